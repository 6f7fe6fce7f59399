"""The install state machine: one transition table, one record per model, pure rules.

Phases (DESIGN.md)::

    idle ─► downloading ─► verified ─► staged ─► smoke_tested ─┬─────────► active ─► committed
                 │             │          │            │        └─► shadow ─┘      └──► rolled_back
                 └─────────────┴──────────┴────────────┴──────────────┴──► failed
                 (and back to idle when a restart abandons an install, or desired
                 state names another version during a shadow)

The record of a model says which version it serves in every phase, so after a crash at
any instant the agent knows what to load (``serving_version``):

============  =========================================  ==========================
phase         ``version`` is                         the device serves
============  =========================================  ==========================
idle          the version in service (or None)            ``version``
downloading…  the candidate being installed               ``previous``
smoke_tested
shadow        the candidate, loaded beside ``previous``  ``previous`` (the candidate
              and given a copy of live requests           answers no client)
active        the candidate, live, on probation           ``version``
committed     the version in service                      ``version``
rolled_back   the candidate that was rolled back          ``previous``
failed        the candidate that failed                   ``previous``
============  =========================================  ==========================

Invariants:
- ``transition`` is the only way to change a record; it raises ``IllegalTransitionError``
  naming the rule for any move the table does not allow. Records are immutable.
- The orchestrator persists the new record *before* the side effect of the phase it
  enters (download, unpack, load, swap, …), so a restart resumes from a known state.
- A candidate that ended ``failed`` or ``rolled_back`` is not installed again for the
  same rollout (``should_skip``); a new rollout id, or another version, retries. One
  exception: a candidate that failed because this agent lacks a contract it needs (a
  bundle format it does not read, a newer ONNX Runtime: ``UnsupportedContractError``)
  records the refusing agent's version (``format_refused_by``), and an agent of another
  version (an upgrade) tries it once more. Integrity failures (hashes, signatures, golden
  vectors, probation) never record it.
- A candidate that failed its shadow is ``failed`` like one that failed its golden vectors.
- Shadow (between ``smoke_tested`` and ``active``, ``agent.update.lifecycle``): the
  candidate is loaded beside ``previous``, which alone answers clients, and is judged on
  copies of live requests (``ShadowPolicy``, carried in the record while in shadow).
  After a restart in shadow the device serves ``previous`` and the shadow starts again
  from the start, on nothing the dead process had compared (``recover``); each such
  restart counts as an interrupted install, so a candidate that crashes the agent in
  shadow fails after ``MAX_INTERRUPTED_INSTALLS``.

Schemas (what an upgraded agent finds on disk; ``tests/agent/update/_old_records.py``
holds a record of each as the older agent wrote it):

- ``edgefleet.journal/2`` (``JOURNAL_SCHEMA``): schema 1 plus the phase ``shadow``, the
  field ``shadow`` (the candidate's ``ShadowPolicy``, only in that phase) and the field
  ``format_refused_by``. A record is written in the *lowest* schema that holds it: a
  record outside a shadow with no ``format_refused_by`` is written as
  ``edgefleet.journal/1``, byte for byte as before, so an older agent put back on the
  device (a downgrade) reads it; a record in shadow, or one a format refusal marked, is
  schema 2, and an older agent finding one stops with ``NewerJournalError`` rather than
  guess. Reading schema 1, ``shadow`` is None and ``format_refused_by`` is set to
  ``LEGACY_REFUSER`` when the record is ``failed`` with a reason an agent gives for a
  format it does not read (``_LEGACY_CONTRACT_REASONS``: the /1 agents did not
  classify), else empty, so an upgraded agent retries what an older one refused for its
  format only;
- ``edgefleet.journal/1``, since the journal exists;
- before it, no journal: ``<model>/active.json`` ``{"version", "previous"}`` (what
  served, after its golden vectors passed here) and ``<model>/failed.json``
  ``{"version", "reason"}`` (a candidate refused here); ``record_from_pointers`` turns
  them into a record (``ModelStore.migrate_pointers`` does it once, at start-up).

A record of a newer schema raises ``NewerJournalError``, never "treat as empty": an
older agent must not forget, nor overwrite, what a newer one recorded. Changing the
record's fields means a new schema number and a step here that reads the old one.

Everything here is a function of data and an injected ``now`` (seconds since the epoch).

Times in a record are the wall clock's, as it read then: they say when, for people and
telemetry, and they carry a probation's elapsed time across a restart
(``probation_carried_s``, which allows for a clock that stepped meanwhile). Nothing
compares them with the clock to time anything within one process: a wall clock steps
(NTP at boot), so the phases' deadlines (``deadline_at`` records them) are enforced on
the monotonic clock where the work runs, and a probation's elapsed time is counted there
too (``agent.update.probation.ProbationClock``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from enum import StrEnum
from typing import Any, Final

from agent.contracts import (
    InvalidNameError,
    ProbationPolicy,
    ShadowPolicy,
    check_shadow_policy,
    check_version,
)


class Phase(StrEnum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFIED = "verified"
    STAGED = "staged"
    SMOKE_TESTED = "smoke_tested"
    SHADOW = "shadow"
    ACTIVE = "active"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


PRE_ACTIVE: Final = frozenset({Phase.DOWNLOADING, Phase.VERIFIED, Phase.STAGED, Phase.SMOKE_TESTED})
SETTLED: Final = frozenset({Phase.IDLE, Phase.COMMITTED, Phase.ROLLED_BACK, Phase.FAILED})

# The one transition table. A new install may start from any settled phase.
TRANSITIONS: Final[Mapping[Phase, frozenset[Phase]]] = {
    Phase.IDLE: frozenset({Phase.DOWNLOADING}),
    Phase.DOWNLOADING: frozenset({Phase.VERIFIED, Phase.FAILED, Phase.IDLE}),
    Phase.VERIFIED: frozenset({Phase.STAGED, Phase.FAILED, Phase.IDLE}),
    Phase.STAGED: frozenset({Phase.SMOKE_TESTED, Phase.FAILED, Phase.IDLE}),
    Phase.SMOKE_TESTED: frozenset({Phase.ACTIVE, Phase.SHADOW, Phase.FAILED, Phase.IDLE}),
    # Idle: desired state named another version during the shadow (``cancel_shadow``).
    Phase.SHADOW: frozenset({Phase.ACTIVE, Phase.FAILED, Phase.IDLE}),
    Phase.ACTIVE: frozenset({Phase.COMMITTED, Phase.ROLLED_BACK}),
    Phase.COMMITTED: frozenset({Phase.DOWNLOADING}),
    Phase.ROLLED_BACK: frozenset({Phase.DOWNLOADING}),
    Phase.FAILED: frozenset({Phase.DOWNLOADING}),
}

JOURNAL_VERSION: Final = 2
JOURNAL_SCHEMA: Final = f"edgefleet.journal/{JOURNAL_VERSION}"
# The schema of a record that holds nothing schema 2 added (module docstring).
JOURNAL_SCHEMA_1: Final = "edgefleet.journal/1"
_SCHEMA_RE: Final = re.compile(r"edgefleet\.journal/([1-9][0-9]{0,8})")
# The fields each schema this agent reads has (a /1 record has no format_refused_by).
_V2_ONLY_FIELDS: Final = frozenset({"format_refused_by", "shadow"})
# ``format_refused_by`` of a /1 record that failed for its format: the agents writing /1
# did not record who refused; never the version of a running agent.
LEGACY_REFUSER: Final = "an agent before edgefleet.journal/2"
# The reasons with which agents writing /1 refused a candidate for a contract they lacked
# (their exact messages: a manifest schema they did not know, a member encoding, an ONNX
# Runtime too old). Nothing else in a /1 record is retried by an upgraded agent.
_LEGACY_CONTRACT_REASONS: Final = (
    re.compile(r"schema expected '[^']*'(?: or '[^']*')*, got 'edgefleet\.manifest/[0-9]+'"),
    re.compile(r"encoding expected 'zstd', got '"),
    re.compile(r"needs ONNX Runtime >= \S+, this agent has "),
)
# Restarts while a version is on probation before the agent calls it a crash loop.
CRASH_LOOP_RESTARTS: Final = 3
# Restarts that interrupt installs of the same candidate before it is given up.
MAX_INTERRUPTED_INSTALLS: Final = 3


class IllegalTransitionError(ValueError):
    """A transition the table does not allow; the message names the rule."""


class JournalFormatError(ValueError):
    """A journal file that cannot be read back."""


class NewerJournalError(ValueError):
    """A record of a schema newer than this agent reads: a newer agent wrote it."""

    def __init__(self, found: str) -> None:
        super().__init__(
            f"journal schema {found!r} is newer than this agent reads ({JOURNAL_SCHEMA!r})"
        )
        self.found = found


@dataclass(frozen=True)
class JournalRecord:
    """The install state of one model. Times are seconds since the epoch."""

    model: str
    phase: Phase = Phase.IDLE
    version: str | None = None
    previous: str | None = None
    rollout_id: str = ""
    entered_at: float = 0.0
    deadline_at: float | None = None
    reason: str = ""
    # Restarts that interrupted installs of ``interrupted_version`` (pre-active phases).
    interrupted: int = 0
    interrupted_version: str | None = None
    # Restarts while ``version`` was on probation.
    restarts: int = 0
    probation: ProbationPolicy = field(default_factory=ProbationPolicy)
    probation_started_at: float | None = None
    # The previous version's p99 latency (s) and sample count when the candidate went live.
    baseline_p99_s: float | None = None
    baseline_samples: int = 0
    # ``failed`` because the agent lacked a contract the candidate needs
    # (``UnsupportedContractError``): that agent's version, and another retries it
    # (``should_skip``). Empty for every other failure, and outside ``failed``.
    format_refused_by: str = ""
    # The candidate's shadow policy, while it is in shadow (schema 2); None otherwise.
    shadow: ShadowPolicy | None = None

    def to_json_bytes(self) -> bytes:
        doc = asdict(self)
        if self.phase is Phase.SHADOW or self.shadow is not None or self.format_refused_by:
            doc["schema"] = JOURNAL_SCHEMA
        else:
            for name in _V2_ONLY_FIELDS:  # schema 1, as an older agent reads it
                del doc[name]
            doc["schema"] = JOURNAL_SCHEMA_1
        doc["phase"] = self.phase.value
        return json.dumps(doc, sort_keys=True).encode()


def parse_record(raw: bytes) -> JournalRecord:
    """Read a record of a schema this agent knows (see the module docstring).

    Raises NewerJournalError for a newer schema, JournalFormatError for anything else
    that is not a record (no known schema, bad JSON, missing or unknown fields).
    """
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise JournalFormatError(f"unreadable journal record: {exc}") from None
    if not isinstance(doc, dict):
        raise JournalFormatError(f"a journal record is a JSON object, got {type(doc).__name__}")
    schema = doc.pop("schema", None)
    match = _SCHEMA_RE.fullmatch(schema) if isinstance(schema, str) else None
    if match is None:
        raise JournalFormatError(f"journal schema expected {JOURNAL_SCHEMA!r}, got {schema!r}")
    version = int(match.group(1))
    if version > JOURNAL_VERSION:
        raise NewerJournalError(schema)
    known = {f.name for f in fields(JournalRecord)}
    if version == 1:
        known -= _V2_ONLY_FIELDS
    unknown = sorted(set(doc) - known)
    if unknown:
        raise JournalFormatError(f"journal record fields this agent does not know: {unknown}")
    try:
        doc["phase"] = Phase(doc["phase"])
        doc["probation"] = ProbationPolicy(**doc.get("probation", {}))
        if doc.get("shadow") is not None:
            doc["shadow"] = check_shadow_policy(ShadowPolicy(**doc["shadow"]))
        if doc["phase"] is Phase.SHADOW and doc.get("shadow") is None:
            raise ValueError("a record in shadow names no shadow policy")
        if version == 1 and doc["phase"] is Phase.SHADOW:
            raise ValueError("phase shadow in a schema 1 record")
        record = JournalRecord(**doc)
    except (ValueError, TypeError, KeyError) as exc:
        raise JournalFormatError(f"unreadable journal record: {exc!r}") from None
    if version == 1 and record.phase is Phase.FAILED and legacy_contract_refusal(record.reason):
        record = replace(record, format_refused_by=LEGACY_REFUSER)
    return record


def legacy_contract_refusal(reason: str) -> bool:
    """Whether a /1 record's reason is one an agent gave for a candidate in a format (or
    needing a runtime) it did not have; see ``_LEGACY_CONTRACT_REASONS``."""
    return any(pattern.search(reason) for pattern in _LEGACY_CONTRACT_REASONS)


def record_from_pointers(
    model: str, active: bytes | None, failed: bytes | None, now: float
) -> JournalRecord:
    """The record of what an agent from before the journal left for ``model``: the bytes
    of ``active.json`` and ``failed.json`` (None: absent).

    ``active.json`` named a version that passed its golden vectors here and served:
    committed. A ``failed.json`` naming another version becomes ``failed`` on that
    candidate, still serving the active one; it has no rollout id, so the next rollout
    of that version tries it once more. Raises JournalFormatError naming the file.
    """
    reason = "migrated from active.json, written by an agent before the install journal"
    record = JournalRecord(model=model, entered_at=now, reason=reason)
    if active is not None:
        doc = _pointer(active, "active.json", ("version",), ("previous",))
        record = replace(
            record, phase=Phase.COMMITTED, version=doc["version"], previous=doc["previous"]
        )
    if failed is not None:
        doc = _pointer(failed, "failed.json", ("version",), ())
        if doc["version"] != record.version:
            record = replace(
                record,
                phase=Phase.FAILED,
                version=doc["version"],
                previous=record.version,
                reason=str(doc.get("reason", "")) or "failed here (failed.json)",
            )
    return record


def _pointer(
    raw: bytes, name: str, versions: tuple[str, ...], optional: tuple[str, ...]
) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError(f"expected a JSON object, got {type(doc).__name__}")
        for key in versions:
            check_version(doc[key])
        for key in optional:
            doc[key] = check_version(doc[key]) if doc.get(key) is not None else None
        return doc
    except (ValueError, KeyError, InvalidNameError) as exc:
        raise JournalFormatError(f"unreadable {name}: {exc!r}") from None


def serving_version(record: JournalRecord) -> str | None:
    """The version the device serves (or must restore) in this record's phase."""
    if record.phase in (Phase.IDLE, Phase.ACTIVE, Phase.COMMITTED):
        return record.version
    return record.previous


def transition(
    record: JournalRecord,
    to: Phase,
    now: float,
    *,
    reason: str = "",
    deadline_s: float | None = None,
) -> JournalRecord:
    """Move ``record`` to phase ``to``; raise IllegalTransitionError if the table forbids it."""
    allowed = TRANSITIONS[record.phase]
    if to not in allowed:
        names = ", ".join(sorted(p.value for p in allowed))
        raise IllegalTransitionError(
            f"{record.model}: illegal transition {record.phase.value} -> {to.value} "
            f"(from {record.phase.value} the table allows: {names})"
        )
    return replace(
        record,
        phase=to,
        entered_at=now,
        deadline_at=now + deadline_s if deadline_s is not None else None,
        reason=reason,
        # The shadow policy is kept while in shadow only (schema 1 records outside it).
        shadow=record.shadow if to is Phase.SHADOW else None,
    )


def enter_shadow(record: JournalRecord, policy: ShadowPolicy, now: float) -> JournalRecord:
    """A smoke-tested candidate goes into shadow under ``policy``."""
    shadowed = transition(record, Phase.SHADOW, now)
    return replace(shadowed, shadow=policy)


def cancel_shadow(record: JournalRecord, now: float, reason: str) -> JournalRecord:
    """Stop a shadow that no verdict ended (desired state names another version now):
    back to idle on the version in service, the candidate neither failed nor counted."""
    if record.phase is not Phase.SHADOW:
        raise IllegalTransitionError(f"{record.model}: only a shadow can be cancelled")
    idle = transition(record, Phase.IDLE, now, reason=reason)
    return replace(idle, version=record.previous, previous=None)


def begin_install(
    record: JournalRecord,
    version: str,
    rollout_id: str,
    probation: ProbationPolicy,
    now: float,
    deadline_s: float,
) -> JournalRecord:
    """Start installing ``version``: the version served now becomes ``previous``."""
    serving = serving_version(record)
    if serving == version:
        raise IllegalTransitionError(f"{record.model}: {version} is already served")
    started = transition(record, Phase.DOWNLOADING, now, deadline_s=deadline_s)
    same_candidate = record.interrupted_version == version
    return replace(
        started,
        version=version,
        previous=serving,
        rollout_id=rollout_id,
        probation=probation,
        interrupted=record.interrupted if same_candidate else 0,
        interrupted_version=version,
        restarts=0,
        probation_started_at=None,
        baseline_p99_s=None,
        baseline_samples=0,
        format_refused_by="",
    )


def abandon(record: JournalRecord, now: float, reason: str) -> JournalRecord:
    """Give up an install in a pre-active phase: back to idle on the version in service.

    The record goes idle with ``version`` = what serves, and remembers the candidate in
    ``interrupted_version`` with a count, so the next check retries it. When installs of
    one candidate were interrupted ``MAX_INTERRUPTED_INSTALLS`` times, it fails instead,
    so a bundle that crashes the agent while loading cannot make it restart forever.
    """
    if record.phase not in PRE_ACTIVE:
        raise IllegalTransitionError(
            f"{record.model}: only an install in progress can be abandoned"
        )
    count = record.interrupted + 1
    if count >= MAX_INTERRUPTED_INSTALLS:
        failed = transition(
            record,
            Phase.FAILED,
            now,
            reason=f"install interrupted {count} times (last in {record.phase.value}): {reason}",
        )
        return replace(failed, interrupted=count)
    idle = transition(record, Phase.IDLE, now, reason=f"{record.phase.value} abandoned: {reason}")
    # Idle names what serves in ``version``; the candidate stays in interrupted_version.
    return replace(idle, version=record.previous, previous=None, interrupted=count)


def retry_later(record: JournalRecord, now: float, reason: str) -> JournalRecord:
    """A transient failure before activation: back to idle on the version in service.

    Unlike ``abandon`` this counts nothing: the next check tries the candidate again.
    """
    if record.phase not in PRE_ACTIVE:
        raise IllegalTransitionError(f"{record.model}: only an install in progress can be retried")
    idle = transition(record, Phase.IDLE, now, reason=reason)
    return replace(idle, version=record.previous, previous=None)


def fail(record: JournalRecord, now: float, reason: str, refused_by: str = "") -> JournalRecord:
    """The candidate failed here; ``refused_by``: the version of this agent when it
    failed for a contract this agent lacks (``UnsupportedContractError``), else ""."""
    failed = transition(record, Phase.FAILED, now, reason=reason)
    return replace(failed, format_refused_by=refused_by)


def should_skip(
    record: JournalRecord, version: str, rollout_id: str, agent_version: str
) -> str | None:
    """Why a candidate must not be installed now by the agent of ``agent_version``, or
    None when it may be.

    It is skipped when it failed or was rolled back here for this very rollout, unless
    it failed for a contract the refusing agent lacked (``format_refused_by``) and the
    agent running now is another version: an upgrade may read it, so it tries once (and
    records its own version if it refuses too).
    """
    if (
        record.phase not in (Phase.FAILED, Phase.ROLLED_BACK)
        or record.version != version
        or record.rollout_id != rollout_id
    ):
        return None
    refused_by = record.format_refused_by if record.phase is Phase.FAILED else ""
    if refused_by and refused_by != agent_version:
        return None
    retry = (
        f"; refused by this agent, edge-agent {agent_version}, for a contract it lacks: "
        "another agent version retries it"
        if refused_by
        else ""
    )
    return (
        f"{version} {record.phase.value} here for rollout {rollout_id} ({record.reason}){retry}; "
        "waiting for desired state to name another release"
    )


@dataclass(frozen=True)
class Recovery:
    """What to do at start-up for one model."""

    record: JournalRecord  # the record to persist before loading anything
    load: str | None  # the version to load and serve
    fallback: str | None  # the version to load if ``load`` fails its checks
    note: str
    # For a probation resumed: how much of it counts as passed already.
    probation_carried_s: float = 0.0


def probation_carried_s(record: JournalRecord, now: float) -> tuple[float, str]:
    """How much of the probation of an ``active`` record a restarted agent counts as
    passed, from the recorded start and the wall clock ``now``; with the reason when it
    counts none of it ("" otherwise).

    The agent that wrote the record had not ended the probation, so it had watched the
    version for less than ``duration_s``; ``now - start`` is that time, plus the time the
    agent was down, plus whatever the wall clock stepped meanwhile. Within
    ``[0, duration_s)`` it is taken as it reads (a restart after a crash resumes where it
    was). Below 0 the wall clock went back since; at or past ``duration_s`` it went
    forward, or the agent was down past the probation's end. Either way how long the
    version was watched is unknown, and counting that time would end the probation with
    no evidence (the request figures start from zero in every process): the probation
    starts over, which costs one more ``duration_s`` and never commits early.
    """
    started = record.probation_started_at
    if started is None:
        started = record.entered_at
    elapsed = now - started
    duration = record.probation.duration_s
    if elapsed < 0:
        return 0.0, (
            f"the wall clock reads {-elapsed:.0f}s before the probation started: "
            "it went back, so the probation starts over"
        )
    if elapsed >= duration > 0:  # (a probation of 0 s ends at once anyway)
        return 0.0, (
            f"the wall clock reads {elapsed:.0f}s since the probation started, past its "
            f"{duration:g}s that never ended: the clock went forward or the agent was "
            "down meanwhile, so the probation starts over"
        )
    return elapsed, ""


def recover(record: JournalRecord, now: float) -> Recovery:
    """Decide, after a restart, what to serve and which state to persist.

    - settled phases: serve what the record says;
    - pre-active phases: abandon the install, serve the previous version;
    - shadow: serve the previous version and shadow the candidate again from the start
      (``recover_shadow``);
    - active (probation): count the restart; at ``CRASH_LOOP_RESTARTS`` roll back,
      otherwise resume probation on the candidate (the previous one is the fallback),
      with the elapsed time ``probation_carried_s`` allows.
    """
    if record.phase in SETTLED:
        return Recovery(record, serving_version(record), None, "nothing was in progress")
    if record.phase in PRE_ACTIVE:
        new = abandon(record, now, "the agent restarted")
        return Recovery(new, serving_version(new), None, new.reason)
    if record.phase is Phase.SHADOW:
        return recover_shadow(record, now)
    restarts = record.restarts + 1
    if restarts >= CRASH_LOOP_RESTARTS:
        reason = f"crash loop: the agent restarted {restarts} times during probation"
        rolled = replace(
            transition(record, Phase.ROLLED_BACK, now, reason=reason), restarts=restarts
        )
        return Recovery(rolled, rolled.previous, None, reason)
    resumed = replace(record, restarts=restarts)
    carried_s, starts_over = probation_carried_s(record, now)
    note = f"resuming probation of {record.version} after restart {restarts}"
    if starts_over:
        # The record's start then says when the count began again, on the clock as it is.
        resumed = replace(resumed, probation_started_at=now)
        note += f"; {starts_over}"
    else:
        note += f", {carried_s:.0f}s of {record.probation.duration_s:g}s passed"
    return Recovery(resumed, record.version, record.previous, note, carried_s)


def recover_shadow(record: JournalRecord, now: float) -> Recovery:
    """After a restart in shadow: serve ``previous``; the shadow starts over.

    The record stays in shadow (entered again at ``now``: its figures were the dead
    process's, in memory, and are gone), with the restart counted as an interrupted
    install of the candidate. At ``MAX_INTERRUPTED_INSTALLS`` the candidate fails
    instead: one that crashes the agent while it runs in shadow cannot make it restart
    forever. ``Recovery.load`` is the version to serve; the lifecycle loads the
    candidate beside it again.
    """
    count = record.interrupted + 1
    if count >= MAX_INTERRUPTED_INSTALLS:
        reason = f"shadow interrupted {count} times by a restart of the agent"
        failed = replace(
            transition(record, Phase.FAILED, now, reason=reason), interrupted=count, shadow=None
        )
        return Recovery(failed, failed.previous, None, reason)
    note = (
        f"the agent restarted during the shadow of {record.version}: serving "
        f"{record.previous} and shadowing again from the start (restart {count})"
    )
    again = replace(
        record,
        entered_at=now,
        deadline_at=None,
        reason=note,
        interrupted=count,
        interrupted_version=record.version,
    )
    return Recovery(again, record.previous, None, note)
