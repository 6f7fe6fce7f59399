"""Drift of one loaded version: a bounded sketch of what it serves, scored against its
bundle's reference (``agent.contracts.reference``).

``DriftSketch`` counts, for each output and input the reference describes, the served
values in the reference's own bins (the top-1 class, or the decile bin of each value):
counts only, O(bins) memory, whatever the traffic. The window slides: counts go into a
*current* half until it holds ``HALF_WINDOW`` samples (batch rows), which then becomes
the *previous* half and a new current one starts; a score reads both halves, so it is
based on the last ``HALF_WINDOW`` to ``2 × HALF_WINDOW`` samples, and drift that stops
falls out within ``2 × HALF_WINDOW`` samples. The score is the population stability
index of the live shares against the reference's (``agent.contracts.reference.psi``),
the largest over outputs (``psi``) and over inputs (``input_psi``); below
``MIN_SAMPLES`` samples there is no score (None), as the expected PSI of no drift is
about (bins − 1) / samples.

Cost: ``observe`` runs on the request's connection once the answer is written (the
server defers it, ``agent.serving.http_messages.after_response``): it copies what
the request's tensors hold (the scores, at most ``MAX_VALUES_PER_ROW`` values a row of
the others) and appends them under a lock; every ``FLUSH_EVERY`` requests (or when a
heartbeat reads the figures) the kept values are binned together, one numpy call per
tensor (bench/drift_sketch.py measures it against the run of a small model;
docs/benchmarks.md). At most ``FLUSH_EVERY`` requests' copies are held. The sketch
lives with the model object: a new version, or a restarted agent, starts empty.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from agent.contracts.reference import (
    KIND_CLASSES,
    Histogram,
    Reference,
    class_counts,
    psi,
    row_values,
    value_counts,
)

if TYPE_CHECKING:
    import numpy as np

HALF_WINDOW: Final = 1024
MIN_SAMPLES: Final = 100
# Requests kept before they are counted in the bins together.
FLUSH_EVERY: Final = 32


@dataclass(frozen=True)
class DriftFigures:
    """A version's drift now: the worst PSI over its outputs and over its inputs (None:
    fewer than ``MIN_SAMPLES`` samples, or no input described), and the samples they are
    based on."""

    psi: float | None
    input_psi: float | None
    samples: int


class _Tensor:
    """The bins of one tensor: the reference's shares and the two halves' counts."""

    __slots__ = ("classes", "current", "edges", "previous", "reference")

    def __init__(self, histogram: Histogram, dtype: Any) -> None:
        import numpy as np

        self.reference = histogram.proportions
        self.classes = histogram.bins if histogram.kind == KIND_CLASSES else 0
        self.edges = None if self.classes else np.asarray(histogram.edges, dtype=dtype)
        self.current = np.zeros(histogram.bins, dtype=np.int64)
        self.previous = np.zeros(histogram.bins, dtype=np.int64)

    def kept(self, array: np.ndarray) -> np.ndarray | None:
        """What a request leaves to count later, copied (a bound run's buffers are used
        again): the scores of a classifier output of the reference's width, or the
        values ``row_values`` takes of another; None for a tensor that does not fit."""
        if self.classes:
            if array.ndim != 2 or array.shape[1] != self.classes or array.dtype.kind != "f":
                return None
            return array.copy()
        if array.ndim == 0 or array.shape[0] == 0 or array.dtype.kind not in "fiu":
            return None
        return row_values(array).ravel()  # ravel of a strided view copies

    def count(self, kept: list[np.ndarray]) -> None:
        import numpy as np

        together = np.concatenate(kept)
        if self.classes:
            self.current += class_counts(together, self.classes)
        else:
            assert self.edges is not None
            self.current += value_counts(together, self.edges)

    def seen(self) -> bool:
        """Whether any value was counted (a tensor never counted has no score, not 0)."""
        return bool(self.current.any() or self.previous.any())

    def score(self) -> float:
        return psi((self.current + self.previous).tolist(), self.reference)


class DriftSketch:
    """The sliding sketch of one version against its ``reference`` (module docstring).
    Thread-safe: ``observe`` from request threads, ``figures`` from telemetry.

    ``observe`` keeps copies of what a request's tensors hold (a few hundred values at
    most) and counts them in the bins every ``FLUSH_EVERY`` requests, in one numpy call
    per tensor (a fraction of a µs a request), or when ``figures`` is read."""

    def __init__(
        self,
        reference: Reference,
        output_types: Mapping[str, str] | None = None,
        input_types: Mapping[str, str] | None = None,
        half_window: int = HALF_WINDOW,
    ) -> None:
        """``*_types``: numpy dtype names of the tensors (the bins' edges are compared in
        the tensor's own dtype; float64 when not given)."""
        outs, ins = output_types or {}, input_types or {}
        self._outputs = [
            (n, _Tensor(h, outs.get(n, "float64"))) for n, h in sorted(reference.outputs.items())
        ]
        self._inputs = [
            (n, _Tensor(h, ins.get(n, "float64"))) for n, h in sorted(reference.inputs.items())
        ]
        self._half = half_window
        self._lock = threading.Lock()
        self._current = 0  # samples in the current half
        self._previous = 0
        # Per request not counted yet: (rows, what each output and input left, or None).
        self._pending: list[tuple[int, list[np.ndarray | None]]] = []

    def observe(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        """Count one answered request: its inputs and the outputs it asked for (an output
        not asked for, or of another shape than the reference's, is not counted; a
        request with no output counted counts nothing)."""
        rows = 0
        kept: list[np.ndarray | None] = []
        for name, tensor in self._outputs:
            array = outputs.get(name)
            left = None if array is None else tensor.kept(array)
            if left is not None:
                rows = max(rows, array.shape[0])  # type: ignore[union-attr]
            kept.append(left)
        if not rows:
            return
        for name, tensor in self._inputs:
            array = inputs.get(name)
            kept.append(None if array is None else tensor.kept(array))
        with self._lock:
            self._pending.append((rows, kept))
            if len(self._pending) >= FLUSH_EVERY:
                self._flush()

    def _flush(self) -> None:
        """Count the pending requests (the lock held)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        tensors = [t for _n, t in (*self._outputs, *self._inputs)]
        if self._current >= self._half:
            for t in tensors:
                t.previous, t.current = t.current, t.previous
                t.current[:] = 0
            self._previous, self._current = self._current, 0
        for i, tensor in enumerate(tensors):
            kept = [left[i] for _rows, left in pending if left[i] is not None]
            if kept:
                tensor.count(kept)  # type: ignore[arg-type]
        self._current += sum(rows for rows, _left in pending)

    def figures(self) -> DriftFigures:
        """The scores now (module docstring)."""
        with self._lock:
            self._flush()
            samples = self._current + self._previous
            if samples < MIN_SAMPLES:
                return DriftFigures(None, None, samples)
            out = max((t.score() for _n, t in self._outputs if t.seen()), default=None)
            ins = max((t.score() for _n, t in self._inputs if t.seen()), default=None)
        return DriftFigures(
            None if out is None else round(out, 6), None if ins is None else round(ins, 6), samples
        )


def sketch_for(
    reference: Reference | None,
    output_types: Mapping[str, str] | None = None,
    input_types: Mapping[str, str] | None = None,
) -> DriftSketch | None:
    """The sketch of a version whose manifest carries ``reference`` (None without one)."""
    if reference is None or not reference.outputs:
        return None
    return DriftSketch(reference, output_types, input_types)
