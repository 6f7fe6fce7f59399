"""The heartbeat hot path: same verdict and figures as the contract's parser, malformed
heartbeats refused and counted (never stored, never fatal to a batch), and the way the
ingest client splits PUBLISH packets out of what it reads."""

from __future__ import annotations

import json
import string
from collections import Counter
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt._packet import decode_publish
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.contracts import (
    ModelFigures,
    PayloadError,
    SystemFigures,
    device_topic,
    parse_telemetry,
    telemetry_payload,
)
from agent.telemetry.reporter import build_heartbeat
from controller.fleet.ingest import Ingestor, IngestSettings, Received, read_packets
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
# Drift (issue 23): absent from the good payload, added (or not) with any value.
_model_fields.update(
    dict.fromkeys(
        ("drift", "input_drift", "drift_samples"),
        st.one_of(st.sampled_from([0, 0.2, 1500, -1, None, True]), _value),
    )
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
        wait_until(lambda: ingestor.is_subscribed, 10, "the ingestor to connect")
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


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, byte = n >> 7, n & 0x7F
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _publish(topic: bytes, payload: bytes, qos: int, mid: int, props: Properties | None) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic
    body += mid.to_bytes(2, "big") if qos else b""
    body += props.pack() if props is not None else b""  # type: ignore[no-untyped-call]
    body += payload
    return bytes([0x30 | qos << 1]) + _varint(len(body)) + body


def _properties(kind: int) -> Properties | None:
    if kind == 0:
        return None
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if kind >= 2:
        props.UserProperty = [("k", "v" * 200)]  # a property length of two bytes
        props.ContentType = "application/json"
        props.MessageExpiryInterval = 60
    return props


@given(
    st.lists(
        st.tuples(
            st.text(min_size=1, max_size=40),
            st.binary(max_size=300),
            st.sampled_from([0, 1]),
            st.integers(1, 65535),
            st.sampled_from([1, 2]),
        ),
        min_size=1,
        max_size=6,
    ),
    st.integers(1, 64),
)
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
def test_read_packets_decodes_publishes_as_paho_does_whatever_the_reads(
    messages: list[tuple[str, bytes, int, int, int]], step: int
) -> None:
    """PUBLISH packets (MQTT 5, with and without properties, QoS 0 and 1) read in pieces
    of any size give what paho's own decoder gives, and a packet of another kind stops the
    reading where it is, for paho to handle."""
    wire = b"".join(_publish(t.encode(), p, q, m, _properties(k)) for t, p, q, m, k in messages)
    expected = []
    for topic, payload, qos, mid, kind in messages:
        packet = _publish(topic.encode(), payload, qos, mid, _properties(kind))
        header_len = 1
        while packet[header_len] & 0x80:
            header_len += 1
        decoded = decode_publish(packet[0], packet[header_len + 1 :], MQTTProtocolVersion.MQTTv5)
        expected.append((decoded.topic.decode(), decoded.payload, decoded.qos, decoded.mid))
    ping = b"\xd0\x00"  # PINGRESP
    wire += ping + wire
    got: list[Received] = []
    others: list[tuple[int, bytes]] = []
    buffer = b""
    for start in range(0, len(wire), step):
        buffer += wire[start : start + step]
        pos = 0
        while True:
            found, other, pos = read_packets(buffer, pos)
            got += found
            if other is None:
                break
            others.append(other)
        buffer = buffer[pos:]
    assert buffer == b""
    assert got == expected + expected
    assert others == [(0xD0, b"")]


def test_read_packets_refuses_a_malformed_publish() -> None:
    # A topic length past the packet's end.
    with pytest.raises((ValueError, IndexError)):
        read_packets(b"\x30\x04\x00\x09ab" + b"\x30\x02\x00\x00" * 4)
    # A remaining length of five bytes.
    with pytest.raises(ValueError, match="four bytes"):
        read_packets(b"\x30\xff\xff\xff\xff\x01")
    # Not all here yet: nothing read, nothing used.
    assert read_packets(b"\x30\x0a\x00\x01t") == ([], None, 0)
