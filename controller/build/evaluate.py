"""Measuring a built model against the original: data sets, quality, latency and the gate.

Owns the ``--eval`` / ``--calibration`` data format, the quality metrics a build records,
the in-process latency measurement and the quality gate (``--max-drift``).

Data files are ``.npz`` archives: one array per model input, named like the input, each
holding samples along the first axis (``(N, *input_shape[1:])``; the model's first axis
is its batch axis), and optionally ``labels``, an integer array ``(N,)`` of expected
classes (``-1`` = unlabelled, left out of accuracy).

Invariants:
- ``load_samples`` refuses (UsageError) any file whose names, shapes or dtypes do not
  match the model's inputs, naming the array, what was expected and what was found;
  nothing is cast silently.
- Quality metrics are pure functions of output arrays; the reference is the original
  model's outputs on the same inputs.
- ``Gate.check`` names every failed limit; a limit that does not apply to the model
  (top-1 agreement with no classifier output) is reported as not applicable, not passed.
"""

from __future__ import annotations

import hashlib
import math
import statistics
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from controller.base.errors import BuildError, UsageError
from controller.build.golden import numpy_dtype

Array = npt.NDArray[Any]
LABELS_KEY: Final = "labels"
# The default gate of ``auto``: at most 1 % of top-1 decisions change, outputs stay aligned.
DEFAULT_MIN_AGREEMENT: Final = 0.99
DEFAULT_MIN_COSINE: Final = 0.99
EVAL_BATCH: Final = 32


# ---------------------------------------------------------------------------- data sets


@dataclass(frozen=True)
class InputSpec:
    """One model input as ONNX Runtime reports it; dynamic dimensions are None."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int | None, ...]

    @property
    def batch(self) -> int | None:
        """The fixed batch size, or None when the first axis is dynamic."""
        return self.shape[0] if self.shape else 1


def input_specs(session: Any) -> tuple[InputSpec, ...]:
    """The inputs of an ORT session; BuildError for inputs that are not numeric tensors."""
    specs = []
    for arg in session.get_inputs():
        shape = tuple(d if isinstance(d, int) and d > 0 else None for d in arg.shape)
        specs.append(InputSpec(arg.name, numpy_dtype(arg.type, arg.name), shape))
    return tuple(specs)


@dataclass(frozen=True)
class Samples:
    """Model inputs with samples along the first axis, optional labels, and where from."""

    inputs: Mapping[str, Array]
    labels: Array | None
    source: str
    sha256: str

    @property
    def count(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, index: Array) -> dict[str, Array]:
        return {k: v[index] for k, v in self.inputs.items()}


def load_samples(path: Path, specs: Sequence[InputSpec], what: str) -> Samples:
    """Read a ``--calibration`` or ``--eval`` file (``what``) and check it against ``specs``.

    Raises UsageError when the file is missing or not an npz, or when its arrays do not
    match the model's input names, shapes or dtypes, or their sample counts differ.
    """
    if not path.is_file():
        raise UsageError(f"{what} data {path} does not exist or is not a file")
    data = path.read_bytes()
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UsageError(f"{what} data {path} is not a .npz file of arrays: {exc}") from None
    where = f"{what} data {path}"
    names = [s.name for s in specs]
    extra = sorted(set(arrays) - set(names) - {LABELS_KEY})
    missing = [n for n in names if n not in arrays]
    if missing or extra:
        raise UsageError(
            f"{where}: arrays expected {names} (plus optional {LABELS_KEY!r}), "
            f"got {sorted(arrays)}" + (f"; missing {missing}" if missing else "")
        )
    for spec in specs:
        _check_array(arrays[spec.name], spec, where)
    counts = {n: len(arrays[n]) for n in names}
    if len(set(counts.values())) != 1:
        raise UsageError(f"{where}: every input needs the same number of samples, got {counts}")
    count = next(iter(counts.values()))
    if count == 0:
        raise UsageError(f"{where}: holds no samples")
    for spec in specs:
        if spec.batch is not None and count % spec.batch:
            raise UsageError(
                f"{where}: input {spec.name!r} has a fixed batch of {spec.batch}; "
                f"the sample count must be a multiple of it, got {count}"
            )
    labels = arrays.get(LABELS_KEY)
    if labels is not None:
        if labels.dtype.kind not in "iu" or labels.shape != (count,):
            raise UsageError(
                f"{where}: {LABELS_KEY!r} expected integers of shape ({count},), "
                f"got {labels.dtype} {labels.shape}"
            )
        labels = labels.astype(np.int64)
    inputs = {n: arrays[n] for n in names}
    return Samples(inputs, labels, str(path), hashlib.sha256(data).hexdigest())


def _check_array(array: Array, spec: InputSpec, where: str) -> None:
    expected = ("N", *("?" if d is None else d for d in spec.shape[1:]))
    if array.dtype != spec.dtype:
        raise UsageError(
            f"{where}: input {spec.name!r} expected dtype {spec.dtype}, got {array.dtype}"
        )
    ok = array.ndim == max(len(spec.shape), 1) and all(
        d is None or d == got for d, got in zip(spec.shape[1:], array.shape[1:], strict=False)
    )
    if not ok:
        raise UsageError(
            f"{where}: input {spec.name!r} expected shape {list(expected)}, got {list(array.shape)}"
        )


def generated_samples(specs: Sequence[InputSpec], count: int, seed: int) -> Samples:
    """Seeded random samples from the input signature (dynamic dimensions → 1)."""
    rng = np.random.default_rng(seed)
    inputs: dict[str, Array] = {}
    for spec in specs:
        rows = count * (spec.batch or 1)
        shape = (rows, *(d or 1 for d in spec.shape[1:]))
        if spec.dtype.kind == "f":
            inputs[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            inputs[spec.name] = rng.integers(0, 2, size=shape).astype(spec.dtype)
        else:
            inputs[spec.name] = rng.integers(0, 10, size=shape).astype(spec.dtype)
    return Samples(inputs, None, "generated", "")


# ---------------------------------------------------------------------------- running


def session(model: bytes, threads: int = 0, optimize: bool = True) -> Any:
    """An ORT CPU session; ``threads`` 0 lets ONNX Runtime choose. BuildError if it fails."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own untyped errors
        raise BuildError(f"ONNX Runtime cannot load the model: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def batches(
    specs: Sequence[InputSpec], samples: Samples, rows: int = EVAL_BATCH
) -> list[dict[str, Array]]:
    """The samples cut into feeds: ``rows`` rows, or the model's fixed batch.

    Calibration wants ``rows=1``: ORT's histogram calibrators (percentile, entropy)
    need every feed to have the same shape."""
    fixed = {s.batch for s in specs if s.batch is not None}
    step = fixed.pop() if len(fixed) == 1 else (1 if fixed else rows)
    return [
        {k: v[i : i + step] for k, v in samples.inputs.items()}
        for i in range(0, samples.count, step)
    ]


def run(sess: Any, feeds: Sequence[Mapping[str, Array]]) -> dict[str, Array]:
    """Outputs of ``sess`` on every feed, concatenated along the first axis."""
    names = [o.name for o in sess.get_outputs()]
    parts: list[list[Array]] = []
    for i, feed in enumerate(feeds):
        try:
            parts.append(sess.run(names, dict(feed)))
        except Exception as exc:  # ORT raises its own untyped errors
            raise BuildError(f"ONNX Runtime failed on batch {i}: {_first_line(exc)}") from None
    return {
        name: np.concatenate([np.atleast_1d(p[j]) for p in parts]) for j, name in enumerate(names)
    }


def median_latencies_ms(
    sessions: Mapping[str, Any], feed: Mapping[str, Array], runs: int, warmup: int = 2
) -> dict[str, float]:
    """Median wall time of one ``run`` per session, in ms, measured side by side.

    Rounds interleave the sessions (A B C, A B C, …) so load from other processes on a
    shared machine falls on every candidate alike; the median drops the outliers.
    """
    clock: Callable[[], float] = time.perf_counter
    times: dict[str, list[float]] = {key: [] for key in sessions}
    for sess in sessions.values():
        for _ in range(warmup):
            sess.run(None, dict(feed))
    for _ in range(max(1, runs)):
        for key, sess in sessions.items():
            start = clock()
            sess.run(None, dict(feed))
            times[key].append((clock() - start) * 1e3)
    return {key: statistics.median(values) for key, values in times.items()}


# ---------------------------------------------------------------------------- quality


def _is_scores(array: Array) -> bool:
    """A classifier's scores: float ``(N, C)`` with C > 1."""
    return array.dtype.kind == "f" and array.ndim == 2 and array.shape[1] > 1


def _is_labels(array: Array) -> bool:
    """A classifier's decided labels: integers ``(N,)``."""
    return array.dtype.kind in "iu" and array.ndim == 1


def decisions(array: Array) -> Array | None:
    """The top-1 decision per sample of an output, or None when it has no such meaning."""
    if _is_scores(array):
        return np.asarray(np.argmax(array, axis=1))
    if _is_labels(array):
        return array
    return None


def compare(
    reference: Mapping[str, Array], got: Mapping[str, Array], labels: Array | None
) -> dict[str, Any]:
    """Per-output quality of ``got`` against ``reference`` (same inputs, same order).

    Float outputs: ``cosine`` (mean over samples of the per-sample cosine similarity)
    and ``max_abs_diff``. Outputs with a top-1 meaning (scores ``(N, C)`` or labels
    ``(N,)``): ``top1_agreement``, and with labels ``accuracy`` and ``accuracy_reference``.
    """
    result: dict[str, Any] = {}
    known = None if labels is None else labels >= 0
    for name, ref in reference.items():
        out = got[name]
        entry: dict[str, Any] = {}
        if ref.shape != out.shape:
            raise BuildError(
                f"output {name!r}: shape expected {list(ref.shape)}, got {list(out.shape)}"
            )
        if ref.dtype.kind == "f":
            a = ref.astype(np.float64).reshape(len(ref), -1) if ref.ndim else ref.reshape(1, 1)
            b = out.astype(np.float64).reshape(a.shape)
            entry["cosine"] = round(_mean_cosine(a, b), 6)
            entry["max_abs_diff"] = float(np.max(np.abs(a - b))) if a.size else 0.0
        ref_top, got_top = decisions(ref), decisions(out)
        if ref_top is not None and got_top is not None and ref_top.size:
            entry["top1_agreement"] = round(float(np.mean(ref_top == got_top)), 6)
            if labels is not None and known is not None and known.any():
                entry["accuracy"] = round(float(np.mean(got_top[known] == labels[known])), 6)
                entry["accuracy_reference"] = round(
                    float(np.mean(ref_top[known] == labels[known])), 6
                )
        result[name] = entry
    return result


def _mean_cosine(a: Array, b: Array) -> float:
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.sum(a * b, axis=1)
    both_zero = (norms == 0) & (np.abs(a - b).max(axis=1, initial=0.0) == 0)
    cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.where(both_zero, 1, 0))
    return float(np.mean(cos)) if cos.size else 1.0


def summary(outputs: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    """The worst value of each metric over the outputs (None when no output has it)."""

    def worst(key: str, pick: Callable[[Sequence[float]], float]) -> float | None:
        values = [float(e[key]) for e in outputs.values() if key in e]
        return pick(values) if values else None

    drops = [
        float(e["accuracy_reference"]) - float(e["accuracy"])
        for e in outputs.values()
        if "accuracy" in e
    ]
    return {
        "top1_agreement": worst("top1_agreement", min),
        "cosine": worst("cosine", min),
        "max_abs_diff": worst("max_abs_diff", max),
        "accuracy": worst("accuracy", min),
        "accuracy_drop": round(max(drops), 6) if drops else None,
    }


# ---------------------------------------------------------------------------- the gate


@dataclass(frozen=True)
class Gate:
    """Limits a candidate must meet against the original model (None = no limit).

    ``min_agreement``: top-1 agreement; ``min_cosine``: cosine similarity;
    ``max_abs``: max abs difference; ``max_accuracy_drop``: accuracy lost (needs labels).
    """

    min_agreement: float | None = DEFAULT_MIN_AGREEMENT
    min_cosine: float | None = DEFAULT_MIN_COSINE
    max_abs: float | None = None
    max_accuracy_drop: float | None = None
    source: str = "default"

    def check(self, worst: Mapping[str, float | None]) -> list[str]:
        """The limits ``worst`` (see ``summary``) breaks, as readable reasons; [] = pass."""
        failures: list[str] = []
        checks: list[tuple[str, float | None, float | None, bool]] = [
            ("top-1 agreement", self.min_agreement, worst.get("top1_agreement"), True),
            ("cosine", self.min_cosine, worst.get("cosine"), True),
            ("max abs diff", self.max_abs, worst.get("max_abs_diff"), False),
            ("accuracy drop", self.max_accuracy_drop, worst.get("accuracy_drop"), False),
        ]
        for label, limit, value, is_minimum in checks:
            if limit is None:
                continue
            if value is None:
                if label != "top-1 agreement" or self.source != "default":
                    failures.append(f"{label}: not measurable on this model/data")
                continue
            if (value < limit) if is_minimum else (value > limit):
                sign = ">=" if is_minimum else "<="
                failures.append(f"{label} {value:.4g} (needs {sign} {limit:g})")
        return failures

    def to_json(self) -> dict[str, Any]:
        return {
            "min_top1_agreement": self.min_agreement,
            "min_cosine": self.min_cosine,
            "max_abs_diff": self.max_abs,
            "max_accuracy_drop": self.max_accuracy_drop,
            "source": self.source,
        }


_GATE_KEYS: Final = {
    "agreement": "min_agreement",
    "cosine": "min_cosine",
    "abs": "max_abs",
    "accuracy": "max_accuracy_drop",
}


def parse_gate(text: str) -> Gate:
    """Parse ``--max-drift``: a number (the share of top-1 decisions allowed to change,
    e.g. ``0.01``) or ``KEY=VALUE`` pairs separated by commas, keys ``agreement`` (min
    top-1 agreement), ``cosine`` (min), ``abs`` (max abs diff), ``accuracy`` (max drop).

    Limits not given are off, except that a bare number keeps the default cosine limit.
    Raises UsageError naming the bad part.
    """
    text = text.strip()
    try:
        share = float(text)
    except ValueError:
        share = None
    if share is not None:
        if not 0.0 <= share <= 1.0:
            raise UsageError(f"--max-drift {text}: expected a share in [0, 1], e.g. 0.01")
        return Gate(min_agreement=round(1.0 - share, 9), source=f"--max-drift {text}")
    values: dict[str, float] = {}
    for part in text.split(","):
        key, sep, raw = part.partition("=")
        key = key.strip()
        if not sep or key not in _GATE_KEYS:
            raise UsageError(
                f"--max-drift: bad part {part.strip()!r}; expected a number such as 0.01 or "
                f"KEY=VALUE with KEY one of {', '.join(_GATE_KEYS)}"
            )
        try:
            value = float(raw)
        except ValueError:
            raise UsageError(f"--max-drift: {key} expected a number, got {raw!r}") from None
        if value < 0 or (key in ("agreement", "cosine") and value > 1):
            raise UsageError(f"--max-drift: {key}={raw} is out of range")
        values[_GATE_KEYS[key]] = value
    limits: dict[str, Any] = {f: None for f in _GATE_KEYS.values()}
    limits.update(values)
    return Gate(**limits, source=f"--max-drift {text}")


# ---------------------------------------------------------------------------- candidates


@dataclass
class Candidate:
    """One recipe's result: the model bytes and everything measured about it."""

    recipe: str
    model: bytes | None = None
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    latency_ms: float | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    worst: dict[str, float | None] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    verdict: str = ""
    # The model as the bundle stores it (its zstd frame, schema /2), set by the builder.
    stored: bytes | None = None

    @property
    def size(self) -> int | None:
        return None if self.model is None else len(self.model)

    @property
    def shipped(self) -> int | None:
        """The model's bytes as a device downloads them: its stored (compressed) size,
        or its size when it is stored as is."""
        if self.model is None:
            return None
        return len(self.stored) if self.stored is not None else len(self.model)

    def record(self, original_size: int, original_latency_ms: float) -> dict[str, Any]:
        """The candidate's row in the manifest (JSON, ASCII keys)."""
        row: dict[str, Any] = {"recipe": self.recipe, "verdict": self.verdict}
        if self.error is not None:
            row["error"] = self.error
            return row
        assert self.size is not None
        row["size_bytes"] = self.size
        row["size_ratio"] = round(self.size / original_size, 4)
        row["shipped_bytes"] = self.shipped
        if self.latency_ms is not None:
            row["latency_ms"] = round(self.latency_ms, 4)
            row["latency_ratio"] = round(self.latency_ms / original_latency_ms, 4)
        row.update({k: v for k, v in self.worst.items() if v is not None})
        if self.failures:
            row["gate_failures"] = list(self.failures)
        return row


def choose(
    candidates: Sequence[Candidate], original_latency_ms: float, max_latency_ratio: float
) -> tuple[Candidate | None, str]:
    """The candidate with the fewest shipped bytes (what a device downloads: the model
    compressed, in a compressed bundle) that passed the gate and is fast enough, and why.

    Sets each candidate's ``verdict``. Ties in size go to the faster candidate.
    """
    ok: list[Candidate] = []
    for c in candidates:
        if c.error is not None:
            c.verdict = "skipped: " + c.error
        elif c.failures:
            c.verdict = "fails gate: " + "; ".join(c.failures)
        elif c.latency_ms is not None and c.latency_ms > max_latency_ratio * original_latency_ms:
            ratio = c.latency_ms / original_latency_ms
            c.verdict = f"too slow: {ratio:.2f}x the original (limit {max_latency_ratio:g}x)"
        else:
            c.verdict = "passes"
            ok.append(c)
    if not ok:
        return None, "no candidate passed the gate within the latency limit"
    best = min(ok, key=lambda c: (c.shipped or 0, c.latency_ms or 0.0))
    best.verdict = "chosen"
    others = [c.recipe for c in ok if c is not best]
    if math.isfinite(max_latency_ratio):
        why = (
            f"{best.recipe}: smallest candidate that passes the gate within {max_latency_ratio:g}x"
        )
        why += " the original's latency"
    else:  # the builder passes inf when latency was not measured (--latency-runs 0)
        why = f"{best.recipe}: smallest candidate that passes the gate (latency not measured)"
    why += f" (also passing: {', '.join(others)})" if others else ""
    if best.stored is not None:
        why += f"; ranked by shipped (compressed) bytes, {best.shipped:,}"
    return best, why


def format_table(
    candidates: Sequence[Candidate], original_size: int, original_latency_ms: float
) -> str:
    """The candidate table as fixed-width text, one row per candidate."""
    head = (
        "recipe", "size", "shipped", "ratio", "latency", "ratio", "top-1", "cosine", "max abs",
        "acc",
    )  # fmt: skip
    rows = [head]
    rows.append(
        ("original", _kb(original_size), "-", "1.00")
        + ((f"{original_latency_ms:.3f}ms", "1.00") if original_latency_ms else ("-", "-"))
        + ("-",) * 4
    )
    for c in candidates:
        if c.error is not None or c.size is None:
            rows.append((c.recipe, *("-",) * 9))
            continue
        w = c.worst
        lat = c.latency_ms
        rows.append(
            (
                c.recipe,
                _kb(c.size),
                _kb(c.shipped or 0),
                f"{c.size / original_size:.2f}",
                "-" if lat is None else f"{lat:.3f}ms",
                "-"
                if lat is None or not original_latency_ms
                else f"{lat / original_latency_ms:.2f}",
                _fmt(w.get("top1_agreement"), "{:.2%}"),
                _fmt(w.get("cosine"), "{:.5f}"),
                _fmt(w.get("max_abs_diff"), "{:.3g}"),
                _fmt(w.get("accuracy"), "{:.2%}"),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    verdicts = [f"  {c.recipe}: {c.verdict}" for c in candidates if c.verdict]
    if not original_latency_ms:
        verdicts.append("  latency: not measured (--latency-runs 0)")
    return "\n".join(lines + verdicts)


def _kb(size: int) -> str:
    return f"{size / 1024:.1f}KiB"


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)
