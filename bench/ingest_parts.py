"""Where one ingest worker's CPU goes per heartbeat, part by part, in one process.

The heartbeats of ``bench/telemetry_ingest.py`` (its 519-byte template, ``--devices``
device ids, two publishers' interleaved order) parsed as ingestion parses them
(``add_payload``) and written as ``TelemetryStore.write`` writes them, in batches of
2,000 into a fresh store, each part timed on its own: this process's CPU
(``time.process_time``: other jobs' load counts only through the caches and the clock
speed) and wall time, per heartbeat. The parts are ``write``'s own steps, called in its
order inside one transaction per batch (QoS 0: ``synchronous=NORMAL`` on SQLite). Not
counted: the MQTT client, the backlog and the threads (the whole process's CPU per
message is ``telemetry_ingest.py``'s figure; the difference is theirs).

    python bench/ingest_parts.py [--heartbeats 200000] [--devices 100000] [--store DSN]
"""

from __future__ import annotations

import gc
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from _common import arguments, parse_arguments
from telemetry_ingest import _SEQ, FLEET, _template

from agent.contracts import device_topic
from controller.fleet import store as store_module
from controller.fleet.payloads import add_payload
from controller.fleet.records import IngestBatch
from controller.fleet.stores import open_store

BATCH = 2000


def messages(count: int, devices: int) -> list[tuple[str, bytes, float]]:
    """(topic, payload, received at) as the bench's two publishers send them."""
    template, now = _template(), time.time()
    out = []
    for j in range(count // 2):
        for first in (0, 10**7):
            i = j + first
            device = f"d{i % devices:011d}"
            payload = template.replace(b"DEVICEXXXXXX", device.encode())
            payload = payload.replace(b"%d" % _SEQ, b"%d" % (i + 1))
            out.append((device_topic(FLEET, device, "telemetry"), payload, now + j / 10_000))
    return out


def measure(location: str, items: list[tuple[str, bytes, float]]) -> dict[str, tuple[float, float]]:
    """Part -> (CPU s, wall s) over ``items``."""
    spent: dict[str, tuple[float, float]] = {}

    @contextmanager
    def part(name: str) -> Iterator[None]:
        cpu, wall = time.process_time(), time.perf_counter()
        yield
        before = spent.get(name, (0.0, 0.0))
        spent[name] = (
            before[0] + time.process_time() - cpu,
            before[1] + time.perf_counter() - wall,
        )

    store = open_store(location)
    sqlite = hasattr(store, "_synchronous")
    if sqlite:
        store._write_conn.execute("PRAGMA synchronous=NORMAL")  # type: ignore[attr-defined]
        store._synchronous = "NORMAL"  # type: ignore[attr-defined]
    gc.freeze()
    try:
        for at in range(0, len(items), BATCH):
            with part("parse and check (add_payload)"):
                batch = IngestBatch(durable=False)
                for topic, payload, received in items[at : at + BATCH]:
                    add_payload(batch, topic, payload, received)
            with part("rows (heartbeat_rows)"):
                beats = store_module.heartbeat_rows(batch)
            writing = store._write()
            with part("SQL: begin"):
                cur = writing.__enter__()
            with part("SQL: device upsert"):
                store._write_rows(cur, store_module.DEVICE_FROM_HEARTBEAT, beats["devices"])
            with part("SQL: model upsert"):
                store._write_rows(cur, store_module.MODEL_UPSERT, beats["models"])
            with part("SQL: history insert"):
                inserted = store._insert_heartbeats(cur, beats["history"])
            with part("rollup: sums (rollup_rows)"):
                rows = store_module.rollup_rows(store_module._fresh(beats["beats"], inserted))
            for key, *_rest in store_module.ROLLUP:
                with part(f"rollup: SQL {key}"):
                    store._write_rollup(cur, {k: v if k == key else [] for k, v in rows.items()})
            with part("SQL: commit"):
                writing.__exit__(None, None, None)
    finally:
        store.close()
    return spent


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--heartbeats", type=int, default=200_000)
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--store", default="", help="a postgresql:// DSN (default: SQLite)")
    args = parse_arguments(parser, record=False)
    items = messages(args.heartbeats, args.devices)
    with tempfile.TemporaryDirectory(prefix="ingest-parts-") as tmp:
        spent = measure(args.store or str(Path(tmp) / "store.sqlite"), items)
    n = len(items)
    print("| part | CPU µs per heartbeat | wall µs per heartbeat |")
    print("|---|---|---|")
    for name, (cpu, wall) in spent.items():
        print(f"| {name} | {1e6 * cpu / n:.2f} | {1e6 * wall / n:.2f} |")
    cpu = sum(c for c, _w in spent.values())
    wall = sum(w for _c, w in spent.values())
    print(f"| all of the above | {1e6 * cpu / n:.2f} | {1e6 * wall / n:.2f} |")


if __name__ == "__main__":
    main()
