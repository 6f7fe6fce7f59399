"""The drift reference of a build: the built model's outputs, and its inputs, on the eval data.

``measure_reference`` runs the built model on the ``--eval`` feeds and summarises what it
answered and what it was given, binned as the device bins what it serves
(``agent.contracts.reference``): a top-1 class histogram for classifier-like outputs,
deciles and their shares for any other numeric output and for each numeric input. A
build without eval data records no reference (generated inputs say nothing of what
devices will see): devices then report drift as unavailable.

Pure but for the session it is given; deterministic for the same model and data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np

from agent.contracts.reference import (
    KIND_CLASSES,
    KIND_QUANTILES,
    MAX_TENSORS,
    QUANTILES,
    Histogram,
    Reference,
    class_counts,
    is_classifier,
    row_values,
    value_counts,
)
from controller.build import evaluate

# Below this many eval rows the reference itself is noisy: the expected PSI of no drift
# is about (bins - 1) / rows from the reference alone (0.09 for 10 bins and 100 rows).
FEW_SAMPLES: Final = 200


def _shares(counts: np.ndarray) -> tuple[float, ...]:
    total = float(counts.sum())
    return tuple(float(c) / total for c in counts)


def quantile_histogram(array: np.ndarray, *, with_moments: bool) -> Histogram | None:
    """Deciles of ``array``'s binned values (``row_values``) and their shares; None when
    the values are not numeric or take a single value (nothing to bin)."""
    if array.dtype.kind not in "fiu" or array.size == 0 or array.shape[0] == 0:
        return None
    values = row_values(array).ravel()
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    if finite.size == 0:
        return None
    # Values the data holds (inverted CDF): an edge is exact in the tensor's own dtype.
    edges = np.unique(np.quantile(finite, QUANTILES, method="inverted_cdf"))
    # The lowest edge is the smallest value when ties fill the first decile: a bin below
    # it would stay empty; cut at the edges above it only.
    edges = edges[edges > finite.min()]
    if edges.size == 0:
        return None
    edges = edges.astype(values.dtype)
    counts = value_counts(array, edges)
    mean = float(finite.astype(np.float64).mean()) if with_moments else None
    std = float(finite.astype(np.float64).std()) if with_moments else None
    return Histogram(KIND_QUANTILES, _shares(counts), tuple(float(e) for e in edges), mean, std)


def output_histogram(array: np.ndarray) -> Histogram | None:
    """The reference of one output (module docstring); None for one it cannot bin."""
    if is_classifier(array):
        return Histogram(KIND_CLASSES, _shares(class_counts(array, array.shape[1])))
    return quantile_histogram(array, with_moments=False)


def measure_reference(
    session: Any, feeds: Sequence[Mapping[str, np.ndarray]], inputs: Mapping[str, np.ndarray]
) -> Reference | None:
    """The reference of the model ``session`` runs on the eval ``feeds`` (``inputs``: the
    same samples whole); None when no output can be binned."""
    outputs = evaluate.run(session, feeds)
    out = {
        name: h
        for name, array in sorted(outputs.items())[:MAX_TENSORS]
        if (h := output_histogram(np.asarray(array))) is not None
    }
    if not out:
        return None
    ins = {
        name: h
        for name, array in sorted(inputs.items())[:MAX_TENSORS]
        if (h := quantile_histogram(np.asarray(array), with_moments=True)) is not None
    }
    rows = len(next(iter(inputs.values())))
    return Reference(rows, out, ins)


def describe(reference: Reference | None) -> str:
    """One line for the build's output: what the reference holds, or why there is none."""
    if reference is None:
        return "drift reference: none (no --eval data): devices report drift as unavailable"
    outs = ", ".join(
        f"{n} ({'top-1 of ' + str(h.bins) + ' classes' if h.kind == KIND_CLASSES else str(h.bins) + ' quantile bins'})"
        for n, h in sorted(reference.outputs.items())
    )
    text = f"drift reference: {outs}; {len(reference.inputs)} input(s) on {reference.samples} eval samples"
    if reference.samples < FEW_SAMPLES:
        text += (
            f" (few: the reference alone adds about (bins-1)/{reference.samples} to a device's PSI)"
        )
    return text
