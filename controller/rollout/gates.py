"""Rollout health gates: parsing the operator's gate text and judging a stage's evidence.

Pure: ``evaluate_gates`` is a function of the policy and the evidence of one stage's
window, gathered by ``controller.rollout.service``: a ``RolledEvidence`` (the sums the
store keeps as it stores heartbeats, ``controller.fleet.rollup``: what a tick judges) or
an ``Evidence`` (the heartbeats themselves and lifecycle events: the reference the
rolled evidence is tested against); it never reads a clock or a store.

Gates (``edgectl rollout start --gate``, laid over ``DEFAULT_GATES`` by
``gates_from_cli``: a gate given replaces that gate only, ``name=off`` drops one), each
``metric<limit``; the stage keeps going while every figure stays *below* its limit:

``error_rate``       errors / served requests of the new version, summed over devices
                     (served = requests − client errors; a 4xx is the caller's fault),
                     each device's requests counted up to ``judge_n`` (its errors in
                     proportion): per device, so that one device reporting a flood of
                     clean requests cannot hide another's failures.
``p99_ratio``        the median over devices of the new version's p99 latency, divided by
                     the previous version's (the same median over devices still running
                     it, or the baseline measured earlier in the rollout). From a
                     ``RolledEvidence``: a device's p99 is the mean of its heartbeats',
                     the previous version's the median over its heartbeats (log bins,
                     within 0.99 %).
``failed_installs``  devices whose install of the new version failed (golden vectors, an
                     unpackable or untrusted bundle, a phase deadline) or that rolled it
                     back (probation, crash loop), over the devices that tried it.
``rollbacks``        the rolled-back share alone (optional, stricter on its own).
``drift``            the largest drift (PSI of a device's outputs against the bundle's
                     drift reference, ``agent.runtime.drift``) among the devices on the new
                     version, each device's newest score in the window (optional, e.g.
                     ``drift<0.2``). With it, a stage passes only once a device reported a
                     score: no reference in the bundle, or no traffic, is no evidence.

Two gates on what devices saw of the new version *in shadow* (beside the serving version,
on copies of live requests, before it answered a client: ``agent.update.lifecycle``);
optional (not in ``DEFAULT_GATES``), judged on the shadow reports of devices that reached
a verdict (``passed`` or ``failed``: the device compared the samples its policy asks for),
the worst device naming the figure:

``shadow_agreement``      ``shadow_agreement>LIMIT``: the lowest top-1 agreement over
                          devices must stay *above* the limit (the one gate written with
                          ``>``); devices whose outputs are not class scores report none.
``shadow_latency_ratio``  the highest median run-time ratio candidate / serving.

A candidate that fails its shadow on a device also sends ``install_failed``, which
``failed_installs`` counts: the shadow gates add the fleet's own thresholds to the
devices' policy, so a rollout halts at its first stage with no client-visible error.

And two evidence floors, ``name=value``:

``min_devices``      devices reporting heartbeats on the new version in the stage window
                     before the stage may pass (default 3).
``min_requests``     served requests on the new version, summed, before it may pass
                     (default 0: a quiet fleet still advances, as a quiet device commits).

Evidence rules, the fleet-level twin of the device's probation (``agent.update.probation``):
- ``error_rate`` is judged once ``judge_n = max(min_requests, 20, ceil(3 / limit))``
  requests were served (300 for a 1 % limit: enough that one error is not a verdict);
  before that it breaks only when the breach is already certain (``errors >= limit *
  judge_n``, i.e. at least 3 errors), so one unlucky error does not halt a rollout but a
  version that fails everything does, after its third error. A device weighs at most
  ``judge_n`` requests, the evidence that suffices to judge: below it the weighting
  changes nothing, above it a device's figures are scaled down, so a device that claims
  a million clean requests counts as ``judge_n`` clean ones. The report's ``served`` and
  ``errors`` stay the sums devices reported; its ``error_rate`` is the weighted one.
- ``p99_ratio`` is judged only with at least 100 requests on each side: below that a
  p99 is the maximum of a handful.
- ``failed_installs`` and ``rollbacks`` break on the first failure that puts the share at
  or over the limit: one failure in three devices is a third of the stage.
A broken gate halts the stage whatever ``min_devices`` says: evidence of harm is enough;
passing needs enough evidence of health.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from controller.base.errors import UsageError
from controller.fleet.rollup import DeviceTotals, binned_median

LIMIT_METRICS: Final = (
    "error_rate",
    "p99_ratio",
    "failed_installs",
    "rollbacks",
    "shadow_agreement",
    "shadow_latency_ratio",
    "drift",
)
# The limits a figure must stay above (``metric>limit``); every other one, below.
ABOVE_METRICS: Final = frozenset({"shadow_agreement"})
# Shadow reports judged: those of a device that reached its verdict.
SHADOW_VERDICTS: Final = frozenset({"passed", "failed"})
FLOOR_NAMES: Final = ("min_devices", "min_requests")
DEFAULT_GATES: Final = "error_rate<0.01,p99_ratio<1.5,failed_installs<0.02,min_devices=3"
MIN_REQUESTS_TO_JUDGE: Final = 20
# Errors that must be seen before an error rate may halt a rollout (sets judge_n).
MIN_ERRORS_TO_HALT: Final = 3
MIN_LATENCY_REQUESTS: Final = 100
# Devices named in a breach, worst first; the count says how many there were in all.
MAX_NAMED_DEVICES: Final = 10
FAILURE_KINDS: Final = frozenset({"install_failed", "rolled_back"})


@dataclass(frozen=True)
class Gate:
    metric: str
    limit: float


@dataclass(frozen=True)
class GatePolicy:
    """The gates of a rollout: limits on figures, and evidence floors."""

    limits: tuple[Gate, ...]
    min_devices: int = 3
    min_requests: int = 0

    def limit(self, metric: str) -> float | None:
        return next((g.limit for g in self.limits if g.metric == metric), None)

    def to_text(self) -> str:
        parts = [
            f"{g.metric}{'>' if g.metric in ABOVE_METRICS else '<'}{g.limit:g}" for g in self.limits
        ]
        parts.append(f"min_devices={self.min_devices}")
        if self.min_requests:
            parts.append(f"min_requests={self.min_requests}")
        return ",".join(parts)


def parse_gates(text: str) -> GatePolicy:
    """``"error_rate<0.01,p99_ratio<1.5,min_devices=3"`` → GatePolicy; raises UsageError.

    The text is the full set: a limit not named is not a gate. This reads a stored
    rollout's ``to_text()``; the operator's ``--gate`` goes through ``gates_from_cli``.
    """
    limits: dict[str, float] = {}
    floors = {"min_devices": 3, "min_requests": 0}
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            continue
        if "<" in part or ">" in part:
            sign = "<" if "<" in part else ">"
            name, _, value = part.partition(sign)
            name = name.strip()
            if name not in LIMIT_METRICS:
                raise UsageError(
                    f"--gate: unknown metric {name!r}; expected one of {', '.join(LIMIT_METRICS)}"
                )
            wanted = ">" if name in ABOVE_METRICS else "<"
            if sign != wanted:
                raise UsageError(
                    f"--gate: {part!r}: {name} is written {name}{wanted}LIMIT (the figure must "
                    f"stay {'above' if wanted == '>' else 'below'} it)"
                )
            limits[name] = _number(value, part, integer=False)
        elif "=" in part:
            name, _, value = part.partition("=")
            name = name.strip()
            if name not in FLOOR_NAMES:
                raise UsageError(
                    f"--gate: unknown setting {name!r}; expected one of {', '.join(FLOOR_NAMES)}"
                )
            floors[name] = int(_number(value, part, integer=True))
        else:
            raise UsageError(
                f"--gate: expected metric<limit or name=value, got {part!r} (e.g. {DEFAULT_GATES})"
            )
    for name in ("error_rate", "failed_installs", "rollbacks"):
        if name in limits and not 0 < limits[name] <= 1:
            raise UsageError(f"--gate: {name} is a share within (0, 1], got {limits[name]:g}")
    if "p99_ratio" in limits and not limits["p99_ratio"] > 0:
        raise UsageError(f"--gate: p99_ratio must be > 0, got {limits['p99_ratio']:g}")
    if "shadow_agreement" in limits and not 0 <= limits["shadow_agreement"] < 1:
        raise UsageError(
            f"--gate: shadow_agreement is a share within [0, 1), got {limits['shadow_agreement']:g}"
        )
    if "shadow_latency_ratio" in limits and not limits["shadow_latency_ratio"] > 0:
        raise UsageError(
            f"--gate: shadow_latency_ratio must be > 0, got {limits['shadow_latency_ratio']:g}"
        )
    if "drift" in limits and not limits["drift"] > 0:
        raise UsageError(f"--gate: drift is a PSI > 0, got {limits['drift']:g}")
    return GatePolicy(
        limits=tuple(Gate(m, limits[m]) for m in LIMIT_METRICS if m in limits),
        min_devices=floors["min_devices"],
        min_requests=floors["min_requests"],
    )


GATE_NAMES: Final = (*LIMIT_METRICS, *FLOOR_NAMES)
OFF: Final = "off"


def gates_from_cli(text: str | None) -> GatePolicy:
    """The operator's ``--gate`` text laid over ``DEFAULT_GATES``: raises UsageError.

    Each gate given replaces that gate only; the others keep their defaults.
    ``metric=off`` drops a limit (``error_rate=off``), ``min_devices=off`` and
    ``min_requests=off`` set the floor to 0. A stored rollout's gates are the full
    effective set: read them with ``parse_gates``, never with this.
    """
    policy = parse_gates(DEFAULT_GATES)
    limits = {g.metric: g.limit for g in policy.limits}
    floors = {"min_devices": policy.min_devices, "min_requests": policy.min_requests}
    overrides: list[str] = []
    seen: set[str] = set()
    floors_given: set[str] = set()
    for raw in (text or "").split(","):
        part = raw.strip()
        if not part:
            continue
        name = part.split("<", 1)[0].split(">", 1)[0].split("=", 1)[0].strip()
        if name not in GATE_NAMES:
            raise UsageError(
                f"--gate: unknown gate {name!r} in {part!r}; valid gates: {', '.join(GATE_NAMES)}"
            )
        if name in seen:
            raise UsageError(f"--gate: {name} given twice")
        seen.add(name)
        if "=" in part and part.partition("=")[2].strip().lower() == OFF:
            if name in LIMIT_METRICS:
                limits.pop(name, None)
            else:
                floors[name] = 0
            continue
        if name in LIMIT_METRICS and "<" not in part and ">" not in part:
            sign = ">" if name in ABOVE_METRICS else "<"
            raise UsageError(
                f"--gate: {part!r}: {name} takes a limit ({name}{sign}LIMIT) or {name}={OFF}"
            )
        if name in FLOOR_NAMES and "=" not in part:
            raise UsageError(f"--gate: {part!r}: {name} takes a count ({name}=N) or {name}={OFF}")
        overrides.append(part)
        if name in FLOOR_NAMES:
            floors_given.add(name)
    given = parse_gates(",".join(overrides))
    limits.update((g.metric, g.limit) for g in given.limits)
    for name in floors_given:
        floors[name] = getattr(given, name)
    return GatePolicy(
        limits=tuple(Gate(m, limits[m]) for m in LIMIT_METRICS if m in limits),
        min_devices=floors["min_devices"],
        min_requests=floors["min_requests"],
    )


def _number(value: str, part: str, integer: bool) -> float:
    try:
        number = int(value) if integer else float(value)
    except ValueError:
        kind = "a whole number" if integer else "a number"
        raise UsageError(f"--gate: {part!r} expected {kind} after the sign") from None
    if not number >= 0:
        raise UsageError(f"--gate: {part!r} must not be negative")
    return number


# ---------------------------------------------------------------------------- evidence


@dataclass(frozen=True)
class Sample:
    """One heartbeat's figures for the rollout's model, on whichever version served."""

    device: str
    at: float
    version: str | None
    requests: int = 0
    errors: int = 0
    client_errors: int = 0
    p99_s: float | None = None


@dataclass(frozen=True)
class Incident:
    """A lifecycle event of the new version: ``install_started``, ``install_failed``,
    ``rolled_back``, ``committed`` …, with the device's reason."""

    device: str
    at: float
    kind: str
    reason: str = ""


@dataclass(frozen=True)
class ShadowSample:
    """A device's latest shadow report for the new version (``TelemetryStore.shadow_reports``):
    its state (running, passed, failed, cancelled) and figures."""

    device: str
    state: str
    samples: int
    agreement: float | None = None
    latency_ratio: float | None = None


@dataclass(frozen=True)
class Evidence:
    """What one stage's window holds for a rollout of ``version`` over ``previous``."""

    version: str
    previous: str | None
    samples: tuple[Sample, ...] = ()
    incidents: tuple[Incident, ...] = ()
    # The previous version's p99 measured earlier in the rollout (a fallback baseline).
    baseline_p99_s: float | None = None
    shadows: tuple[ShadowSample, ...] = ()
    # -- drift (issue 23): each device's newest drift score on the new version in the
    # window (``controller.fleet.drift.latest_drift``), by device.
    drift: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RolledEvidence:
    """A stage window as the store sums it at ingest (``controller.fleet.rollup``), the
    evidence a tick judges: the new version's sums by device, and the previous version's
    served requests and p99 bins. What it gives against ``Evidence`` (the heartbeats, the
    reference): the same counts and device sets over a window that starts at the time
    bucket holding the stage start; a device's p99 is the mean of its heartbeats' p99s
    (not their median); the previous version's p99 is the median of its heartbeats' p99s
    read from log bins (within 0.99 %), not the median over devices of each one's median.
    """

    version: str
    previous: str | None
    devices: tuple[DeviceTotals, ...] = ()  # of ``version``
    previous_served: int = 0
    previous_latency: Mapping[int, int] = field(default_factory=dict)  # bin → heartbeats
    incidents: tuple[Incident, ...] = ()
    baseline_p99_s: float | None = None
    shadows: tuple[ShadowSample, ...] = ()
    # -- drift (issue 23): as ``Evidence.drift``.
    drift: Mapping[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class DeviceFigures:
    requests: int = 0
    errors: int = 0
    client_errors: int = 0
    p99s: list[float] = field(default_factory=list)

    @property
    def served(self) -> int:
        return self.requests - self.client_errors

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.served if self.served > 0 else None

    @property
    def p99_s(self) -> float | None:
        if len(self.p99s) == 1:  # a rolled device's, or a device's single heartbeat
            return self.p99s[0]
        return statistics.median(self.p99s) if self.p99s else None

    def add(self, s: Sample) -> None:
        self.requests += s.requests
        self.errors += s.errors
        self.client_errors += s.client_errors
        if s.p99_s is not None and s.requests > s.client_errors:
            self.p99s.append(s.p99_s)


def per_device(samples: Iterable[Sample], version: str | None) -> dict[str, DeviceFigures]:
    out: dict[str, DeviceFigures] = {}
    for s in samples:
        if s.version == version:
            out.setdefault(s.device, DeviceFigures()).add(s)
    return out


@dataclass(frozen=True)
class Breach:
    """A gate that broke: the figure against its limit and the devices behind it."""

    gate: str
    limit: float
    observed: float
    detail: str
    devices: Mapping[str, str]  # device → its own figure, worst first
    device_count: int

    def describe(self) -> str:
        named = ", ".join(f"{d} ({fig})" for d, fig in self.devices.items())
        more = self.device_count - len(self.devices)
        return (
            f"gate {self.gate}{'>' if self.gate in ABOVE_METRICS else '<'}{self.limit:g} "
            f"broke: {self.observed:.4g} ({self.detail})"
            + (f" on {named}" if named else "")
            + (f" and {more} more" if more > 0 else "")
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "gate": self.gate,
            "limit": self.limit,
            "observed": self.observed,
            "detail": self.detail,
            "devices": dict(self.devices),
            "device_count": self.device_count,
        }


@dataclass(frozen=True)
class GateReport:
    """The verdict on one stage window: the breaches, and whether evidence suffices."""

    breaches: tuple[Breach, ...]
    reporting: tuple[str, ...]  # devices with heartbeats on the new version
    served: int
    errors: int
    error_rate: float | None
    p99_s: float | None
    baseline_p99_s: float | None
    p99_ratio: float | None
    attempted: int
    failed: int
    rolled_back: int
    min_devices: int
    min_requests: int
    # The worst shadow figures over devices that reached a verdict (None: none did).
    shadow_agreement: float | None = None
    shadow_latency_ratio: float | None = None
    shadowed: int = 0
    # -- drift (issue 23): the worst device's drift on the new version, the devices that
    # reported one, and whether a drift gate asks for it (then passing needs one).
    drift: float | None = None
    drift_devices: int = 0
    drift_gated: bool = False

    @property
    def enough(self) -> bool:
        return (
            len(self.reporting) >= self.min_devices
            and self.served >= self.min_requests
            and (not self.drift_gated or self.drift_devices > 0)
        )

    @property
    def healthy(self) -> bool:
        return not self.breaches and self.enough

    def shortfall(self) -> str:
        """What evidence is missing, in words (empty when there is enough)."""
        parts = []
        if len(self.reporting) < self.min_devices:
            parts.append(
                f"only {len(self.reporting)} of min_devices={self.min_devices} devices "
                "reporting the new version"
            )
        if self.served < self.min_requests:
            parts.append(f"only {self.served} of min_requests={self.min_requests} requests")
        if self.drift_gated and not self.drift_devices:
            parts.append(
                "no drift evidence: no device on the new version reported a drift score (the "
                "bundle needs a reference, `bundle build --eval`, and a device 100 samples)"
            )
        return " and ".join(parts)

    def summary(self) -> dict[str, Any]:
        return {
            "reporting": len(self.reporting),
            "served": self.served,
            "errors": self.errors,
            "error_rate": self.error_rate,
            "p99_s": self.p99_s,
            "baseline_p99_s": self.baseline_p99_s,
            "p99_ratio": self.p99_ratio,
            "attempted": self.attempted,
            "failed": self.failed,
            "rolled_back": self.rolled_back,
            "enough": self.enough,
            "breaches": [b.gate for b in self.breaches],
            "shadowed": self.shadowed,
            "shadow_agreement": self.shadow_agreement,
            "shadow_latency_ratio": self.shadow_latency_ratio,
            "drift": self.drift,
            "drift_devices": self.drift_devices,
        }


def judge_n(policy: GatePolicy, limit: float) -> int:
    """Served requests before an error rate against ``limit`` is judged (module docstring)."""
    return max(policy.min_requests, MIN_REQUESTS_TO_JUDGE, math.ceil(MIN_ERRORS_TO_HALT / limit))


def weighted(figures: Mapping[str, DeviceFigures], cap: float | None) -> tuple[float, float]:
    """(served, errors) summed over devices, each device's served requests counted up to
    ``cap`` and its errors in proportion (``cap`` None: the plain sums)."""
    served = errors = 0.0
    for f in figures.values():
        mine = f.requests - f.client_errors  # f.served, read once: a tick has many devices
        share = cap / mine if cap is not None and mine > cap else 1.0
        served += max(mine, 0) * share
        errors += f.errors * share
    return served, errors


def evaluate_gates(policy: GatePolicy, evidence: Evidence | RolledEvidence) -> GateReport:
    """Judge one stage window against ``policy`` (see the module docstring's rules)."""
    if isinstance(evidence, RolledEvidence):
        new = {
            d.device: DeviceFigures(
                d.requests, d.errors, d.client_errors, [d.p99_sum / d.p99_n] if d.p99_n else []
            )
            for d in evidence.devices
        }
        old_served = evidence.previous_served if evidence.previous else 0
        old_p99 = binned_median(evidence.previous_latency) if evidence.previous else None
    else:
        new = per_device(evidence.samples, evidence.version)
        old = per_device(evidence.samples, evidence.previous) if evidence.previous else {}
        old_served = sum(f.served for f in old.values())
        old_p99 = _median_p99(old)
    served = sum(f.requests - f.client_errors for f in new.values())
    errors = sum(f.errors for f in new.values())
    limit = policy.limit("error_rate")
    weighted_served, weighted_errors = weighted(
        new, judge_n(policy, limit) if limit is not None else None
    )
    p99_new = _median_p99(new)
    baseline = old_p99 if old_served >= MIN_LATENCY_REQUESTS else None
    baseline = baseline if baseline is not None else evidence.baseline_p99_s
    ratio = p99_new / baseline if p99_new is not None and baseline else None
    failed = _devices_with(evidence.incidents, FAILURE_KINDS)
    rolled_back = _devices_with(evidence.incidents, {"rolled_back"})
    attempted = set(new) | {i.device for i in evidence.incidents}
    breaches = [
        b
        for b in (
            _error_rate_breach(policy, new, (served, errors), (weighted_served, weighted_errors)),
            _latency_breach(policy, new, served, p99_new, baseline, ratio),
            _failure_breach(policy, "failed_installs", failed, attempted),
            _failure_breach(policy, "rollbacks", rolled_back, attempted),
            *_shadow_breaches(policy, evidence.shadows),
            _drift_breach(policy, evidence.drift),
        )
        if b is not None
    ]
    judged = [x for x in evidence.shadows if x.state in SHADOW_VERDICTS]
    agreements = [x.agreement for x in judged if x.agreement is not None]
    ratios = [x.latency_ratio for x in judged if x.latency_ratio is not None]
    return GateReport(
        breaches=tuple(breaches),
        reporting=tuple(sorted(new)),
        served=served,
        errors=errors,
        error_rate=weighted_errors / weighted_served if weighted_served > 0 else None,
        p99_s=p99_new,
        baseline_p99_s=baseline,
        p99_ratio=ratio,
        attempted=len(attempted),
        failed=len(failed),
        rolled_back=len(rolled_back),
        min_devices=policy.min_devices,
        min_requests=policy.min_requests,
        shadow_agreement=min(agreements) if agreements else None,
        shadow_latency_ratio=max(ratios) if ratios else None,
        shadowed=len(judged),
        drift=max(evidence.drift.values(), default=None),
        drift_devices=len(evidence.drift),
        drift_gated=policy.limit("drift") is not None,
    )


def _shadow_breaches(
    policy: GatePolicy, shadows: Iterable[ShadowSample]
) -> tuple[Breach | None, Breach | None]:
    """The shadow gates (module docstring): each breaks on the worst device that reached
    a verdict, naming every device past the limit."""
    judged = [x for x in shadows if x.state in SHADOW_VERDICTS]
    found: list[Breach | None] = []
    for gate, above in (("shadow_agreement", True), ("shadow_latency_ratio", False)):
        limit = policy.limit(gate)
        if limit is None:
            found.append(None)
            continue
        figures = [
            (x.device, v, x.samples)
            for x in judged
            if (v := x.agreement if above else x.latency_ratio) is not None
        ]
        bad = [(d, v, n) for d, v, n in figures if (v <= limit if above else v >= limit)]
        if not bad:
            found.append(None)
            continue
        worst = min(v for _d, v, _n in bad) if above else max(v for _d, v, _n in bad)
        what = "top-1 agreement" if above else "run-time ratio"
        ranked = [
            ((1 - v) if above else v, d, f"{what} {v:.3g} over {n} requests") for d, v, n in bad
        ]
        devices, count = _named(ranked)
        detail = f"{len(bad)} of {len(figures)} devices in shadow past the limit"
        found.append(Breach(gate, limit, worst, detail, devices, count))
    return found[0], found[1]


def _drift_breach(policy: GatePolicy, drift: Mapping[str, float]) -> Breach | None:
    """The drift gate: the worst device's newest drift on the new version against the
    limit (one device whose outputs moved away from the reference is enough)."""
    limit = policy.limit("drift")
    if limit is None or not drift:
        return None
    worst = max(drift.values())
    if worst < limit:
        return None
    ranked = [(d, device, f"PSI {d:.3f}") for device, d in drift.items() if d >= limit]
    devices, count = _named(ranked)
    detail = f"the worst of {len(drift)} devices' drift against the bundle's reference"
    return Breach("drift", limit, worst, detail, devices, count)


def _median_p99(figures: Mapping[str, DeviceFigures]) -> float | None:
    values = [p for f in figures.values() if (p := f.p99_s) is not None]
    return statistics.median(values) if values else None


def _devices_with(incidents: Iterable[Incident], kinds: Iterable[str]) -> dict[str, str]:
    wanted = set(kinds)
    out: dict[str, str] = {}
    for i in sorted(incidents, key=lambda i: i.at):
        if i.kind in wanted:
            out[i.device] = f"{i.kind}: {i.reason}" if i.reason else i.kind
    return out


def _clip(reason: str, limit: int = 300) -> str:
    """A device's reason, short enough for a status line; a cut one ends in '...'."""
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


def _named(ranked: list[tuple[float, str, str]]) -> tuple[dict[str, str], int]:
    ranked.sort(key=lambda t: (-t[0], t[1]))
    return {d: text for _, d, text in ranked[:MAX_NAMED_DEVICES]}, len(ranked)


def _error_rate_breach(
    policy: GatePolicy,
    new: Mapping[str, DeviceFigures],
    reported: tuple[int, int],
    counted: tuple[float, float],
) -> Breach | None:
    """``reported``: (served, errors) as devices reported them; ``counted``: the same
    with each device weighted up to ``judge_n`` (``weighted``)."""
    limit = policy.limit("error_rate")
    served, errors = counted
    if limit is None or errors <= 0:
        return None
    n = judge_n(policy, limit)
    rate = errors / served if served > 0 else 1.0
    said = f"{reported[1]} errors in {reported[0]} requests"
    if served >= n and rate >= limit:
        detail = said if served == reported[0] else f"{said}, each device counted up to {n}"
    elif served < n and errors >= limit * n:
        detail = f"certain: {reported[1]} errors in the first {reported[0]} requests"
    else:
        return None
    ranked = [
        (r, d, f"{f.errors}/{f.served} errors")
        for d, f in new.items()
        if (r := f.error_rate) is not None and f.errors and r >= limit
    ]
    devices, count = _named(ranked)
    return Breach("error_rate", limit, rate, detail, devices, count)


def _latency_breach(
    policy: GatePolicy,
    new: Mapping[str, DeviceFigures],
    served: int,
    p99_new: float | None,
    baseline: float | None,
    ratio: float | None,
) -> Breach | None:
    limit = policy.limit("p99_ratio")
    if limit is None or ratio is None or baseline is None or p99_new is None:
        return None
    if served < MIN_LATENCY_REQUESTS or ratio < limit:
        return None
    ranked = [
        (p / baseline, d, f"p99 {p * 1000:.3g} ms")
        for d, f in new.items()
        if (p := f.p99_s) is not None and p / baseline >= limit
    ]
    devices, count = _named(ranked)
    detail = f"p99 {p99_new * 1000:.3g} ms vs previous {baseline * 1000:.3g} ms"
    return Breach("p99_ratio", limit, ratio, detail, devices, count)


def _failure_breach(
    policy: GatePolicy, gate: str, failed: Mapping[str, str], attempted: set[str]
) -> Breach | None:
    limit = policy.limit(gate)
    if limit is None or not failed:
        return None
    share = len(failed) / max(len(attempted), len(failed))
    if share < limit:
        return None
    devices, count = _named([(1.0, d, _clip(reason)) for d, reason in failed.items()])
    detail = f"{len(failed)} of {max(len(attempted), len(failed))} devices"
    return Breach(gate, limit, share, detail, devices, count)
