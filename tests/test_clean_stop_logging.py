"""A clean stop is not a lost connection (issue 20, item 11): on SIGTERM both programs
logged "lost the broker connection … reconnecting" as a WARNING. Each MQTT client, on a
private mosquitto, is stopped cleanly (no WARNING about the broker) and, as a control,
cut off by the broker going away (the WARNING still comes)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from agent.telemetry.mqtt import MqttLink
from controller.fleet.stores import open_store
from controller.serve.announcer import Announcer
from tests.controller.fleet.test_ingest import agent_config, ingestor_for
from tests.e2e_support import wait_until
from tests.helpers import Broker, start_broker


def _lost(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and "lost" in r.getMessage()
    ]


def _agent_link(tmp_path: Path, broker: Broker) -> MqttLink:
    link = MqttLink(agent_config(tmp_path, broker.port), lambda _v: None, lambda: {})
    link.start()
    wait_until(lambda: link.is_connected, 10, "the agent's link to connect")
    return link


def _announcer(broker: Broker) -> Announcer:
    announcer = Announcer(broker.host, broker.port, "announcer-test")
    announcer.start()
    wait_until(lambda: announcer.is_connected, 10, "the announcer to connect")
    return announcer


@pytest.mark.parametrize("client", ["agent", "announcer", "ingest"])
def test_a_clean_stop_logs_no_lost_connection(
    tmp_path: Path, broker: Broker, caplog: pytest.LogCaptureFixture, client: str
) -> None:
    with caplog.at_level(logging.INFO):
        if client == "agent":
            _agent_link(tmp_path, broker).stop()
        elif client == "announcer":
            _announcer(broker).stop()
        else:
            store = open_store(str(tmp_path / "telemetry.sqlite"))
            try:
                ingestor_for(broker, store, "ingest-stop").stop()
            finally:
                store.close()
    assert _lost(caplog) == []
    assert any("stopping" in r.getMessage() for r in caplog.records)


def test_a_broker_that_goes_away_is_still_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = start_broker(tmp_path / "broker")
    link = announcer = None
    try:
        link = _agent_link(tmp_path, broker)
        announcer = _announcer(broker)
        with caplog.at_level(logging.INFO):
            broker.stop()
            wait_until(lambda: len(_lost(caplog)) >= 2 or None, 20, "both to see the loss")
    finally:
        for c in (link, announcer):
            if c is not None:
                c.stop()
        broker.stop()
