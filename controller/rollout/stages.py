"""Staged rollouts, the pure core: the rollout record, its stage machine, and what it
writes into a fleet's desired state.

A rollout takes one model of one fleet from ``previous`` to ``version`` through stages
(percentages of devices, by bucket, plus explicit canaries). ``edgectl serve`` calls
``advance`` on a schedule with a ``GateReport`` (``controller.rollout.gates``) and acts on
the record it returns; the operator's commands call ``pause``, ``resume``, ``promote``
and ``abort``. Nothing here reads a clock, a file or a socket: ``now`` is epoch seconds,
injected.

States and the one transition table::

    running ──► running (next stage) ──► completed
       │  ▲
       ▼  │ resume / promote
    paused ──► aborted            running/paused ──► superseded (another release took
                                                      over the fleet's desired state)
                                  running/paused ──► abandoned (its start was interrupted
                                                      before desired state named it)

Rules of ``advance`` (a running rollout only), in this order:

1. A gate broke (with enough evidence, see ``rollout_gates``): halt. ``on_failure``
   says pause (devices keep what they run; an operator decides) or abort (desired state
   goes back to ``previous``; devices on the new version roll back). The halt records
   the gate, its limit, the observed figure and the devices behind it.
2. The stage's ``wait_s`` has passed and enough devices report (``min_devices``,
   ``min_requests``): the next stage starts, or the rollout completes after the last.
3. The stage's ``deadline_s`` has passed without enough devices reporting: pause with
   that reason. A rollout never waits forever.

Invariants:
- Stages ascend strictly within (0, 100] and the last one is 100.
- The rollout id never changes: devices keep their bucket across stages, and a device
  that failed or rolled back this rollout does not retry it (``agent.update.journal.should_skip``).
- Every state change goes through ``_move``, which raises ``IllegalTransitionError``
  naming the rule for a move the table does not allow.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any, Final

from agent.base.errors import DesiredStateError
from agent.contracts import (
    ModelRelease,
    ProbationPolicy,
    ShadowPolicy,
    bundle_target_path,
    parse_shadow_policy,
)
from controller.base.errors import ControllerError, UsageError
from controller.rollout.gates import GatePolicy, GateReport, parse_gates


class RolloutState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTED = "aborted"
    SUPERSEDED = "superseded"
    # ``rollout start`` saved the record but never published it; desired state never named
    # it, so it is discarded (controller.rollout.service.settle_records).
    ABANDONED = "abandoned"


class OnFailure(StrEnum):
    PAUSE = "pause"
    ABORT = "abort"


ACTIVE: Final = frozenset({RolloutState.RUNNING, RolloutState.PAUSED})
TRANSITIONS: Final[Mapping[RolloutState, frozenset[RolloutState]]] = {
    RolloutState.RUNNING: frozenset(
        {
            RolloutState.RUNNING,
            RolloutState.PAUSED,
            RolloutState.COMPLETED,
            RolloutState.ABORTED,
            RolloutState.SUPERSEDED,
            RolloutState.ABANDONED,
        }
    ),
    RolloutState.PAUSED: frozenset(
        {
            RolloutState.RUNNING,
            RolloutState.COMPLETED,
            RolloutState.ABORTED,
            RolloutState.SUPERSEDED,
            RolloutState.ABANDONED,
        }
    ),
    RolloutState.COMPLETED: frozenset(),
    RolloutState.ABORTED: frozenset(),
    RolloutState.SUPERSEDED: frozenset(),
    RolloutState.ABANDONED: frozenset(),
}
ROLLOUT_SCHEMA: Final = "edgefleet.rollout/1"
# History entries kept in a record (oldest dropped first).
HISTORY_LIMIT: Final = 100


class IllegalTransitionError(UsageError):
    """An operator command or a tick asked for a move the transition table forbids."""


class RolloutRecordError(ControllerError):
    """A stored rollout record does not parse."""


@dataclass(frozen=True)
class Halt:
    """Why a rollout stopped: a broken gate, too few devices, or an operator."""

    at: float
    stage: int
    percent: float
    kind: str  # "gate", "too_few_devices" or "operator"
    reason: str
    breaches: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class Rollout:
    """One staged rollout of ``model`` ``version`` in ``fleet`` (see the module docstring)."""

    id: str
    fleet: str
    model: str
    version: str
    previous: str | None
    stages: tuple[float, ...]
    wait_s: float
    deadline_s: float
    gates: GatePolicy
    canaries: tuple[str, ...]
    on_failure: OnFailure
    probation: ProbationPolicy
    created_at: float
    state: RolloutState = RolloutState.RUNNING
    stage: int = 0
    stage_started_at: float = 0.0
    updated_at: float = 0.0
    halt: Halt | None = None
    # Whether desired state named this rollout (its first stage was published). A record
    # that is not published is discarded (``abandoned``) by the next command or tick
    # unless desired state names it (controller.rollout.service.settle_records).
    published: bool = False
    # Saved ahead of the desired state it asks for (an operator command or a tick of a
    # published rollout writes its record first, then desired state): while set, the next
    # command or tick publishes ``desired_release(self)`` and clears it, so an interrupted
    # command is finished, never undone (controller.rollout.service.settle_records).
    pending: bool = False
    # The previous version's p99 the latency gate compares with, once measured.
    baseline_p99_s: float | None = None
    # The last gate report, summarised for ``rollout status``.
    last_report: Mapping[str, Any] = field(default_factory=dict)
    # Per stage index: the summary of the report it passed with.
    passed: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    history: tuple[tuple[float, str], ...] = ()
    # What each device checks in shadow before the release answers a client (a record
    # written before shadows existed: the defaults, as desired state without one).
    shadow: ShadowPolicy = field(default_factory=ShadowPolicy)

    @property
    def percent(self) -> float:
        """The share of devices (by bucket) this rollout's desired state gives ``version``."""
        if self.state in (RolloutState.ABORTED, RolloutState.ABANDONED):
            return 0.0
        if self.state is RolloutState.COMPLETED:
            return 100.0
        return self.stages[self.stage]

    @property
    def is_active(self) -> bool:
        return self.state in ACTIVE

    @property
    def stage_deadline(self) -> float:
        return self.stage_started_at + self.deadline_s

    def to_json_bytes(self) -> bytes:
        doc = asdict(self)
        doc["schema"] = ROLLOUT_SCHEMA
        doc["gates"] = self.gates.to_text()
        doc["history"] = [list(h) for h in self.history]
        return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=True).encode()


def check_stages(stages: Sequence[float]) -> tuple[float, ...]:
    """Return ``stages`` as a tuple if they ascend within (0, 100] and end at 100.

    Raises UsageError naming the rule.
    """
    out = tuple(float(s) for s in stages)
    if not out:
        raise UsageError("--stages expected at least one percentage, e.g. 1,10,50,100")
    for s in out:
        if not 0 < s <= 100:
            raise UsageError(f"--stages: every stage must be within (0, 100], got {s:g}")
    if any(b <= a for a, b in itertools.pairwise(out)):
        raise UsageError(f"--stages must ascend strictly, got {','.join(f'{s:g}' for s in out)}")
    if out[-1] != 100:
        raise UsageError(f"--stages must end at 100 (the whole fleet), got {out[-1]:g}")
    return out


def parse_stages(text: str) -> tuple[float, ...]:
    """``"1,10,50,100"`` → (1.0, 10.0, 50.0, 100.0); raises UsageError."""
    try:
        values = [float(part.strip().removesuffix("%")) for part in text.split(",") if part]
    except ValueError:
        raise UsageError(f"--stages expected comma-separated percentages, got {text!r}") from None
    return check_stages(values)


def parse_duration(text: str, what: str) -> float:
    """``"90"``, ``"90s"``, ``"10m"``, ``"2h"`` → seconds; raises UsageError."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    raw = text.strip().lower()
    scale = units.get(raw[-1:])
    number = raw[:-1] if scale is not None else raw
    try:
        seconds = float(number) * (scale or 1.0)
    except ValueError:
        raise UsageError(
            f"{what} expected a duration such as 90s, 10m or 2h, got {text!r}"
        ) from None
    if not seconds >= 0:
        raise UsageError(f"{what} must not be negative, got {text!r}")
    return seconds


def new_rollout(
    *,
    rollout_id: str,
    fleet: str,
    model: str,
    version: str,
    previous: str | None,
    stages: Sequence[float],
    wait_s: float,
    deadline_s: float,
    gates: GatePolicy,
    canaries: Sequence[str],
    on_failure: OnFailure,
    probation: ProbationPolicy,
    now: float,
    shadow: ShadowPolicy | None = None,
) -> Rollout:
    """A running rollout at its first stage. Raises UsageError on bad stages or times."""
    if wait_s < 0:
        raise UsageError(f"--wait must not be negative, got {wait_s:g}s")
    if deadline_s < wait_s:
        raise UsageError(
            f"--deadline ({deadline_s:g}s) must be at least --wait ({wait_s:g}s): a stage "
            "cannot be given up before it may pass"
        )
    if previous == version:
        raise UsageError(f"the fleet already runs {model} {version}; nothing to roll out")
    return Rollout(
        id=rollout_id,
        fleet=fleet,
        model=model,
        version=version,
        previous=previous,
        stages=check_stages(stages),
        wait_s=wait_s,
        deadline_s=deadline_s,
        gates=gates,
        canaries=tuple(dict.fromkeys(canaries)),
        on_failure=on_failure,
        probation=probation,
        created_at=now,
        stage_started_at=now,
        updated_at=now,
        history=((now, f"started at stage 1 ({_pct(check_stages(stages)[0])})"),),
        shadow=shadow or ShadowPolicy(),
    )


# ---------------------------------------------------------------------------- transitions


def _move(r: Rollout, to: RolloutState, now: float, note: str, **changes: Any) -> Rollout:
    if to not in TRANSITIONS[r.state]:
        allowed = ", ".join(sorted(TRANSITIONS[r.state])) or "nothing (it is over)"
        raise IllegalTransitionError(
            f"rollout {r.id} is {r.state.value}: it cannot become {to.value} "
            f"(from {r.state.value} it may become: {allowed})"
        )
    history = (*r.history, (now, note))[-HISTORY_LIMIT:]
    return replace(r, state=to, updated_at=now, history=history, **changes)


def _next_stage(r: Rollout, now: float, note: str, summary: Mapping[str, Any]) -> Rollout:
    passed = {**r.passed, str(r.stage): dict(summary)}
    if r.stage + 1 >= len(r.stages):
        return _move(r, RolloutState.COMPLETED, now, f"{note}; completed", halt=None, passed=passed)
    nxt = r.stage + 1
    return _move(
        r,
        RolloutState.RUNNING,
        now,
        f"{note}; stage {nxt + 1} ({_pct(r.stages[nxt])})",
        stage=nxt,
        stage_started_at=now,
        halt=None,
        passed=passed,
        last_report={},
    )


def advance(r: Rollout, report: GateReport, now: float) -> Rollout:
    """The record after one scheduled evaluation (see the module docstring's rules).

    A rollout that is not running is returned unchanged; so is one whose stage simply
    goes on (the report is kept in ``last_report`` either way for a running one).
    """
    if r.state is not RolloutState.RUNNING:
        return r
    summary = report.summary()
    r = replace(r, last_report=summary)
    if report.baseline_p99_s is not None:
        r = replace(r, baseline_p99_s=report.baseline_p99_s)
    stage_label = f"stage {r.stage + 1} ({_pct(r.percent)})"
    if report.breaches:
        reason = "; ".join(b.describe() for b in report.breaches)
        halt = Halt(
            at=now,
            stage=r.stage,
            percent=r.percent,
            kind="gate",
            reason=f"{stage_label}: {reason}",
            breaches=tuple(b.to_json() for b in report.breaches),
        )
        to = RolloutState.ABORTED if r.on_failure is OnFailure.ABORT else RolloutState.PAUSED
        return _move(r, to, now, f"halted ({to.value}): {halt.reason}", halt=halt)
    elapsed = now - r.stage_started_at
    if elapsed >= r.wait_s and report.enough:
        return _next_stage(r, now, f"{stage_label} passed its gates after {elapsed:.0f}s", summary)
    if now >= r.stage_deadline and not report.enough:
        halt = Halt(
            at=now,
            stage=r.stage,
            percent=r.percent,
            kind="too_few_devices",
            reason=f"{stage_label}: {report.shortfall()} by its deadline "
            f"({r.deadline_s:g}s); add canaries, lower min_devices, or "
            f"`edgectl rollout promote` to go on",
        )
        return _move(r, RolloutState.PAUSED, now, f"paused: {halt.reason}", halt=halt)
    return r


def pause(r: Rollout, now: float, reason: str = "paused by the operator") -> Rollout:
    """Hold the rollout where it is; devices keep what they run. Raises IllegalTransitionError."""
    if r.state is not RolloutState.RUNNING:
        raise IllegalTransitionError(f"rollout {r.id} is {r.state.value}, not running: no pause")
    halt = Halt(at=now, stage=r.stage, percent=r.percent, kind="operator", reason=reason)
    return _move(r, RolloutState.PAUSED, now, reason, halt=halt)


def resume(r: Rollout, now: float) -> Rollout:
    """Run a paused rollout again; its stage's wait and deadline start over.

    Raises IllegalTransitionError unless it is paused.
    """
    if r.state is not RolloutState.PAUSED:
        raise IllegalTransitionError(f"rollout {r.id} is {r.state.value}, not paused: no resume")
    return _move(
        r,
        RolloutState.RUNNING,
        now,
        f"resumed at stage {r.stage + 1} ({_pct(r.percent)})",
        stage_started_at=now,
        halt=None,
        last_report={},
    )


def promote(r: Rollout, now: float) -> Rollout:
    """Go to the next stage now (or complete), whatever the gates say.

    Raises IllegalTransitionError unless the rollout is running or paused.
    """
    if not r.is_active:
        raise IllegalTransitionError(f"rollout {r.id} is {r.state.value}: nothing to promote")
    return _next_stage(
        r,
        now,
        f"stage {r.stage + 1} ({_pct(r.percent)}) promoted by the operator",
        {**r.last_report, "promoted": True},
    )


def abort(r: Rollout, now: float, reason: str = "aborted by the operator") -> Rollout:
    """Send the fleet back to ``previous``; devices on the new version roll back.

    Raises IllegalTransitionError unless the rollout is running or paused.
    """
    if not r.is_active:
        raise IllegalTransitionError(
            f"rollout {r.id} is {r.state.value}: nothing to abort"
            + (
                f"; to go back, roll out {r.previous} again"
                if r.state is RolloutState.COMPLETED and r.previous
                else ""
            )
        )
    halt = r.halt
    if halt is None or halt.kind == "operator":  # a gate's halt stays the explanation
        halt = Halt(at=now, stage=r.stage, percent=r.percent, kind="operator", reason=reason)
    return _move(r, RolloutState.ABORTED, now, reason, halt=halt)


def supersede(r: Rollout, now: float, why: str) -> Rollout:
    """Another release replaced this rollout's entry in the fleet's desired state."""
    return _move(r, RolloutState.SUPERSEDED, now, f"superseded: {why}")


def abandon(r: Rollout, now: float, why: str) -> Rollout:
    """Discard a record desired state never named (its start was interrupted before it
    published). Raises IllegalTransitionError for a published or finished one."""
    if r.published:
        raise IllegalTransitionError(f"rollout {r.id} was published: it cannot be abandoned")
    return _move(r, RolloutState.ABANDONED, now, f"abandoned: {why}")


# ---------------------------------------------------------------------------- desired state


def desired_release(r: Rollout) -> ModelRelease:
    """The entry of the fleet's desired state this rollout asks for, in its current state.

    Aborted: percent 0 and no canaries, so every device resolves to ``previous`` (a first
    release has none: devices that installed it keep it, nothing else gets it).
    """
    canaries = r.canaries if r.is_active else ()
    return ModelRelease(
        version=r.version,
        target=bundle_target_path(r.model, r.version),
        rollout_id=r.id,
        percent=r.percent,
        previous=r.previous,
        previous_target=bundle_target_path(r.model, r.previous) if r.previous else None,
        canaries=canaries,
        probation=r.probation,
        shadow=r.shadow,
    )


def stable_version(entry: ModelRelease | None) -> str | None:
    """The version a fleet's whole population runs under ``entry``, if any: the new one
    at 100 %, otherwise the previous one (a partial or aborted rollout)."""
    if entry is None:
        return None
    if entry.percent >= 100.0:
        return entry.version
    return entry.previous


# ---------------------------------------------------------------------------- persistence


def _pct(value: float) -> str:
    return f"{value:g}%"


def parse_rollout(raw: bytes) -> Rollout:
    """Parse a stored record; raise RolloutRecordError naming what is wrong."""
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("schema") != ROLLOUT_SCHEMA:
            raise RolloutRecordError(f"schema expected {ROLLOUT_SCHEMA!r}")
        halt = doc.get("halt")
        return Rollout(
            id=str(doc["id"]),
            fleet=str(doc["fleet"]),
            model=str(doc["model"]),
            version=str(doc["version"]),
            previous=doc.get("previous"),
            stages=tuple(float(s) for s in doc["stages"]),
            wait_s=float(doc["wait_s"]),
            deadline_s=float(doc["deadline_s"]),
            gates=parse_gates(str(doc["gates"])),
            canaries=tuple(str(c) for c in doc["canaries"]),
            on_failure=OnFailure(doc["on_failure"]),
            probation=ProbationPolicy(**doc["probation"]),
            created_at=float(doc["created_at"]),
            state=RolloutState(doc["state"]),
            stage=int(doc["stage"]),
            stage_started_at=float(doc["stage_started_at"]),
            updated_at=float(doc["updated_at"]),
            halt=None
            if halt is None
            else Halt(**{**halt, "breaches": tuple(halt.get("breaches", ()))}),
            published=bool(doc.get("published", False)),
            pending=bool(doc.get("pending", False)),
            baseline_p99_s=doc.get("baseline_p99_s"),
            last_report=dict(doc.get("last_report", {})),
            passed={str(k): dict(v) for k, v in doc.get("passed", {}).items()},
            history=tuple((float(at), str(note)) for at, note in doc.get("history", [])),
            shadow=parse_shadow_policy(doc.get("shadow"), "rollout record"),
        )
    except RolloutRecordError:
        raise
    except (ValueError, KeyError, TypeError, UsageError, DesiredStateError) as exc:
        raise RolloutRecordError(f"bad rollout record: {type(exc).__name__}: {exc}") from None
