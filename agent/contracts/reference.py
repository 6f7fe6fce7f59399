"""The drift reference a bundle carries, and how live values are binned and scored against it.

``edgectl bundle build --eval DATA`` runs the built model on the eval data and records,
in the manifest's optional ``reference`` key (covered by the bundle's signed hash like
the rest of the manifest; absent without eval data), a compact picture of what the model
saw and answered there (docs/bundle-format.md):

- per output: for classifier-like outputs (floating point, ``[N, C]`` with ``C > 1``) a
  histogram of the top-1 class (``kind: "classes"``, ``C`` bins); for any other numeric
  output the deciles of its values (``kind: "quantiles"``: the ≤ 9 distinct interior
  edges, so ≤ 10 bins) and the share of values in each bin;
- per numeric input: the same deciles and shares of its values, and their mean and std.

Values are taken per batch row and, for a row of more than ``MAX_VALUES_PER_ROW``
values, every k-th value from a fixed stride (``row_values``), the same way at build time
and on the device, so both sides bin the same positions.

The device bins what it serves with the same functions (``class_counts``,
``value_counts``) and scores the live shares against the reference with the population
stability index (``psi``): ``PSI = Σ (p_i − q_i) · ln(p_i / q_i)`` over bins, ``p`` the
live shares and ``q`` the reference's, each share floored at ``PSI_EPSILON`` so an
empty bin is finite. The usual reading: below 0.1 stable, 0.1–0.25 moderate, above
0.25 significant. For ``n`` live samples drawn from the reference's own distribution
over ``B`` bins, ``n · PSI`` is about χ² with ``B − 1`` degrees of freedom, so the
expected PSI of no drift at all is about ``(B − 1) / n`` (plus ``(B − 1) / m`` for a
reference measured on ``m`` samples).

Pure: the parser and ``psi`` use no numpy; the binning functions import it when called
(only a device serving a model, which has numpy already, calls them).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from agent.base.errors import BundleError

if TYPE_CHECKING:
    import numpy as np

REFERENCE_SCHEMA: Final = "edgefleet.reference/1"
KIND_CLASSES: Final = "classes"
KIND_QUANTILES: Final = "quantiles"
# Deciles: 9 interior edges, 10 bins (fewer when values repeat).
QUANTILES: Final = tuple(i / 10 for i in range(1, 10))
# A class histogram of more classes than this is not recorded (the manifest stays small).
MAX_CLASSES: Final = 4096
# Values of one batch row binned at most: a longer row is strided (``row_values``).
MAX_VALUES_PER_ROW: Final = 256
# Tensors with a reference at most (inputs and outputs each).
MAX_TENSORS: Final = 64
# The floor of a share in ``psi``: an empty bin counts as this share.
PSI_EPSILON: Final = 1e-4


@dataclass(frozen=True)
class Histogram:
    """One tensor's reference: its kind, the bin edges (quantiles; empty for classes),
    the share of reference values in each bin, and for inputs their mean and std."""

    kind: str
    proportions: tuple[float, ...]
    edges: tuple[float, ...] = ()
    mean: float | None = None
    std: float | None = None

    @property
    def bins(self) -> int:
        return len(self.proportions)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"kind": self.kind, "proportions": list(self.proportions)}
        if self.kind == KIND_QUANTILES:
            doc["edges"] = list(self.edges)
        if self.mean is not None:
            doc["mean"] = self.mean
            doc["std"] = self.std
        return doc


@dataclass(frozen=True)
class Reference:
    """A bundle's drift reference: ``samples`` eval rows, per output and per input."""

    samples: int
    outputs: Mapping[str, Histogram]
    inputs: Mapping[str, Histogram]

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": REFERENCE_SCHEMA,
            "samples": self.samples,
            "outputs": {k: h.to_json() for k, h in sorted(self.outputs.items())},
            "inputs": {k: h.to_json() for k, h in sorted(self.inputs.items())},
        }


def _number(value: Any, where: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        raise BundleError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _histogram(doc: Any, where: str) -> Histogram:
    if not isinstance(doc, dict):
        raise BundleError(f"{where}: expected an object, got {type(doc).__name__}")
    kind = doc.get("kind")
    if kind not in (KIND_CLASSES, KIND_QUANTILES):
        raise BundleError(f"{where}: kind expected 'classes' or 'quantiles', got {kind!r}")
    shares = doc.get("proportions")
    if not isinstance(shares, list) or not 2 <= len(shares) <= MAX_CLASSES:
        raise BundleError(f"{where}: proportions expected a list of 2 to {MAX_CLASSES} shares")
    proportions = tuple(_number(p, f"{where}: proportions") for p in shares)
    if any(p < 0 for p in proportions) or abs(sum(proportions) - 1.0) > 1e-6:
        raise BundleError(f"{where}: proportions must be shares >= 0 that sum to 1")
    edges: tuple[float, ...] = ()
    if kind == KIND_QUANTILES:
        raw = doc.get("edges")
        if not isinstance(raw, list) or len(raw) != len(proportions) - 1:
            raise BundleError(
                f"{where}: edges expected a list of {len(proportions) - 1} numbers "
                "(one fewer than the proportions)"
            )
        edges = tuple(_number(e, f"{where}: edges") for e in raw)
        if any(b <= a for a, b in itertools.pairwise(edges)):
            raise BundleError(f"{where}: edges must increase strictly")
    mean = std = None
    if "mean" in doc:
        mean = _number(doc["mean"], f"{where}: mean")
        std = _number(doc.get("std"), f"{where}: std")
    return Histogram(kind, proportions, edges, mean, std)


def parse_reference(doc: Any, where: str = "manifest.json reference") -> Reference:
    """The manifest's ``reference``; BundleError naming what is wrong."""
    if not isinstance(doc, dict):
        raise BundleError(f"{where}: expected an object, got {type(doc).__name__}")
    if doc.get("schema") != REFERENCE_SCHEMA:
        raise BundleError(
            f"{where}: schema expected {REFERENCE_SCHEMA!r}, got {doc.get('schema')!r}"
        )
    samples = doc.get("samples")
    if type(samples) is not int or samples < 1:
        raise BundleError(f"{where}: samples expected an integer >= 1, got {samples!r}")
    parts: dict[str, dict[str, Histogram]] = {}
    for side in ("outputs", "inputs"):
        found = doc.get(side)
        if not isinstance(found, dict) or len(found) > MAX_TENSORS:
            raise BundleError(f"{where}: {side} expected an object of at most {MAX_TENSORS}")
        parts[side] = {
            str(name): _histogram(h, f"{where} {side}[{name!r}]") for name, h in found.items()
        }
    for name, h in parts["inputs"].items():
        if h.kind != KIND_QUANTILES:
            raise BundleError(f"{where} inputs[{name!r}]: kind expected 'quantiles'")
    return Reference(samples, parts["outputs"], parts["inputs"])


# ---------------------------------------------------------------------------- binning


def is_classifier(array: np.ndarray) -> bool:
    """Whether an output looks like class scores: floating point ``[N, C]``, ``C > 1``."""
    return array.ndim == 2 and 1 < array.shape[1] <= MAX_CLASSES and array.dtype.kind == "f"


def row_values(array: np.ndarray) -> np.ndarray:
    """The values of ``array`` (batch along the first axis) that are binned: every value
    of each row, or every k-th for a row longer than ``MAX_VALUES_PER_ROW`` (k the
    smallest stride that keeps at most that many)."""
    rows = array.reshape(array.shape[0], -1) if array.ndim > 1 else array.reshape(-1, 1)
    width = rows.shape[1]
    if width > MAX_VALUES_PER_ROW:
        rows = rows[:, :: -(-width // MAX_VALUES_PER_ROW)]
    return rows


def class_counts(array: np.ndarray, classes: int) -> np.ndarray:
    """Rows of ``array`` ``[N, C]`` counted by their top-1 class (``classes`` bins)."""
    import numpy as np

    return np.bincount(array.argmax(axis=1), minlength=classes)[:classes]


def value_counts(array: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The values of ``array`` (``row_values``) counted in the bins ``edges`` cut:
    bin ``i`` holds ``edges[i-1] <= v < edges[i]`` (NaN counts in the last)."""
    import numpy as np

    bins = np.searchsorted(edges, row_values(array).ravel(), side="right")
    return np.bincount(bins, minlength=len(edges) + 1)


def psi(live: Sequence[float], reference: Sequence[float]) -> float:
    """The population stability index of ``live`` counts (or shares) against the
    ``reference`` shares (module docstring); 0.0 for no live values."""
    total = float(sum(live))
    if total <= 0:
        return 0.0
    score = 0.0
    floor = PSI_EPSILON
    for count, q in zip(live, reference, strict=True):
        p = max(count / total, floor)
        q = max(q, floor)
        score += (p - q) * math.log(p / q)
    return score
