"""The bounded on-disk outbox: order, durability across reopen, oldest dropped first; and
on a real full disk (a small tmpfs filled to the last byte), events held in memory, in
order, until the disk has room."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from agent.telemetry.outbox import Outbox

if TYPE_CHECKING:
    from tests.chaos.fleet import StateDisk


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


# ---------------------------------------------------------------------------- a full disk


def _seqs(outbox: Outbox) -> list[int]:
    return [i.seq for i in outbox.peek(1000)]


def test_events_a_full_disk_refuses_are_held_in_order_and_written_once_it_has_room(
    small_disk: StateDisk,
) -> None:
    path = small_disk.state_dir / "o.sqlite"
    outbox = Outbox(path, max_events=100)
    assert _append(outbox, 3) == [1, 2, 3]
    small_disk.fill()
    assert _append(outbox, 2) == [4, 5]  # no error: held in memory
    assert outbox.held == 2 and outbox.pending == 5 and outbox.last_seq == 5
    assert _seqs(outbox) == [1, 2, 3]  # only what is on disk is offered to the sender
    assert outbox.persist_held() is False
    small_disk.free()
    assert outbox.persist_held() is True
    assert outbox.held == 0 and _seqs(outbox) == [1, 2, 3, 4, 5]
    assert json.loads(outbox.peek(5)[4].payload) == {"s": outbox.stream, "q": 5}
    outbox.close()
    again = Outbox(path, max_events=100)
    assert _seqs(again) == [1, 2, 3, 4, 5] and again.dropped == 0
    assert _append(again, 1) == [6]


def test_an_event_appended_after_the_disk_frees_goes_after_those_held(
    small_disk: StateDisk,
) -> None:
    outbox = Outbox(small_disk.state_dir / "o.sqlite", max_events=100)
    _append(outbox, 1)
    small_disk.fill()
    _append(outbox, 2)
    small_disk.free()
    assert _append(outbox, 1) == [4]
    assert outbox.held == 0 and _seqs(outbox) == [1, 2, 3, 4]


def test_past_the_memory_bound_the_oldest_held_event_is_dropped_and_counted(
    small_disk: StateDisk,
) -> None:
    path = small_disk.state_dir / "o.sqlite"
    outbox = Outbox(path, max_events=100, max_held=3)
    _append(outbox, 1)
    small_disk.fill()
    assert _append(outbox, 5) == [2, 3, 4, 5, 6]
    assert outbox.held == 3 and outbox.dropped == 2
    small_disk.free()
    assert outbox.persist_held()
    assert _seqs(outbox) == [1, 4, 5, 6]
    outbox.close()
    assert Outbox(path, max_events=100).dropped == 2


def test_an_acknowledged_event_the_full_disk_cannot_forget_is_not_offered_again(
    small_disk: StateDisk,
) -> None:
    path = small_disk.state_dir / "o.sqlite"
    outbox = Outbox(path, max_events=100)
    _append(outbox, 3)
    small_disk.fill()
    outbox.remove([1, 2])  # no error: remembered
    assert _seqs(outbox) == [3] and outbox.pending == 1
    small_disk.free()
    assert _append(outbox, 1) == [4]
    outbox.close()
    assert _seqs(Outbox(path, max_events=100)) == [3, 4]


def test_an_outbox_opened_on_a_full_disk_keeps_its_stream_and_numbers(
    small_disk: StateDisk,
) -> None:
    path = small_disk.state_dir / "o.sqlite"
    first = Outbox(path, max_events=100)
    _append(first, 2)
    first.remove([1])
    stream = first.stream
    first.close()  # a clean stop: SQLite removes its -wal and -shm files
    small_disk.fill()  # no room left to create them again
    again = Outbox(path, max_events=100)
    assert again.stream == stream and again.last_seq == 2
    assert _append(again, 1) == [3] and again.held == 1
    assert _seqs(again) == []  # the file is out of reach until the disk has room
    small_disk.free()
    assert again.persist_held()
    assert _seqs(again) == [2, 3]
    assert json.loads(again.peek(2)[1].payload) == {"s": stream, "q": 3}


def test_a_new_outbox_on_a_full_disk_writes_its_events_once_it_can(
    small_disk: StateDisk,
) -> None:
    path = small_disk.state_dir / "o.sqlite"
    small_disk.fill()
    outbox = Outbox(path, max_events=100)
    assert _append(outbox, 2) == [1, 2]
    small_disk.free()
    assert outbox.persist_held()
    stream = outbox.stream
    outbox.close()
    again = Outbox(path, max_events=100)
    assert again.stream == stream and _seqs(again) == [1, 2]


def test_events_still_held_at_close_are_named_as_lost(
    small_disk: StateDisk, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = Outbox(small_disk.state_dir / "o.sqlite", max_events=100)
    _append(outbox, 1)
    small_disk.fill()
    _append(outbox, 2)
    with caplog.at_level(logging.ERROR, logger="agent.telemetry.outbox"):
        outbox.close()
    assert "2 event(s) held in memory are lost (seq 2-3)" in caplog.text
