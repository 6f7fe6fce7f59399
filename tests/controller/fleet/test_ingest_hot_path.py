"""The heartbeat hot path: same verdict and figures as the contract's parser, malformed
heartbeats refused and counted (never stored, never fatal to a batch), and the buffered
socket paho reads through."""

from __future__ import annotations

import json
import socket
import string
from collections import Counter
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from agent.contracts import (
    ModelFigures,
    PayloadError,
    SystemFigures,
    device_topic,
    parse_telemetry,
    telemetry_payload,
)
from agent.telemetry.reporter import build_heartbeat
from controller.fleet.ingest import Ingestor, IngestSettings, _BufferedSocket
from controller.fleet.payloads import parse_heartbeat
from controller.fleet.records import heartbeat_facts
from tests.controller.test_store_support import store_for
from tests.e2e_support import wait_until
from tests.helpers import Broker

FLEET, DEVICE = "lab", "cam-1"


def good_payload(device: str = DEVICE, requests: int = 200) -> bytes:
    beat = build_heartbeat(
        device=device,
        fleet=FLEET,
        at="2026-01-01T00:00:00.000Z",
        seq=3,
        interval_s=10.0,
        uptime_s=30.0,
        system=SystemFigures(12.5, 2**29, 2**30, 2**33, 0.4, None),
        models_status={},
        interval={},
    )
    figures = ModelFigures("1.4.0", "committed", requests, 1, 0, 0.004, 0.009, 0.02)
    beat = beat.__class__(**{**beat.__dict__, "models": {"resnet": figures}})
    return telemetry_payload(beat)


def verdict(raw: bytes) -> tuple[str, Any]:
    """("ok", facts) or ("refused", None) of both parsers; they must agree.

    The contract's path is what ingestion did before: parse, then refuse a payload that
    names another device or fleet than the topic (cam-1 of lab here).
    """
    try:
        beat = parse_telemetry(raw)
        on_its_topic = (beat.fleet, beat.device) == (FLEET, DEVICE)
        expected = ("ok", heartbeat_facts(beat)) if on_its_topic else ("refused", None)
    except PayloadError:
        expected = ("refused", None)
    try:
        got = ("ok", parse_heartbeat(FLEET, DEVICE, raw))
    except PayloadError:
        got = ("refused", None)
    assert got == expected, raw
    return got


# Values of every JSON type, in the range both parsers can hold (no NaN, no lone
# surrogates, no NUL, counts within 32 bits: tested on their own below).
_text = st.text(string.ascii_letters + string.digits + "-._ é", max_size=8)
_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**31) + 1, 2**31 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    _text,
)
_value = st.one_of(_scalar, st.lists(_scalar, max_size=2), st.dictionaries(_text, _scalar))
_model_fields = dict.fromkeys(
    ("version", "state", "requests", "errors", "client_errors", "p99_s"),
    st.one_of(st.sampled_from(["", 0, 1.5, True, None]), _value),
)


@st.composite
def _mutated(
    draw: st.DrawFn,
    base: dict[str, Any],
    fields: dict[str, st.SearchStrategy[Any]],
    keep: int = 1,
) -> dict[str, Any]:
    """``base`` with some of ``fields`` dropped or replaced by anything JSON holds
    (each kept with odds ``keep`` to 2)."""
    doc = dict(base)
    for key, values in fields.items():
        change = draw(st.sampled_from(["keep"] * keep + ["drop", "replace"]))
        if change == "drop":
            doc.pop(key, None)
        elif change == "replace":
            doc[key] = draw(values)
    return doc


_good = json.loads(good_payload())
_top_fields = {
    "schema": st.sampled_from(["edgefleet.telemetry/1", "edgefleet.telemetry/2"]),
    "device": st.sampled_from([DEVICE, "cam-2", 7]),
    "fleet": st.sampled_from([FLEET, "north"]),
    "at": st.one_of(_text, st.integers()),
    "seq": st.one_of(_scalar, st.integers(-(2**63) + 1, 2**63 - 1)),
    "interval_s": _scalar,
    "agent_version": _value,
    "system": _value,
    "models": st.one_of(_value, st.dictionaries(_text, _value, max_size=2)),
    "outbox": _value,
}


@st.composite
def _doc(draw: st.DrawFn) -> dict[str, Any]:
    """A real heartbeat whose fields, nested ones too, are kept, dropped or replaced."""
    doc = dict(_good)
    doc["system"] = draw(
        _mutated(_good["system"], dict.fromkeys(SystemFigures.__dataclass_fields__, _scalar))
    )
    models = draw(st.lists(_mutated(_good["models"]["resnet"], _model_fields), max_size=3))
    doc["models"] = {f"m{i}": m for i, m in enumerate(models)}
    doc["outbox"] = draw(_mutated(_good["outbox"], {"pending": _scalar, "dropped": _scalar}))
    return draw(_mutated(doc, _top_fields, keep=12))


def test_the_hot_path_agrees_with_the_contract_parser() -> None:
    kinds: Counter[str] = Counter()

    @settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
    @given(_doc())
    def check(doc: dict[str, Any]) -> None:
        kinds[verdict(json.dumps(doc).encode())[0]] += 1

    check()
    # Both verdicts often enough that the figures of accepted heartbeats are compared too.
    assert kinds["ok"] > 200 and kinds["refused"] > 200, kinds


def test_a_real_heartbeat_is_accepted_with_its_figures() -> None:
    kind, facts = verdict(good_payload())
    assert kind == "ok"
    assert facts.models == (("resnet", "1.4.0", "committed", 200, 1, 0, 0.02),)
    assert facts.system["cpu_percent"] == 12.5 and facts.system["temperature_c"] is None
    assert (facts.at, facts.seq) == ("2026-01-01T00:00:00.000Z", 3)  # what identifies it


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"\x00garbage", "not valid JSON"),
        (json.dumps({"a": 1}).encode("utf-16"), "not valid JSON"),  # json.loads takes it
        (b"[1, 2]", "expected a JSON object"),
        (good_payload().replace(b"0.02", b"NaN"), "not valid JSON"),
        (good_payload().replace(b'"1.4.0"', b'"\\ud800"'), "not valid JSON"),
        (good_payload().replace(b'"1.4.0"', b'"1.4\\u0000"'), "NUL"),
        (good_payload(requests=2**40), "requests expected at most"),
        (good_payload().replace(b'"seq":3', b'"seq":%d' % 2**63), "seq expected at most"),
        (good_payload().replace(b'"at":"', b'"at":"\\u0000'), "at holds a NUL"),
        (good_payload(device="cam-2"), "arrived on the topic of lab/cam-1"),
        (good_payload().replace(b'"models":{', b'"modelz":{'), "'models' expected an object"),
    ],
)
def test_what_no_store_can_hold_is_refused_naming_why(raw: bytes, why: str) -> None:
    with pytest.raises(PayloadError, match=why):
        parse_heartbeat(FLEET, DEVICE, raw)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_malformed_heartbeats_are_counted_and_the_rest_of_the_batch_is_stored(
    tmp_path: Path, broker: Broker, backend: str
) -> None:
    """One batch mixes good heartbeats with ones that would break the store's transaction
    (a 2**40 count overflows PostgreSQL's INTEGER, NUL is refused by its TEXT)."""
    bad = [
        b"not json",
        good_payload(requests=2**40),
        good_payload().replace(b'"1.4.0"', b'"\\u0000"'),
        good_payload(device="other"),  # on cam-1's topic
    ]
    with store_for(backend, tmp_path) as store:
        ingestor = Ingestor(
            IngestSettings(broker.host, broker.port, client_id=f"hot-{backend}", flush_s=0.5),
            store,
        )
        ingestor.start()
        wait_until(lambda: ingestor.is_connected, 10, "the ingestor to connect")
        publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="hot-sim")
        publisher.connect(broker.host, broker.port)
        publisher.loop_start()
        try:
            infos = [
                publisher.publish(device_topic(FLEET, f"d{i}", "telemetry"), good_payload(f"d{i}"))
                for i in range(50)
            ]
            topic = device_topic(FLEET, DEVICE, "telemetry")
            infos += [publisher.publish(topic, raw, qos=1) for raw in bad]
            infos.append(publisher.publish(device_topic(FLEET, "last", "telemetry"), b"{}"))
            infos.append(publisher.publish(topic, good_payload(), qos=1))
            for info in infos:
                info.wait_for_publish(timeout=10)
            wait_until(lambda: ingestor.counts["heartbeats"] == 51, 20, "the good heartbeats")
        finally:
            publisher.loop_stop()
            publisher.disconnect()
            ingestor.stop()
        assert ingestor.counts["rejected"] == len(bad) + 1
        assert ingestor.counts["lost"] == 0
        assert store.count("heartbeats") == 51 and store.count("devices") == 51
        (beat,) = store.heartbeats(DEVICE)
        assert beat.payload == json.loads(good_payload())  # kept as received


def test_the_buffered_socket_serves_small_reads_from_one_receive() -> None:
    left, right = socket.socketpair()
    try:
        left.setblocking(False)
        buffered = _BufferedSocket(left)
        right.sendall(b"\x30\x05hello\x30\x02hi")
        assert buffered.recv(1) == b"\x30"  # one recv of up to 64 KiB behind it
        assert buffered.pending() == 10
        assert [buffered.recv(1), buffered.recv(5)] == [b"\x05", b"hello"]
        assert buffered.recv(100) == b"\x30\x02hi"  # a short read, as recv may return
        assert buffered.pending() == 0
        with pytest.raises(BlockingIOError):
            buffered.recv(1)
        right.sendall(b"x" * 100)
        assert buffered.recv(100) == b"x" * 100  # large enough: returned without copying
        assert buffered.fileno() == left.fileno()  # the rest is the socket's
    finally:
        left.close()
        right.close()
