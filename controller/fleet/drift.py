"""Model-quality drift in the fleet: the alert on a device whose drift stays high, the
figures a rollout's drift gate reads, and how a drift reads in a table. Pure: functions
of the stored drift points (``TelemetryStore.drift_history``) and an injected ``now``.

A device reports, per model, the population stability index of what its version served
over its last 1,024-2,048 samples against the reference its bundle was built with
(``agent.runtime.drift``; docs/operations.md, "Reading drift"): below 0.1 stable,
0.1-0.25 moderate, above 0.25 significant.

The alert (``drift_alerts``): a (device, model) is marked when every drift it reported
on its current version over the last ``window_s`` seconds was above ``threshold``,
and it has been above since at least ``window_s`` ago: the run of points above the
threshold that ends with its newest point started ``window_s`` or more before ``now``,
and that newest point is within the window (a device silent since is stale, not
drifting). Points without a score (too few samples) neither start nor end a run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

DEFAULT_THRESHOLD: Final = 0.25
DEFAULT_WINDOW_S: Final = 600.0


class Point(Protocol):
    """One heartbeat's drift (``controller.fleet.store.DriftPoint``)."""

    @property
    def device(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def at(self) -> float: ...
    @property
    def drift(self) -> float | None: ...


@dataclass(frozen=True)
class DriftPolicy:
    """When ``fleet status`` marks a device: drift above ``threshold`` for ``window_s``."""

    threshold: float = DEFAULT_THRESHOLD
    window_s: float = DEFAULT_WINDOW_S


@dataclass(frozen=True)
class DriftAlert:
    """A (device, model) whose drift stayed above the threshold: since when, and now."""

    since: float
    drift: float


def drift_alerts(
    points: Iterable[Point],
    now: float,
    policy: DriftPolicy,
    versions: Mapping[tuple[str, str], str | None] | None = None,
) -> dict[tuple[str, str], DriftAlert]:
    """The (device, model) pairs to mark (module docstring). ``points`` in any order;
    ``versions``: the version each (device, model) runs now, whose points alone count
    (None: the version of its newest point)."""
    series: dict[tuple[str, str], list[tuple[float, str, float]]] = {}
    for p in points:
        if p.drift is not None:
            series.setdefault((p.device, p.model), []).append((p.at, p.version, p.drift))
    alerts = {}
    for key, found in series.items():
        found.sort()
        version = versions.get(key) if versions is not None else found[-1][1]
        mine = [(at, drift) for at, v, drift in found if v == version]
        if not mine or mine[-1][0] < now - policy.window_s:
            continue
        since = None
        for at, drift in reversed(mine):
            if drift <= policy.threshold:
                break
            since = at
        if since is not None and now - since >= policy.window_s:
            alerts[key] = DriftAlert(since, mine[-1][1])
    return alerts


def latest_drift(points: Iterable[Point]) -> dict[str, float]:
    """Each device's newest drift score among ``points`` (one model and version, as a
    rollout's drift gate reads them), by device."""
    newest: dict[str, tuple[float, float]] = {}
    for p in points:
        if p.drift is not None and (p.device not in newest or newest[p.device][0] <= p.at):
            newest[p.device] = (p.at, p.drift)
    return {device: drift for device, (_at, drift) in sorted(newest.items())}


def drift_cell(drift: float | None, samples: int | None) -> str:
    """A model's drift in the ``fleet status`` table: the PSI, ``n/a`` when its version
    has no reference, ``-`` (with the samples so far) before there is a score."""
    if samples is None:
        return "n/a"
    if drift is None:
        return f"- ({samples})"
    return f"{drift:.3f}"
