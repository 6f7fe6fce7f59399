"""Rollout state for ``edgectl serve``'s ``GET /metrics`` (issue 24, monitoring).

``render_rollouts`` writes, in the Prometheus text format (version 0.0.4), the latest
rollout of each (fleet, model) as its records say: the stage it is at, the share of
devices it gives its version, its state, and whether its gates or its deadline halted it
(``edgefleet_rollout_halted``, what ``packaging/prometheus-rules.yml`` alerts on). A pure
function of the records (``RolloutStore.all``); ``controller.app`` appends it to the page.

Invariants:
- One series per (fleet, model) and metric, labelled with the latest rollout's version: a
  finished rollout stays visible (completed, or halted) until the next one of that model
  replaces it, or retention removes its record. A rollout never published (abandoned)
  is not a rollout of the fleet and is left out.
- ``edgefleet_rollout_halted`` is 1 only for a halt the operator did not ask for (a gate
  broke, or too few devices reported by the stage's deadline), while the rollout is paused
  or aborted by it; an operator's pause or abort is 0.
- Every metric has its HELP and TYPE lines even when there is no rollout.
"""

from __future__ import annotations

from collections.abc import Iterable

from controller.rollout.stages import Rollout, RolloutState

# Halts an alert is for: the operator did not ask for them.
UNASKED_HALTS = frozenset({"gate", "too_few_devices"})


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _line(name: str, labels: dict[str, str], value: float) -> str:
    text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    number = str(value) if isinstance(value, int) else repr(float(value))
    return f"{name}{{{text}}} {number}"


def latest_rollouts(rollouts: Iterable[Rollout]) -> list[Rollout]:
    """The newest published rollout of each (fleet, model), sorted by fleet and model."""
    latest: dict[tuple[str, str], Rollout] = {}
    for r in rollouts:
        if r.state is RolloutState.ABANDONED:
            continue
        key = (r.fleet, r.model)
        held = latest.get(key)
        if held is None or (r.created_at, r.id) > (held.created_at, held.id):
            latest[key] = r
    return [latest[k] for k in sorted(latest)]


def is_halted(r: Rollout) -> bool:
    """Whether a gate or the stage's deadline (not the operator) stopped the rollout."""
    return (
        r.state in (RolloutState.PAUSED, RolloutState.ABORTED)
        and r.halt is not None
        and r.halt.kind in UNASKED_HALTS
    )


def render_rollouts(rollouts: Iterable[Rollout]) -> str:
    """The latest rollout of each (fleet, model) in the Prometheus text format."""
    latest = latest_rollouts(rollouts)
    out = [
        "# HELP edgefleet_rollout_stage The stage (1, 2, ...) the latest rollout of each "
        "fleet and model is at, or ended at.",
        "# TYPE edgefleet_rollout_stage gauge",
    ]
    out += [_line("edgefleet_rollout_stage", _labels(r), r.stage + 1) for r in latest]
    out += [
        "# HELP edgefleet_rollout_percent The share of devices (percent) the latest rollout's "
        "desired state gives its version (100 once completed, 0 once aborted).",
        "# TYPE edgefleet_rollout_percent gauge",
    ]
    out += [_line("edgefleet_rollout_percent", _labels(r), r.percent) for r in latest]
    out += [
        "# HELP edgefleet_rollout_state The latest rollout's state: 1 for the state it is "
        "in, 0 for the others.",
        "# TYPE edgefleet_rollout_state gauge",
    ]
    states = [s for s in RolloutState if s is not RolloutState.ABANDONED]
    for r in latest:
        for state in states:
            labels = {**_labels(r), "state": state.value}
            out.append(_line("edgefleet_rollout_state", labels, int(r.state is state)))
    out += [
        "# HELP edgefleet_rollout_halted Whether the latest rollout is halted by a broken "
        "gate or too few devices by its stage's deadline (1), not by the operator: "
        "edgectl rollout status says why.",
        "# TYPE edgefleet_rollout_halted gauge",
    ]
    out += [_line("edgefleet_rollout_halted", _labels(r), int(is_halted(r))) for r in latest]
    return "\n".join(out) + "\n"


def _labels(r: Rollout) -> dict[str, str]:
    return {"fleet": r.fleet, "model": r.model, "version": r.version}
