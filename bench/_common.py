"""Helpers the benchmarks share: the machine, percentiles, RSS, tables, docs/benchmarks.md.

Import it from a script in bench/ (``from _common import ...``): a script's own folder is
first on ``sys.path``. Importing it also puts the repository root on ``sys.path``, so
``agent``, ``controller`` and ``tests`` import from the working tree.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BENCHMARKS_MD = ROOT / "docs" / "benchmarks.md"


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


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100, linear interpolation) or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median_ms(run: Callable[[], object], repeat: int) -> tuple[float, float]:
    """The median and the least of ``repeat`` timed calls of ``run``, in ms."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000, min(times) * 1000


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


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    return "\n".join(lines)


def goal(text: str, met: bool, got: str) -> str:
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
