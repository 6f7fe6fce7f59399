"""The chaos harness itself: its plan is a function of the seed, its invariants fail when
they must, and each proxy fault does to a real client what it says.

Fast: pure functions, and the proxy between a real HTTP server (or a TCP echo server) and
a real client, all on loopback.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest

from agent.update.journal import JournalRecord, Phase
from tests.chaos import invariants as inv
from tests.chaos import schedule as sch
from tests.chaos.fleet import agent_threads
from tests.chaos.proxy import FaultLog, FaultProxy, ProxyHub, ProxySettings, Switch

DEVICES = [f"dev-{i:02d}" for i in range(6)]
FLEETS = ("lab", "field")


def _plan(seed: int, duration_s: float = 150.0) -> sch.Plan:
    return sch.make_plan(
        seed, duration_s, DEVICES, disk_device="dev-03", clock_device="dev-01", fleets=FLEETS
    )


def test_the_stack_dump_of_a_stuck_agent_names_its_waiting_threads(tmp_path: Path) -> None:
    """``agent_threads`` reads a real faulthandler dump (what SIGUSR1 makes an agent write):
    the threads standing in the project's code, the last dump only."""
    script = tmp_path / "agent" / "stuck.py"
    script.parent.mkdir()
    script.write_text(
        "import faulthandler, sys, threading, time\n"
        "faulthandler.dump_traceback(all_threads=True)  # an earlier dump\n"
        "def waits_for_the_lock():\n"
        "    threading.Event().wait(5)\n"
        "threading.Thread(target=waits_for_the_lock, daemon=True).start()\n"
        "time.sleep(0.3)\n"
        "print('a log line', file=sys.stderr)\n"
        "faulthandler.dump_traceback(all_threads=True)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=30)
    threads = agent_threads(done.stderr).split(" || ")
    assert len(threads) == 2, done.stderr
    assert any("stuck.py:4 waits_for_the_lock" in t for t in threads), threads
    assert agent_threads("no dump in this log\n") == ""


# ---------------------------------------------------------------------------- the plan


def test_the_same_seed_gives_the_same_plan_and_another_seed_another() -> None:
    assert _plan(7) == _plan(7)
    assert _plan(7).steps != _plan(8).steps


@pytest.mark.parametrize("seed", range(20))
def test_every_plan_exercises_every_kind_and_closes_every_episode(seed: int) -> None:
    plan = _plan(seed)
    actions = {s.action for s in plan.steps}
    assert {
        sch.AGENT_SIGKILL,
        sch.SERVE_SIGKILL,
        sch.BROKER_RESTART,
        sch.DISK_FULL,
        sch.CLOCK_STEP,
    } <= actions
    assert [s.at_s for s in plan.steps] == sorted(s.at_s for s in plan.steps)
    assert all(0 <= s.at_s < plan.duration_s for s in plan.steps)
    closing = {
        sch.AGENT_SIGKILL: sch.AGENT_START,
        sch.SERVE_SIGKILL: sch.SERVE_START,
        sch.BROKER_RESTART: sch.BROKER_START,
        sch.DISK_FULL: sch.DISK_FREE,
    }
    open_: dict[tuple[str, str], bool] = {}
    for step in plan.steps:
        for opening, close in closing.items():
            key = (opening, step.target)
            if step.action == opening:
                assert not open_.get(key), f"{key} opened twice at {step.at_s}"
                open_[key] = True
            elif step.action == close:
                assert open_.get(key), f"{key} closed before it opened at {step.at_s}"
                open_[key] = False
    assert not any(open_.values())


def test_the_releases_ship_new_versions_of_each_fleet_and_one_bad_per_cycle() -> None:
    plan = _plan(3)
    versions = [r.version for r in plan.releases]
    assert len(versions) == len(set(versions))
    assert all(r.version.startswith("1.") for r in plan.releases if r.fleet == "lab")
    assert all(r.version.startswith("2.") for r in plan.releases if r.fleet == "field")
    assert sum(r.bad for r in plan.releases) == 2 and all(
        r.how == "rollout" for r in plan.releases if r.bad
    )
    assert sch.final_version(plan, FLEETS, "lab") not in versions


# ---------------------------------------------------------------------------- invariants


def test_an_answer_of_an_unsigned_version_or_with_other_outputs_is_a_violation() -> None:
    out = np.array([[0.1, 0.2, 0.7]], dtype=np.float32)
    expected = {"1.0.0": out}
    assert inv.judge_answer("lab", {"1.0.0"}, expected, "1.0.0", out.copy()) is None
    assert "never signed for fleet lab" in str(
        inv.judge_answer("lab", {"1.0.0"}, expected, "2.0.0", out)
    )
    assert "does not compute" in str(
        inv.judge_answer("lab", {"1.0.0"}, expected, "1.0.0", out + 0.01)
    )
    assert "no answer" in str(inv.judge_answer("lab", {"1.0.0", "1.1.0"}, expected, "1.1.0", out))


def test_a_failure_is_excused_only_while_the_agent_is_down_or_the_bad_release_is_young() -> None:
    bad = "model 'linear' 1.2.0 failed to run: Gather out of bounds"
    common = {"model": "linear", "bad_versions": {"1.2.0"}, "started": 10.0, "ended": 10.5}
    down = [inv.DownWindow(9.0, 10.2)]
    assert (
        inv.classify_failure("refused", large_input=False, windows=down, **common) == "agent down"
    )
    assert (
        inv.classify_failure("refused", large_input=False, windows=[inv.DownWindow(3, 9)], **common)
        is None
    )
    assert (
        inv.classify_failure("refused", large_input=False, windows=[inv.DownWindow(9.0)], **common)
        == "agent down"
    )
    assert inv.classify_failure(bad, large_input=True, windows=[], **common) == "bad release"
    assert inv.classify_failure(bad, large_input=False, windows=[], **common) is None
    late = inv.BAD_RELEASE_GRACE_S + 1
    assert (
        inv.classify_failure(bad, large_input=True, windows=[], bad_streak_s=late, **common) is None
    )
    good = "model 'linear' 1.1.0 failed to run: Gather out of bounds"
    assert inv.classify_failure(good, large_input=True, windows=[], **common) is None


def test_convergence_accepts_the_desired_version_or_a_documented_way_back_only() -> None:
    desired = ("1.2.0", "bundles/linear/1.2.0.bundle")
    rolled = JournalRecord("linear", Phase.ROLLED_BACK, "1.2.0", "1.1.0", rollout_id="r1")
    assert inv.judge_convergence(desired, "r1", "1.2.0", None) is None
    assert inv.judge_convergence(desired, "r1", "1.1.0", rolled) is None
    assert inv.judge_convergence(desired, "r2", "1.1.0", rolled) is not None  # another rollout
    committed = JournalRecord("linear", Phase.COMMITTED, "1.1.0", "1.0.0", rollout_id="r1")
    assert "desired 1.2.0" in str(inv.judge_convergence(desired, "r1", "1.1.0", committed))
    assert inv.judge_convergence(None, "", None, None) is None


def _stored(*seqs: int, stream: str = "s1") -> list[inv.StoredEvent]:
    return [inv.StoredEvent(i, stream, seq, "k") for i, seq in enumerate(seqs, start=1)]


def test_the_event_check_finds_losses_duplicates_disorder_and_strangers() -> None:
    ledger = inv.Ledger("s1", last_seq=4, dropped=0, pending=0)
    assert inv.check_events(ledger, _stored(1, 2, 3, 4), {1: "k"}) == []
    assert "missing seq 2-3 of 1..4" in inv.check_events(ledger, _stored(1, 4), {})[0]
    assert "out of order" in " ".join(inv.check_events(ledger, _stored(1, 3, 2, 4), {}))
    assert "more than once" in " ".join(inv.check_events(ledger, _stored(1, 2, 2, 3, 4), {}))
    strangers = _stored(1, 2, 3, 4) + _stored(1, stream="s9")
    assert "streams the outbox never had" in " ".join(inv.check_events(ledger, strangers, {}))
    assert "another kind" in " ".join(inv.check_events(ledger, _stored(1, 2, 3, 4), {2: "x"}))
    assert "dropped" in " ".join(
        inv.check_events(inv.Ledger("s1", 4, 1, 0), _stored(1, 2, 3, 4), {})
    )


def test_violations_name_the_seed_and_count_beyond_what_they_keep() -> None:
    found = inv.Violations(seed=4242)
    for n in range(inv.Violations.KEEP + 3):
        found.add(inv.EVENTS, "dev-01", f"problem {n}")
    assert found.total == inv.Violations.KEEP + 3
    assert found.report().startswith("seed 4242: [no event lost] dev-01: problem 0")
    assert "and 3 more" in found.report()


# ---------------------------------------------------------------------------- the proxies


BODY = b'{"signed": {"_type": "timestamp", "version": 7}, "signatures": []}' * 20


class _Files(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def hub() -> Iterator[ProxyHub]:
    h = ProxyHub()
    yield h
    h.close()


def _proxy(
    hub: ProxyHub, tmp_path: Path, protocol: str, port: int, only: str
) -> tuple[FaultProxy, FaultLog]:
    log = FaultLog(tmp_path / f"{only}.log")
    switch = Switch()
    switch.set(True)
    settings = ProxySettings(
        http_fault_rate=1.0,
        only=only,
        mqtt_fault_after_s=(0.05, 0.1),
        mqtt_stall_max_s=0.5,
        http_stall_max_s=0.5,
    )
    proxy = hub.add(
        FaultProxy("p", protocol, port, seed=1, log=log, switch=switch, settings=settings)
    )
    return proxy, log


def _get(port: int, path: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)


@pytest.mark.parametrize(
    ("kind", "path", "effect"),
    [
        ("http.5xx", "/metadata/timestamp.json", "5xx"),
        ("http.garbage", "/metadata/timestamp.json", "error"),
        ("http.reset", "/metadata/timestamp.json", "error"),
        ("http.truncate", "/metadata/timestamp.json", "error"),
        ("http.stall", "/metadata/timestamp.json", "intact"),
        ("http.corrupt", "/metadata/3.rollout.json", "altered"),
        ("http.corrupt", "/targets/bundles/m/abc.1.0.0.bundle", "altered"),
        ("http.oversize", "/metadata/timestamp.json", "longer"),
    ],
)
def test_each_http_fault_reaches_a_real_client_as_it_says(
    hub: ProxyHub, upstream: int, tmp_path: Path, kind: str, path: str, effect: str
) -> None:
    proxy, log = _proxy(hub, tmp_path, "http", upstream, kind)
    for _ in range(5):
        try:
            response = _get(proxy.port, path)
        except httpx.HTTPError:
            assert effect == "error", kind
            continue
        if effect == "5xx":
            assert 500 <= response.status_code < 600
        elif effect == "intact":
            assert response.status_code == 200 and response.content == BODY
        elif effect == "altered":
            assert response.status_code == 200 and response.content != BODY
        elif effect == "longer":
            assert response.content.startswith(BODY) and len(response.content) > len(BODY)
        else:
            raise AssertionError(f"{kind}: a clean answer: {response}")
    counted = log.snapshot()
    assert sum(counted.values()) == 5, counted
    if kind == "http.corrupt":
        assert set(counted) == {
            "http.corrupt_metadata" if "/metadata/" in path else "http.corrupt_target"
        }
    else:
        assert set(counted) == {kind}


def test_with_the_switch_off_the_proxy_forwards_untouched(
    hub: ProxyHub, upstream: int, tmp_path: Path
) -> None:
    proxy, log = _proxy(hub, tmp_path, "http", upstream, "http.truncate")
    proxy._switch.set(False)
    with httpx.Client(timeout=5) as client:
        for _ in range(5):
            assert client.get(f"http://127.0.0.1:{proxy.port}/metadata/x.json").content == BODY
    assert log.total() == 0


@pytest.fixture
def echo() -> Iterator[int]:
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(5)
    server.close()


def _echo(conn: socket.socket) -> None:
    with conn, contextlib.suppress(OSError):  # the proxy may reset it
        while data := conn.recv(4096):
            conn.sendall(data)


def _exchange(port: int, seconds: float) -> tuple[bool, int, int]:
    """Send a small packet every 20 ms for ``seconds`` (or until the connection closes);
    return (closed, bytes sent, bytes echoed back)."""
    sent = echoed = 0
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.settimeout(0.02)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                conn.sendall(b"\x30\x02ab")
                sent += 4
                chunk = conn.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return True, sent, echoed
            if not chunk:
                return True, sent, echoed
            echoed += len(chunk)
        conn.settimeout(2)
        with contextlib.suppress(TimeoutError, OSError):
            while echoed < sent and (chunk := conn.recv(4096)):
                echoed += len(chunk)
    return False, sent, echoed


@pytest.mark.parametrize("kind", ["mqtt.reset", "mqtt.truncate", "mqtt.garbage"])
def test_an_mqtt_fault_that_ends_a_connection_ends_it(
    hub: ProxyHub, echo: int, tmp_path: Path, kind: str
) -> None:
    proxy, log = _proxy(hub, tmp_path, "mqtt", echo, kind)
    closed, _, _ = _exchange(proxy.port, 5.0)
    assert closed
    assert log.snapshot() == {kind: 1}


def test_an_mqtt_stall_holds_the_bytes_and_then_delivers_them(
    hub: ProxyHub, echo: int, tmp_path: Path
) -> None:
    proxy, log = _proxy(hub, tmp_path, "mqtt", echo, "mqtt.stall")
    closed, sent, echoed = _exchange(proxy.port, 1.5)
    assert not closed and echoed == sent
    assert log.snapshot().get("mqtt.stall", 0) >= 1
