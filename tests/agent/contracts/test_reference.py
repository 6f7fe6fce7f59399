"""The drift reference contract: parsing, binning and the population stability index."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from agent.base.errors import BundleError
from agent.contracts import GoldenSpec, Manifest, TensorSpec, parse_manifest
from agent.contracts.reference import (
    MAX_VALUES_PER_ROW,
    PSI_EPSILON,
    Histogram,
    Reference,
    class_counts,
    is_classifier,
    parse_reference,
    psi,
    row_values,
    value_counts,
)


def reference() -> Reference:
    return Reference(
        100,
        {"p": Histogram("classes", (0.5, 0.25, 0.25))},
        {"x": Histogram("quantiles", (0.25, 0.5, 0.25), (0.0, 1.0), 0.5, 0.3)},
    )


def test_reference_round_trips_through_the_manifest() -> None:
    manifest = Manifest(
        name="m",
        version="1.0.0",
        inputs=(TensorSpec("x", "FP32", (-1, 4)),),
        outputs=(TensorSpec("p", "FP32", (-1, 3)),),
        opset=17,
        min_ort_version="1.12.0",
        golden=GoldenSpec(1, 0.0, 0.0),
        members={
            "model.onnx": {"size": 1, "sha256": "0" * 64},
            "golden.npz": {"size": 1, "sha256": "1" * 64},
        },
        schema="edgefleet.manifest/1",
        reference=reference(),
    )
    back = parse_manifest(manifest.to_json_bytes())
    assert back.reference == reference()
    # Without a reference the key is absent: the manifest is what it was before it.
    plain = Manifest(**{**manifest.__dict__, "reference": None})
    assert "reference" not in json.loads(plain.to_json_bytes())
    assert parse_manifest(plain.to_json_bytes()).reference is None


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"schema": "edgefleet.reference/9"}, "schema expected"),
        ({"samples": 0}, "samples expected"),
        ({"outputs": []}, "outputs expected an object"),
        ({"outputs": {"p": {"kind": "bins", "proportions": [0.5, 0.5]}}}, "kind expected"),
        ({"outputs": {"p": {"kind": "classes", "proportions": [0.5, 0.6]}}}, "sum to 1"),
        ({"outputs": {"p": {"kind": "classes", "proportions": [1.0]}}}, "list of 2 to"),
        (
            {"outputs": {"p": {"kind": "quantiles", "proportions": [0.5, 0.5], "edges": []}}},
            "edges expected",
        ),
        (
            {
                "outputs": {
                    "p": {"kind": "quantiles", "proportions": [0.3, 0.3, 0.4], "edges": [2, 1]}
                }
            },
            "increase",
        ),
        (
            {"inputs": {"x": {"kind": "classes", "proportions": [0.5, 0.5]}}},
            "kind expected 'quantiles'",
        ),
        (
            {"inputs": {"x": {"kind": "quantiles", "proportions": [0.5, 0.5], "edges": [1e999]}}},
            "finite",
        ),
    ],
)
def test_a_malformed_reference_is_refused_naming_the_field(change: dict, match: str) -> None:
    doc = {**reference().to_json(), **change}
    with pytest.raises(BundleError, match=match):
        parse_reference(doc)


def test_psi_is_zero_for_the_reference_itself_and_grows_with_the_shift() -> None:
    q = (0.1,) * 10
    assert psi([10] * 10, q) == 0.0
    assert psi([], []) == 0.0
    mild = psi([12, 8] * 5, q)
    strong = psi([50, 0, 50, 0, 0, 0, 0, 0, 0, 0], q)
    assert 0 < mild < 0.1 < 0.25 < strong
    # An empty bin counts as PSI_EPSILON: finite, and by the formula.
    expected = 2 * (0.5 - 0.1) * math.log(5) + 8 * (PSI_EPSILON - 0.1) * math.log(PSI_EPSILON / 0.1)
    assert strong == pytest.approx(expected)


def test_psi_of_a_same_distribution_sample_is_about_bins_minus_one_over_n() -> None:
    # n * PSI is about chi-square with B - 1 degrees of freedom: mean (B - 1) / n.
    rng = np.random.default_rng(1)
    q = np.full(10, 0.1)
    for n in (500, 2000):
        scores = [psi(rng.multinomial(n, q).tolist(), q.tolist()) for _ in range(300)]
        assert np.mean(scores) == pytest.approx(9 / n, rel=0.2)


def test_binning() -> None:
    scores = np.array([[0.1, 0.7, 0.2], [0.8, 0.1, 0.1], [0.1, 0.1, 0.8]], np.float32)
    assert (
        is_classifier(scores) and not is_classifier(scores[:, :1]) and not is_classifier(scores[0])
    )
    assert class_counts(scores, 3).tolist() == [1, 1, 1]
    edges = np.array([1.0, 2.0], np.float32)
    # Bin i holds edges[i-1] <= v < edges[i]; NaN counts in the last.
    values = np.array([[0.5, 1.0, 1.5, 2.0, np.nan]], np.float32)
    assert value_counts(values, edges).tolist() == [1, 2, 2]
    wide = np.arange(2 * 1000, dtype=np.float32).reshape(2, 1000)
    taken = row_values(wide)
    assert taken.shape == (2, 250) and taken.shape[1] <= MAX_VALUES_PER_ROW
    assert taken[0, 1] == 4.0  # a fixed stride, the same at build time and on the device
