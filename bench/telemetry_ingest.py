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
per wall second, 100% = one core) and CPU per stored message. ``--threads`` also splits
the controller's CPU per message by thread (``/proc/<pid>/task``, named by ``py-spy
dump``): the ``ingest-writer`` thread (parsing, checks, the store), the ingest client's
MQTT network thread (reading the socket, splitting packets, the backlog) and all the
others (HTTP, the announcer's and the repository responder's MQTT clients, the rollout
scheduler, asyncio's threads). ``--parts`` runs ``bench/ingest_parts.py`` before and
after the steps and reports its in-process CPU per heartbeat: the same work timed in one
process, a yardstick of how fast the machine runs this code in those minutes (on the
shared 2-core VMs it went from 17 µs to 40 between sessions, and the whole figure with
it), so that runs on different days compare by their ratio to it.

    python bench/telemetry_ingest.py [--rates 5000,10000,15000] [--seconds 10] \
        [--workers 2] [--baseline 96201a8] [--registry] [--qos 1] [--threads] [--parts] [--record]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

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
    port: int,
    rate: float,
    seconds: float,
    first: int,
    devices: int,
    qos: int,
    raw: bool,
    out: mp.Queue,  # type: ignore[type-arg]
) -> None:
    """Publish heartbeats at ``rate`` for ``seconds``; put (sent, when the first was due
    on the monotonic clock, this process's CPU seconds while publishing) in ``out``.

    ``raw``: QoS 0 PUBLISH packets written straight to the socket of a minimal MQTT
    3.1.1 connection (CONNECT, then PUBLISH only; keepalive off), a few hundred per
    ``sendall``: the broker and the controller get the same messages as from paho, at a
    small part of paho's CPU per message (which on 2 shared cores is taken from the
    controller). Otherwise paho's ``publish``, as before."""
    template = _template()
    topic_of = {d: device_topic(FLEET, f"d{d:011d}", "telemetry").encode() for d in range(devices)}
    send = _raw_sender(port) if raw else _paho_sender(port, qos)
    sent = 0
    cpu = time.process_time()
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
        messages = []
        for _ in range(min(due, 500)):
            d = i % devices
            messages.append(
                (
                    topic_of[d],
                    template.replace(b"DEVICEXXXXXX", b"d%011d" % d).replace(
                        b"%d" % _SEQ,
                        b"%d" % (i + 1),  # publishers' i ranges are disjoint
                    ),
                )
            )
            i += 1
        send(messages)
        sent += len(messages)
    send(None)
    out.put((sent, start, time.process_time() - cpu))


def _paho_sender(port: int, qos: int) -> Callable[[list[tuple[bytes, bytes]] | None], None]:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sim-{os.getpid()}")
    client.max_inflight_messages_set(1000)  # QoS 1: not one broker round trip per 20
    client.connect("127.0.0.1", port)
    client.loop_start()

    def send(messages: list[tuple[bytes, bytes]] | None) -> None:
        if messages is None:
            client.loop_stop()
            client.disconnect()
            return
        for topic, payload in messages:
            client.publish(topic.decode(), payload, qos=qos)

    return send


def _raw_sender(port: int) -> Callable[[list[tuple[bytes, bytes]] | None], None]:
    import socket

    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client_id = f"sim-{os.getpid()}".encode()
    # CONNECT: protocol "MQTT" level 4, clean session, keepalive 0 (no PINGREQ needed).
    body = b"\x00\x04MQTT\x04\x02\x00\x00" + len(client_id).to_bytes(2, "big") + client_id
    sock.sendall(b"\x10" + _remaining_length(len(body)) + body)
    connack = b""
    while len(connack) < 4:
        chunk = sock.recv(4 - len(connack))
        if not chunk:
            raise RuntimeError("the broker closed the connection before CONNACK")
        connack += chunk
    if connack[0] != 0x20 or connack[3] != 0:
        raise RuntimeError(f"the broker refused the connection: CONNACK {connack.hex()}")

    def send(messages: list[tuple[bytes, bytes]] | None) -> None:
        if messages is None:
            sock.sendall(b"\xe0\x00")  # DISCONNECT
            sock.close()
            return
        packets = []
        for topic, payload in messages:
            size = 2 + len(topic) + len(payload)
            packets.append(
                b"\x30" + _remaining_length(size) + len(topic).to_bytes(2, "big") + topic + payload
            )
        sock.sendall(b"".join(packets))

    return send


def _remaining_length(n: int) -> bytes:
    """MQTT's variable-length integer."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


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

    def thread_cpu_s(self) -> dict[tuple[int, int], float]:
        """(pid, thread id) -> CPU seconds so far, of every thread of every process."""
        return {
            (p.pid, tid): cpu for p in self.procs for tid, cpu in thread_cpu_seconds(p.pid).items()
        }

    def thread_roles(self) -> dict[tuple[int, int], str]:
        """(pid, thread id) -> "writer", "network" (the ingest client's MQTT thread) or
        "other", from the Python thread names ``py-spy dump`` shows (briefly pausing the
        process: call it after the CPU was read)."""
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        roles = {}
        for p in self.procs:
            dump = subprocess.run(
                [spy, "dump", "--pid", str(p.pid)], capture_output=True, text=True, timeout=60
            ).stdout
            for tid, name in re.findall(r'^Thread (\d+) \(\w+\): "([^"]*)"', dump, re.M):
                role = "other"
                if name == "ingest-writer":
                    role = "writer"
                elif name.startswith("paho-mqtt-client-bench-ingest-"):
                    role = "network"
                roles[(p.pid, int(tid))] = role
        return roles

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(timeout=60)


def parts_cpu_us() -> float:
    """``bench/ingest_parts.py``'s CPU µs per heartbeat for all its parts (40,000 heartbeats)."""
    out = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("ingest_parts.py")), "--heartbeats", "40000"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = re.search(r"^\| all of the above \| ([0-9.]+) \|", out, re.M)
    if found is None:
        raise RuntimeError(f"ingest_parts.py printed no total:\n{out}")
    return float(found.group(1))


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """Thread id -> user + system CPU seconds so far, of each thread of process ``pid``."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:  # the thread ended
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


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


class Step(NamedTuple):
    published: int
    stored: int
    per_s: float  # stored / (step start → the store stopped growing), as before
    steady_per_s: float  # rows stored per second in the middle of the publishing
    cpu_s: float  # the controller's processes
    publishers_cpu_s: float
    broker_cpu_s: float
    # ``--threads``: the controller's CPU seconds by role (writer, network, other).
    roles_cpu_s: dict[str, float]


def measure_step(
    args: argparse.Namespace,
    port: int,
    broker_pid: int,
    rate: float,
    code: Path | None,
    work: Path,
    step: str,
) -> Step:
    """One step: what was published and stored, and the CPU of each party.

    ``per_s`` counts from before the publishers start (their start-up included) until
    the store stopped growing: even a controller that keeps up stays below the offered
    rate by that much. ``steady_per_s`` is the rows stored per second from 1 s after the
    first heartbeat was due until 1 s before the last (the store's row count sampled
    every 100 ms): the rate the controller sustains while heartbeats arrive, which is the
    offered rate when it keeps up and what it can store when it does not.

    SQLite: a new file per step. PostgreSQL: a new schema per step in the DSN's database
    (dropped after the step), as heartbeats repeat their keys from one step to the next.
    """
    location = _pg_schema(args.store, step) if args.store else str(work / f"{step}.sqlite")
    controller = Controller(code, port, location, work, args.workers)
    store = open_store(location)
    try:
        before = store.count("heartbeats")
        cpu0, broker0 = controller.cpu_s(), cpu_seconds(broker_pid)
        threads0 = controller.thread_cpu_s() if args.threads else {}
        t0 = time.monotonic()
        results: mp.Queue[tuple[int, float, float]] = mp.Queue()
        share = rate / args.publishers
        procs = [
            mp.Process(
                target=publisher,
                args=(
                    port,
                    share,
                    args.seconds,
                    k * 10**7,
                    args.devices,
                    args.qos,
                    args.publisher == "raw",
                    results,
                ),
            )
            for k in range(args.publishers)
        ]
        for p in procs:
            p.start()
        samples: list[tuple[float, int]] = []
        done: list[tuple[int, float, float]] = []
        while len(done) < len(procs):
            samples.append((time.monotonic(), store.count("heartbeats")))
            try:
                done.append(results.get(timeout=0.1))
            except queue.Empty:
                if time.monotonic() - t0 > args.seconds + 60:
                    raise RuntimeError("the publishers did not finish") from None
        for p in procs:
            p.join()
        published = sum(sent for sent, _start, _cpu in done)
        first_due = min(start for _sent, start, _cpu in done)
        # Wait until the store stops growing (the controller drains what it queued).
        last, last_change = store.count("heartbeats"), time.monotonic()
        while time.monotonic() - last_change < 1.0:
            time.sleep(0.1)
            now_count = store.count("heartbeats")
            if now_count != last:
                last, last_change = now_count, time.monotonic()
        wall = last_change - t0
        cpu = controller.cpu_s() - cpu0
        broker_cpu = cpu_seconds(broker_pid) - broker0
        roles_cpu: dict[str, float] = {}
        if args.threads:
            threads1 = controller.thread_cpu_s()
            roles = controller.thread_roles()
            for key, spent in threads1.items():
                role = roles.get(key, "other")  # a thread py-spy did not show: no Python
                roles_cpu[role] = roles_cpu.get(role, 0.0) + spent - threads0.get(key, 0.0)
    finally:
        store.close()
        controller.stop()
        if args.store:
            _pg_schema(args.store, step, drop=True)
    return Step(
        published,
        last - before,
        (last - before) / wall,
        _steady_rate(samples, first_due + 1.0, first_due + args.seconds - 1.0),
        cpu,
        sum(cpu_s for _sent, _start, cpu_s in done),
        broker_cpu,
        roles_cpu,
    )


def _steady_rate(samples: list[tuple[float, int]], start: float, end: float) -> float:
    """Rows per second between ``start`` and ``end`` from (time, row count) samples, each
    end read from the last sample at or before it (NaN without two such samples)."""
    first = [(t, n) for t, n in samples if t <= start]
    last = [(t, n) for t, n in samples if t <= end]
    if not first or last[-1][0] <= first[-1][0]:
        return float("nan")
    (t1, n1), (t2, n2) = first[-1], last[-1]
    return (n2 - n1) / (t2 - t1)


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
    parts = [parts_cpu_us()] if args.parts else []
    try:
        for rate in args.rates:
            for n, (name, code) in enumerate(variants):
                step = f"step-{int(rate)}-{n}"
                got = measure_step(args, broker.port, broker.process.pid, rate, code, work, step)
                wall = got.stored / got.per_s if got.per_s else float("nan")
                per_msg = 1e6 / max(got.stored, 1)
                rows.append(
                    f"| {name} | {rate:,.0f} | {got.published:,} | {got.stored:,} | "
                    f"{got.per_s:,.0f} | {got.steady_per_s:,.0f} | "
                    f"{100 * got.cpu_s / wall:.0f}% | {per_msg * got.cpu_s:.1f} | "
                    f"{per_msg * got.publishers_cpu_s:.1f} | {per_msg * got.broker_cpu_s:.1f} |"
                    + (
                        "".join(
                            f" {per_msg * got.roles_cpu_s.get(role, 0.0):.1f} |"
                            for role in ("writer", "network", "other")
                        )
                        if args.threads
                        else ""
                    )
                )
                print(rows[-1], flush=True)
                loads.append(os.getloadavg()[0])
        if args.parts:
            parts.append(parts_cpu_us())
    finally:
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    header = [
        f"Store: {backend}; {args.workers} serve process(es)"
        + (" on a shared subscription" if args.workers > 1 else "")
        + f"; {args.devices:,} simulated devices"
        + (" enrolled in the device registry" if args.registry else "")
        + f", {args.publishers} publisher processes, "
        f"{args.seconds:g} s per step ({args.publisher} publishers); "
        f"heartbeat {len(_template())} bytes at QoS {args.qos}; "
        f"load average "
        f"(1 min) {min(loads):.1f}–{max(loads):.1f} during the run."
        + (
            f" In-process parts (`ingest_parts.py`, this tree) before and after: "
            f"{parts[0]:.1f} and {parts[-1]:.1f} µs CPU per heartbeat."
            if parts
            else ""
        ),
        "",
        "| code | offered msg/s | published | stored | stored msg/s (step start to last row) "
        "| stored msg/s (steady, while publishing) | controller CPU | controller CPU µs/msg "
        "| publishers CPU µs/msg | broker CPU µs/msg |"
        + (
            " of which: ingest-writer thread µs/msg | MQTT network thread µs/msg "
            "| other threads µs/msg |"
            if args.threads
            else ""
        ),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if args.threads else ""),
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
        "--publisher",
        choices=("raw", "paho"),
        default="raw",
        help="raw: QoS 0 packets written to the socket (little CPU); paho: paho's publish",
    )
    parser.add_argument(
        "--registry", action="store_true", help="enroll the simulated devices (checked per message)"
    )
    parser.add_argument(
        "--parts",
        action="store_true",
        help="also time bench/ingest_parts.py before and after (the machine's yardstick)",
    )
    parser.add_argument(
        "--threads",
        action="store_true",
        help="split the controller's CPU per message by thread (needs py-spy)",
    )
    args = parse_arguments(parser)
    args.rates = [float(r) for r in args.rates.split(",")]
    if args.qos and args.publisher == "raw":
        parser.error("--qos 1 needs --publisher paho (the raw publisher sends QoS 0 only)")
    lines = run(args)
    print("\n".join(lines))
    if args.record:
        heading = run_heading(command_line(), note="; shared with other jobs")
        record_section("Telemetry ingest", INTRO, "\n".join([heading, "", *lines]))


if __name__ == "__main__":
    main()
