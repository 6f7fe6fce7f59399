"""Deltas between bundles: made by the controller, applied as the agent does (pure)."""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import numpy as np
import pytest

from agent.base.errors import BundleError
from agent.contracts import MANIFEST_SCHEMA_V2, GoldenSpec, Manifest, TensorSpec
from agent.contracts.bundle_container import (
    TAR_V1,
    TAR_V2_ZSTD,
    read_container,
    read_stored,
    write_container,
    write_stored,
)
from agent.contracts.compression import codec_facts, compress_member, libzstd_version
from agent.contracts.delta import (
    DELTA_MAGIC,
    DeltaError,
    apply_delta,
    delta_target_path,
    pack_delta,
    parse_delta_header,
    parse_delta_target,
)
from controller.build.bundle_file import member_digest, pack_bundle, stored_member_digest
from controller.build.delta import make_delta, onnx_tensors


def model_bytes(w: np.ndarray, b: np.ndarray, head: np.ndarray | None = None) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["y"]),
    ]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")]
    if head is not None:
        inits.append(numpy_helper.from_array(head, "head"))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", w.shape[1]])],
        initializer=inits,
    )
    return bytes(helper.make_model(graph).SerializeToString())


def lin_manifest(version: str, members: dict[str, Any], name: str = "lin", **more: Any) -> Manifest:
    """The manifest of the test's linear model (x: n x 4 -> y: n x 3) with ``members``."""
    return Manifest(
        name=name,
        version=version,
        inputs=(TensorSpec("x", "FP32", (-1, 4)),),
        outputs=(TensorSpec("y", "FP32", (-1, 3)),),
        opset=17,
        min_ort_version="1.17",
        golden=GoldenSpec(cases=1, rtol=1e-3, atol=1e-4),
        members=members,
        **more,
    )


def bundle(version: str, model: bytes, golden: bytes = b"golden" * 50, name: str = "lin") -> bytes:
    members = {"model.onnx": member_digest(model), "golden.npz": member_digest(golden)}
    manifest = lin_manifest(version, members, name)
    return pack_bundle(manifest.to_json_bytes(), model, golden)


def members(data: bytes) -> dict[str, bytes]:
    return dict(read_container(data)[1])


RNG = np.random.default_rng(0)
W = RNG.standard_normal((256, 128)).astype(np.float32)
B = RNG.standard_normal(128).astype(np.float32)


def apply(delta: bytes, old: bytes, new_version: str = "2.0.0", limit: int = 1 << 30) -> bytes:
    base = members(old)
    return apply_delta(
        delta, lambda n: base[n], model="lin", old="1.0.0", new=new_version, max_output_bytes=limit
    )


def test_container_round_trips_and_pack_bundle_uses_it() -> None:
    data = bundle("1.0.0", model_bytes(W, B))
    kind, found = read_container(data)
    assert kind == TAR_V1 and write_container(kind, found) == data


def test_tensors_found_in_the_protobuf() -> None:
    model = model_bytes(W, B)
    tensors = {t.name: t for t in onnx_tensors(model)}
    assert model[tensors["W"].offset : tensors["W"].offset + tensors["W"].size] == W.tobytes()
    assert tensors["W"].planes == 4


def test_head_retrained_delta_is_small_and_rebuilds_exactly() -> None:
    old = bundle("1.0.0", model_bytes(W, B))
    new = bundle("2.0.0", model_bytes(W, RNG.standard_normal(128).astype(np.float32)))
    delta = make_delta(old, new)
    assert apply(delta, old) == new
    assert len(delta) < len(new) * 0.05
    header = parse_delta_header(delta, 1 << 30)
    ops = [i["part"]["op"] for m in header.doc["members"] for i in m.get("inserts", [])]
    assert ops[0] == "copy" and ops[1] != "copy"  # W unchanged, b patched or new


def test_perturbed_weights_use_xor_and_stay_below_plain() -> None:
    import zstandard

    old = bundle("1.0.0", model_bytes(W, B))
    noise = 1 + 1e-3 * RNG.standard_normal(W.shape).astype(np.float32)
    new = bundle("2.0.0", model_bytes((W * noise).astype(np.float32), B))
    delta = make_delta(old, new)
    assert apply(delta, old) == new
    assert len(delta) < len(zstandard.ZstdCompressor(level=16).compress(new))


def test_new_tensor_and_other_model_rebuild() -> None:
    old = bundle("1.0.0", model_bytes(W, B))
    new = bundle("2.0.0", model_bytes(W[:, :64].copy(), B[:64].copy(), head=B), golden=b"other")
    assert apply(make_delta(old, new), old) == new


def test_other_model_name_is_refused() -> None:
    with pytest.raises(DeltaError, match="two versions of one model"):
        make_delta(bundle("1.0.0", model_bytes(W, B)), bundle("2.0.0", model_bytes(W, B), name="x"))


def test_wrong_base_is_refused_before_work() -> None:
    old = bundle("1.0.0", model_bytes(W, B))
    new = bundle("2.0.0", model_bytes(W, B * 2))
    delta = make_delta(old, new)
    other = members(bundle("1.0.0", model_bytes(W * 2, B)))
    with pytest.raises(DeltaError, match="not the one the delta was made from"):
        apply_delta(
            delta,
            lambda n: other[n],
            model="lin",
            old="1.0.0",
            new="2.0.0",
            max_output_bytes=1 << 30,
        )
    with pytest.raises(DeltaError, match=r"expected lin 1\.0\.0 → 3\.0\.0"):
        apply(delta, old, new_version="3.0.0")


def _rewrite(delta: bytes, change: Any) -> bytes:
    (length,) = struct.unpack(">I", delta[8:12])
    doc = json.loads(delta[12 : 12 + length])
    change(doc)
    return pack_delta(doc, delta[12 + length :])


def test_oversized_declared_output_is_refused() -> None:
    old = bundle("1.0.0", model_bytes(W, B))
    new = bundle("2.0.0", model_bytes(W, B * 2))
    delta = make_delta(old, new)
    with pytest.raises(DeltaError, match=r"more than 1000 bytes of output|in \[0, 1000\]"):
        apply(delta, old, limit=1000)

    def grow(doc: dict[str, Any]) -> None:
        doc["members"][1]["size"] += 1 << 20
        doc["members"][1]["body"]["size"] += 1 << 20

    with pytest.raises(DeltaError, match=r"declared|decompressed|needs"):
        apply(_rewrite(delta, grow), old)


def test_a_bomb_part_is_cut_at_its_declared_size() -> None:
    import zstandard

    old = bundle("1.0.0", model_bytes(W, B))
    new = bundle("2.0.0", model_bytes(W, B * 2))
    delta = make_delta(old, new)
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (64 << 20))

    def swap(doc: dict[str, Any]) -> None:
        part = doc["members"][0]["body"]
        part.pop("base", None)
        part["op"] = "zstd"
        part["blob"] = [len(delta) - 12 - struct.unpack(">I", delta[8:12])[0], len(bomb)]

    with pytest.raises(DeltaError, match="decompressed to more than"):
        apply(_rewrite(delta, swap) + bomb, old)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda d: d.update(schema="edgefleet.delta/9"), "schema"),
        (lambda d: d.update(container="zip/1"), "container"),
        (lambda d: d["members"][0]["body"].update(op="exec"), "unknown op"),
        (lambda d: d["members"][0]["body"].update(blob=[0, 1 << 40]), "not inside the payload"),
        (
            lambda d: d["members"][1]["inserts"][0]["part"].update(
                base=[["model.onnx", 0, 1 << 40]]
            ),
            "base range",
        ),
        (lambda d: d["members"].append(d["members"][0]), "repeated member"),
    ],
)
def test_malformed_headers_are_refused(mutate: Any, match: str) -> None:
    old = bundle("1.0.0", model_bytes(W, B))
    delta = make_delta(old, bundle("2.0.0", model_bytes(W, B * 2)))
    with pytest.raises(DeltaError, match=match):
        apply(_rewrite(delta, mutate), old)


def test_garbage_is_refused() -> None:
    with pytest.raises(DeltaError, match="bad magic"):
        parse_delta_header(b"PK\x03\x04" * 10, 1000)
    with pytest.raises(DeltaError, match="past the file"):
        parse_delta_header(DELTA_MAGIC + b"\xff\xff\xff\x00", 1000)


def test_rebuild_that_does_not_match_is_refused() -> None:
    old = bundle("1.0.0", model_bytes(W, B))
    delta = make_delta(old, bundle("2.0.0", model_bytes(W, B * 2)))

    def lie(doc: dict[str, Any]) -> None:
        doc["members"][1]["sha256"] = hashlib.sha256(b"x").hexdigest()

    with pytest.raises(DeltaError, match="another size or sha256"):
        apply(_rewrite(delta, lie), old)


def test_target_paths() -> None:
    path = delta_target_path("lin", "2.0.0", "1.0.0")
    assert path == "bundles/lin/2.0.0.from-1.0.0.delta"
    assert parse_delta_target(path) == ("lin", "2.0.0", "1.0.0")
    assert parse_delta_target("bundles/lin/2.0.0.bundle") is None


def test_golden_arrays_are_found_and_unchanged_inputs_copied() -> None:
    from controller.build.delta import npz_arrays
    from controller.build.golden import npz_bytes

    x = {"x": RNG.standard_normal((4, 1, 256)).astype(np.float32)}
    old_golden = npz_bytes(x, {"y": np.ones((4, 1, 128), np.float32)})
    new_golden = npz_bytes(x, {"y": np.zeros((4, 1, 128), np.float32)})
    arrays = {a.name: a for a in npz_arrays(new_golden)}
    assert set(arrays) == {"input:x.npy", "output:y.npy"}
    old = bundle("1.0.0", model_bytes(W, B), golden=old_golden)
    new = bundle("2.0.0", model_bytes(W, B), golden=new_golden)
    delta = make_delta(old, new)
    assert apply(delta, old) == new
    golden = parse_delta_header(delta, 1 << 30).doc["members"][2]
    assert golden["name"] == "golden.npz"
    assert [i["part"]["op"] for i in golden["inserts"]][0] == "copy"  # the inputs


# ---------------------------------------------------------------------------- format 2


def bundle2(version: str, model: bytes, golden: bytes = b"golden" * 50) -> bytes:
    """A manifest /2 bundle (members zstd frames), packed as the builder packs it."""
    stored_model, stored_golden = compress_member(model), compress_member(golden)
    members = {
        "model.onnx": stored_member_digest(model, stored_model),
        "golden.npz": stored_member_digest(golden, stored_golden),
    }
    manifest = lin_manifest(
        version, members, build={"compression": codec_facts()}, schema=MANIFEST_SCHEMA_V2
    )
    return pack_bundle(manifest.to_json_bytes(), stored_model, stored_golden, compressed=True)


def test_format2_container_gives_unpacked_members_and_round_trips() -> None:
    model = model_bytes(W, B)
    data = bundle2("1.0.0", model)
    kind, found = read_container(data)
    assert kind == TAR_V2_ZSTD
    assert [n for n, _ in found] == ["manifest.json", "model.onnx", "golden.npz"]
    assert dict(found)["model.onnx"] == model
    assert write_container(kind, found) == data


def test_format2_container_is_bounded_by_the_manifest() -> None:
    # A frame that decompresses past the size the manifest declares is refused there.
    model = model_bytes(W, B)
    data = bundle2("1.0.0", model)
    stored = read_stored(data)
    doc = json.loads(stored[0][1])
    doc["members"]["model.onnx"]["size"] = 100
    forged = write_stored(
        TAR_V2_ZSTD,
        [("manifest.json", json.dumps(doc).encode())]
        + [(n.removesuffix(".zst"), d) for n, d in stored[1:]],
    )
    with pytest.raises(BundleError, match="more than the 100 bytes"):
        read_container(forged)


@pytest.mark.parametrize("old_format", [1, 2])
def test_delta_to_format2_rebuilds_from_the_unpacked_files(old_format: int) -> None:
    # The device holds the old version's members unpacked whatever its bundle's format.
    old_model = model_bytes(W, B)
    old = (bundle if old_format == 1 else bundle2)("1.0.0", old_model)
    new = bundle2("2.0.0", model_bytes(W, RNG.standard_normal(128).astype(np.float32)))
    delta = make_delta(old, new)
    header = parse_delta_header(delta, 1 << 30)
    assert header.container == TAR_V2_ZSTD
    assert header.doc["libzstd"] == libzstd_version()
    assert apply(delta, old) == new
    assert members(old)["model.onnx"] == old_model
    assert len(delta) < len(new) * 0.2


def test_other_libzstd_is_refused_before_reading_the_installed_files() -> None:
    old = bundle2("1.0.0", model_bytes(W, B))
    delta = make_delta(old, bundle2("2.0.0", model_bytes(W, B * 2)))

    def other(doc: dict[str, Any]) -> None:
        doc["libzstd"] = "0.0.1"

    def no_read(name: str) -> bytes:
        raise AssertionError(f"read {name}")

    with pytest.raises(DeltaError, match="libzstd 0.0.1, this agent has libzstd"):
        apply_delta(
            _rewrite(delta, other),
            no_read,
            model="lin",
            old="1.0.0",
            new="2.0.0",
            max_output_bytes=1 << 30,
        )

    def missing(doc: dict[str, Any]) -> None:
        del doc["libzstd"]

    with pytest.raises(DeltaError, match="must name its libzstd release"):
        parse_delta_header(_rewrite(delta, missing), 1 << 30)


def test_format2_bundle_another_writer_made_is_refused() -> None:
    # Frames made with other parameters (level 3 here, as another libzstd might) are a
    # valid bundle that no delta can rebuild: make_delta says so.
    import zstandard

    model = model_bytes(W, B)
    old = bundle2("1.0.0", model)
    new = bundle2("2.0.0", model_bytes(W, B * 3))
    stored = read_stored(new)
    doc = json.loads(stored[0][1])
    frames = {
        n.removesuffix(".zst"): zstandard.ZstdCompressor(level=3, write_checksum=True).compress(
            dict(read_container(new)[1])[n.removesuffix(".zst")]
        )
        for n, _ in stored[1:]
    }
    for name, frame in frames.items():
        doc["members"][name]["stored_size"] = len(frame)
    other = write_stored(
        TAR_V2_ZSTD, [("manifest.json", json.dumps(doc).encode()), *frames.items()]
    )
    with pytest.raises(DeltaError, match="not what write_container"):
        make_delta(old, other)
