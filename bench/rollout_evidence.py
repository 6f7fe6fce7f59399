"""What reading one rollout tick's telemetry (``RolloutService.evidence``) costs at fleet scale.

A real telemetry store (SQLite in a temporary folder, and PostgreSQL in a fresh schema
of ``EDGEFLEET_TEST_PG_DSN``, default the local server, unless ``--no-postgres``) filled
through the store's own write path (``TelemetryStore.write`` of heartbeat facts, as
ingestion stores them): for each size in ``--devices``, that many devices in the rolled
out fleet, each with ``--beats`` heartbeats 10 s apart ending now, carrying the model's
figures, plus a second fleet of a tenth of the size. A rollout's stage started 45 s ago.
It times, median of ``--repeat`` calls each:

- the first tick of a stage: a fresh ``RolloutService``, the whole window read;
- a later tick: the same service 5 s on, reading only the newest heartbeats (with the
  ``WINDOW_OVERLAP_S`` overlap);
- ``fleet_counts``, the device counts a tick saves for ``rollout status``.

    python bench/rollout_evidence.py [--devices 10000,100000] [--repeat 5] [--no-postgres]
                                     [--record]
"""

from __future__ import annotations

import argparse
import json
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
from controller.fleet.records import HeartbeatFacts, IngestBatch
from controller.fleet.store import TelemetryStore
from controller.rollout.gates import parse_gates
from controller.rollout.service import RolloutService
from controller.rollout.stages import OnFailure, Rollout, new_rollout
from tests.controller.test_store_support import store_for

FLEET = "fleet-00"
MODEL = "detector"
BATCH = 5000


def fill(store: TelemetryStore, fleet: str, devices: int, beats: int, now: float) -> None:
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
    for start in range(0, len(rows), BATCH):
        store.write(IngestBatch(heartbeat_facts=rows[start : start + BATCH]))


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
        now=now - 45.0,
    )


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
            return len(RolloutService(folder, store).evidence(r, now).samples)

        later = RolloutService(folder, store)
        samples = len(later.evidence(r, now).samples)

        def later_tick() -> int:
            return len(later.evidence(r, now + 5.0).samples)

        rows: list[tuple[object, ...]] = []

        def counts() -> int:
            return int(later.fleet_counts(r)["devices_known"])

        runs = (
            ("evidence, first tick of a stage", first_tick),
            ("evidence, later tick", later_tick),
            ("fleet_counts", counts),
        )
        for label, run in runs:
            shown = samples if label.startswith("evidence") else ""
            median, best = median_ms(run, args.repeat)
            rows.append(
                (backend, devices, label, shown, f"{median:.0f}", f"{best:.0f}", args.repeat)
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
    parser.add_argument("--label", default="", help="what this run measures (for --record)")
    args = parse_arguments(parser, stores=True)

    rows: list[tuple[object, ...]] = []
    for devices in (int(n) for n in args.devices.split(",")):
        for backend in store_backends(args):
            with tempfile.TemporaryDirectory(prefix="rollout-evidence-") as tmp:
                rows += measure(backend, Path(tmp), devices, args)
    headers = ("store", "devices", "call", "samples", "median ms", "min ms", "runs")
    table = markdown_table(headers, rows)
    print(table)
    if args.record:
        run_text = "\n".join(
            [
                run_heading(command_line(), label=args.label),
                f"`bench/rollout_evidence.py`: one `RolloutService.evidence` (and `fleet_counts`) "
                "call for a rollout "
                f"of a fleet of that many devices, {args.beats} heartbeats each 10 s apart, "
                "stored through `TelemetryStore.write`; the stage started 45 s before.",
                "",
                table,
            ]
        )
        intro = (
            "What one rollout tick spends reading telemetry (`RolloutService.evidence`), "
            "per active rollout, every `rollout_tick_interval_s` (5 s by default)."
        )
        record_section("Rollout tick evidence", intro, run_text)


if __name__ == "__main__":
    main()
