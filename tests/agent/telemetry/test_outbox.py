"""The bounded on-disk outbox: order, durability across reopen, oldest dropped first."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from agent.telemetry.outbox import Outbox


def _append(outbox: Outbox, n: int) -> list[int]:
    return [
        outbox.append("t", lambda stream, seq: json.dumps({"s": stream, "q": seq}).encode())
        for _ in range(n)
    ]


def test_events_come_out_in_order_and_leave_only_when_removed(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.sqlite", max_events=100)
    assert _append(outbox, 5) == [1, 2, 3, 4, 5]
    items = outbox.peek(3)
    assert [i.seq for i in items] == [1, 2, 3]
    assert json.loads(items[0].payload) == {"s": outbox.stream, "q": 1}
    outbox.remove([1, 2])
    assert [i.seq for i in outbox.peek(10)] == [3, 4, 5]
    assert outbox.pending == 3 and outbox.dropped == 0


def test_pending_events_stream_and_numbering_survive_a_restart(tmp_path: Path) -> None:
    first = Outbox(tmp_path / "o.sqlite", max_events=100)
    _append(first, 3)
    first.remove([1])
    stream = first.stream
    first.close()
    again = Outbox(tmp_path / "o.sqlite", max_events=100)
    assert again.stream == stream
    assert [i.seq for i in again.peek(10)] == [2, 3]
    assert _append(again, 1) == [4]  # numbers are never reused, even after removal


def test_past_the_bound_the_oldest_are_dropped_and_counted(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.sqlite", max_events=10)
    _append(outbox, 25)
    assert outbox.pending == 10
    assert [i.seq for i in outbox.peek(100)] == list(range(16, 26))
    assert outbox.dropped == 15
    outbox.close()
    assert Outbox(tmp_path / "o.sqlite", max_events=10).dropped == 15


def test_a_new_file_gets_a_new_stream(tmp_path: Path) -> None:
    a = Outbox(tmp_path / "a.sqlite", max_events=10)
    b = Outbox(tmp_path / "b.sqlite", max_events=10)
    assert a.stream != b.stream


def test_concurrent_producers_get_distinct_consecutive_numbers(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.sqlite", max_events=10_000)
    got: list[int] = []
    lock = threading.Lock()

    def produce() -> None:
        seqs = _append(outbox, 50)
        with lock:
            got.extend(seqs)

    threads = [threading.Thread(target=produce) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 201))
    assert [i.seq for i in outbox.peek(1000)] == list(range(1, 201))


def test_wait_for_events_wakes_on_append(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.sqlite", max_events=10)
    assert outbox.wait_for_events(0.01) is False
    timer = threading.Timer(0.05, lambda: _append(outbox, 1))
    timer.start()
    assert outbox.wait_for_events(10) is True
    timer.join()
