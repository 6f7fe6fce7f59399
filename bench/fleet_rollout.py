"""A fleet of simulated agents on the real update path, against one controller.

    python bench/fleet_rollout.py [--devices 1000] [--workers 4] [--threads 24] [--mb 5]
    python bench/fleet_rollout.py --gateway [--gateways 4] [--devices 1000] ...

What runs for real: a private mosquitto; ``edgectl serve`` (aiohttp serving the TUF
repository, the MQTT announcer, the telemetry ingestor); ``edgectl release`` of a bundle
of about ``--mb`` MB; and per simulated device the agent's own ``UpdateService``: a new
``tuf.ngclient.Updater`` per check (timestamp, snapshot, targets and rollout metadata,
signatures, versions, expiry), the fleet's desired state and the device's bucket,
download of the bundle through the agent's ``HttpxFetcher`` with TUF's length and sha256
check, staged under ``.part`` and renamed.

What is simulated, and says so in the results: loading the model is skipped (no
unpacking, no ONNX Runtime session, no golden vectors, no probation): the install step
deletes the verified file and records the version as committed. Each worker process
holds one MQTT connection for its devices (a real agent holds its own) and runs their
checks on ``--threads`` threads. Every device has its own TUF metadata folder, HTTP
connection pool and journal.

Measured: time from starting ``edgectl release`` to the last device committed, and the
CPU seconds ``edgectl serve`` used meanwhile (utime + stime from /proc). Then, for the
rollout job itself: one ``RolloutService.tick`` over a telemetry store holding the same
number of devices with a stage window of heartbeats each.

Appends a run to the "Fleet rollout" section of docs/benchmarks.md (``--no-record`` to
skip).

``--deltas`` measures instead the move v1 → v2 of devices that serve v1, twice side by
side in one run: released without deltas (``--delta-from 0``) and with them (the
default). v2 is v1 with its last layer's bias retrained (the bench model is one linear
layer: ``W`` unchanged, 1,000 new bias values). Each simulated device serves v1 from one
shared folder of v1's unpacked members (the delta's base, read only), applies the delta
with the agent's code and verifies the rebuilt bundle against the signed target. Bytes
served are the bytes the devices fetched (the agent's own log of each transfer: the
delta, or the full bundle, or both when a delta fell back), summed over the fleet.

``--gateway`` releases one bundle to the fleet twice, side by side in one run: devices
straight on the controller, then split over ``--gateways`` site gateways (an nginx
``proxy_cache`` mirror and a mosquitto bridged to the central broker per site, both from
``edgectl gateway config``; each worker's devices use one site). The controller's bytes are
counted by an nginx in front of ``edgectl serve`` that caches nothing (its access log).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _common import BENCHMARKS_MD, cpu_seconds, record_section, run_heading

FLEET = "bench"
MODEL = "big"
HEADING = "Fleet rollout"
_OUT = threading.Lock()


def emit(doc: Any) -> None:
    """One JSON line on stdout; whole lines only (print() from threads can interleave)."""
    line = doc if isinstance(doc, str) else json.dumps(doc)
    with _OUT:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


# ---------------------------------------------------------------------------- the simulated agent


class SkipLoadLifecycle:
    """The part of ``agent.update.lifecycle.ModelLifecycle`` the update service calls, with the
    model load skipped: the verified download is deleted and the version committed."""

    def __init__(self, on_commit: Any, serving: str = "", installed: str = "") -> None:
        import agent
        from agent.update.journal import JournalRecord, Phase

        self.agent_version = agent.__version__
        self._records: dict[str, JournalRecord] = {}
        self._on_commit = on_commit
        self._serving, self._installed = serving, Path(installed)
        if serving:  # a device already serving ``serving``, its files in ``installed``
            self._records[MODEL] = JournalRecord(
                model=MODEL, phase=Phase.COMMITTED, version=serving, entered_at=time.time()
            )

    def installed_dir(self, model: str, version: str) -> Path:
        return self._installed if version == self._serving else Path("/nonexistent")

    def record(self, model: str) -> Any:
        from agent.update.journal import JournalRecord

        return self._records.get(model, JournalRecord(model=model))

    def install(
        self,
        model: str,
        version: str,
        rollout_id: str,
        probation: Any,
        download: Any,
        shadow: Any = None,
    ) -> None:
        from agent.update.journal import JournalRecord, Phase, serving_version

        _FETCHED.bytes = 0
        path = download()  # TUF download: length and sha256 checked against signed metadata
        size = _FETCHED.bytes or path.stat().st_size
        path.unlink()
        before = self.record(model)
        self._records[model] = JournalRecord(
            model=model,
            phase=Phase.COMMITTED,
            version=version,
            previous=serving_version(before),
            rollout_id=rollout_id,
            entered_at=time.time(),
        )
        self._on_commit(model, version, size)

    def roll_back(self, model: str, reason: str) -> bool:
        return False

    def cancel_shadow(self, model: str, reason: str) -> bool:
        return False  # no shadows here: nothing is loaded

    def put_back_interrupted(self) -> None:
        """Nothing is ever interrupted here: installs are not resumed across restarts."""

    def model_names(self) -> list[str]:
        return list(self._records)

    def probation_left_s(self, model: str) -> float:
        return 0.0


_FETCHED = threading.local()


class _FetchedBytes(logging.Handler):
    """Sums, per checking thread, the bytes of each transfer the update service logs
    (``installing <model> <version> from <target> (<bytes> bytes…)``)."""

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args
        if record.msg.startswith("installing ") and isinstance(args, tuple) and len(args) >= 4:
            _FETCHED.bytes = getattr(_FETCHED, "bytes", 0) + int(args[3])


class SimAgent:
    def __init__(
        self, device: str, state: Path, url: str, root: Path, serving: str = "", installed: str = ""
    ) -> None:
        from agent.device.config import AgentConfig, RepositoryConfig
        from agent.update.updater import UpdateService

        config = AgentConfig(
            device_id=device,
            fleet=FLEET,
            state_dir=state,
            trusted_root=root,
            repository=RepositoryConfig(url=url, read_timeout_s=60, download_deadline_s=300),
        )
        self.device = device
        self.lifecycle = SkipLoadLifecycle(self._committed, serving, installed)
        self.updates = UpdateService(config, self.lifecycle)  # type: ignore[arg-type]
        self.lock = threading.Lock()
        self.wanted = False
        self.running = False

    def _committed(self, model: str, version: str, size: int) -> None:
        emit({"device": self.device, "version": version, "at": time.time(), "bytes": size})

    def check(self) -> None:
        try:
            result = self.updates.check()
        except Exception as exc:  # report it: a swallowed error would strand the device
            emit({"device": self.device, "error": f"{type(exc).__name__}: {exc}"})
            return
        if result.error or result.refused:
            emit({"device": self.device, "error": result.error or result.refused})


def run_worker(args: argparse.Namespace) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from agent.contracts import announce_topic

    devices = [f"sim-{i:04d}" for i in range(args.first, args.first + args.count)]
    updater_log = logging.getLogger("agent.update.updater")
    updater_log.setLevel(logging.INFO)
    updater_log.propagate = False
    updater_log.addHandler(_FetchedBytes())
    agents = [
        SimAgent(d, Path(args.state) / d, args.url, Path(args.root), args.serving, args.installed)
        for d in devices
    ]
    pool = ThreadPoolExecutor(args.threads, thread_name_prefix="check")
    list(pool.map(lambda a: a.check(), agents))  # bootstrap: trusted metadata cached
    pending = threading.Lock()
    checking: set[str] = set()
    again: set[str] = set()

    def run(agent: SimAgent) -> None:
        while True:
            agent.check()
            with pending:
                if agent.device not in again:
                    checking.discard(agent.device)
                    return
                again.discard(agent.device)

    def announced(*_: Any) -> None:
        for agent in agents:
            with pending:
                if agent.device in checking:
                    again.add(agent.device)  # checks coalesce, as the agent's do
                    continue
                checking.add(agent.device)
            pool.submit(run, agent)

    host, port = args.broker.rsplit(":", 1)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-worker-{args.first}")
    client.on_message = announced
    client.on_connect = lambda c, *_: c.subscribe(announce_topic(FLEET), qos=1)
    client.connect(host, int(port))
    client.loop_start()
    emit("ready")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait(args.lifetime)
    client.loop_stop()
    pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------- the controller side


def build_bundle_of(
    mb: float, out: Path, work: Path, version: str = "1.0.0", bias_seed: int | None = None
) -> Path:
    """A bundle of one linear layer of about ``mb`` MB; with ``bias_seed``, its bias
    replaced by new random values (the last layer retrained, ``W`` unchanged)."""
    from controller.build.builder import BuildOptions, build_bundle
    from tests.helpers import make_linear_model

    in_features = max(4, int(mb * 2**20 / 4 / 1000))
    model = make_linear_model(work / "big.onnx", seed=7, in_features=in_features, out_features=1000)
    if bias_seed is not None:
        import numpy as np
        import onnx
        from onnx import numpy_helper

        proto = onnx.load(str(model))
        for init in proto.graph.initializer:
            if init.name == "b":
                rng = np.random.default_rng(bias_seed)
                new = rng.normal(size=numpy_helper.to_array(init).shape).astype(np.float32)
                init.CopyFrom(numpy_helper.from_array(new, "b"))
        model = work / f"big-{version}.onnx"
        onnx.save(proto, str(model))
    options = BuildOptions(quantize="none", latency_runs=0)
    return build_bundle(model, MODEL, version, out, 4, options=options).path


def tick_cost(devices: int, beats: int) -> tuple[float, float]:
    """Seconds per RolloutService.tick over ``devices`` with ``beats`` heartbeats each in
    the stage window: later ticks (mean of 5), and the first one."""
    from agent.contracts import Heartbeat, ModelFigures, ProbationPolicy, SystemFigures
    from controller.fleet.records import IngestBatch
    from controller.fleet.stores import open_store
    from controller.repository.repo import init_repository
    from controller.rollout.gates import DEFAULT_GATES, parse_gates
    from controller.rollout.service import RolloutService
    from controller.rollout.stages import OnFailure, new_rollout
    from controller.rollout.store import RolloutStore

    work = Path(tempfile.mkdtemp(prefix="rollout-tick-"))
    try:
        init_repository(work / "repo")
        store = open_store(str(work / "telemetry.sqlite"))
        now = time.time()
        started = now - beats * 10
        fill = time.perf_counter()
        for b in range(beats):
            batch = IngestBatch()
            for d in range(devices):
                version = "2.0.0" if d % 10 == 0 else "1.0.0"
                figures = ModelFigures(version, "committed", 50, 0, 0, 0.004, 0.008, 0.01)
                hb = Heartbeat(f"sim-{d:04d}", FLEET, "", b, 10.0, "b", 1.0, SystemFigures(),
                               {MODEL: figures})  # fmt: skip
                batch.heartbeats.append((hb, started + b * 10 + 1))
            store.write(batch)
        fill = time.perf_counter() - fill
        rollout = new_rollout(
            rollout_id="big-2.0.0-bench", fleet=FLEET, model=MODEL, version="2.0.0",
            previous="1.0.0", stages=(10, 100), wait_s=10 * beats + 3600, deadline_s=86400,
            gates=parse_gates(DEFAULT_GATES), canaries=(), on_failure=OnFailure.PAUSE,
            probation=ProbationPolicy(), now=started,
        )  # fmt: skip
        RolloutStore(work / "repo").save(rollout)
        service = RolloutService(work / "repo", store)
        t = time.perf_counter()
        service.tick(now)  # reads the whole stage window, publishes desired state
        first = time.perf_counter() - t
        t = time.perf_counter()
        for i in range(5):  # later ticks read what arrived since (and an overlap)
            service.tick(now + i + 1)
        per_tick = (time.perf_counter() - t) / 5
        store.close()
        return per_tick, first
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=24, help="checks at once per worker")
    parser.add_argument("--mb", type=float, default=5.0, help="bundle size (MB)")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument(
        "--deltas", action="store_true", help="v1 → v2 without and with deltas, side by side"
    )
    parser.add_argument(
        "--gateway",
        action="store_true",
        help="devices behind --gateways site gateways vs direct, side by side",
    )
    parser.add_argument("--gateways", type=int, default=4, help="site gateways (--gateway)")
    parser.add_argument(
        "--record-to", type=Path, default=BENCHMARKS_MD, help="default docs/benchmarks.md"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("first", "count"):
        parser.add_argument(f"--{name}", type=int, default=0, help=argparse.SUPPRESS)
    for name in ("broker", "url", "root", "state", "serving", "installed"):
        parser.add_argument(f"--{name}", default="", help=argparse.SUPPRESS)
    parser.add_argument("--lifetime", type=float, default=900.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return
    if args.deltas:
        run_delta_bench(args)
        return
    if args.gateway:
        run_gateway_bench(args)
        return
    run_bench(args)


def run_bench(args: argparse.Namespace) -> None:
    from tests.e2e_support import edgectl, start_serve
    from tests.helpers import start_broker

    work = Path(tempfile.mkdtemp(prefix="fleet-rollout-"))
    broker = start_broker(work / "broker")
    workers: list[subprocess.Popen[str]] = []
    serve = None
    try:
        repo = work / "repo"
        edgectl("init", repo)
        bundle = build_bundle_of(args.mb, work / "big.bundle", work)
        size = bundle.stat().st_size
        serve, url = start_serve(repo, broker.address, work / "serve.log")
        commits: dict[str, float] = {}
        errors: list[str] = []
        ready = threading.Semaphore(0)
        spawn_workers(args, workers, broker.address, url, repo, work, [], (commits, errors, ready))
        t_boot = time.monotonic()
        wait_ready(workers, ready, args.timeout)
        boot_s = time.monotonic() - t_boot
        time.sleep(1.0)  # let the retained announcement's checks settle
        cpu0 = cpu_seconds(serve.process.pid)
        t0 = time.time()
        edgectl("release", bundle, "--fleet", FLEET, "--repo", repo)
        release_s = time.time() - t0
        deadline = time.monotonic() + args.timeout
        while len(commits) < args.devices and time.monotonic() < deadline:
            time.sleep(0.05)
        cpu1 = cpu_seconds(serve.process.pid)
        done = len(commits)
        last = max(commits.values()) - t0 if commits else float("nan")
        lat = sorted(v - t0 for v in commits.values())
        p50 = lat[len(lat) // 2] if lat else float("nan")
        print(
            f"release command: {release_s:.2f} s; "
            f"bootstrap of {args.devices} devices: {boot_s:.1f} s"
        )
        print(f"committed: {done}/{args.devices}; errors: {len(errors)} {errors[:3]}")
        print(f"release -> last device committed: {last:.1f} s (median device {p50:.1f} s)")
        print(f"edgectl serve CPU meanwhile: {cpu1 - cpu0:.1f} s")
        per_tick, first_tick = tick_cost(args.devices, 60)
        print(
            f"rollout tick over {args.devices} devices x 60 heartbeats: first "
            f"{first_tick * 1000:.0f} ms, then {per_tick * 1000:.0f} ms"
        )
        if not args.no_record:
            record(
                args,
                size,
                done,
                last,
                p50,
                cpu1 - cpu0,
                release_s,
                (first_tick, per_tick),
                len(errors),
            )
    finally:
        stop_workers(workers)
        if serve is not None:
            serve.stop()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)


def run_delta_bench(args: argparse.Namespace) -> None:
    """v1 → v2 on devices serving v1: released without deltas, then with; side by side."""
    from agent.update.unpack import unpack_bundle
    from tests.e2e_support import edgectl, start_serve
    from tests.helpers import start_broker

    work = Path(tempfile.mkdtemp(prefix="fleet-deltas-"))
    broker = start_broker(work / "broker")
    results: dict[str, dict[str, Any]] = {}
    try:
        v1 = build_bundle_of(args.mb, work / "v1.bundle", work)
        v2 = build_bundle_of(args.mb, work / "v2.bundle", work, "2.0.0", bias_seed=8)
        installed = work / "installed-1.0.0"
        unpack_bundle(v1, installed, expected_name=MODEL, expected_version="1.0.0",
                      max_member_bytes=1 << 32, max_total_bytes=1 << 33)  # fmt: skip
        for label, delta_from in (("full bundle", "0"), ("delta", "2")):
            results[label] = _move(args, work / label.replace(" ", "-"), broker.address,
                                   v1, v2, installed, delta_from, edgectl, start_serve)  # fmt: skip
            r = results[label]
            print(
                f"{label}: committed {r['done']}/{args.devices} (errors {r['errors']}); "
                f"bytes fetched {r['bytes']:,}; release -> last {r['last']:.1f} s "
                f"(median {r['p50']:.1f} s); serve CPU {r['cpu']:.1f} s",
                flush=True,
            )
    finally:
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    if not args.no_record:
        record_deltas(args, v1_size=results["full bundle"]["size"], results=results)


def _move(
    args: argparse.Namespace, work: Path, broker: str, v1: Path, v2: Path, installed: Path,
    delta_from: str, edgectl: Any, start_serve: Any,
) -> dict[str, Any]:  # fmt: skip
    work.mkdir()
    repo = work / "repo"
    edgectl("init", repo)
    edgectl("release", v1, "--fleet", FLEET, "--repo", repo, "--delta-from", "0")
    serve, url = start_serve(repo, broker, work / "serve.log")
    workers: list[subprocess.Popen[str]] = []
    commits: dict[str, float] = {}
    fetched: dict[str, int] = {}
    errors: list[str] = []
    ready = threading.Semaphore(0)
    try:
        spawn_workers(
            args, workers, broker, url, repo, work,
            ["--serving", "1.0.0", "--installed", str(installed)],
            (commits, errors, ready, "2.0.0", fetched),
        )  # fmt: skip
        wait_ready(workers, ready, args.timeout)
        time.sleep(1.0)
        cpu0 = cpu_seconds(serve.process.pid)
        t0 = time.time()
        out = edgectl("release", v2, "--fleet", FLEET, "--repo", repo, "--delta-from", delta_from)
        deadline = time.monotonic() + args.timeout
        while len(commits) < args.devices and time.monotonic() < deadline:
            time.sleep(0.05)
        cpu1 = cpu_seconds(serve.process.pid)
        lat = sorted(v - t0 for v in commits.values())
        return {
            "size": v2.stat().st_size,
            "release": out.stdout.strip().splitlines(),
            "done": len(commits),
            "errors": len(errors),
            "error_sample": errors[:3],
            "bytes": sum(fetched.values()),
            "last": lat[-1] if lat else float("nan"),
            "p50": lat[len(lat) // 2] if lat else float("nan"),
            "cpu": cpu1 - cpu0,
        }
    finally:
        stop_workers(workers)
        serve.stop()


def run_gateway_bench(args: argparse.Namespace) -> None:
    """The same release to the same fleet, direct and behind site gateways; side by side."""
    work = Path(tempfile.mkdtemp(prefix="fleet-gateway-"))
    results: dict[str, dict[str, Any]] = {}
    try:
        bundle = build_bundle_of(args.mb, work / "big.bundle", work)
        for label, gateways in (("direct", 0), (f"{args.gateways} gateways", args.gateways)):
            results[label] = _gateway_move(args, work / f"run-{gateways}", bundle, gateways)
            r = results[label]
            print(
                f"{label}: committed {r['done']}/{args.devices} (errors {r['errors']}); "
                f"controller served {r['served']:,} B ({r['bundle_fetches']} bundle "
                f"fetches); release -> last {r['last']:.1f} s (median {r['p50']:.1f} s); "
                f"serve CPU {r['cpu']:.1f} s",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not args.no_record:
        record_gateway(args, bundle_size=results["direct"]["size"], results=results)


def _gateway_move(
    args: argparse.Namespace, work: Path, bundle: Path, gateways: int
) -> dict[str, Any]:
    """One release to ``args.devices`` simulated devices: straight from the controller
    (``gateways`` 0) or split over ``gateways`` sites, each an nginx mirror and a bridged
    mosquitto written by `edgectl gateway config`. The controller's bytes are counted by
    an nginx in front of `edgectl serve` that caches nothing (its access log)."""
    import os

    from tests.e2e_support import edgectl, start_serve
    from tests.gateway.servers import start_counting_proxy, start_gateway_nginx
    from tests.helpers import free_port, mosquitto_binary, start_broker, wait_for_port

    work.mkdir()
    broker = start_broker(work / "broker")
    stoppers: list[Any] = [broker]
    workers: list[subprocess.Popen[str]] = []
    commits: dict[str, float] = {}
    errors: list[str] = []
    ready = threading.Semaphore(0)
    try:
        repo = work / "repo"
        edgectl("init", repo)
        serve, serve_url = start_serve(repo, broker.address, work / "serve.log")
        stoppers.append(serve)
        central = start_counting_proxy(work / "central", serve_url)
        stoppers.append(central)
        sites = [(broker.address, central.url)]
        for g in range(gateways):
            folder, http, mqtt = work / f"gateway-{g}", free_port(), free_port()
            run_as = ["--run-as", "root"] if os.geteuid() == 0 else []
            edgectl("gateway", "config", "--site", f"site-{g}", "--upstream", central.url,
                    "--central-broker", broker.address, "--listen", f"127.0.0.1:{http}",
                    "--site-broker-port", str(mqtt), "--site-broker-bind", "127.0.0.1",
                    "--fleet", FLEET, "-o", folder, *run_as)  # fmt: skip
            stoppers.append(start_gateway_nginx(folder, http))
            log = open(folder / "mosquitto.out", "wb")  # noqa: SIM115 - closed with it
            proc = subprocess.Popen([mosquitto_binary(), "-c", str(folder / "mosquitto.conf")],
                                    stdout=log, stderr=log)  # fmt: skip
            stoppers.append(_Stoppable(proc))
            wait_for_port(mqtt)
            sites.append((f"127.0.0.1:{mqtt}", f"http://127.0.0.1:{http}"))
        if gateways:
            sites = sites[1:]
        time.sleep(1.0)  # the bridges connect
        per = -(-args.devices // args.workers)
        for i, first in enumerate(range(0, args.devices, per)):
            site_broker, url = sites[i % len(sites)]
            cmd = [
                sys.executable, __file__, "--worker", "--first", str(first),
                "--count", str(min(per, args.devices - first)), "--broker", site_broker,
                "--url", url + "/", "--root", str(repo / "metadata" / "root.json"),
                "--state", str(work / "devices"), "--threads", str(args.threads),
            ]  # fmt: skip
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            workers.append(proc)
            threading.Thread(target=_read, args=(proc, commits, errors, ready), daemon=True).start()
        wait_ready(workers, ready, args.timeout)
        time.sleep(1.0)
        logged = len(central.requests())
        load = Path("/proc/loadavg").read_text().split()[0]
        cpu0 = cpu_seconds(serve.process.pid)
        t0 = time.time()
        edgectl("release", bundle, "--fleet", FLEET, "--repo", repo)
        deadline = time.monotonic() + args.timeout
        while len(commits) < args.devices and time.monotonic() < deadline:
            time.sleep(0.05)
        cpu1 = cpu_seconds(serve.process.pid)
        time.sleep(0.5)  # nginx logs a request when it is done
        served = central.requests()[logged:]
        (target,) = (repo / "targets" / "bundles" / MODEL).glob("*.bundle")
        lat = sorted(v - t0 for v in commits.values())
        return {
            "size": target.stat().st_size,
            "done": len(commits),
            "errors": len(errors),
            "error_sample": errors[:3],
            "served": sum(r.bytes for r in served),
            "requests": len(served),
            "bundle_fetches": sum(1 for r in served if r.path.endswith(target.name)),
            "last": lat[-1] if lat else float("nan"),
            "p50": lat[len(lat) // 2] if lat else float("nan"),
            "cpu": cpu1 - cpu0,
            "load": load,
        }
    finally:
        stop_workers(workers)
        for item in reversed(stoppers):
            item.stop()


class _Stoppable:
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def record_gateway(args: argparse.Namespace, bundle_size: int, results: dict[str, Any]) -> None:
    command = (
        f"python bench/fleet_rollout.py --gateway --gateways {args.gateways} --devices "
        f"{args.devices} --workers {args.workers} --threads {args.threads} --mb {args.mb:g}"
    )
    direct, behind = results["direct"], results[f"{args.gateways} gateways"]
    lines = [
        run_heading(command),
        f"One release of a {bundle_size:,} B bundle to {args.devices} simulated devices, "
        f"straight from the controller, then split over {args.gateways} site gateways (each "
        "an nginx `proxy_cache` mirror and a mosquitto bridged to the central broker, both "
        "from `edgectl gateway config`, all on this machine); "
        f"{args.workers} worker processes x {args.threads} threads; model loading skipped "
        "(simulated). Controller bytes: the access log of an nginx in front of "
        "`edgectl serve` that caches nothing, from the release to the last commit "
        "(metadata included).",
        "",
        f"| figure | direct | {args.gateways} gateways | gateways / direct |",
        "|---|---|---|---|",
        f"| devices committed (errors) | {direct['done']} ({direct['errors']}) | "
        f"{behind['done']} ({behind['errors']}) | |",
        f"| bytes served by the controller | {direct['served']:,} | {behind['served']:,} | "
        f"{behind['served'] / max(direct['served'], 1):.2%} |",
        f"| requests to the controller | {direct['requests']:,} | {behind['requests']:,} | "
        f"{behind['requests'] / max(direct['requests'], 1):.2%} |",
        f"| bundle fetches from the controller | {direct['bundle_fetches']} | "
        f"{behind['bundle_fetches']} | |",
        f"| release → median device committed | {direct['p50']:.1f} s | {behind['p50']:.1f} s "
        f"| {behind['p50'] / direct['p50']:.2f}× |",
        f"| release → last device committed | {direct['last']:.1f} s | {behind['last']:.1f} s "
        f"| {behind['last'] / direct['last']:.2f}× |",
        f"| `edgectl serve` CPU meanwhile | {direct['cpu']:.1f} s | {behind['cpu']:.1f} s | |",
        f"| load average (1 min) at the release | {direct['load']} | {behind['load']} | |",
    ]
    intro = (
        "`bench/fleet_rollout.py`: simulated agents on the real update path (TUF refresh, "
        "desired state, download, length and sha256 verification; loading the model is "
        "skipped) against one `edgectl serve`. See the script's docstring for what is real."
    )
    record_section(HEADING, intro, "\n".join(lines), args.record_to)
    print(f"recorded in {args.record_to}")


def record_deltas(args: argparse.Namespace, v1_size: int, results: dict[str, Any]) -> None:
    command = (
        f"python bench/fleet_rollout.py --deltas --devices {args.devices} --workers "
        f"{args.workers} --threads {args.threads} --mb {args.mb:g}"
    )
    full, delta = results["full bundle"], results["delta"]
    lines = [
        run_heading(command),
        f"v1 → v2 (the last layer's bias retrained) on {args.devices} devices serving v1; "
        f"v2's bundle {full['size']:,} B (format 2); {args.workers} worker processes x "
        f"{args.threads} threads; model loading skipped (simulated). Bytes: what the "
        "devices fetched, summed.",
        "",
        "| figure | without deltas | with deltas | with / without |",
        "|---|---|---|---|",
        f"| devices committed (errors) | {full['done']} ({full['errors']}) | "
        f"{delta['done']} ({delta['errors']}) | |",
        f"| bytes served | {full['bytes']:,} | {delta['bytes']:,} | "
        f"{delta['bytes'] / max(full['bytes'], 1):.2%} |",
        f"| release → median device committed | {full['p50']:.1f} s | {delta['p50']:.1f} s | "
        f"{delta['p50'] / full['p50']:.2f}× |",
        f"| release → last device committed | {full['last']:.1f} s | {delta['last']:.1f} s | "
        f"{delta['last'] / full['last']:.2f}× |",
        f"| `edgectl serve` CPU meanwhile | {full['cpu']:.1f} s | {delta['cpu']:.1f} s | |",
    ]
    intro = (
        "`bench/fleet_rollout.py`: simulated agents on the real update path (TUF refresh, "
        "desired state, download, length and sha256 verification; loading the model is "
        "skipped) against one `edgectl serve`. See the script's docstring for what is real."
    )
    record_section(HEADING, intro, "\n".join(lines), args.record_to)
    print(f"recorded in {args.record_to}")


def spawn_workers(
    args: argparse.Namespace, workers: list[subprocess.Popen[str]], broker: str, url: str,
    repo: Path, work: Path, extra: list[str], read_args: tuple[Any, ...],
) -> None:  # fmt: skip
    """Start the worker processes that simulate ``args.devices`` devices (``extra`` added
    to each command line), each appended to ``workers`` as it starts (so the caller's
    ``finally`` stops those started before a failure) and read by ``_read(proc,
    *read_args)`` on a thread of its own."""
    per = -(-args.devices // args.workers)
    for first in range(0, args.devices, per):
        cmd = [
            sys.executable, __file__, "--worker", "--first", str(first),
            "--count", str(min(per, args.devices - first)), "--broker", broker,
            "--url", url, "--root", str(repo / "metadata" / "root.json"),
            "--state", str(work / "devices"), "--threads", str(args.threads),
            *extra,
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        workers.append(proc)
        threading.Thread(target=_read, args=(proc, *read_args), daemon=True).start()


def wait_ready(
    workers: list[subprocess.Popen[str]], ready: threading.Semaphore, timeout: float
) -> None:
    """Wait for every worker's "ready" line (its devices bootstrapped)."""
    for _ in workers:
        if not ready.acquire(timeout=timeout):
            raise SystemExit("workers did not bootstrap in time")


def stop_workers(workers: list[subprocess.Popen[str]]) -> None:
    for proc in workers:
        proc.terminate()
    for proc in workers:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _read(proc: subprocess.Popen[str], commits: dict[str, float], errors: list[str],
          ready: threading.Semaphore, version: str = "1.0.0",
          fetched: dict[str, int] | None = None) -> None:  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == "ready":
            ready.release()
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if "error" in doc:
            errors.append(f"{doc['device']}: {doc['error']}")
        elif doc.get("version") == version:
            commits.setdefault(doc["device"], float(doc["at"]))
            if fetched is not None:
                fetched[doc["device"]] = int(doc["bytes"])


def record(
    args: argparse.Namespace, size: int, done: int, last: float, p50: float, cpu: float,
    release_s: float, ticks: tuple[float, float], errors: int,
) -> None:  # fmt: skip
    met = done == args.devices and last <= 60
    command = (
        f"python bench/fleet_rollout.py --devices {args.devices} --workers {args.workers} "
        f"--threads {args.threads} --mb {args.mb:g}"
    )
    verdict = "met" if met else "NOT met"
    run = "\n".join(
        [
            run_heading(command),
            f"Bundle {size / 1e6:.2f} MB; {args.workers} worker processes x {args.threads} "
            "threads; model loading skipped (simulated).",
            "",
            "| figure | value |",
            "|---|---|",
            f"| devices committed | {done} / {args.devices} (errors {errors}) |",
            f"| `edgectl release` (command) | {release_s:.2f} s |",
            f"| release → median device committed | {p50:.1f} s |",
            f"| release → last device committed | {last:.1f} s |",
            f"| `edgectl serve` CPU meanwhile | {cpu:.1f} s |",
            f"| rollout tick, {args.devices} devices x 60 heartbeats each | first "
            f"{ticks[0] * 1000:.0f} ms, then {ticks[1] * 1000:.0f} ms |",
            "",
            f"- {verdict}: ≤ 60 s from release to the last of {args.devices} devices committed "
            f"({last:.1f} s).",
        ]
    )
    intro = (
        "`bench/fleet_rollout.py`: simulated agents on the real update path (TUF refresh, "
        "desired state, download, length and sha256 verification; loading the model is "
        "skipped) against one `edgectl serve`. See the script's docstring for what is real."
    )
    path = args.record_to
    record_section(HEADING, intro, run, path)
    print(f"recorded in {path}")


if __name__ == "__main__":
    main()
