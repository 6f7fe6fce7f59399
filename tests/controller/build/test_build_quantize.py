"""``bundle build`` options: recipes, auto, the gate, pruning, eval data and their errors.

Models are made here: an sklearn digits MLP through skl2onnx (MatMul, a label output and
a score output), a decision tree (nothing a quantizer can handle) and an onnx.helper model
with a custom-domain operator. Latency uses few runs: tests never assert timings.
"""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from agent.contracts import parse_manifest
from controller.base.errors import BuildError, UsageError
from controller.build.builder import BuildOptions, QualityGateError, build_bundle
from controller.build.evaluate import Gate, parse_gate
from controller.build.prune import prune, shrink, weight_names
from controller.build.quantize import UnsupportedOpsError
from tests.controller.conftest import edgectl_cmd
from tests.helpers import bundle_members, make_linear_model

# Few timed runs, and no latency limit: a 10 µs model's timings are noise.
FAST: dict[str, Any] = {"latency_runs": 3, "max_latency_ratio": 1000.0}


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An MLP on sklearn's digits as ONNX, calibration and eval data with labels."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier
    from sklearn.tree import DecisionTreeClassifier

    root = tmp_path_factory.mktemp("digits")
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    mlp = MLPClassifier(hidden_layer_sizes=(32,), max_iter=200, random_state=0)
    mlp.fit(x[:1200], y[:1200])
    options = {"zipmap": False}
    onnx.save(to_onnx(mlp, x[:1], target_opset=17, options=options), str(root / "mlp.onnx"))
    tree = DecisionTreeClassifier(max_depth=4, random_state=0).fit(x[:1200], y[:1200])
    onnx.save(to_onnx(tree, x[:1], target_opset=17, options=options), str(root / "tree.onnx"))
    np.savez(root / "calib.npz", X=x[:200])
    np.savez(root / "eval.npz", X=x[1200:1500], labels=y[1200:1500])
    np.savez(root / "eval_nolabels.npz", X=x[1200:1300])
    return {
        "mlp": root / "mlp.onnx",
        "tree": root / "tree.onnx",
        "calib": root / "calib.npz",
        "eval": root / "eval.npz",
        "eval_nolabels": root / "eval_nolabels.npz",
    }


def _golden(path: Path) -> tuple[Any, dict[str, np.ndarray], bytes]:
    files = bundle_members(path)
    manifest = parse_manifest(files["manifest.json"])
    with np.load(io.BytesIO(files["golden.npz"])) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return manifest, arrays, files["model.onnx"]


def _check_golden_reproduces(path: Path) -> None:
    manifest, arrays, model = _golden(path)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    for i in range(manifest.golden.cases):
        feed = {t.name: arrays[f"input:{t.name}"][i] for t in manifest.inputs}
        for out, got in zip(manifest.outputs, session.run(None, feed), strict=True):
            want = arrays[f"output:{out.name}"][i]
            np.testing.assert_allclose(
                got, want, rtol=manifest.golden.rtol, atol=manifest.golden.atol
            )


@pytest.mark.parametrize(
    "recipe", ["none", "dynamic", "dynamic-matmul", "static", "static-mixed", "fp16"]
)
def test_each_recipe_builds_a_measured_bundle(
    digits: dict[str, Path], tmp_path: Path, recipe: str
) -> None:
    opts = BuildOptions(
        quantize=recipe,
        eval_data=digits["eval"],
        calibration=digits["calib"] if recipe.startswith("static") else None,
        **FAST,
    )
    result = build_bundle(digits["mlp"], "digits", "1.0.0", tmp_path / "b.bundle", options=opts)
    m = result.manifest
    assert m.build["recipe"] == recipe and m.build["quantization"] == recipe
    assert m.build["golden_source"] == "eval"
    quality = m.quality
    assert quality["eval"]["samples"] == 300 and quality["eval"]["labelled"] == 300
    probs = quality["outputs"]["probabilities"]
    assert probs["top1_agreement"] >= 0.95 and probs["cosine"] > 0.95
    assert probs["accuracy"] >= 0.85 and probs["accuracy_reference"] >= 0.85
    assert quality["outputs"]["label"]["top1_agreement"] >= 0.95
    (row,) = quality["candidates"]
    assert row["recipe"] == recipe and row["size_bytes"] == m.sizes["built_bytes"]
    assert row["latency_ms"] > 0 and quality["latency"]["runs"] == 3
    if recipe in ("none",):
        assert m.sizes["built_bytes"] == m.sizes["original_bytes"]
        assert probs["max_abs_diff"] == 0.0
    if recipe in ("dynamic", "dynamic-matmul", "static", "static-mixed", "fp16"):
        assert m.sizes["built_bytes"] < 0.8 * m.sizes["original_bytes"]
    if recipe.startswith("static"):
        assert m.build["calibration"]["samples"] == 200
        assert len(m.build["calibration"]["sha256"]) == 64
    assert quality["gate"] is None  # an explicit recipe without --max-drift is not gated
    _check_golden_reproduces(result.path)


def test_auto_keeps_the_smallest_passing_candidate(digits: dict[str, Path], tmp_path: Path) -> None:
    opts = BuildOptions(
        quantize="auto", eval_data=digits["eval"], calibration=digits["calib"], **FAST
    )
    result = build_bundle(digits["mlp"], "digits", "1.0.0", tmp_path / "b.bundle", options=opts)
    rows = {r["recipe"]: r for r in result.manifest.quality["candidates"]}
    assert set(rows) == {"dynamic-matmul", "dynamic", "static", "static-mixed", "fp16"}
    passing = [
        r for r in rows.values() if r["verdict"] in ("passes", "chosen") and "size_bytes" in r
    ]
    chosen = result.manifest.build["recipe"]
    assert rows[chosen]["verdict"] == "chosen"
    assert rows[chosen]["size_bytes"] == min(r["size_bytes"] for r in passing)
    assert result.manifest.quality["gate"]["min_top1_agreement"] == 0.99
    assert result.manifest.quality["gate_passed"] is True
    assert "smallest candidate that passes the gate" in result.reason
    for recipe in rows:
        assert recipe in result.table
    _check_golden_reproduces(result.path)


def test_auto_without_calibration_skips_static(digits: dict[str, Path], tmp_path: Path) -> None:
    opts = BuildOptions(quantize="auto", eval_data=digits["eval_nolabels"], latency_runs=0)
    result = build_bundle(digits["mlp"], "digits", "1.0.0", tmp_path / "b.bundle", options=opts)
    rows = {r["recipe"]: r for r in result.manifest.quality["candidates"]}
    assert rows["static"]["verdict"] == "skipped: no --calibration data"
    assert rows["static-mixed"]["verdict"] == "skipped: no --calibration data"
    assert result.manifest.quality["latency"] is None
    assert "accuracy" not in result.manifest.quality["outputs"]["probabilities"]


def test_gate_refuses_a_bad_recipe_and_builds_nothing(
    digits: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "b.bundle"
    strict = parse_gate("abs=1e-7")
    opts = BuildOptions(quantize="dynamic", eval_data=digits["eval"], gate=strict, **FAST)
    with pytest.raises(QualityGateError, match=r"(?s)fails the quality gate.*max abs diff"):
        build_bundle(digits["mlp"], "digits", "1.0.0", out, options=opts)
    assert not out.exists()
    # Pruning away 95 % of the weights breaks the model: auto finds nothing that passes.
    opts = BuildOptions(quantize="auto", eval_data=digits["eval"], prune=0.95, **FAST)
    with pytest.raises(QualityGateError, match="no candidate passed") as info:
        build_bundle(digits["mlp"], "digits", "1.0.0", out, options=opts)
    assert "top-1 agreement" in str(info.value) and "--fallback fp32" in str(info.value)
    assert not out.exists()


def test_the_default_gates_the_model_it_keeps(digits: dict[str, Path], tmp_path: Path) -> None:
    """Without --quantize the smaller model is kept first, then judged by --max-drift: a
    quantized model that fails the gate is not swapped for the original silently."""
    out = tmp_path / "b.bundle"
    strict = BuildOptions(eval_data=digits["eval"], gate=parse_gate("abs=1e-7"), **FAST)
    with pytest.raises(
        QualityGateError,
        match=r"(?s)dynamic-matmul, the smaller kept by the default \(no --quantize given\), "
        r"fails the quality gate.*dynamic-matmul: fails gate: max abs diff.*none: not kept: dynamic-matmul is "
        r"smaller.*--fallback fp32",
    ):
        build_bundle(digits["mlp"], "digits", "1.0.0", out, options=strict)
    assert not out.exists()
    # Pruned, the tiny 4x3 model still grows under int8: the pruned model is kept unquantized.
    tiny = make_linear_model(tmp_path / "tiny.onnx", seed=1)
    opts = BuildOptions(prune=0.5, latency_runs=0)
    m = build_bundle(tiny, "t", "1.0.0", out, options=opts).manifest
    assert m.build["recipe"] == "none" and m.build["pruning"]["sparsity_reached"] >= 0.5
    assert m.build["selection_reason"].startswith(
        "none: the default (no --quantize given) kept the pruned model unquantized"
    )
    assert _golden(out)[2] != tiny.read_bytes()


def test_fallback_keeps_the_original(digits: dict[str, Path], tmp_path: Path) -> None:
    opts = BuildOptions(
        quantize="auto", eval_data=digits["eval"], prune=0.95, fallback="fp32", **FAST
    )
    result = build_bundle(digits["mlp"], "digits", "1.0.0", tmp_path / "b.bundle", options=opts)
    m = result.manifest
    assert m.build["recipe"] == "none" and m.build["fallback"] == "fp32"
    assert "pruning" not in m.build
    assert m.sizes["built_bytes"] == m.sizes["original_bytes"]
    verdicts = {r["recipe"]: r["verdict"] for r in m.quality["candidates"]}
    assert verdicts.pop("static") == "skipped: no --calibration data"
    assert verdicts.pop("static-mixed") == "skipped: no --calibration data"
    assert all(v.startswith("fails gate") for v in verdicts.values()), verdicts
    assert "kept the original fp32 model" in result.reason
    _, _, model = _golden(result.path)
    assert model == digits["mlp"].read_bytes()


def test_prune_reaches_the_sparsity_and_is_recorded(
    digits: dict[str, Path], tmp_path: Path
) -> None:
    opts = BuildOptions(quantize="none", prune=0.3, eval_data=digits["eval"], **FAST)
    result = build_bundle(digits["mlp"], "digits", "1.0.0", tmp_path / "b.bundle", options=opts)
    pruning = result.manifest.build["pruning"]
    assert pruning["sparsity_requested"] == 0.3
    assert 0.3 <= pruning["sparsity_reached"] < 0.31
    _, _, model_bytes = _golden(result.path)
    model = onnx.load_from_string(model_bytes)
    names = weight_names(model)
    weights = [onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.name in names]
    assert weights and all(np.mean(w == 0) >= 0.3 for w in weights)
    assert result.manifest.quality["outputs"]["probabilities"]["max_abs_diff"] > 0


def test_shrink_rule_drops_what_crosses_zero() -> None:
    w = np.array([[-0.5, -0.1, 0.05, 0.3, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(shrink(w, 0.1), [[-0.4, 0.0, 0.0, 0.2, 0.0]], atol=1e-7)
    model = onnx.load_from_string(_matmul_model())
    _, facts = prune(model, 0.5)
    # |W| = 6 5 4 3 2 1 0 1 2 3 4 5: alpha is 3, and the tied 3s go too (7 of 12).
    assert facts["sparsity_reached"] == 0.5833 and facts["pruned_tensors"] == 1


def test_generated_golden_without_eval_data(digits: dict[str, Path], tmp_path: Path) -> None:
    result = build_bundle(
        digits["mlp"], "digits", "1.0.0", tmp_path / "b.bundle", golden_cases=3,
        options=BuildOptions(latency_runs=0),
    )  # fmt: skip
    m = result.manifest
    assert m.build["golden_source"] == "generated" and m.quality["eval"]["source"] == "generated"
    assert m.build["recipe"] == "dynamic-matmul" and m.golden.cases == 3
    tol = m.quality["golden_tolerance"]
    assert m.golden.atol >= 0.2499 * tol["drift_max_abs"] and m.golden.atol >= 1e-4
    _check_golden_reproduces(result.path)


def test_tolerance_catches_the_unquantized_model(digits: dict[str, Path], tmp_path: Path) -> None:
    """A runtime that computes the original instead of the quantized model fails."""
    opts = BuildOptions(quantize="dynamic", eval_data=digits["eval"], latency_runs=0)
    result = build_bundle(digits["mlp"], "digits", "1.0.0", tmp_path / "b.bundle", options=opts)
    manifest, arrays, _ = _golden(result.path)
    session = ort.InferenceSession(str(digits["mlp"]), providers=["CPUExecutionProvider"])
    mismatched = 0
    for i in range(manifest.golden.cases):
        (_, got) = session.run(None, {"X": arrays["input:X"][i]})
        want = arrays["output:probabilities"][i]
        g = manifest.golden
        mismatched += not np.allclose(got, want, rtol=g.rtol, atol=g.atol)
    assert mismatched > 0


def test_gate_parsing() -> None:
    assert parse_gate("0.01") == Gate(min_agreement=0.99, source="--max-drift 0.01")
    gate = parse_gate("agreement=0.98, abs=0.1")
    assert (gate.min_agreement, gate.min_cosine, gate.max_abs) == (0.98, None, 0.1)
    for bad in ("2", "speed=1", "abs=x", "cosine=1.5"):
        with pytest.raises(UsageError, match="--max-drift"):
            parse_gate(bad)
    assert Gate().check({"top1_agreement": 0.5, "cosine": 1.0}) == [
        "top-1 agreement 0.5 (needs >= 0.99)"
    ]
    assert Gate().check({"top1_agreement": None, "cosine": 1.0}) == []
    assert parse_gate("0.01").check({"top1_agreement": None, "cosine": 1.0}) == [
        "top-1 agreement: not measurable on this model/data"
    ]


# ---------------------------------------------------------------------------- bad input


def _matmul_model(custom_op: bool = False) -> bytes:
    w = onnx.numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) - 6, "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y0"])]
    opsets = [helper.make_opsetid("", 17)]
    if custom_op:
        nodes.append(helper.make_node("Frobnicate", ["y0"], ["y"], domain="com.example"))
        opsets.append(helper.make_opsetid("com.example", 1))
    else:
        nodes.append(helper.make_node("Relu", ["y0"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return bytes(model.SerializeToString())


def test_operators_the_quantizer_cannot_handle(digits: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UnsupportedOpsError, match=r"quantizes .*none of them.*TreeEnsemble"):
        build_bundle(
            digits["tree"], "t", "1.0.0", tmp_path / "o.bundle",
            options=BuildOptions(quantize="dynamic", latency_runs=0),
        )  # fmt: skip
    # The default keeps such a model as is, as it always did, and says why.
    result = build_bundle(
        digits["tree"], "t", "1.0.0", tmp_path / "o.bundle", options=BuildOptions(latency_runs=0)
    )
    assert result.manifest.build["quantization"] == "none"
    assert result.reason.startswith(
        "none: the default (no --quantize given) kept the original model: dynamic-matmul "
        "does not apply (--quantize dynamic-matmul quantizes Gemm, MatMul; the model has none"
    )
    (tmp_path / "custom.onnx").write_bytes(_matmul_model(custom_op=True))
    with pytest.raises(UnsupportedOpsError, match=r"custom domains: com\.example\.Frobnicate"):
        build_bundle(
            tmp_path / "custom.onnx", "c", "1.0.0", tmp_path / "c.bundle",
            options=BuildOptions(quantize="static", calibration=digits["calib"]),
        )  # fmt: skip


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((5, 64), np.float32)}, r"arrays expected \['X'\].*missing \['X'\]"),
        ({"X": np.zeros((5, 64), np.float64)}, "input 'X' expected dtype float32, got float64"),
        ({"X": np.zeros((5, 63), np.float32)}, r"'X' expected shape \['N', 64\], got \[5, 63"),
        ({"X": np.zeros((5, 1, 64), np.float32)}, r"expected shape \['N', 64\], got \[5, 1, 64\]"),
        ({"X": np.zeros((5, 64), np.float32), "labels": np.zeros(4, int)}, "'labels' expected"),
        ({"X": np.zeros((0, 64), np.float32)}, "holds no samples"),
    ],
)
def test_eval_data_that_does_not_match_the_model(
    digits: dict[str, Path], tmp_path: Path, arrays: dict[str, np.ndarray], message: str
) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)  # type: ignore[arg-type]
    for opts in (
        BuildOptions(eval_data=tmp_path / "bad.npz"),
        BuildOptions(quantize="static", calibration=tmp_path / "bad.npz"),
    ):
        with pytest.raises(UsageError, match=message):
            build_bundle(digits["mlp"], "d", "1.0.0", tmp_path / "o.bundle", options=opts)
    assert not (tmp_path / "o.bundle").exists()


def test_option_errors(digits: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    cases: list[tuple[BuildOptions, str]] = [
        (BuildOptions(quantize="static"), "--quantize static needs --calibration"),
        (BuildOptions(calibration=digits["calib"]), "--calibration is used only by"),
        (BuildOptions(prune=1.5), "--prune expected a sparsity between 0 and 1"),
        (BuildOptions(eval_data=tmp_path / "junk.npz"), "is not a .npz file"),
        (BuildOptions(eval_data=tmp_path / "none.npz"), "does not exist"),
    ]
    for opts, message in cases:
        with pytest.raises(UsageError, match=message):
            build_bundle(digits["mlp"], "d", "1.0.0", tmp_path / "o.bundle", options=opts)


def test_cli_auto_prints_the_table_and_records_it(digits: dict[str, Path], tmp_path: Path) -> None:
    out = subprocess.run(
        edgectl_cmd(
            "bundle", "build", digits["mlp"], "--name", "digits", "--version", "1.0.0",
            "-o", tmp_path / "b.bundle", "--quantize", "auto", "--calibration",
            digits["calib"], "--eval", digits["eval"], "--max-drift", "0.02",
            "--prune", "0.1", "--latency-runs", "3", "--max-latency-ratio", "1000",
        ),
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    for word in ("recipe", "original", "dynamic-matmul", "static", "fp16", "chosen", "pruning"):
        assert word in out.stdout
    manifest = json.loads(_golden(tmp_path / "b.bundle")[0].to_json_bytes())
    assert manifest["quality"]["gate"]["source"] == "--max-drift 0.02"
    assert manifest["build"]["pruning"]["sparsity_requested"] == 0.1


@pytest.mark.parametrize(
    ("model", "args", "code", "message"),
    [
        ("mlp", ["--quantize", "dynamic", "--max-drift", "abs=1e-7"], 1, "fails the quality gate"),
        ("tree", ["--quantize", "dynamic-matmul"], 1, "quantizes Gemm, MatMul"),
        ("mlp", ["--eval", "BAD"], 2, "expected dtype float32, got int64"),
        ("mlp", ["--max-drift", "fast"], 2, "--max-drift: bad part"),
        ("bad", [], 1, "is not an ONNX model"),
    ],
)
def test_cli_errors_are_clear(
    digits: dict[str, Path],
    tmp_path: Path,
    model: str,
    args: list[str],
    code: int,
    message: str,
) -> None:
    np.savez(tmp_path / "bad.npz", X=np.zeros((3, 64), np.int64))
    (tmp_path / "bad.onnx").write_bytes(b"\x00garbage")
    paths = {**digits, "bad": tmp_path / "bad.onnx"}
    args = [str(tmp_path / "bad.npz") if a == "BAD" else a for a in args]
    out = subprocess.run(
        edgectl_cmd(
            "bundle", "build", paths[model], "--name", "m", "--version", "1.0.0",
            "-o", tmp_path / "o.bundle", "--latency-runs", "0", *args,
        ),
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == code, out.stderr
    progress, _, error = out.stderr.partition("edgectl: error: ")
    assert error and message in error, out.stderr
    # Before the error only progress lines (issue 20, item 12).
    assert all(line.startswith("bundle build: ") for line in progress.splitlines()), out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "o.bundle").exists()


def test_invalid_graph_is_refused(tmp_path: Path) -> None:
    model = onnx.load_from_string(_matmul_model())
    model.graph.node[1].input[0] = "nowhere"
    (tmp_path / "broken.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(BuildError, match="not a valid ONNX graph"):
        build_bundle(
            tmp_path / "broken.onnx", "b", "1.0.0", tmp_path / "o.bundle",
            options=BuildOptions(quantize="auto"),
        )  # fmt: skip
