"""``edgectl rollout status``: rollout records as text (a bar per stage) and as JSON.

Pure functions of records and an injected ``now`` (epoch seconds). The figures come from
the record's ``last_report`` and ``passed`` summaries, which the rollout service writes
on every tick; a status whose report is older than a few ticks says how old it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any, Final

from agent.contracts import Waiting
from controller.fleet.status import waiting_line
from controller.repository.history import is_going_back
from controller.rollout.stages import Rollout, RolloutState

BAR_WIDTH: Final = 24


def _bar(fraction: float) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    full = round(fraction * BAR_WIDTH)
    return "█" * full + "░" * (BAR_WIDTH - full)


def _duration(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _figures(report: Mapping[str, Any]) -> str:
    if not report:
        return ""
    parts = [f"{report.get('reporting', 0)} reporting"]
    if report.get("served"):
        parts.append(f"{report['served']} req")
    rate = report.get("error_rate")
    if rate is not None:
        parts.append(f"err {rate * 100:.2f}%")
    ratio = report.get("p99_ratio")
    if ratio is not None:
        parts.append(f"p99 x{ratio:.2f}")
    if report.get("failed"):
        parts.append(f"{report['failed']} failed")
    return ", ".join(parts)


def _stage_line(r: Rollout, index: int, now: float) -> str:
    percent = r.stages[index]
    label = f"  stage {index + 1:<2} {percent:>5g}%  "
    report = r.passed.get(str(index))
    if report is not None or index < r.stage or r.state is RolloutState.COMPLETED:
        how = "promoted" if report and report.get("promoted") else "passed"
        return label + _bar(1.0) + f"  {how}" + (f"  ({_figures(report)})" if report else "")
    if index > r.stage:
        return label + _bar(0.0)
    # The current stage: the bar shows devices on the new version over those it targets.
    rep = r.last_report
    expected = int(rep.get("expected", 0) or 0)
    on_new = int(rep.get("on_new", 0) or 0)
    fraction = on_new / expected if expected else 0.0
    if r.state is RolloutState.RUNNING:
        elapsed = now - r.stage_started_at
        state = f"running {_duration(elapsed)} of {_duration(r.wait_s)}"
    else:
        state = r.state.value
    devices = f"{on_new}/{expected} devices" if expected else "devices: no report yet"
    figures = _figures(rep)
    waiting = rep.get("waiting")
    if isinstance(waiting, Mapping) and waiting:
        counts = ", ".join(f"{n} {code}" for code, n in sorted(waiting.items()))
        figures = (f"{figures}; " if figures else "") + f"waiting: {counts}"
    return label + _bar(fraction) + f"  {state}, {devices}" + (f"; {figures}" if figures else "")


def _waiting_lines(r: Rollout, now: float) -> list[str]:
    """Of the current stage, the devices given the new version that wait, and why."""
    listed = r.last_report.get("waiting_devices")
    if r.state not in (RolloutState.RUNNING, RolloutState.PAUSED) or not isinstance(listed, list):
        return []
    lines = []
    for entry in listed:
        if not isinstance(entry, Mapping):
            continue
        waiting = Waiting(
            code=str(entry.get("code", "")),
            detail=str(entry.get("detail", "")),
            version=r.version,
            since=str(entry.get("since", "")),
        )
        lines.append(f"    {entry.get('device', '?')} waits: {waiting_line(waiting, now)}")
    counts = r.last_report.get("waiting")
    total = sum(counts.values()) if isinstance(counts, Mapping) else len(lines)
    if total > len(lines):
        lines.append(
            f"    ... and {total - len(lines)} more (edgectl fleet status --fleet {r.fleet})"
        )
    return lines


def render_rollout(r: Rollout, now: float) -> str:
    """One rollout: header, gates, a bar per stage, the halt reason when halted."""
    frm = r.previous or "(nothing)"
    back = "  (going back to an older release)" if is_going_back(r.version, r.previous) else ""
    lines = [
        f"rollout {r.id}  fleet {r.fleet}  {r.model} {frm} -> {r.version}  "
        f"{r.state.value.upper()} at {r.percent:g}%{back}",
        f"  gates {r.gates.to_text()}; wait {_duration(r.wait_s)}, deadline "
        f"{_duration(r.deadline_s)}, on failure {r.on_failure.value}"
        + (f"; canaries {', '.join(r.canaries)}" if r.canaries else ""),
    ]
    lines += [_stage_line(r, i, now) for i in range(len(r.stages))]
    lines += _waiting_lines(r, now)
    if r.halt is not None:
        lines.append(f"  halted ({r.halt.kind}) {_duration(now - r.halt.at)} ago: {r.halt.reason}")
    if r.is_active and not r.published:
        lines.append(
            "  not published: its start was interrupted before desired state named it; the "
            "next rollout command or tick of `edgectl serve` discards it"
        )
    if r.pending:
        lines.append(
            "  pending: its last change was saved and not yet published (an interrupted "
            "command); the next rollout command or tick of `edgectl serve` publishes it"
        )
    if r.state in (RolloutState.SUPERSEDED, RolloutState.ABANDONED) and r.history:
        at, note = r.history[-1]
        lines.append(f"  {_duration(now - at)} ago: {note}")
    if r.is_active and r.updated_at and now - r.updated_at > 60:
        lines.append(
            f"  last evaluated {_duration(now - r.updated_at)} ago: is `edgectl serve` running?"
        )
    return "\n".join(lines)


def render_status(rollouts: Sequence[Rollout], now: float) -> str:
    if not rollouts:
        return "no rollouts"
    return "\n\n".join(render_rollout(r, now) for r in rollouts)


def rollout_json(r: Rollout) -> dict[str, Any]:
    doc = asdict(r)
    doc["gates"] = r.gates.to_text()
    doc["percent"] = r.percent
    doc["history"] = [list(h) for h in r.history]
    doc["going_back"] = is_going_back(r.version, r.previous)
    return doc
