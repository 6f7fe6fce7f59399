"""One bad message cannot stop ingestion (issue 19, defect 3).

Before: the contract's parsers let through a ``seq`` beyond 64 bits, lone surrogates and
NUL characters, the store then raised something other than PayloadError, and the writer
retried the same batch forever, acknowledging nothing (an event nested too deeply for
``json`` even killed the writer thread). Now the parsers refuse what the stores cannot
hold, and a batch the store still refuses for what it holds is split until the message it
refuses is alone: that one is dropped and counted, the rest stored and acknowledged.

Real parts: a private mosquitto, the real ``Ingestor``, SQLite files and PostgreSQL
schemas. A message the parsers let through but the store refuses is made with the
store's own means: a CHECK constraint (PostgreSQL) or a trigger (SQLite) refusing events
whose ``reason`` is ``poison``, as a gap between parser and store would.
"""

from __future__ import annotations

import json
import logging
import operator
import random
import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from agent.contracts import (
    MAX_TEXT,
    Event,
    PayloadError,
    device_topic,
    event_payload,
    parse_event,
    parse_status,
    parse_telemetry,
)
from controller.fleet.ingest import Ingestor, IngestSettings
from controller.fleet.payloads import add_payload, add_to_batch, parse_message
from controller.fleet.records import FleetAggregates, IngestBatch
from controller.fleet.roster import POISON
from controller.fleet.sqlite import SqliteStore
from controller.fleet.store import TelemetryStore
from controller.fleet.stores import is_postgres, open_store
from controller.serve.metrics import render_aggregates
from tests.controller.fleet.test_ingest_hot_path import good_payload
from tests.controller.test_store_support import store_for, store_location
from tests.e2e_support import wait_until
from tests.helpers import Broker

FLEET, DEVICE = "lab", "dev-1"
EVENTS = device_topic(FLEET, DEVICE, "events")


def event(seq: int, **fields: Any) -> bytes:
    """An event of dev-1 as its agent sends it, with ``fields`` replaced."""
    doc = json.loads(
        event_payload(
            Event(DEVICE, FLEET, "s1", 1, "2026-12-03T10:00:00Z", "committed", "m", "1.0.0")
        )
    )
    doc.update(seq=seq, **fields)
    return json.dumps(doc).encode()  # ensure_ascii: a lone surrogate travels as \udXXX


def status(**fields: Any) -> bytes:
    doc = {
        "schema": "edgefleet.status/1",
        "device": DEVICE,
        "fleet": FLEET,
        "online": True,
        "agent_version": "1.0",
        "models": {"m": {"version": "1.0.0", "state": "committed"}},
        "at": "2026-12-03T10:00:00Z",
        **fields,
    }
    return json.dumps(doc).encode()


def heartbeat(change: Any) -> bytes:
    doc = json.loads(good_payload(device=DEVICE))
    change(doc)
    return json.dumps(doc).encode()


# What each store refused, or took differently, before the parsers refused it.
ASTRAL = "\U0001f600"  # 4 bytes in UTF-8
REFUSED_EVENTS = {
    "seq 2**63": event(2**63),
    "seq 2**64": event(2**64),
    "lone surrogate in stream": event(1, stream="\ud800"),
    "lone surrogate in reason": event(1, reason="ok \udfff"),
    "lone surrogate in an unknown field": event(1, extra=["\ud83d"]),
    "NUL in stream": event(1, stream="a\x00"),
    "NUL in at": event(1, at="\x00"),
    "NUL in model": event(1, model="m\x00"),
    "NUL in version": event(1, version="\x00"),
    "NUL in rollout_id": event(1, rollout_id="\x00"),
    "NUL in reason": event(1, reason="\x00"),
    "stream too long to index": event(1, stream=ASTRAL * (MAX_TEXT + 1)),
    "model too long to index": event(1, model="m" * (MAX_TEXT + 1)),
    "NaN": event(1, extra=float("nan")),
    "nested too deeply": b'{"a":' * 100_000,
}
REFUSED_STATUSES = {
    "NUL in a model name": status(models={"m\x00": {"version": "1", "state": "x"}}),
    "lone surrogate in a model name": status(models={"m\ud800": {"state": "x"}}),
    "NUL in a version": status(models={"m": {"version": "\x00", "state": "x"}}),
    "NUL in a state": status(models={"m": {"version": "1", "state": "\x00"}}),
    "NUL in agent_version": status(agent_version="\x00"),
    "a model name too long to index": status(models={"m" * (MAX_TEXT + 1): {"state": "x"}}),
}
REFUSED_HEARTBEATS = {
    "seq 2**63": heartbeat(lambda d: d.update(seq=2**63)),
    "a count beyond 32 bits": heartbeat(lambda d: d["models"]["resnet"].update(requests=2**31)),
    "outbox count beyond 32 bits": heartbeat(lambda d: d["outbox"].update(dropped=2**40)),
    "NUL in at": heartbeat(lambda d: d.update(at="\x00")),
    "lone surrogate in a version": heartbeat(
        lambda d: d["models"]["resnet"].update(version="\ud800")
    ),
    "at too long to index": heartbeat(lambda d: d.update(at="1" * (MAX_TEXT + 1))),
    "a model name too long to index": heartbeat(
        lambda d: d.update(models={"m" * (MAX_TEXT + 1): d["models"]["resnet"]})
    ),
    "Infinity": heartbeat(lambda d: d["system"].update(cpu_percent=float("inf"))),
}


@pytest.mark.parametrize("raw", REFUSED_EVENTS.values(), ids=REFUSED_EVENTS.keys())
def test_the_event_parser_refuses_what_no_store_can_hold(raw: bytes) -> None:
    with pytest.raises(PayloadError):
        parse_event(raw)


@pytest.mark.parametrize("raw", REFUSED_STATUSES.values(), ids=REFUSED_STATUSES.keys())
def test_the_status_parser_refuses_what_no_store_can_hold(raw: bytes) -> None:
    with pytest.raises(PayloadError):
        parse_status(raw)


@pytest.mark.parametrize("raw", REFUSED_HEARTBEATS.values(), ids=REFUSED_HEARTBEATS.keys())
def test_the_telemetry_parser_refuses_what_no_store_can_hold(raw: bytes) -> None:
    with pytest.raises(PayloadError):
        parse_telemetry(raw)


def test_what_the_stores_hold_at_the_limits_still_parses() -> None:
    longest = event(2**63 - 1, stream=ASTRAL * MAX_TEXT, model="m" * MAX_TEXT, reason="r" * 10_000)
    parsed = parse_event(longest)
    assert parsed.seq == 2**63 - 1 and len(parsed.stream) == MAX_TEXT
    assert parse_event(event(1, reason=f"emoji {ASTRAL}")).reason == f"emoji {ASTRAL}"
    beat = parse_telemetry(heartbeat(lambda d: d["system"].update(disk_free_bytes=2**64)))
    assert beat.system.disk_free_bytes is None  # beyond what orjson reads as an integer


def _noise(seed: int) -> str:
    """``MAX_TEXT`` characters of 4 bytes each that do not compress: the largest index
    entry a message that parses can ask of PostgreSQL."""
    rng = random.Random(seed)
    return "".join(chr(rng.randrange(0x10000, 0x10FFFF)) for _ in range(MAX_TEXT))


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_the_largest_messages_that_parse_are_stored(tmp_path: Path, backend: str) -> None:
    """Every text field at ``MAX_TEXT`` incompressible 4-byte characters at once, ``seq``
    and counts at their largest, a long ``reason``: each kind is stored in one batch."""
    texts = {
        key: _noise(n)
        for n, key in enumerate(("stream", "at", "model", "version", "previous", "phase"))
    }
    raw_event = event(2**63 - 1, **texts, rollout_id=_noise(9), reason=_noise(10) * 40)
    raw_status = status(
        agent_version=_noise(11), models={_noise(12): {"version": _noise(13), "state": _noise(14)}}
    )

    def largest(doc: dict[str, Any], at: str) -> None:
        # Requests: the most a heartbeat of an hour may count (check_plausible).
        entry = {"version": _noise(15), "state": _noise(16), "requests": 360_000_000}
        doc.update(at=at, seq=2**63 - 1, agent_version=_noise(18), models={_noise(19): entry})
        doc["outbox"] = {"pending": 2**31 - 1, "dropped": 2**31 - 1}
        doc["interval_s"] = 3600.0

    beats = [heartbeat(lambda doc, n=n: largest(doc, _noise(n))) for n in (20, 21)]
    batch = IngestBatch()
    for kind, raw in (("events", raw_event), ("status", raw_status), ("telemetry", beats[0])):
        add_payload(batch, device_topic(FLEET, DEVICE, kind), raw, 1.0)
    # The contract's parser too (its heartbeats are stored re-encoded).
    add_to_batch(batch, parse_message(device_topic(FLEET, DEVICE, "telemetry"), beats[1]), 2.0)
    with store_for(backend, tmp_path) as store:
        assert store.write(batch) == 4
        (stored,) = store.events(device=DEVICE)
        assert (stored.stream, stored.seq, stored.model) == (
            texts["stream"],
            2**63 - 1,
            texts["model"],
        )
        assert store.count("heartbeats") == 2


# ------------------------------------------------------------------ through a real ingest


@pytest.fixture(params=["sqlite", "postgres"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with store_location(request.param, tmp_path) as where:
        yield where


def refuse_poison_reason(location: str) -> None:
    """Make the store at ``location`` refuse events whose reason is ``poison``, the way a
    value its parser lets through but its database refuses would."""
    if is_postgres(location):
        import psycopg

        with psycopg.connect(location, autocommit=True) as conn:
            conn.execute("ALTER TABLE events ADD CONSTRAINT no_poison CHECK (reason <> 'poison')")
        return
    with sqlite3.connect(location) as conn:
        conn.execute(
            "CREATE TRIGGER no_poison BEFORE INSERT ON events WHEN NEW.reason = 'poison' "
            "BEGIN SELECT RAISE(ABORT, 'poison refused'); END"
        )


def ingest(broker: Broker, store: TelemetryStore) -> Ingestor:
    ingestor = Ingestor(
        IngestSettings(broker.host, broker.port, client_id="ingest-poison", store_retry_max_s=0.5),
        store,
    )
    ingestor.start()
    wait_until(lambda: ingestor.is_subscribed, 10, "the ingestor to connect")
    return ingestor


def publish(broker: Broker, payloads: list[bytes]) -> None:
    """Publish ``payloads`` on dev-1's events topic at QoS 1 and wait for the broker."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="poison-device")
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        for info in [client.publish(EVENTS, raw, qos=1) for raw in payloads]:
            info.wait_for_publish(timeout=10)
    finally:
        client.loop_stop()
        client.disconnect()


def seqs(store: TelemetryStore) -> list[int]:
    return [e.seq for e in store.events(device=DEVICE, limit=1000)]


def test_a_poison_message_is_dropped_and_counted_and_the_rest_stored_and_acknowledged(
    broker: Broker, location: str, caplog: pytest.LogCaptureFixture
) -> None:
    """In one batch: good events, one the store refuses (``poison``), and the ones the
    parsers used to let through; then later events. Before, the batch was retried forever
    (or the writer thread died), so none of the good events were stored."""
    caplog.set_level(logging.ERROR, logger="controller.fleet.ingest")
    store = open_store(location)
    refuse_poison_reason(location)
    ingestor = ingest(broker, store)
    ingestor.stop()  # the session stays: what is published now waits in the broker
    bad = [
        REFUSED_EVENTS[name]
        for name in ("seq 2**63", "lone surrogate in stream", "NUL in model", "nested too deeply")
    ]
    first = [event(n) for n in range(1, 11)]
    publish(broker, [*first[:5], *bad[:2], event(11, reason="poison"), *bad[2:], *first[5:]])
    publish(broker, [event(n) for n in range(12, 21)])
    ingestor = ingest(broker, store)  # the broker sends them all at once: one batch
    try:
        wait_until(lambda: len(seqs(store)) >= 19, 30, "the good events of the batch")
        publish(broker, [event(n) for n in range(21, 26)])  # and ingest goes on
        wait_until(lambda: len(seqs(store)) >= 24, 30, "the later events")
        wait_until(lambda: ingestor.unacknowledged == 0, 10, "every message acknowledged")
    finally:
        ingestor.stop()
    try:
        assert seqs(store) == [*range(1, 11), *range(12, 26)]
        assert ingestor.refusals[POISON] == 1 and ingestor.counts["refused"] == 1
        assert ingestor.counts["rejected"] == 4 and ingestor.counts["events"] == 24
        assert "the store cannot hold a message on" in caplog.text
        text = render_aggregates(
            FleetAggregates({}, {}, {}), [], dict(ingestor.counts), None, ingestor.refusals
        )
        assert 'edgefleet_ingest_refused_total{reason="poison"} 1' in text
    finally:
        store.close()

    # Acknowledged, poison included: a new ingest of the same session gets nothing again.
    again = open_store(location)
    second = ingest(broker, again)
    try:
        publish(broker, [event(26)])
        wait_until(lambda: second.counts["events"] >= 1, 20, "the next event")
        assert second.counts["events"] == 1 and second.counts["refused"] == 0
        assert second.counts["rejected"] == 0
    finally:
        second.stop()
        again.close()


def test_a_full_store_is_retried_and_nothing_is_dropped(
    tmp_path: Path, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    """A store error that is not about the data (SQLite's real "database or disk is full",
    from a page limit) is retried with backoff: nothing dropped, nothing acknowledged,
    until there is room again; then everything is stored."""
    caplog.set_level(logging.ERROR, logger="controller.fleet.ingest")
    store = SqliteStore(tmp_path / "telemetry.sqlite")
    with store._write_lock:
        (pages,) = store._write_conn.execute("PRAGMA page_count").fetchone()
        store._write_conn.execute(f"PRAGMA max_page_count = {pages}")
    ingestor = ingest(broker, store)
    try:
        publish(broker, [event(n, reason="r" * 2000) for n in range(1, 31)])
        wait_until(lambda: "(attempt 3)" in caplog.text, 30, "the batch to be retried")
        assert "database or disk is full" in caplog.text
        wait_until(lambda: ingestor.unacknowledged == 30, 10, "all 30 held unacknowledged")
        assert store.count("events") == 0
        assert ingestor.refusals[POISON] == 0 and ingestor.counts["rejected"] == 0
        with store._write_lock:
            store._write_conn.execute("PRAGMA max_page_count = 1073741823")
        wait_until(lambda: len(seqs(store)) == 30, 30, "the events once there is room")
        wait_until(lambda: ingestor.unacknowledged == 0, 10, "the acknowledgements")
        assert seqs(store) == list(range(1, 31)) and ingestor.refusals[POISON] == 0
    finally:
        ingestor.stop()
        store.close()


# ------------------------------------------------------------------ the parsers against the stores

_CHARS = st.sampled_from(["a", "-", "é", "\x00", "\ud800", "\udfff", ASTRAL, "\n", "'", "\\"])
_text = st.one_of(
    st.text(_CHARS, max_size=6),
    # Long text that does not compress: what an index entry of PostgreSQL must hold.
    st.text(
        st.characters(min_codepoint=0x10000, max_codepoint=0x10FFFF),
        min_size=MAX_TEXT - 1,
        max_size=MAX_TEXT + 1,
    ),
    st.builds(operator.mul, st.sampled_from(["a", ASTRAL]), st.sampled_from([MAX_TEXT, 3000])),
)
_int = st.one_of(
    st.integers(-3, 3),
    st.sampled_from([2**31 - 1, 2**31, -(2**31), 2**63 - 1, 2**63, -(2**63), 2**64 - 1, 2**70]),
)
_scalar = st.one_of(st.none(), st.booleans(), _int, st.floats(), _text)
_value = st.one_of(
    _scalar, st.lists(_scalar, max_size=2), st.dictionaries(_text, _scalar, max_size=2)
)


@st.composite
def _replaced(draw: st.DrawFn, base: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """``base`` with one or two of ``fields`` dropped or replaced: the others stay valid,
    so that the one changed decides whether the message parses."""
    doc = dict(base)
    for key in draw(st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=2)):
        if draw(st.integers(0, 3)) == 0:
            doc.pop(key, None)
        else:
            doc[key] = draw(fields[key])
    return doc


_EVENT = json.loads(event(1))
_STATUS = json.loads(status())
_BEAT = json.loads(good_payload(device=DEVICE))
_model_entry = st.fixed_dictionaries(
    {},
    optional={
        "version": st.one_of(_text, _value),
        "state": st.one_of(_text, _value),
        **dict.fromkeys(("requests", "errors", "client_errors"), st.one_of(_int, _value)),
        "p99_s": _value,
    },
)
_events = _replaced(
    _EVENT,
    {
        **dict.fromkeys(
            ("stream", "at", "model", "version", "previous", "phase", "rollout_id", "reason"),
            st.one_of(_text, _value),
        ),
        "seq": st.one_of(_int, _value),
        "extra": _value,
    },
)
_statuses = _replaced(
    _STATUS,
    {
        "agent_version": st.one_of(_text, _value),
        "at": st.one_of(_text, _value),
        "models": st.dictionaries(_text, st.one_of(_model_entry, _value), max_size=2),
        "extra": _value,
    },
)
_beats = _replaced(
    _BEAT,
    {
        "at": st.one_of(_text, _value),
        "seq": st.one_of(_int, _value),
        "agent_version": st.one_of(_text, _value),
        "interval_s": _value,
        "models": st.dictionaries(_text, st.one_of(_model_entry, _value), max_size=2),
        "system": st.fixed_dictionaries(
            {}, optional=dict.fromkeys(_BEAT["system"], st.one_of(_int, _value))
        ),
        "outbox": st.fixed_dictionaries(
            {}, optional=dict.fromkeys(("pending", "dropped"), st.one_of(_int, _value))
        ),
        "extra": _value,
    },
)
_messages = st.one_of(
    st.tuples(st.just("events"), _events),
    st.tuples(st.just("status"), _statuses),
    st.tuples(st.just("telemetry"), _beats),
)


def test_whatever_the_parsers_accept_both_stores_hold(tmp_path: Path) -> None:
    """Each field of each message kind, replaced by text with NUL, lone surrogates or
    too long to index, integers beyond 32 and 64 bits, NaN and the like: a message the
    parsers accept (the hot path for heartbeats, and the contract's ``parse_telemetry``
    too) is stored by SQLite and by PostgreSQL, alone in its batch."""
    verdicts: Counter[str] = Counter()
    with store_for("sqlite", tmp_path) as lite, store_for("postgres", tmp_path) as pg:

        @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
        @given(_messages)
        def check(message: tuple[str, dict[str, Any]]) -> None:
            kind, doc = message
            topic = device_topic(FLEET, DEVICE, kind)
            raw = json.dumps(doc).encode()
            batches = [IngestBatch()]
            try:
                add_payload(batches[0], topic, raw, 1.0 + len(verdicts))
            except PayloadError:
                verdicts["refused"] += 1
            else:
                verdicts["accepted"] += 1
            if kind == "telemetry":
                try:
                    parsed = parse_message(topic, raw)
                except PayloadError:
                    pass
                else:
                    batches.append(IngestBatch())
                    add_to_batch(batches[-1], parsed, 1.0)
            for batch in batches:
                if len(batch):
                    lite.write(batch)
                    pg.write(batch)

        check()
    assert verdicts["accepted"] > 40 and verdicts["refused"] > 40, verdicts
