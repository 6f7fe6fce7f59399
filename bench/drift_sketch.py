"""What counting a request in the drift sketch costs, against the model run it follows.

``DriftSketch.observe`` runs on the request's thread after the model answered
(agent/runtime/drift.py). This times, side by side and interleaved (rounds alternate so a
noisy neighbour hits both alike), for three models:

- the demo's digits MLP (``pixels`` [1, 64] -> ``probabilities`` [1, 10]: a class
  histogram and the deciles of 64 input values), a model of ~15 µs;
- a tiny linear model (4 -> 3 floats), where the sketch is the largest share;
- an image-sized input (1x3x224x224 float32, strided to 256 values a row) through a
  1x1 convolution and a global pool to 10 classes.

Then the same MLP through a real inference server in another process, twice (one name
with the sketch, one without), requests interleaved: the p50 and p99 a client sees.

It reports the median of each in µs, the sketch's share of the run, and the sketch's
mean (which includes the binning of the kept values every 32 requests): the
per-request cost docs/benchmarks.md records. Pure in-process: no server, no socket.

    python bench/drift_sketch.py [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from agent.contracts import GoldenSpec, Manifest, TensorSpec
from agent.contracts.reference import Reference
from agent.runtime.drift import DriftSketch
from agent.runtime.loading import load_model
from controller.build.reference import output_histogram, quantile_histogram


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _dense(path: Path, n_in: int, n_out: int, softmax: bool) -> Path:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((n_in, n_out)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["l" if softmax else "y"])]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["l"], ["y"]))
    graph = helper.make_graph(
        nodes, "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_out])], [w],
    )  # fmt: skip
    return _save(graph, path)


def _image(path: Path) -> Path:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((10, 3, 1, 1)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("GlobalAveragePool", ["c"], ["p"]),
        helper.make_node("Flatten", ["p"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "image",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], [w],
    )  # fmt: skip
    return _save(graph, path)


def _loaded(folder: Path, onnx_path: Path, shape: tuple[int, ...], outputs: int) -> object:
    """The model loaded as the agent loads it, with a sketch from a reference of its
    outputs on 256 random samples."""
    directory = folder / onnx_path.stem
    directory.mkdir()
    (directory / "model.onnx").write_bytes(onnx_path.read_bytes())
    np.savez(directory / "golden.npz", x=np.zeros(1))
    manifest = Manifest(
        name=onnx_path.stem, version="1.0.0",
        inputs=(TensorSpec("x", "FP32", (-1, *shape[1:])),),
        outputs=(TensorSpec("y", "FP32", (-1, outputs)),),
        opset=17, min_ort_version="1.12.0", golden=GoldenSpec(1, 0, 0), members={},
    )  # fmt: skip
    model = load_model(directory, manifest)
    sample = np.random.default_rng(1).standard_normal((256, *shape[1:])).astype(np.float32)
    y = model.infer({"x": sample})["y"]
    out, inp = output_histogram(y), quantile_histogram(sample, with_moments=True)
    assert out is not None and inp is not None
    reference = Reference(256, {"y": out}, {"x": inp})
    return model, DriftSketch(reference, {"y": "float32"}, {"x": "float32"}), sample[:1]


def _serve(socket_path: str, ready: Any) -> None:
    """A real inference server (another process, as on a device) serving the digits-sized
    MLP twice: ``plain`` without a drift sketch, ``sketched`` with one."""
    import asyncio
    import dataclasses

    from agent.runtime.registry import ModelRegistry
    from agent.serving.routes import import_infer_path
    from agent.serving.server import InferenceServer

    folder = Path(tempfile.mkdtemp(prefix="ef-drift-"))
    model, sketch, _x = _loaded(folder, _dense(folder / "mlp.onnx", 64, 10, True), (1, 64), 10)
    registry = ModelRegistry()
    registry.activate(dataclasses.replace(model, name="plain"))  # type: ignore[type-var]
    registry.activate(dataclasses.replace(model, name="sketched", drift=sketch))  # type: ignore[type-var]
    import_infer_path()
    server = InferenceServer(registry, Path(socket_path))

    async def run() -> None:
        await server.start()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(run())


def served(rounds: int) -> None:
    """Answered requests with and without the sketch, through the real server, calls
    interleaved (plain, sketched, plain, ...), binary tensors on the Unix socket."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import SocketProcess

    from agent.client import InferenceClient

    server = SocketProcess("inference server", _serve)
    try:
        x = np.random.default_rng(2).standard_normal((1, 64)).astype(np.float32)
        times: dict[str, list[int]] = {"plain": [], "sketched": []}
        with InferenceClient(server.socket_path) as client:
            for _ in range(200):
                for name in times:
                    client.infer(name, {"x": x})
            for i in range(rounds):
                for name in ("plain", "sketched") if i % 2 else ("sketched", "plain"):
                    start = time.perf_counter_ns()
                    client.infer(name, {"x": x})
                    times[name].append(time.perf_counter_ns() - start)
        plain = statistics.median(times["plain"]) / 1000
        sketched = statistics.median(times["sketched"]) / 1000
        p99 = {k: float(np.percentile(v, 99)) / 1000 for k, v in times.items()}
        print(
            f"served (client to answer), digits MLP-sized: p50 {plain:.1f} µs without the "
            f"sketch, {sketched:.1f} µs with it ({sketched / plain:.3f}x); p99 "
            f"{p99['plain']:.1f} / {p99['sketched']:.1f} µs ({p99['sketched'] / p99['plain']:.3f}x)"
        )
    finally:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3000)
    args = parser.parse_args()
    clock = time.perf_counter_ns
    print(f"load average: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    print(f"{'model':<34} {'run µs':>8} {'observe µs':>11} {'share':>7} {'observe mean µs':>16}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cases = [
            ("digits MLP-sized (64 -> 10)", _dense(folder / "mlp.onnx", 64, 10, True), (1, 64), 10),
            ("tiny linear (4 -> 3)", _dense(folder / "tiny.onnx", 4, 3, False), (1, 4), 3),
            ("image 1x3x224x224 -> 10", _image(folder / "image.onnx"), (1, 3, 224, 224), 10),
        ]
        for label, path, shape, n_out in cases:
            model, sketch, x = _loaded(folder, path, shape, n_out)
            inputs = {"x": x}
            runs, observes = [], []
            for _ in range(100):  # warm up both
                sketch.observe(inputs, model.infer(inputs))
            for _ in range(args.rounds):
                start = clock()
                outputs = model.infer(inputs)
                ran = clock()
                sketch.observe(inputs, outputs)
                done = clock()
                runs.append(ran - start)
                observes.append(done - ran)
            run_us = statistics.median(runs) / 1000
            observe_us = statistics.median(observes) / 1000
            mean_us = statistics.fmean(observes) / 1000  # with the binning every 32 requests
            share = observe_us / run_us
            print(f"{label:<34} {run_us:>8.1f} {observe_us:>11.1f} {share:>7.1%} {mean_us:>16.1f}")
    served(args.rounds)


if __name__ == "__main__":
    main()
