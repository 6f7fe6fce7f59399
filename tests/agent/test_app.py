"""The composition root's pure pieces: the loops' pass deadlines, how long each may go
without a pass, and the update loop's back-off (the loops themselves run in a real agent:
tests/test_update_liveness.py, tests/test_clock_step.py); and the repository index it
gives the inference server."""

from __future__ import annotations

import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.app import (
    AgentApp,
    IdleBounds,
    PassDeadlines,
    idle_bounds,
    pass_deadlines,
    retry_delay_s,
)
from agent.device.config import AgentConfig, InstallConfig, RepositoryConfig, TelemetryConfig
from agent.device.liveness import Liveness
from agent.runtime.loading import load_model
from agent.serving.triton import IndexEntry
from agent.update.journal import JournalRecord, Phase
from tests.agent._model_dir import make_model_dir
from tests.helpers import ManualClock


def _config(tmp_path: Path) -> AgentConfig:
    return AgentConfig(
        device_id="dev-1",
        fleet="lab",
        state_dir=tmp_path / "state",
        trusted_root=tmp_path / "root.json",
        repository=RepositoryConfig(
            url="http://127.0.0.1:1",
            download_deadline_s=100.0,
            poll_interval_s=300.0,
            poll_jitter_s=30.0,
        ),
        install=InstallConfig(
            unpack_deadline_s=10.0,
            smoke_test_deadline_s=20.0,
            activate_deadline_s=5.0,
            probation_tick_s=1.0,
        ),
        telemetry=TelemetryConfig(heartbeat_interval_s=10.0),
    )


def test_pass_deadlines_follow_the_config(tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert pass_deadlines(config) == PassDeadlines(
        update_s=100.0 + 60.0,  # the longest step that reports no progress, and slack
        probation_s=20.0 + 5.0 + 60.0,  # a rollback's load and swap, and slack
        telemetry_s=60.0,  # at least a minute
    )
    slow = replace(config, telemetry=TelemetryConfig(heartbeat_interval_s=45.0))
    assert pass_deadlines(slow).telemetry_s == 90.0


def test_the_update_pass_is_bounded_by_its_longest_silent_step(tmp_path: Path) -> None:
    """A smoke test longer than a download's deadline is the longest step then."""
    config = _config(tmp_path)
    slow = replace(config, install=replace(config.install, smoke_test_deadline_s=300.0))
    assert pass_deadlines(slow).update_s == 300.0 + 60.0


def test_a_transfer_of_the_update_check_renews_its_pass(tmp_path: Path) -> None:
    """The update check's fetcher reports each transfer's progress to the watchdog: a
    pass that downloads is renewed, a pass that hangs is not (real HTTP on 127.0.0.1)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"m" * 1000)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    config = _config(tmp_path)
    app = AgentApp(replace(config, repository=replace(config.repository, url=base)))
    clock = ManualClock()
    app.liveness = Liveness(clock)
    try:
        app.liveness.watch("update", lambda: True)
        app.liveness.begin("update", 10.0)
        clock.now += 50.0
        assert not app.liveness.verdict().is_healthy  # 50 s into a 10 s pass
        fetcher = app.updates._fetcher  # the one a check of the first source uses
        assert fetcher.download_bytes(f"{base}/metadata/1.root.json", 2000) == b"m" * 1000
        assert app.liveness.verdict().is_healthy  # renewed by the transfer
        clock.now += 11.0
        assert not app.liveness.verdict().is_healthy  # nothing since: a hang shows
    finally:
        app.updates.close()
        app.outbox.close()
        httpd.shutdown()
        httpd.server_close()


def test_a_loop_is_late_after_its_longest_gap_and_a_minute(tmp_path: Path) -> None:
    assert idle_bounds(_config(tmp_path)) == IdleBounds(
        update_s=300.0 + 2 * 30.0 + 60.0,  # a poll early, the next late, and slack
        probation_s=1.0 + 60.0,
        telemetry_s=10.0 + 60.0,
    )


def test_the_retry_delay_doubles_up_to_the_poll_interval() -> None:
    assert [retry_delay_s(n, 5.0, 300.0) for n in range(1, 9)] == [
        5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0,
    ]  # fmt: skip
    assert retry_delay_s(10_000, 5.0, 300.0) == 300.0
    assert retry_delay_s(1, 5.0, 1.0) == 1.0  # a poll shorter than the first delay wins
    with pytest.raises(ValueError, match="failures expected >= 1, got 0"):
        retry_delay_s(0, 5.0, 300.0)


def test_the_repository_index_lists_what_the_store_holds_and_what_serves(
    tmp_path: Path, linear_model: Path
) -> None:
    app = AgentApp(_config(tmp_path))
    try:
        assert app.repository_index() == []
        make_model_dir(app.store.version_dir("linear", "1.0.0"), linear_model, version="1.0.0")
        live = make_model_dir(
            app.store.version_dir("linear", "2.0.0"), linear_model, version="2.0.0"
        )
        app.registry.activate(load_model(*live))
        record = JournalRecord("linear", Phase.ACTIVE, version="2.0.0", previous="1.0.0")
        app.store.write_journal(record)
        assert app.repository_index() == [
            IndexEntry(
                "linear", "1.0.0", "UNAVAILABLE", "the previous version, kept for a rollback"
            ),
            IndexEntry("linear", "2.0.0", "READY", "serving, on probation"),
        ]
        # What the server answers is what the app says.
        assert app.server._router._repository() == app.repository_index()
    finally:
        app.outbox.close()
        app.updates.close()
