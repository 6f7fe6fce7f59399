"""What the inference server's own code costs per repeated infer request, warm.

The transport is taken out: each case builds the request an ``InferenceClient`` sends
and hands it straight to the server's router (``dispatch``, as a connection's thread
does), with the connection's memo kept between calls, then encodes the response head.
Cases: the tiny model (1×4 → 1×3 floats) with binary tensors, and with shared memory
(input and output in a registered region). A row runs the same tiny model in-process
(``LoadedModel.infer``): the model's own share of each figure.

Each tree runs in its own process, trees alternating, ``--runs`` times; the table gives
each case's median over the runs of the median per-call time (5000 calls per run).
``--tree DIR`` (repeatable) measures other checkouts too, e.g. the commit before a change
(``git worktree add /tmp/before <commit>``); the current tree is always measured.

    python bench/server_overhead.py [--tree /tmp/before] [--runs 3] [--record]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from _common import ROOT, arguments, command_line, parse_arguments, record_section, run_heading

CASES = ("shm", "binary", "model.infer")

# Runs in a fresh interpreter with TREE on sys.path first: the code of that checkout.
_PROBE = r"""
import inspect, json, os, statistics, sys, tempfile, time
sys.path.insert(0, TREE)
sys.path.insert(1, os.path.join(TREE, "bench"))
from pathlib import Path
import numpy as np
from infer_overhead import _inputs, _load, build_models
from agent.serving.http_messages import Request
from agent.runtime.registry import ModelRegistry
from agent.serving.server import InferenceServer
from agent.oip.shm import SharedMemoryRegion

base = Path(tempfile.mkdtemp(prefix="ef-server-overhead-"))
dirs = build_models(base)
x, _ = _inputs()
registry = ModelRegistry()
registry.activate(_load(dirs["tiny"], 1))
server = InferenceServer(registry, base / "unused.sock")
router = server._router
region = SharedMemoryRegion(f"ef-server-overhead-{os.getpid()}", 1 << 16)
server.shm.register("r", {"key": region.key, "offset": 0, "byte_size": region.byte_size}, 0)
region.ndarray(0, np.float32, x.shape)[:] = x
tensor = {"name": "x", "datatype": "FP32", "shape": [1, 4]}
shm_doc = {
    "inputs": [{**tensor, "parameters": {"shared_memory_region": "r",
        "shared_memory_offset": 0, "shared_memory_byte_size": 16}}],
    "outputs": [{"name": "y", "parameters": {"shared_memory_region": "r",
        "shared_memory_offset": 64, "shared_memory_byte_size": 12}}],
}
shm_body = json.dumps(shm_doc, separators=(",", ":")).encode()
bin_doc = {"inputs": [{**tensor, "parameters": {"binary_data_size": 16}}],
           "parameters": {"binary_data_output": True}}
header = json.dumps(bin_doc, separators=(",", ":")).encode()
bin_body = header + x.tobytes()
url = b"/v2/models/tiny/infer"
with_memo = "memo" in inspect.signature(Request.__init__).parameters
memos = ({}, {})

def request(body, header_length, memo):
    args = (b"POST", url, bytes(body), True, False, header_length, 0, time.monotonic())
    return Request(*args, memo) if with_memo else Request(*args)

model = registry.get("tiny")
cases = {
    "shm": lambda: router.dispatch(request(shm_body, len(shm_body), memos[0])).encode_head(b""),
    "binary": lambda: router.dispatch(request(bin_body, len(header), memos[1])).encode_head(b""),
    "model.infer": lambda: model.infer({"x": x}),
}
assert b" 200 " in cases["shm"]()[0] and b" 200 " in cases["binary"]()[0]
result = {}
for name, call in cases.items():
    for _ in range(500):
        call()
    times = []
    for _ in range(5000):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    result[name] = statistics.median(times) * 1e6
print(json.dumps(result))
region.close()
"""


def measure(tree: Path) -> dict[str, float]:
    """One run of every case with the code of ``tree`` (µs per call)."""
    done = subprocess.run(
        [sys.executable, "-c", f"TREE = {str(tree)!r}\n{_PROBE}"],
        capture_output=True, text=True, cwd=tree, check=False,
    )  # fmt: skip
    if done.returncode:
        raise SystemExit(f"{tree}: the probe failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--tree", type=Path, action="append", default=[], help="another checkout")
    parser.add_argument("--runs", type=int, default=3)
    args = parse_arguments(parser)
    trees = [*args.tree, ROOT]
    runs: dict[Path, list[dict[str, float]]] = {tree: [] for tree in trees}
    for _ in range(args.runs):
        for tree in trees:
            runs[tree].append(measure(tree))
    lines = [
        "| tree | " + " | ".join(f"{case} (µs)" for case in CASES) + " |",
        "|---|" + "---|" * len(CASES),
    ]
    for tree, results in runs.items():
        medians = [statistics.median(r[case] for r in results) for case in CASES]
        name = "this tree" if tree == ROOT else str(tree)
        lines.append(f"| {name} | " + " | ".join(f"{m:.1f}" for m in medians) + " |")
    print("\n".join(lines))
    if args.record:
        commits = {
            tree: subprocess.run(
                ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                capture_output=True, text=True, check=False,
            ).stdout.strip()
            for tree in trees
        }  # fmt: skip
        trees_at = ", ".join(
            f"{'this tree' if t == ROOT else t} at {c}" for t, c in commits.items()
        )
        run = "\n".join([run_heading(command_line(), note=f"; {trees_at}"), "", *lines])
        intro = (
            "The server's own code per repeated infer request, warm, without the "
            "transport (`bench/server_overhead.py`): the router's dispatch of a "
            "tiny-model request and its response head; `model.infer` is the model's "
            "share."
        )
        record_section("Server overhead", intro, run)


if __name__ == "__main__":
    main()
