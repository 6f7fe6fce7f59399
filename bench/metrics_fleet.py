"""What the fleet part of a controller ``/metrics`` scrape costs at fleet scale.

A real telemetry store (SQLite in a temporary folder, and PostgreSQL in a fresh schema
of ``EDGEFLEET_TEST_PG_DSN``, default the local server, unless ``--no-postgres``)
filled through the store's own write path (``TelemetryStore.write`` of heartbeat facts
and statuses, as ingestion stores them): ``--devices`` devices in 20 fleets, each with
one or two models, some silent long enough to be stale, some offline by their last
will. It times, median of ``--repeat`` runs each, the device gauges of one scrape:

- ``store.devices()`` + ``render_metrics``: every device row and its models loaded into
  Python, health and counts computed there (what ``/metrics`` did before);
- ``store.fleet_aggregates`` + ``render_aggregates``: the counts computed in SQL
  (GROUP BY), only the aggregate rows loaded (what ``/metrics`` does now).

Both outputs are checked to be identical first.

    python bench/metrics_fleet.py [--devices 100000] [--repeat 5] [--no-postgres] [--record]
"""

from __future__ import annotations

import argparse
import random
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

from agent.contracts import Status
from controller.fleet.records import HeartbeatFacts, IngestBatch
from controller.fleet.status import StalePolicy
from controller.fleet.store import TelemetryStore
from controller.serve.metrics import render_aggregates, render_metrics
from tests.controller.test_store_support import store_for

MODELS = ("detector", "classifier", "segmenter")
VERSIONS = ("1.0.0", "1.1.0", "2.0.0")
BATCH = 2000


def fill(store: TelemetryStore, devices: int, now: float) -> None:
    """``devices`` devices through ``store.write``: 1-2 models each, ~5% stale, ~3% offline."""
    rng = random.Random(11)
    for start in range(0, devices, BATCH):
        batch = IngestBatch()
        for i in range(start, min(start + BATCH, devices)):
            fleet = f"fleet-{i % 20:02d}"
            device = f"dev-{i:06d}"
            names = sorted(rng.sample(MODELS, rng.choice((1, 2))))
            models = tuple(
                (
                    name,
                    rng.choice(VERSIONS),
                    "committed" if rng.random() < 0.9 else "probation",
                    rng.randrange(0, 5000),
                    rng.randrange(0, 5),
                    0,
                    0.012,
                )
                for name in names
            )
            silent = rng.random() < 0.05
            received = now - (rng.uniform(40.0, 4000.0) if silent else rng.uniform(0.0, 25.0))
            facts = HeartbeatFacts(
                fleet,
                device,
                "0.9.0",
                10.0,
                {"cpu_percent": 3.5},
                0,
                rng.choice((0, 0, 0, 1, 7)),
                models,
            )
            batch.heartbeat_facts.append((facts, received, "{}"))
            if rng.random() < 0.03:
                status = Status(device, fleet, False, "0.9.0", {}, "2026-01-01T00:00:00Z")
                batch.statuses.append((status, received + 1.0))
        store.write(batch)


def measure(backend: str, folder: Path, args: argparse.Namespace) -> list[tuple[object, ...]]:
    policy = StalePolicy()
    now = time.time()
    with store_for(backend, folder) as store:
        start = time.perf_counter()
        fill(store, args.devices, now)
        fill_s = time.perf_counter() - start
        counts = {"heartbeats": 1}

        def before() -> str:
            return render_metrics(store.devices(), [], counts, now, policy)

        def after() -> str:
            return render_aggregates(
                store.fleet_aggregates(now, policy.default_interval_s, policy.stale_after),
                [],
                counts,
            )

        assert before() == after(), "the SQL aggregates differ from the Python ones"
        rows: list[tuple[object, ...]] = []
        for label, run in (
            ("store.devices() + render_metrics (before)", before),
            ("store.fleet_aggregates + render_aggregates (after)", after),
        ):
            median, best = median_ms(run, args.repeat)
            rows.append((backend, label, f"{median:.1f}", f"{best:.1f}", args.repeat))
        print(
            f"{backend}: {store.count('devices')} devices, {store.count('device_models')} "
            f"device models, filled in {fill_s:.0f} s",
            file=sys.stderr,
        )
    return rows


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parse_arguments(parser, stores=True)

    rows: list[tuple[object, ...]] = []
    with tempfile.TemporaryDirectory(prefix="metrics-fleet-") as tmp:
        for backend in store_backends(args):
            rows += measure(backend, Path(tmp), args)
    table = markdown_table(("store", "fleet part of a scrape", "median ms", "min ms", "runs"), rows)
    print(table)
    if args.record:
        run_text = "\n".join(
            [
                run_heading(command_line()),
                f"`bench/metrics_fleet.py`: the device gauges of a scrape over {args.devices} "
                "devices (20 fleets, 1-2 models each) stored through `TelemetryStore.write`; "
                "before loads every device row, after groups in SQL; outputs checked equal.",
                "",
                table,
            ]
        )
        record_section("Controller metrics scrape", "", run_text)


if __name__ == "__main__":
    main()
