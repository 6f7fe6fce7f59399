"""How many heartbeats a second `edgectl serve` stores, and what CPU it takes per message.

A private mosquitto on loopback; real `edgectl serve` processes ingesting into a store
(SQLite by default, ``--store DSN`` for PostgreSQL); simulated devices in separate
processes publishing real ``edgefleet.telemetry/1`` heartbeats (one model each, QoS 0
as agents do by default; ``--qos 1`` as with ``heartbeat_qos = 1``: the controller then
acknowledges each once its batch is on disk, as it does events) from ``--devices``
distinct device ids, at each offered rate of ``--rates`` for ``--seconds``.
``--workers N`` runs N serve processes on one MQTT 5 shared subscription
(``mqtt_shared_group``) and one store.

Every step starts fresh serve processes on an empty store, so steps do not inherit each
other's backlog or table size. ``--baseline REV`` runs each step twice, once with the
``agent/`` and ``controller/`` of git revision REV and once with the working tree,
interleaved, so both see the same machine load; on a shared machine the CPU per message
is the robust figure, the stored rate depends on what else runs. ``--registry`` enrolls
every simulated device in the repository's device registry, so ingestion checks each
message against it (as a repository with `edgectl device add` devices does; a baseline
older than that check ignores the file).

For every step it reports what was published, what the controller stored (rows in
``heartbeats``), the sustained stored rate (stored / time from the step's start until the
store stopped growing), the controller's CPU (user+system seconds of all its processes
per wall second, 100% = one core) and CPU per stored message.

    python bench/telemetry_ingest.py [--rates 5000,10000,15000] [--seconds 10] \
        [--workers 2] [--baseline 96201a8] [--registry] [--qos 1] [--record]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    arguments,
    command_line,
    cpu_seconds,
    export_revision,
    parse_arguments,
    record_section,
    run_heading,
)

from agent.contracts import (
    ModelFigures,
    SystemFigures,
    device_topic,
    telemetry_payload,
)
from agent.telemetry.reporter import build_heartbeat
from controller.fleet.stores import open_store
from tests.e2e_support import BIN
from tests.helpers import start_broker

FLEET = "bench"
_SEQ = 7777777777  # a placeholder no other field of the template contains


def _template() -> bytes:
    beat = build_heartbeat(
        device="DEVICEXXXXXX",
        fleet=FLEET,
        at="2026-01-01T00:00:00.000Z",
        seq=_SEQ,  # replaced per message: the store keeps one row per (device, at, seq)
        interval_s=10.0,
        uptime_s=3600.0,
        system=SystemFigures(12.5, 512 * 2**20, 2**30, 8 * 2**30, 0.4, 48.0),
        models_status={},
        interval={},
    )
    beat = beat.__class__(
        **{
            **beat.__dict__,
            "models": {"resnet": ModelFigures("1.4.0", "committed", 200, 1, 0, 0.004, 0.009, 0.02)},
        }
    )
    return telemetry_payload(beat)


def publisher(
    port: int, rate: float, seconds: float, first: int, devices: int, qos: int, out: mp.Queue
) -> None:  # type: ignore[type-arg]
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    template = _template()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sim-{os.getpid()}")
    client.max_inflight_messages_set(1000)  # QoS 1: not one broker round trip per 20
    client.connect("127.0.0.1", port)
    client.loop_start()
    sent = 0
    start = time.monotonic()
    i = first
    while True:
        elapsed = time.monotonic() - start
        if elapsed >= seconds:
            break
        due = int(rate * elapsed) - sent
        if due <= 0:
            time.sleep(0.001)
            continue
        for _ in range(min(due, 500)):
            device = f"d{i % devices:011d}"
            client.publish(
                device_topic(FLEET, device, "telemetry"),
                template.replace(b"DEVICEXXXXXX", device.encode()).replace(
                    b"%d" % _SEQ,
                    b"%d" % (i + 1),  # publishers' i ranges are disjoint
                ),
                qos=qos,
            )
            i += 1
            sent += 1
    client.loop_stop()
    client.disconnect()
    out.put(sent)


class Controller:
    """``workers`` `edgectl serve` processes of one code tree on one store."""

    def __init__(self, code: Path | None, port: int, store: str, work: Path, workers: int):
        self.procs: list[subprocess.Popen[bytes]] = []
        repo = work / "repo"
        if not repo.exists():
            subprocess.run(
                [str(BIN / "edgectl"), "init", str(repo)], check=True, capture_output=True
            )
        for k in range(workers):
            config = work / f"serve-{k}.toml"
            config.write_text(
                "[serve]\n"
                f'store = "{store}"\n'
                # Stable per worker: the broker keeps each id's session (and its place in
                # the shared group) after a step; a new id would leave a dead member
                # that still takes its share of the heartbeats.
                f'ingest_client_id = "bench-ingest-{k}"\n'
                + ('mqtt_shared_group = "bench"\n' if workers > 1 else "")
            )
            args = ["serve", "--repo", str(repo), "--mqtt", f"127.0.0.1:{port}"]
            args += ["--listen", "127.0.0.1:0", "--config", str(config)]
            if code is None:
                command = [str(BIN / "edgectl"), *args]
            else:  # another revision's tree, run by this interpreter
                boot = (
                    f"import sys; sys.path.insert(0, {str(code)!r}); "
                    "from controller.cli import main; sys.exit(main())"
                )
                command = [sys.executable, "-c", boot, *args]
            log = work / f"serve-{k}.log"
            out = open(log, "wb")  # noqa: SIM115 - closed with the process
            self.procs.append(subprocess.Popen(command, stdout=out, stderr=out))
            _wait_subscribed(log)

    def cpu_s(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.procs)

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(timeout=60)


def write_registry(repo: Path, devices: int) -> None:
    """Enroll ``devices`` simulated ids in fleet FLEET: registry entries only (ingestion
    reads the registry, never the certificates)."""
    from controller.identity.devices import DeviceRecord, ca_dir, save_registry

    ca_dir(repo).mkdir(mode=0o700, exist_ok=True)
    records = {
        f"d{i:011d}": DeviceRecord(f"d{i:011d}", FLEET, i + 1, "2099-01-01T00:00:00+00:00", "t")
        for i in range(devices)
    }
    save_registry(repo, records)


def _wait_subscribed(log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if re.search(r"ingest: subscribed", log.read_text(errors="replace")):
            return
        time.sleep(0.1)
    raise RuntimeError(f"edgectl serve did not subscribe:\n{log.read_text()}")


def measure_step(
    args: argparse.Namespace, port: int, rate: float, code: Path | None, work: Path, step: str
) -> tuple[int, int, float, float]:
    """(published, stored, stored per second, controller CPU seconds) of one step.

    SQLite: a new file per step. PostgreSQL: a new schema per step in the DSN's database
    (dropped after the step), as heartbeats repeat their keys from one step to the next.
    """
    location = _pg_schema(args.store, step) if args.store else str(work / f"{step}.sqlite")
    controller = Controller(code, port, location, work, args.workers)
    store = open_store(location)
    try:
        before = store.count("heartbeats")
        cpu0 = controller.cpu_s()
        t0 = time.monotonic()
        results: mp.Queue[int] = mp.Queue()
        share = rate / args.publishers
        procs = [
            mp.Process(
                target=publisher,
                args=(port, share, args.seconds, k * 10**7, args.devices, args.qos, results),
            )
            for k in range(args.publishers)
        ]
        for p in procs:
            p.start()
        published = sum(results.get(timeout=args.seconds + 60) for _ in procs)
        for p in procs:
            p.join()
        # Wait until the store stops growing (the controller drains what it queued).
        last, last_change = store.count("heartbeats"), time.monotonic()
        while time.monotonic() - last_change < 1.0:
            time.sleep(0.2)
            now_count = store.count("heartbeats")
            if now_count != last:
                last, last_change = now_count, time.monotonic()
        wall = last_change - t0
        cpu = controller.cpu_s() - cpu0
    finally:
        store.close()
        controller.stop()
        if args.store:
            _pg_schema(args.store, step, drop=True)
    return published, last - before, (last - before) / wall, cpu


def _pg_schema(dsn: str, step: str, drop: bool = False) -> str:
    """A DSN of ``dsn``'s database whose tables are in a new schema for ``step`` (with
    ``drop``: drop that schema)."""
    import psycopg

    schema = "telemetry_bench_" + step.replace("-", "_")
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        if not drop:
            admin.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in dsn else "?"
    return f"{dsn}{sep}options=-csearch_path%3D{schema}"


def run(args: argparse.Namespace) -> list[str]:
    work = Path(tempfile.mkdtemp(prefix="telemetry-bench-"))
    broker = start_broker(work / "broker")
    if args.registry:
        subprocess.run(
            [str(BIN / "edgectl"), "init", str(work / "repo")], check=True, capture_output=True
        )
        write_registry(work / "repo", args.devices)
    variants: list[tuple[str, Path | None]] = [("this tree", None)]
    if args.baseline:
        code = export_revision(args.baseline, work / "baseline", ("agent", "controller"))
        variants.insert(0, (f"before ({args.baseline})", code))
    backend = "PostgreSQL" if args.store else "SQLite (WAL)"
    rows = []
    loads = [os.getloadavg()[0]]
    try:
        for rate in args.rates:
            for n, (name, code) in enumerate(variants):
                step = f"step-{int(rate)}-{n}"
                published, stored, per_s, cpu = measure_step(
                    args, broker.port, rate, code, work, step
                )
                wall = stored / per_s if per_s else float("nan")
                rows.append(
                    f"| {name} | {rate:,.0f} | {published:,} | {stored:,} | {per_s:,.0f} | "
                    f"{100 * cpu / wall:.0f}% | {1e6 * cpu / max(stored, 1):.0f} |"
                )
                print(rows[-1], flush=True)
                loads.append(os.getloadavg()[0])
    finally:
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    header = [
        f"Store: {backend}; {args.workers} serve process(es)"
        + (" on a shared subscription" if args.workers > 1 else "")
        + f"; {args.devices:,} simulated devices"
        + (" enrolled in the device registry" if args.registry else "")
        + f", {args.publishers} publisher processes, "
        f"{args.seconds:g} s per step; heartbeat {len(_template())} bytes at QoS {args.qos}; "
        f"load average "
        f"(1 min) {min(loads):.1f}–{max(loads):.1f} during the run.",
        "",
        "| code | offered msg/s | published | stored | stored msg/s (sustained) "
        "| controller CPU | CPU µs/msg |",
        "|---|---|---|---|---|---|---|",
    ]
    return header + rows


INTRO = (
    "Heartbeats stored per second by one `edgectl serve` (`bench/telemetry_ingest.py`): a "
    "private mosquitto on loopback, simulated devices in other processes on the same machine "
    "(they compete for the same cores), the controller's CPU measured on its process. Goal: "
    "≥ 10,000 msg/s stored (100,000 devices at one heartbeat per 10 s)."
)


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--rates", default="5000,10000,15000,20000")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="serve processes (shared group)")
    parser.add_argument("--baseline", default="", metavar="REV", help="also run this revision")
    parser.add_argument("--store", default="", help="a postgresql:// DSN (default: SQLite)")
    parser.add_argument(
        "--qos", type=int, default=0, choices=(0, 1), help="heartbeats' QoS (1: acknowledged)"
    )
    parser.add_argument(
        "--registry", action="store_true", help="enroll the simulated devices (checked per message)"
    )
    args = parse_arguments(parser)
    args.rates = [float(r) for r in args.rates.split(",")]
    lines = run(args)
    print("\n".join(lines))
    if args.record:
        heading = run_heading(command_line(), note="; shared with other jobs")
        record_section("Telemetry ingest", INTRO, "\n".join([heading, "", *lines]))


if __name__ == "__main__":
    main()
