"""What reading one rollout tick's telemetry costs at fleet scale, and what summing it at
ingest costs the store's writes.

A real telemetry store (SQLite in a temporary folder, and PostgreSQL in a fresh schema
of ``EDGEFLEET_TEST_PG_DSN``, default the local server, unless ``--no-postgres``) filled
through the store's own write path (``TelemetryStore.write`` of heartbeat facts, as
ingestion stores them): for each size in ``--devices``, that many devices in the rolled
out fleet (a tenth on the new version), each with ``--beats`` heartbeats 10 s apart
ending now, carrying the model's figures, plus a second fleet of a tenth of the size. A
rollout's stage started 45-105 s ago, on a minute (a rollup bucket's start, so that both
reads cover the same heartbeats). It times, median of ``--repeat`` calls each:

- ``rolled_evidence``: what a tick judges, the sums the store kept at ingest
  (``controller.fleet.rollup``), with the gates evaluated on it;
- the heartbeats themselves (``RolloutService.evidence``, what a tick read before, kept
  as the reference), with the gates evaluated: the first tick of a stage (a fresh
  service, the whole window read) and a later one (the same service 5 s on, reading the
  newest heartbeats with the ``WINDOW_OVERLAP_S`` overlap);
- ``fleet_counts``, the device counts a tick saves for ``rollout status``;
- the whole tick, ``RolloutService.tick`` end to end as ``edgectl serve``'s job runs it:
  a real repository (``init_repository``, 1.0.0 released to the fleet, 2.0.0 rolled out
  by ``start_rollout`` at 10 %), its records settled, the evidence read and judged, the
  counts, the record saved and desired state published under the repository lock. The
  first tick of a rollout: after `edgectl rollout start` stored each device's place in
  the rollout (``place_rollout``, timed on its own; each first tick a fresh service, as
  a restarted `edgectl serve`), and, once, when nothing placed them (the tick then reads
  the fleet's ids and hashes each device's place itself, as every first tick did
  before); later ones, and ticks that each follow a batch adding one device (the store's
  log of device changes followed, in memory).

And, with ``--ingest N`` (default 20,000), ``TelemetryStore.write`` of N heartbeats in
batches of 2,000 (ingestion's default batch) into a fresh store, with the rollup and
without it (the write path before it: the heartbeat insert alone, nothing summed),
``--ingest-rounds`` stores each way, alternating: the store's time per message. A third
way: with the rollup but without the triggers that keep the device counts
(``rollout_census``). Half of these heartbeats are a device's first (its device and model
rows inserted, which the triggers count); in a fleet already known only a model moving to
another version fires one.
Both gate reports are compared: the run stops if they differ.

    python bench/rollout_evidence.py [--devices 10000,100000] [--repeat 5] [--no-postgres]
                                     [--ingest 20000] [--ingest-rounds 5] [--skip-heartbeats]
                                     [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    arguments,
    command_line,
    markdown_table,
    median_ms,
    parse_arguments,
    record_section,
    run_heading,
    store_backends,
)

from agent.contracts import ProbationPolicy
from controller.build.builder import build_bundle
from controller.fleet import store as store_module
from controller.fleet.records import HeartbeatFacts, IngestBatch
from controller.fleet.rollup import bucket_of
from controller.fleet.store import HEARTBEAT_INSERT, TelemetryStore
from controller.repository.release import release_bundle
from controller.repository.repo import init_repository
from controller.rollout.gates import evaluate_gates, parse_gates
from controller.rollout.service import RolloutService, place_rollout, start_rollout
from controller.rollout.stages import OnFailure, Rollout, RolloutState, new_rollout
from tests.controller.test_store_support import store_for
from tests.helpers import make_linear_model

FLEET = "fleet-00"
MODEL = "detector"
BATCH = 5000
INGEST_BATCH = 2000


def heartbeats(
    fleet: str, devices: int, beats: int, now: float
) -> list[tuple[HeartbeatFacts, float, str]]:
    """``devices`` devices of ``fleet``, each ``beats`` heartbeats 10 s apart up to ``now``."""
    rows = []
    for i in range(devices):
        device = f"{fleet}-dev-{i:06d}"
        version = "2.0.0" if i % 10 == 0 else "1.0.0"
        figures = {"version": version, "state": "committed", "requests": 100, "errors": i % 3}
        payload = json.dumps({"models": {MODEL: {**figures, "p99_s": 0.012}}})
        model = (MODEL, version, "committed", 100, i % 3, 0, 0.012)
        for k in range(beats):
            received = now - 10.0 * (beats - 1 - k) - (i % 10)
            facts = HeartbeatFacts(fleet, device, "0.9.0", 10.0, {}, 0, 0, (model,), f"t{k}", k + 1)
            rows.append((facts, received, payload))
    return rows


def fill(store: TelemetryStore, fleet: str, devices: int, beats: int, now: float) -> None:
    rows = heartbeats(fleet, devices, beats, now)
    for start in range(0, len(rows), BATCH):
        store.write(IngestBatch(heartbeat_facts=rows[start : start + BATCH]))


def without_rollup(store: TelemetryStore) -> None:
    """Make ``store`` write as it did before the rollup: the heartbeat insert alone."""

    def insert(cur: object, rows: list[tuple[object, ...]]) -> set[tuple[str, str, str, int]]:
        cur.executemany(store._sql(HEARTBEAT_INSERT), rows)  # type: ignore[attr-defined]
        return set()

    store._insert_heartbeats = insert  # type: ignore[method-assign]
    store._write_rollup = lambda cur, rows: None  # type: ignore[method-assign]


def without_count_triggers(store: TelemetryStore) -> None:
    """Drop the triggers that keep the count tables (``rollout_census``): the write as it
    was before them."""
    tables = {"devices_added": "devices", "devices_removed": "devices"}
    with store._write() as cur:
        for name in (
            "devices_added",
            "devices_removed",
            "device_models_added",
            "device_models_removed",
            "device_models_moved",
        ):
            on = f" ON {tables.get(name, 'device_models')}" if store.placeholder == "%s" else ""
            cur.execute(f"DROP TRIGGER IF EXISTS {name}{on}")


def ingest_cost(backend: str, folder: Path, args: argparse.Namespace) -> list[tuple[object, ...]]:
    """The store's time per heartbeat in ``TelemetryStore.write``, with the rollup and
    without it, ``--ingest-rounds`` fresh stores each, alternating: the median and the
    best of the rounds, wall clock and this process's CPU (SQLite's work is in-process;
    PostgreSQL's server is not counted in CPU)."""
    out: list[tuple[object, ...]] = []
    now = time.time()
    # As ingestion meets them: in the order received, a device's heartbeats batches apart.
    rows = sorted(heartbeats(FLEET, args.ingest // 2, 2, now), key=lambda row: row[1])
    labels = (
        "with the rollup",
        "with the rollup, without the count triggers",
        "without (the write before it)",
    )
    spent: dict[str, list[tuple[float, float]]] = {label: [] for label in labels}
    # The second half: every device's second heartbeat (the first ones sort before them).
    known: dict[str, list[float]] = {label: [] for label in labels}
    half = len(rows) // 2
    for n in range(args.ingest_rounds):
        for way, label in enumerate(labels):
            with store_for(backend, folder / f"{n}-{way}") as store:
                original = store_module.rollup_rows
                if label.startswith("without") or "triggers" in label:
                    without_count_triggers(store)
                if label.startswith("without"):
                    without_rollup(store)
                    store_module.rollup_rows = lambda beats: {}
                try:
                    wall, cpu = time.perf_counter(), time.process_time()
                    for at in range(0, len(rows), INGEST_BATCH):
                        if at == half:
                            cpu_half = time.process_time()
                        store.write(IngestBatch(heartbeat_facts=rows[at : at + INGEST_BATCH]))
                    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                    cpu_half = time.process_time() - cpu_half
                finally:
                    store_module.rollup_rows = original
            spent[label].append((wall / len(rows) * 1e6, cpu / len(rows) * 1e6))
            known[label].append(cpu_half / (len(rows) - half) * 1e6)
    for label in labels:
        walls = [w for w, _c in spent[label]]
        cpus = [c for _w, c in spent[label]]
        out.append(
            (
                backend,
                len(rows),
                label,
                f"{statistics.median(walls):.1f} / {min(walls):.1f}",
                f"{statistics.median(cpus):.1f} / {min(cpus):.1f}",
                f"{statistics.median(known[label]):.1f} / {min(known[label]):.1f}",
                args.ingest_rounds,
            )
        )
    return out


def rollout(now: float) -> Rollout:
    return new_rollout(
        rollout_id=f"{MODEL}-2.0.0-bench",
        fleet=FLEET,
        model=MODEL,
        version="2.0.0",
        previous="1.0.0",
        stages=(10, 100),
        wait_s=600.0,
        deadline_s=1800.0,
        gates=parse_gates("error_rate<0.01,min_devices=3"),
        canaries=(),
        on_failure=OnFailure.PAUSE,
        probation=ProbationPolicy(),
        # On a rollup bucket's start: both reads then cover the same heartbeats.
        now=bucket_of(now - 45.0),
    )


# The whole tick's rollout: the gates of ``rollout`` with room for the fill's error
# rate (about 1 %), so the stage goes on and every tick judges it.
TICK_GATES = "error_rate<0.05,min_devices=3"


def repository_with_rollout(folder: Path, now: float) -> Path:
    """A repository where the fleet runs 1.0.0 and a rollout of 2.0.0 at 10 % started
    45-105 s before ``now``, on a minute (as ``rollout``)."""
    repo = init_repository(folder / "repo")
    bundles = []
    for seed, version in ((1, "1.0.0"), (2, "2.0.0")):
        model = make_linear_model(folder / f"{version}.onnx", seed=seed)
        bundles.append(build_bundle(model, MODEL, version, folder / f"{version}.bundle", 4).path)
    release_bundle(bundles[0], FLEET, repo.path)
    start_rollout(
        repo.path,
        fleet=FLEET,
        model=MODEL,
        version="2.0.0",
        stages=(10, 100),
        wait_s=600.0,
        deadline_s=1800.0,
        gates=parse_gates(TICK_GATES),
        bundle=bundles[1],
        now=bucket_of(now - 45.0),
    )
    return repo.path


def whole_ticks(
    store: TelemetryStore, folder: Path, devices: int, now: float, repeat: int
) -> list[tuple[str, str, list[float]]]:
    """``RolloutService.tick`` timed end to end: the first of a rollout when nothing placed
    its devices (once), what `edgectl rollout start` does to place them, ``repeat`` first
    ticks after it (each a fresh service), ``repeat`` later ones, and ``repeat`` that each
    follow a batch adding a device to the fleet."""
    repo_dir = repository_with_rollout(folder, now)
    service = RolloutService(repo_dir, store)

    def tick(at: float, by: RolloutService | None = None) -> float:
        start = time.perf_counter()
        (after,) = (by or service).tick(at)
        spent = time.perf_counter() - start
        if after.state is not RolloutState.RUNNING or after.stage != 0:
            raise SystemExit(f"the tick moved the rollout: {after.state.value} {after.stage}")
        return spent

    unplaced = [tick(now)]
    (r,) = service.records.active()
    start = time.perf_counter()
    place_rollout(store, r)
    placing = [time.perf_counter() - start]
    # First ticks (each of a fresh service, as after a restart) and later ticks of one
    # service, alternately: side by side under the same load.
    service = RolloutService(repo_dir, store)
    tick(now)
    first, later = [], []
    for k in range(1, repeat + 1):
        first.append(tick(now + 5.0 * k, RolloutService(repo_dir, store)))
        later.append(tick(now + 5.0 * k))
    joined = []
    for k in range(repeat):
        at = now + 5.0 * (repeat + 1 + k)
        extra = heartbeats(FLEET, 1, 1, at)
        facts, received, payload = extra[0]
        extra = [(facts._replace(device=f"{FLEET}-joined-{k:03d}"), received, payload)]
        store.write(IngestBatch(heartbeat_facts=extra))
        joined.append(tick(at))
    counts = service.records.load(service.records.active()[0].id).last_report
    shown = f"{counts.get('on_new')}/{counts.get('expected')} of {counts.get('devices_known')}"
    return [
        ("rollout start: the devices placed (`place_rollout`)", shown, placing),
        ("whole tick, first of the rollout (devices placed at rollout start)", shown, first),
        ("whole tick, first of the rollout, nothing placed (ids read, hashed)", shown, unplaced),
        ("whole tick, later", shown, later),
        ("whole tick after a batch adding a device", shown, joined),
    ]


def measure(
    backend: str, folder: Path, devices: int, args: argparse.Namespace
) -> list[tuple[object, ...]]:
    now = time.time()
    r = rollout(now)
    with store_for(backend, folder) as store:
        start = time.perf_counter()
        fill(store, FLEET, devices, args.beats, now)
        fill(store, "fleet-01", devices // 10, args.beats, now)
        fill_s = time.perf_counter() - start

        def first_tick() -> int:
            evidence = RolloutService(folder, store).evidence(r, now)
            evaluate_gates(r.gates, evidence)
            return len(evidence.samples)

        later = RolloutService(folder, store)
        raw = later.evidence(r, now)
        samples = len(raw.samples)
        rolled = later.rolled_evidence(r)
        want, got = evaluate_gates(r.gates, raw), evaluate_gates(r.gates, rolled)
        judged = [
            ([b.gate for b in report.breaches], report.served, report.errors, report.healthy)
            for report in (got, want)
        ]
        if judged[0] != judged[1] or got.reporting != want.reporting:
            raise SystemExit(f"the rolled evidence judges otherwise: {judged}")

        def later_tick() -> int:
            evidence = later.evidence(r, now + 5.0)
            evaluate_gates(r.gates, evidence)
            return len(evidence.samples)

        def rolled_tick() -> int:
            evaluate_gates(r.gates, later.rolled_evidence(r))
            return len(rolled.devices)

        rows: list[tuple[object, ...]] = []

        def counts() -> int:
            return int(later.fleet_counts(r)["devices_known"])

        runs = (
            ("rolled_evidence + gates (a tick)", rolled_tick, f"{len(rolled.devices)} devices"),
            ("heartbeats + gates, first tick of a stage", first_tick, f"{samples} heartbeats"),
            ("heartbeats + gates, later tick", later_tick, f"{samples} heartbeats"),
            ("fleet_counts", counts, ""),
        )
        if args.skip_heartbeats:
            runs = (runs[0], runs[3])
        for label, run, shown in runs:
            median, best = median_ms(run, args.repeat)
            load = f"{os.getloadavg()[0]:.1f}"
            rows.append(
                (backend, devices, label, shown, f"{median:.1f}", f"{best:.1f}", args.repeat, load)
            )
        for label, shown, spent in whole_ticks(store, folder, devices, now, args.repeat):
            load = f"{os.getloadavg()[0]:.1f}"
            median, best = statistics.median(spent) * 1000, min(spent) * 1000
            rows.append(
                (backend, devices, label, shown, f"{median:.1f}", f"{best:.1f}", len(spent), load)
            )
        print(
            f"{backend}: {store.count('devices')} devices, {store.count('heartbeats')} "
            f"heartbeats, filled in {fill_s:.0f} s",
            file=sys.stderr,
        )
    return rows


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--devices", default="10000,100000", help="fleet sizes, comma-separated")
    parser.add_argument("--beats", type=int, default=8, help="heartbeats per device")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--ingest", type=int, default=20000, help="heartbeats written to time the store (0: none)"
    )
    parser.add_argument("--ingest-rounds", type=int, default=5, help="stores written, each way")
    parser.add_argument(
        "--skip-heartbeats",
        action="store_true",
        help="time only the rolled evidence and fleet_counts (the heartbeats are still read "
        "once, to compare the verdicts)",
    )
    parser.add_argument("--label", default="", help="what this run measures (for --record)")
    args = parse_arguments(parser, stores=True)

    rows: list[tuple[object, ...]] = []
    for devices in (int(n) for n in args.devices.split(",")):
        for backend in store_backends(args):
            with tempfile.TemporaryDirectory(prefix="rollout-evidence-") as tmp:
                rows += measure(backend, Path(tmp), devices, args)
    headers = ("store", "devices", "call", "read", "median ms", "min ms", "runs", "load 1 min")
    table = markdown_table(headers, rows)
    print(table)
    ingest: list[tuple[object, ...]] = []
    if args.ingest:
        for backend in store_backends(args):
            with tempfile.TemporaryDirectory(prefix="rollout-ingest-") as tmp:
                ingest += ingest_cost(backend, Path(tmp), args)
        ingest_headers = (
            "store",
            "heartbeats",
            "write",
            "wall µs per heartbeat (median / best)",
            "CPU µs per heartbeat (median / best)",
            "devices known (second half): CPU µs per heartbeat",
            "rounds",
        )
        ingest_table = markdown_table(ingest_headers, ingest)
        print(ingest_table)
        table += (
            "\n\n`TelemetryStore.write` of heartbeats in batches of "
            f"{INGEST_BATCH} (the store's time only):\n\n{ingest_table}"
        )
    if args.record:
        run_text = "\n".join(
            [
                run_heading(command_line(), label=args.label),
                "`bench/rollout_evidence.py`: what a tick reads and judges for a rollout of a "
                f"fleet of that many devices (a tenth on the new version), {args.beats} "
                "heartbeats each 10 s apart, stored through `TelemetryStore.write`; the stage "
                "started 45-105 s before, on a minute. `rolled_evidence`: the sums kept at "
                "ingest; heartbeats: the reads before them (`RolloutService.evidence`).",
                "",
                table,
            ]
        )
        intro = (
            "What one rollout tick spends reading telemetry (`RolloutService.evidence`), "
            "per active rollout, every `rollout_tick_interval_s` (5 s by default); since "
            "2026-12-03 `RolloutService.rolled_evidence`, the sums kept at ingest."
        )
        record_section("Rollout tick evidence", intro, run_text)


if __name__ == "__main__":
    main()
