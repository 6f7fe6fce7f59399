"""Rollout evidence aggregated at ingest: the rows a batch of heartbeats adds to the
store's rollup tables, and the latency bins they count in. Pure (no SQL connection).

A rollout tick judges a stage window by version (``controller.rollout.gates``). Reading
and decoding every heartbeat of the window grew with the fleet (5 s a tick at 100,000
devices, docs/benchmarks.md), so the store keeps, as it stores each heartbeat and in the
same transaction, three small tables of sums by time bucket (``BUCKET_S`` seconds of
``received_at``, the controller's clock, as the window is):

- ``rollout_figures`` (fleet, model, version, bucket): heartbeats, requests, errors and
  client errors, summed;
- ``rollout_latency`` (fleet, model, version, bucket, bin): heartbeats whose p99 fell in
  each log bin (``latency_bin``), counting those the gates count: a p99 given, and more
  requests than client errors (something was served);
- ``rollout_devices`` (fleet, model, version, bucket, device): the same sums per device,
  and the sum and count of its counted p99s, so the per-device rules (each device's
  errors weighed up to ``judge_n``, which devices report) stay exact.

A tick reads O(versions × buckets) rows of the first two and, for the new version only,
one indexed range of the third grouped by device in SQL. Heartbeats carry no rollout id,
so rows are keyed by version, as the heartbeats the window read before were.

Latency bins: bin ``i`` holds p99s in (γ^(i-1), γ^i] seconds, γ = ``GAMMA`` = 1.02, and
stands for ``2γ^i / (γ + 1)``, within ``ALPHA`` = (γ − 1)/(γ + 1) < 0.99 % of every value
in it (the DDSketch layout). p99s below ``MIN_LATENCY_S`` (1 µs) count as 1 µs. A median
read from bins is within 0.99 % of the median of the values, so a p99 ratio of two such
medians within (1 + α)/(1 − α) − 1 ≈ 2 % of the ratio of the exact ones. The bins are
mergeable: adding counts is merging sketches, in any order, across workers.

Invariants:
- Only heartbeats the history table did not already hold are counted (a redelivered
  heartbeat, same (at, seq), adds nothing): ``write`` passes the rows it inserted.
- Rows are sorted by key, as the other rows of a batch (concurrent writers on PostgreSQL
  take the row locks in one order: no deadlock).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from math import ceil
from typing import Any, Final, NamedTuple

# Width of a time bucket, seconds. A window is read from the start of the bucket that
# holds its start: up to BUCKET_S seconds of heartbeats before it count too.
BUCKET_S: Final = 60.0
GAMMA: Final = 1.02
ALPHA: Final = (GAMMA - 1) / (GAMMA + 1)
MIN_LATENCY_S: Final = 1e-6
_LOG_GAMMA: Final = math.log(GAMMA)

# One model of a heartbeat: (name, version, state, requests, errors, client_errors, p99_s),
# as ``controller.fleet.records.ModelFacts``.
ModelFigures = tuple[str, str | None, str, int, int, int, float | None]


def bucket_of(at: float) -> float:
    """The start of the time bucket holding ``at`` (epoch seconds)."""
    return math.floor(at / BUCKET_S) * BUCKET_S


def latency_bin(seconds: float) -> int:
    """The log bin of a latency (module docstring)."""
    return math.ceil(math.log(max(seconds, MIN_LATENCY_S)) / _LOG_GAMMA)


def bin_value(index: int) -> float:
    """The latency a bin stands for: within ``ALPHA`` of any value in it."""
    return 2 * GAMMA**index / (GAMMA + 1)


def binned_median(bins: Mapping[int, int]) -> float | None:
    """The median of the values counted in ``bins`` (bin → count), as ``statistics.median``
    takes it (the mean of the two middle ones when the count is even), each value read as
    its bin's ``bin_value``; None when empty."""
    total = sum(bins.values())
    if total <= 0:
        return None
    lower_rank, upper_rank = (total - 1) // 2, total // 2
    lower = upper = None
    seen = 0
    for index in sorted(bins):
        seen += bins[index]
        if lower is None and seen > lower_rank:
            lower = bin_value(index)
        if seen > upper_rank:
            upper = bin_value(index)
            break
    assert lower is not None and upper is not None
    return (lower + upper) / 2


def counted_p99(requests: int, client_errors: int, p99: float | None) -> float | None:
    """The p99 the gates count: given, with something served in the interval."""
    return p99 if p99 is not None and requests > client_errors else None


def rollup_rows(
    beats: Iterable[tuple[str, str, float, Iterable[ModelFigures]]],
) -> dict[str, list[tuple[Any, ...]]]:
    """The rollup rows of heartbeats given as (fleet, device, received_at, models):
    ``figures``, ``latency`` and ``devices`` (in the column order of
    ``controller.fleet.store.ROLLUP``), each summed over the heartbeats that share its
    key and sorted by it. Models without a version are left out (no gate can count them).

    Runs for every stored heartbeat: the sums of one (fleet, model, version, bucket) are
    kept together (its figures, its bins, its devices), so each heartbeat builds and
    hashes one key tuple, not three."""
    # (fleet, model, version, bucket) -> [figures, {bin: n}, {device: sums}]
    groups: dict[tuple[str, str, str, float], list[Any]] = {}
    floor, log, width, low = math.floor, math.log, BUCKET_S, MIN_LATENCY_S
    for fleet, device, received, models in beats:
        bucket = floor(received / width) * width
        for name, version, _state, requests, errors, client_errors, p99 in models:
            if version is None:
                continue
            key = (fleet, name, version, bucket)
            group = groups.get(key)
            if group is None:
                group = groups[key] = [[0, 0, 0, 0], {}, {}]
            sums, bins, devices = group
            sums[0] += 1
            sums[1] += requests
            sums[2] += errors
            sums[3] += client_errors
            if p99 is not None and requests > client_errors:  # counted_p99
                at = ceil(log(max(p99, low)) / _LOG_GAMMA)
                bins[at] = bins.get(at, 0) + 1
            else:
                p99 = None
            mine = devices.get(device)
            if mine is None:
                devices[device] = [
                    requests,
                    errors,
                    client_errors,
                    p99 or 0.0,
                    0 if p99 is None else 1,
                ]
            else:
                mine[0] += requests
                mine[1] += errors
                mine[2] += client_errors
                if p99 is not None:
                    mine[3] += p99
                    mine[4] += 1
    figures: list[tuple[Any, ...]] = []
    latency: list[tuple[Any, ...]] = []
    by_device: list[tuple[Any, ...]] = []
    for key in sorted(groups):
        sums, bins, devices = groups[key]
        figures.append((*key, *sums))
        latency += [(*key, at, bins[at]) for at in sorted(bins)]
        by_device += [(*key, device, *devices[device]) for device in sorted(devices)]
    return {"figures": figures, "latency": latency, "devices": by_device}


def payload_models(payload: Mapping[str, Any]) -> list[ModelFigures]:
    """The models of a stored heartbeat payload (JSON decoded), read as the rollout's
    evidence reads them (``controller.rollout.service._sample``): a count that is not an
    integer counts 0, a p99 that is not a number is none. For seeding the rollup of
    heartbeats stored before it existed."""
    models = payload.get("models")
    out: list[ModelFigures] = []
    if not isinstance(models, dict):
        return out
    for name, entry in sorted(models.items()):
        if not isinstance(entry, dict):
            continue

        def count(key: str, entry: Mapping[str, Any] = entry) -> int:
            value = entry.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) else 0

        version = entry.get("version")
        p99 = entry.get("p99_s")
        out.append(
            (
                str(name),
                version if isinstance(version, str) else None,
                "",
                count("requests"),
                count("errors"),
                count("client_errors"),
                float(p99) if isinstance(p99, int | float) and not isinstance(p99, bool) else None,
            )
        )
    return out


@dataclass(frozen=True)
class VersionTotals:
    """One version's sums over a window's buckets (``rollout_figures``, ``rollout_latency``)."""

    beats: int = 0
    requests: int = 0
    errors: int = 0
    client_errors: int = 0
    latency: Mapping[int, int] = field(default_factory=dict)  # bin → heartbeats


class DeviceTotals(NamedTuple):
    """One device's sums over a window's buckets, on one version (``rollout_devices``):
    a tuple, since a tick builds one per device on the new version."""

    device: str
    requests: int
    errors: int
    client_errors: int
    p99_sum: float
    p99_n: int


@dataclass(frozen=True)
class RolloutRollup:
    """What ``TelemetryStore.rollout_rollup`` reads for one tick: the sums of each version
    asked for (absent: no heartbeat on it), and the devices of the one asked by device."""

    versions: Mapping[str, VersionTotals]
    devices: tuple[DeviceTotals, ...]
