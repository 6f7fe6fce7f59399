from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from agent.contracts import BUNDLE_REQUIRED_MEMBERS, parse_manifest
from agent.contracts.compression import ZSTD_LEVEL, compress_member
from agent.update.unpack import unpack_bundle
from controller.base.errors import BuildError, BundleFileError, UsageError
from controller.build.builder import BuildOptions, build_bundle
from controller.build.bundle_file import pack_bundle, read_bundle
from tests.controller.conftest import edgectl_cmd
from tests.helpers import bundle_members, make_linear_model


def _members(path: Path) -> dict[str, tuple[tarfile.TarInfo, bytes]]:
    """Members by unpacked name (``model.onnx.zst`` → ``model.onnx``), decompressed."""
    contents = bundle_members(path)
    out = {}
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            name = info.name.removesuffix(".zst")
            out[name] = (info, contents[name])
    return out


def test_bundle_has_exactly_the_contract_members(linear_model: Path, tmp_path: Path) -> None:
    result = build_bundle(linear_model, "lin", "1.0.0", tmp_path / "b.bundle")
    members = _members(result.path)
    assert list(members) == list(BUNDLE_REQUIRED_MEMBERS)
    stored = [info.name for info, _ in members.values()]
    assert stored == ["manifest.json", "model.onnx.zst", "golden.npz.zst"]
    for info, _ in members.values():
        assert info.isreg() and info.mode == 0o644 and info.uid == 0 and info.gid == 0
    manifest = parse_manifest(members["manifest.json"][1])
    assert (manifest.name, manifest.version) == ("lin", "1.0.0")
    assert [(t.name, t.datatype, t.shape) for t in manifest.inputs] == [("x", "FP32", (-1, 4))]
    assert [(t.name, t.datatype, t.shape) for t in manifest.outputs] == [("y", "FP32", (-1, 3))]
    assert manifest.opset == 17
    # no --quantize given on a model this small: the default keeps the original (see
    # test_default_keeps_the_original_when_quantizing_makes_it_bigger)
    assert manifest.build["quantization"] == "none" and manifest.build["recipe"] == "none"
    assert manifest.build["selection_reason"].startswith("none: the default (no --quantize given)")
    assert manifest.build["golden_source"] == "generated"
    assert manifest.quality["outputs"]["y"]["top1_agreement"] >= 0.75
    assert manifest.quality["outputs"]["y"]["cosine"] > 0.99
    assert manifest.sizes["original_bytes"] == linear_model.stat().st_size
    assert manifest.members["model.onnx"]["size"] == len(members["model.onnx"][1])
    assert manifest.schema == "edgefleet.manifest/2" and manifest.compressed
    model_entry = manifest.members["model.onnx"]
    assert model_entry["encoding"] == "zstd"
    assert model_entry["stored_size"] == members["model.onnx"][0].size
    assert manifest.sizes["shipped_bytes"] == model_entry["stored_size"]
    assert manifest.build["compression"]["level"] == ZSTD_LEVEL == 16
    for row in manifest.quality["candidates"]:
        assert row["shipped_bytes"] > 0
    assert read_bundle(result.path).manifest == manifest


def test_format_1_writes_the_uncompressed_bundle_old_agents_read(
    linear_model: Path, tmp_path: Path
) -> None:
    result = build_bundle(
        linear_model, "lin", "1.0.0", tmp_path / "b.bundle", options=BuildOptions(bundle_format=1)
    )
    members = _members(result.path)
    assert [info.name for info, _ in members.values()] == list(BUNDLE_REQUIRED_MEMBERS)
    m = result.manifest
    assert m.schema == "edgefleet.manifest/1" and not m.compressed
    assert set(m.members["model.onnx"]) == {"size", "sha256"}  # what a /1 reader knows
    assert m.sizes["shipped_bytes"] == m.sizes["built_bytes"] == len(members["model.onnx"][1])
    assert "compression" not in m.build
    assert read_bundle(result.path).manifest == m
    with pytest.raises(UsageError, match="--format expected 1 or 2"):
        build_bundle(
            linear_model, "lin", "1.0.0", tmp_path / "c", options=BuildOptions(bundle_format=3)
        )


def _cli_build(model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = edgectl_cmd("bundle", "build", model, "--name", "lin", "--version", "1.0.0", "-o", out)
    return subprocess.run(
        [*cmd, "--latency-runs", "0", *extra], capture_output=True, text=True, timeout=120
    )


def test_default_keeps_the_original_when_quantizing_makes_it_bigger(
    linear_model: Path, tmp_path: Path
) -> None:
    """A 4x3 MatMul grows under int8 (scales, zero points, conversion nodes): without
    --quantize the build packs the original and says which it kept and why."""
    original = linear_model.read_bytes()
    out = _cli_build(linear_model, tmp_path / "b.bundle")
    assert out.returncode == 0, out.stderr
    bundle = read_bundle(tmp_path / "b.bundle")
    assert _members(tmp_path / "b.bundle")["model.onnx"][1] == original
    assert "bytes shipped (format 2, edgefleet.manifest/2, zstd)" in out.stdout
    assert f"shipped {bundle.manifest.sizes['shipped_bytes']:,} bytes" in out.stdout
    m = bundle.manifest
    rows = {r["recipe"]: r for r in m.quality["candidates"]}
    grown = rows["dynamic-matmul"]["size_bytes"]
    assert grown > len(original) == rows["none"]["size_bytes"] == m.sizes["built_bytes"]
    assert (m.build["recipe"], m.build["quantization"]) == ("none", "none")
    assert m.build["requested"] == "default (the smaller of dynamic-matmul and none)"
    why = (
        f"none: the default (no --quantize given) kept the original model "
        f"({len(original):,} bytes): dynamic-matmul made it bigger ({grown:,} bytes)"
    )
    assert m.build["selection_reason"] == why
    assert f"recipe: none ({why})" in out.stdout
    assert "dynamic-matmul: not kept: bigger than the original model" in out.stdout
    assert "none: chosen (no gate asked)" in out.stdout
    assert all(line.startswith("bundle build: ") for line in out.stderr.splitlines()), out.stderr

    doc = json.loads(_cli_build(linear_model, tmp_path / "j.bundle", "--json").stdout)
    assert (doc["recipe"], doc["reason"]) == ("none", why)
    assert [(c["recipe"], c["size"]) for c in doc["candidates"]] == [
        ("dynamic-matmul", grown),
        ("none", len(original)),
    ]


def test_default_keeps_the_quantized_model_when_it_is_smaller(tmp_path: Path) -> None:
    model = make_linear_model(tmp_path / "big.onnx", seed=1, in_features=64, out_features=32)
    out = _cli_build(model, tmp_path / "b.bundle", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    sizes = doc["sizes"]
    assert doc["recipe"] == doc["build"]["quantization"] == "dynamic-matmul"
    assert sizes["built_bytes"] < sizes["original_bytes"] == model.stat().st_size
    assert doc["reason"] == (
        "dynamic-matmul: the default (no --quantize given), smaller than the original model "
        f"({sizes['built_bytes']:,} bytes against {sizes['original_bytes']:,} bytes)"
    )
    verdicts = {c["recipe"]: c["verdict"] for c in doc["candidates"]}
    assert verdicts == {
        "dynamic-matmul": "chosen (no gate asked)",
        "none": "not kept: dynamic-matmul is smaller",
    }


def test_an_explicit_recipe_is_kept_even_when_bigger_with_a_warning(
    linear_model: Path, tmp_path: Path
) -> None:
    out = _cli_build(linear_model, tmp_path / "b.bundle", "--quantize", "dynamic-matmul")
    assert out.returncode == 0, out.stderr
    m = read_bundle(tmp_path / "b.bundle").manifest
    assert m.build["recipe"] == "dynamic-matmul"
    assert m.sizes["built_bytes"] > m.sizes["original_bytes"]
    note = (
        f"dynamic-matmul made the model bigger ({m.sizes['built_bytes']:,} bytes against "
        f"{m.sizes['original_bytes']:,} bytes unquantized); without --quantize the build "
        "keeps the smaller"
    )
    assert m.build["selection_reason"] == f"dynamic-matmul: asked for with --quantize; note: {note}"
    assert note in out.stderr and "WARNING" in out.stderr


def test_golden_outputs_reproduce_in_onnx_runtime(linear_model: Path, tmp_path: Path) -> None:
    result = build_bundle(linear_model, "lin", "1.0.0", tmp_path / "b.bundle", golden_cases=5)
    members = _members(result.path)
    golden = np.load(io.BytesIO(members["golden.npz"][1]))
    assert sorted(golden.files) == ["input:x", "output:y"]
    assert golden["input:x"].shape == (5, 1, 4)
    spec = result.manifest.golden
    assert spec.cases == 5
    session = ort.InferenceSession(members["model.onnx"][1], providers=["CPUExecutionProvider"])
    for i in range(spec.cases):
        (got,) = session.run(["y"], {"x": golden["input:x"][i]})
        np.testing.assert_allclose(got, golden["output:y"][i], rtol=spec.rtol, atol=spec.atol)


def test_build_is_reproducible(
    linear_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    untimed = BuildOptions(latency_runs=0)  # timings are the only non-deterministic facts
    a = build_bundle(linear_model, "lin", "1.0.0", tmp_path / "a.bundle", options=untimed)
    b = build_bundle(linear_model, "lin", "1.0.0", tmp_path / "b.bundle", options=untimed)
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.manifest.created_at == "2023-11-14T22:13:20Z"
    # What a delta relies on: the agent's unpacked files give the signed bytes again.
    folder = tmp_path / "unpacked"
    unpack_bundle(
        a.path, folder, expected_name="lin", expected_version="1.0.0",
        max_member_bytes=1 << 20, max_total_bytes=1 << 20,
    )  # fmt: skip
    rebuilt = pack_bundle(
        (folder / "manifest.json").read_bytes(),
        compress_member((folder / "model.onnx").read_bytes()),
        compress_member((folder / "golden.npz").read_bytes()),
        compressed=True,
    )
    assert rebuilt == a.path.read_bytes()


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["missing.onnx", "--name", "lin", "--version", "1.0.0"], 2, "does not exist"),
        (["not.onnx", "--name", "lin", "--version", "1.0.0"], 1, "is not an ONNX model"),
        (["MODEL", "--name", "../lin", "--version", "1.0.0"], 2, "invalid model name"),
        (["MODEL", "--name", "lin", "--version", "v1"], 2, "invalid version"),
    ],
)
def test_bad_input_gets_a_clear_error(
    linear_model: Path, tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    (tmp_path / "not.onnx").write_text("this is not a model\n")
    args = [str(linear_model) if a == "MODEL" else a for a in args]
    out = subprocess.run(
        edgectl_cmd("bundle", "build", *args, "-o", tmp_path / "out.bundle"),
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == code, out.stderr
    progress, _, error = out.stderr.partition("edgectl: error: ")
    assert error and message in error, out.stderr
    # Before the error only progress lines (issue 20, item 12).
    assert all(line.startswith("bundle build: ") for line in progress.splitlines()), out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "out.bundle").exists()


def test_invalid_graph_and_unwritable_output(linear_model: Path, tmp_path: Path) -> None:
    import onnx

    model = onnx.load(str(linear_model))
    model.graph.node[0].input[1] = "nowhere"  # an input no node or initializer produces
    onnx.save(model, str(tmp_path / "broken.onnx"))
    with pytest.raises(BuildError, match="not a valid ONNX graph"):
        build_bundle(tmp_path / "broken.onnx", "lin", "1.0.0", tmp_path / "o.bundle")
    with pytest.raises(UsageError, match="not a writable directory"):
        build_bundle(linear_model, "lin", "1.0.0", tmp_path / "no" / "such" / "o.bundle")


@pytest.mark.parametrize(
    ("fmt", "member", "error"),
    [
        (1, "model.onnx", r"member model\.onnx expected size"),
        (2, "model.onnx.zst", r"'model\.onnx' is not valid zstd data"),
    ],
)
def test_tampered_bundle_is_refused(
    linear_model: Path, tmp_path: Path, fmt: int, member: str, error: str
) -> None:
    opts = BuildOptions(bundle_format=fmt, latency_runs=0)
    path = build_bundle(linear_model, "lin", "1.0.0", tmp_path / "b.bundle", options=opts).path
    with tarfile.open(path, "r:") as tar:
        offset = tar.getmember(member).offset_data
    data = bytearray(path.read_bytes())
    data[offset + 10] ^= 0xFF
    (tmp_path / "t.bundle").write_bytes(bytes(data))
    with pytest.raises(BundleFileError, match=error):
        read_bundle(tmp_path / "t.bundle")


def test_auto_ranks_candidates_by_shipped_bytes() -> None:
    """A pruned model bigger on disk but smaller once compressed wins under ``auto``;
    stored as is (format 1), model bytes decide."""
    from controller.build.evaluate import Candidate, choose

    def candidates(stored: bool) -> list[Candidate]:
        dense = Candidate("dynamic", b"d" * 1000, stored=b"s" * 900 if stored else None)
        pruned = Candidate("none", b"p" * 4000, stored=b"s" * 300 if stored else None)
        return [dense, pruned]

    chosen, why = choose(candidates(stored=True), 1.0, 1.1)
    assert chosen is not None and chosen.recipe == "none"
    assert why.endswith("ranked by shipped (compressed) bytes, 300")
    rows = [c.record(4000, 1.0) for c in candidates(stored=True)]
    assert [r["shipped_bytes"] for r in rows] == [900, 300]
    chosen, _ = choose(candidates(stored=False), 1.0, 1.1)
    assert chosen is not None and chosen.recipe == "dynamic"


def test_cli_format_1_for_old_agents(linear_model: Path, tmp_path: Path) -> None:
    out = _cli_build(linear_model, tmp_path / "b.bundle", "--format", "1", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["schema"] == "edgefleet.manifest/1"
    assert all(c["shipped"] == c["size"] for c in doc["candidates"] if c["size"])
    assert read_bundle(tmp_path / "b.bundle").manifest.schema == "edgefleet.manifest/1"


def test_a_build_without_latency_says_it_was_not_measured(tmp_path: Path) -> None:
    # --latency-runs 0: no "within infx the original's latency", no 0.000ms original.
    model = make_linear_model(tmp_path / "lin.onnx", seed=1)
    options = BuildOptions(quantize="auto", latency_runs=0)
    result = build_bundle(model, "lin", "1.0.0", tmp_path / "b.bundle", options=options)
    assert "inf" not in result.reason and "latency not measured" in result.reason
    assert "0.000ms" not in result.table
    assert "latency: not measured (--latency-runs 0)" in result.table
