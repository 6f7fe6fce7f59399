"""What serve says about itself in ``/metrics``: signing keys and MQTT connections.

``signing_problems`` loads the online roles' keys as a re-sign would, on a real
repository; ``render_serve_health`` writes the gauges. The whole path (a damaged key
while serve runs a rollout) is ``tests/serve_faults/``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from controller.app import ONLINE_ROLES, ServeState, _check_signing, signing_problems
from controller.repository.repo import init_repository
from controller.serve.metrics import ServeHealth, render_serve_health


def test_a_damaged_key_is_named_and_its_repair_seen(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = tmp_path / "repo"
    init_repository(repo)
    assert signing_problems(repo) == dict.fromkeys(ONLINE_ROLES, "")
    key = repo / "keys" / "timestamp.pem"
    good = key.read_bytes()
    key.write_bytes(b"not a key\n")
    state = ServeState()

    with caplog.at_level(logging.INFO, logger="controller.app"):
        _check_signing(repo, state)
        _check_signing(repo, state)  # said once, not on every check
        assert state.signing_ready == {"rollout": True, "snapshot": True, "timestamp": False}
        said = [r.getMessage() for r in caplog.records if r.name == "controller.app"]
        assert len(said) == 1 and said[0].startswith("cannot sign timestamp metadata"), said
        assert str(key) in said[0] and "repository is still served" in said[0]

        key.write_bytes(good)
        _check_signing(repo, state)
    assert state.signing_ready["timestamp"] is True
    assert caplog.records[-1].getMessage() == "the timestamp key is usable again"


def test_the_gauges() -> None:
    text = render_serve_health(
        ServeHealth({"ingest": False, "announce": True}, {"timestamp": False}, 3)
    )
    assert 'edgefleet_mqtt_connected{client="announce"} 1\n' in text
    assert 'edgefleet_mqtt_connected{client="ingest"} 0\n' in text
    assert 'edgefleet_signing_ready{role="timestamp"} 0\n' in text
    assert "edgefleet_resign_failures_total 3\n" in text
    assert text.count("# HELP") == text.count("# TYPE") == 3
