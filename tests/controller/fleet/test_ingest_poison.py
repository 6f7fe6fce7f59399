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
import operator
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
from controller.fleet.payloads import add_payload, add_to_batch, parse_message
from controller.fleet.records import IngestBatch
from tests.controller.fleet.test_ingest_hot_path import good_payload
from tests.controller.test_store_support import store_for

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
