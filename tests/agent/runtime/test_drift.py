"""The device's drift sketch: bounded, sliding, and scored against the reference by PSI.
Thresholds come from the statistics: n samples of the reference's own distribution over
B bins give a PSI of about (B - 1) / n."""

from __future__ import annotations

import numpy as np
import pytest

from agent.contracts.reference import Histogram, Reference, psi
from agent.runtime.drift import MIN_SAMPLES, DriftSketch, sketch_for

CLASSES = 10
UNIFORM = (0.1,) * CLASSES
EDGES = tuple(float(e) for e in np.quantile(np.arange(1000) / 1000, np.arange(1, 10) / 10))


def reference() -> Reference:
    return Reference(
        10_000,
        {"p": Histogram("classes", UNIFORM)},
        {"x": Histogram("quantiles", UNIFORM, EDGES, 0.5, 0.29)},
    )


def scores(rng: np.random.Generator, rows: int, classes: np.ndarray | None = None) -> np.ndarray:
    """``rows`` one-hot-ish score rows whose top-1 class is uniform (or ``classes``)."""
    top = rng.integers(0, CLASSES, rows) if classes is None else classes
    out = rng.random((rows, CLASSES), dtype=np.float32) * 0.5
    out[np.arange(rows), top] = 1.0
    return out


def feed(sketch: DriftSketch, rng: np.random.Generator, n: int, shifted: bool = False) -> None:
    for _ in range(n):
        x = rng.random((1, 16), dtype=np.float32)
        classes = np.array([rng.integers(0, 3)]) if shifted else None
        if shifted:
            x = x * 0.2  # inputs crowd the lowest bins
        sketch.observe({"x": x}, {"p": scores(rng, 1, classes)})


def test_no_score_below_the_minimum_of_samples_and_none_without_a_reference() -> None:
    assert sketch_for(None) is None
    sketch = DriftSketch(reference())
    feed(sketch, np.random.default_rng(0), MIN_SAMPLES - 1)
    figures = sketch.figures()
    assert (figures.psi, figures.input_psi, figures.samples) == (None, None, MIN_SAMPLES - 1)


def test_drift_stays_low_on_the_reference_distribution_and_rises_on_a_shift() -> None:
    rng = np.random.default_rng(1)
    sketch = DriftSketch(reference(), {"p": "float32"}, {"x": "float32"}, half_window=1024)
    feed(sketch, rng, 2000)
    same = sketch.figures()
    # Expected about 9 / 2000 = 0.0045; five times that is far in the tail of chi2(9)/n.
    assert same.samples == 2000 and same.psi is not None and same.psi < 5 * 9 / same.samples
    assert same.input_psi is not None and same.input_psi < 5 * 9 / same.samples
    feed(sketch, rng, 2048, shifted=True)
    moved = sketch.figures()
    assert moved.psi is not None and moved.psi > 0.25  # significant
    assert moved.input_psi is not None and moved.input_psi > 0.25


def test_the_window_slides_so_drift_falls_again() -> None:
    rng = np.random.default_rng(2)
    sketch = DriftSketch(reference(), half_window=500)
    feed(sketch, rng, 1000, shifted=True)
    assert (sketch.figures().psi or 0) > 0.25
    feed(sketch, rng, 1001)  # two halves of the reference's distribution
    after = sketch.figures()
    assert after.samples <= 1000 and after.psi is not None and after.psi < 5 * 9 / after.samples


def test_batches_count_each_row_and_unrequested_outputs_have_no_score() -> None:
    rng = np.random.default_rng(3)
    sketch = DriftSketch(reference())
    sketch.observe({"x": rng.random((200, 16), dtype=np.float32)}, {"p": scores(rng, 200)})
    assert sketch.figures().samples == 200
    only_inputs = DriftSketch(reference())
    only_inputs.observe({"x": rng.random((200, 16), dtype=np.float32)}, {})
    assert only_inputs.figures().samples == 0  # no output counted: no sample
    # An output of another shape than the reference's is not counted (not a 0).
    other = DriftSketch(reference())
    other.observe({}, {"p": rng.random((200, 3), dtype=np.float32)})
    assert other.figures().samples == 0


def test_the_score_is_the_psi_of_the_counts() -> None:
    rng = np.random.default_rng(4)
    sketch = DriftSketch(reference())
    top = np.repeat(np.arange(CLASSES), [30, 10, 10, 10, 10, 10, 10, 10, 10, 10])
    sketch.observe({}, {"p": scores(rng, len(top), top)})
    counts = np.bincount(top, minlength=CLASSES).tolist()
    assert sketch.figures().psi == pytest.approx(psi(counts, UNIFORM), abs=1e-6)
    assert sketch.figures().input_psi is None  # no input seen
