"""How many heartbeats a second one `edgectl serve` stores, and what CPU it takes.

A private mosquitto on loopback; a real `edgectl serve` process ingesting into its store
(SQLite by default, ``--store DSN`` for PostgreSQL); simulated devices in separate
processes publishing real ``edgefleet.telemetry/1`` heartbeats (one model each, QoS 0
as agents do by default) from ``--devices`` distinct device ids, at each offered rate of
``--rates`` for ``--seconds``. For every step it reports what was published, what the
controller stored (rows in ``heartbeats``), the sustained stored rate (stored / time from
the step's start until the store stopped growing) and the controller's CPU (user+system
seconds per wall second, 100% = one core).

    python bench/telemetry_ingest.py [--rates 5000,10000,15000] [--seconds 10] [--record]
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing as mp
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.contracts import (  # noqa: E402
    ModelFigures,
    SystemFigures,
    device_topic,
    telemetry_payload,
)
from agent.telemetry import build_heartbeat  # noqa: E402
from controller.store import open_store  # noqa: E402
from tests.helpers import start_broker  # noqa: E402

BIN = Path(sys.executable).parent
FLEET = "bench"


def _template() -> bytes:
    beat = build_heartbeat(
        device="DEVICEXXXXXX",
        fleet=FLEET,
        at="2026-01-01T00:00:00.000Z",
        seq=1,
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
    port: int, rate: float, seconds: float, first: int, devices: int, out: mp.Queue
) -> None:  # type: ignore[type-arg]
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    template = _template()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sim-{os.getpid()}")
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
                template.replace(b"DEVICEXXXXXX", device.encode()),
                qos=0,
            )
            i += 1
            sent += 1
    client.loop_stop()
    client.disconnect()
    out.put(sent)


def _start_serve(repo: Path, port: int, store: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "EDGECTL_STORE": store}
    args = [str(BIN / "edgectl"), "serve", "--repo", str(repo), "--mqtt", f"127.0.0.1:{port}"]
    out = open(log, "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([*args, "--listen", "127.0.0.1:0"], stdout=out, stderr=out, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if re.search(r"ingest: subscribed", log.read_text(errors="replace")):
            return proc
        time.sleep(0.1)
    raise RuntimeError(f"edgectl serve did not subscribe:\n{log.read_text()}")


def run(args: argparse.Namespace) -> list[str]:
    work = Path(tempfile.mkdtemp(prefix="telemetry-bench-"))
    broker = start_broker(work / "broker")
    repo = work / "repo"
    subprocess.run([str(BIN / "edgectl"), "init", str(repo)], check=True, capture_output=True)
    store_location = args.store or str(work / "telemetry.sqlite")
    serve = _start_serve(repo, broker.port, store_location, work / "serve.log")
    controller = psutil.Process(serve.pid)
    store = open_store(store_location)
    backend = "PostgreSQL" if "://" in store_location else "SQLite (WAL)"
    rows = []
    try:
        for rate in args.rates:
            before = store.count("heartbeats")
            cpu0 = sum(controller.cpu_times()[:2])
            t0 = time.monotonic()
            results: mp.Queue[int] = mp.Queue()
            share = rate / args.publishers
            procs = [
                mp.Process(
                    target=publisher,
                    args=(broker.port, share, args.seconds, k * 10**7, args.devices, results),
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
            cpu = sum(controller.cpu_times()[:2]) - cpu0
            stored = last - before
            rows.append(
                f"| {rate:,.0f} | {published:,} | {stored:,} | {stored / wall:,.0f} | "
                f"{100 * cpu / wall:.0f}% |"
            )
            print(rows[-1], flush=True)
    finally:
        store.close()
        serve.terminate()
        serve.wait(timeout=30)
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    header = [
        f"Store: {backend}; {args.devices:,} simulated devices, {args.publishers} publisher "
        f"processes, {args.seconds:g} s per offered rate; heartbeat {len(_template())} bytes.",
        "",
        "| offered msg/s | published | stored | stored msg/s (sustained) | controller CPU |",
        "|---|---|---|---|---|",
    ]
    return header + rows


def record(lines: list[str], command: str) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}"
    )
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if "\n## Telemetry ingest\n" not in text:
        text = text.rstrip("\n") + (
            "\n\n## Telemetry ingest\n\nHeartbeats stored per second by one `edgectl serve` "
            "(`bench/telemetry_ingest.py`): a private mosquitto on loopback, simulated "
            "devices in other processes on the same machine (they compete for the same "
            "cores), the controller's CPU measured on its process. Goal: ≥ 10,000 msg/s "
            "stored (100,000 devices at one heartbeat per 10 s).\n"
        )
    text += (
        f"\n### telemetry_ingest.py — {dt.date.today().isoformat()}\n\n"
        f"Command: `{command}`; machine: {machine}; shared with other jobs.\n\n"
        + "\n".join(lines)
        + "\n"
    )
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="5000,10000,15000,20000")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--store", default="", help="a postgresql:// DSN (default: SQLite)")
    parser.add_argument("--record", action="store_true", help="append to docs/benchmarks.md")
    args = parser.parse_args()
    args.rates = [float(r) for r in args.rates.split(",")]
    lines = run(args)
    print("\n".join(lines))
    if args.record:
        record(lines, "python bench/telemetry_ingest.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
