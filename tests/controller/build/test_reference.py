"""The drift reference a build records: from the eval data only, signed with the manifest,
and carried through both bundle formats and deltas unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.contracts.bundle_container import read_container
from agent.contracts.delta import apply_delta
from agent.contracts.reference import class_counts, psi, value_counts
from controller.build.builder import BuildOptions, build_bundle
from controller.build.bundle_file import read_bundle
from controller.build.delta import make_delta
from controller.build.evaluate import session
from tests.helpers import make_linear_model


def eval_file(tmp_path: Path, rows: int = 300) -> Path:
    x = np.random.default_rng(3).standard_normal((rows, 4)).astype(np.float32)
    path = tmp_path / "eval.npz"
    np.savez(path, x=x)
    return path


@pytest.mark.parametrize("bundle_format", [1, 2])
def test_build_with_eval_data_records_the_built_models_reference(
    tmp_path: Path, bundle_format: int
) -> None:
    model = make_linear_model(tmp_path / "lin.onnx", seed=1)
    data = eval_file(tmp_path)
    out = tmp_path / "b.bundle"
    options = BuildOptions(eval_data=data, latency_runs=0, bundle_format=bundle_format)
    build_bundle(model, "lin", "1.0.0", out, options=options)
    ref = read_bundle(out).manifest.reference  # verified against the bundle's hashes
    assert ref is not None and ref.samples == 300
    (name,) = ref.outputs
    hist = ref.outputs[name]
    assert hist.kind == "classes" and hist.bins == 3  # [N, 3] floats: class scores
    # The shares are the built model's top-1 on the eval data, as the device bins them.
    x = np.load(data)["x"]
    (y,) = session(model.read_bytes()).run(None, {"x": x})
    counts = class_counts(y, 3)
    assert hist.proportions == pytest.approx((counts / counts.sum()).tolist())
    assert psi(counts.tolist(), hist.proportions) == pytest.approx(0.0, abs=1e-12)
    # Inputs: deciles of the values (9 edges for continuous data) and their shares.
    inp = ref.inputs["x"]
    assert inp.kind == "quantiles" and len(inp.edges) == 9
    live = value_counts(x, np.asarray(inp.edges, np.float32))
    assert psi(live.tolist(), inp.proportions) == pytest.approx(0.0, abs=1e-12)
    assert inp.mean == pytest.approx(float(x.mean()), abs=1e-6)


def test_build_without_eval_data_records_no_reference(tmp_path: Path) -> None:
    model = make_linear_model(tmp_path / "lin.onnx", seed=1)
    out = tmp_path / "b.bundle"
    build_bundle(model, "lin", "1.0.0", out, options=BuildOptions(latency_runs=0))
    assert read_bundle(out).manifest.reference is None
    assert "reference" not in json.loads(read_container(out.read_bytes())[1][0][1])


@pytest.mark.parametrize("bundle_format", [1, 2])
def test_a_delta_between_bundles_with_references_rebuilds_exactly(
    tmp_path: Path, bundle_format: int
) -> None:
    data = eval_file(tmp_path)
    bundles = []
    for version, seed in (("1.0.0", 1), ("2.0.0", 2)):
        model = make_linear_model(tmp_path / f"{seed}.onnx", seed=seed)
        out = tmp_path / f"{version}.bundle"
        options = BuildOptions(eval_data=data, latency_runs=0, bundle_format=bundle_format)
        build_bundle(model, "lin", version, out, options=options)
        bundles.append(out.read_bytes())
    old, new = bundles
    base = dict(read_container(old)[1])
    rebuilt = apply_delta(
        make_delta(old, new), lambda n: base[n], model="lin", old="1.0.0", new="2.0.0",
        max_output_bytes=1 << 30,
    )  # fmt: skip
    assert rebuilt == new
