"""Schema /2 bundles (members as zstd frames) unpack with the same guarantees as /1, and
decompression is bounded by the sizes the manifest signs: bombs, truncated and garbage
frames and content of another hash are refused, leaving nothing behind."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
import zstandard

from agent.base.errors import BundleError, InsufficientSpaceError
from agent.contracts import parse_manifest
from agent.contracts.compression import CHUNK_BYTES, compress_member, decompress_member
from agent.update.unpack import unpack_bundle
from tests.agent._bundles import (
    compressed_entries,
    compressed_manifest_for,
    good_entries,
    write_tar,
)

LIMIT = 1024 * 1024
MODEL = b"model-bytes" * 50
GOLDEN = b"golden-bytes"


def _unpack(bundle: Path, dest: Path) -> object:
    return unpack_bundle(
        bundle,
        dest,
        expected_name="m",
        expected_version="1.0.0",
        max_member_bytes=LIMIT,
        max_total_bytes=LIMIT,
    )


def _bundle(
    tmp_path: Path, stored_model: bytes, *, model: bytes = MODEL, declared: int | None = None
) -> Path:
    """A /2 bundle whose manifest describes ``model`` (size ``declared`` if given) while
    the tar stores ``stored_model`` as model.onnx.zst."""
    members = {"model.onnx": model, "golden.npz": GOLDEN}
    stored = {"model.onnx": stored_model, "golden.npz": compress_member(GOLDEN)}
    doc = compressed_manifest_for(members, stored)
    if declared is not None:
        doc["members"]["model.onnx"]["size"] = declared
    entries = [
        ("manifest.json", json.dumps(doc).encode()),
        ("model.onnx.zst", stored["model.onnx"]),
        ("golden.npz.zst", stored["golden.npz"]),
    ]
    return write_tar(tmp_path / "b.tar", entries)


def _assert_refused(tmp_path: Path, bundle: Path, match: str) -> None:
    with pytest.raises(BundleError, match=match):
        _unpack(bundle, tmp_path / "out" / "1.0.0")
    assert not (tmp_path / "out" / "1.0.0").exists()
    assert list((tmp_path / "out").iterdir()) == []  # no staging left behind


def test_a_compressed_bundle_unpacks_to_the_original_members(tmp_path: Path) -> None:
    bundle = write_tar(tmp_path / "b.tar", compressed_entries())
    manifest = _unpack(bundle, tmp_path / "out" / "1.0.0")
    out = tmp_path / "out" / "1.0.0"
    assert (out / "model.onnx").read_bytes() == MODEL
    assert (out / "golden.npz").read_bytes() == GOLDEN
    assert sorted(p.name for p in out.iterdir()) == ["golden.npz", "manifest.json", "model.onnx"]
    assert parse_manifest((out / "manifest.json").read_bytes()) == manifest


def test_an_old_uncompressed_bundle_still_unpacks(tmp_path: Path) -> None:
    manifest = _unpack(write_tar(tmp_path / "b.tar", good_entries()), tmp_path / "out" / "1.0.0")
    assert manifest.schema == "edgefleet.manifest/1"  # type: ignore[attr-defined]
    assert (tmp_path / "out" / "1.0.0" / "model.onnx").read_bytes() == b"model-bytes"


def test_a_compression_bomb_is_refused(tmp_path: Path) -> None:
    bomb = compress_member(b"\0" * (16 << 20))  # 16 MiB of zeros in a few hundred bytes
    bundle = _bundle(tmp_path, bomb)
    _assert_refused(tmp_path, bundle, r"'model\.onnx' decompresses to more than the 550 bytes")


def test_decompression_stops_at_the_declared_size_plus_one_byte() -> None:
    """The bound holds while streaming: a bomb's output stops one byte past the declared
    size, and only a prefix of its frame is read."""
    bomb = compress_member(b"\0" * (64 << 20))
    source = io.BytesIO(bomb)
    received: list[int] = []
    with pytest.raises(BundleError, match="decompresses to more than the 1000 bytes"):
        decompress_member("model.onnx", source, 1000, "0" * 64, lambda c: received.append(len(c)))
    assert sum(received) <= 1000
    assert source.tell() <= CHUNK_BYTES


@pytest.mark.parametrize(
    ("stored", "match"),
    [
        (compress_member(MODEL)[: len(compress_member(MODEL)) // 2], "short of the 550"),
        (b"\x28\xb5\x2f\xfd" + b"garbage" * 20, "not valid zstd data"),
        (b"not zstd at all" * 10, "not valid zstd data"),
        (b"", "short of the 550"),
    ],
    ids=["truncated frame", "garbage after a zstd magic", "not zstd", "empty"],
)
def test_a_bad_frame_is_refused(tmp_path: Path, stored: bytes, match: str) -> None:
    _assert_refused(tmp_path, _bundle(tmp_path, stored), match)


def test_content_of_another_hash_is_refused(tmp_path: Path) -> None:
    other = b"MODEL-BYTES" * 50  # the same size, other bytes
    bundle = _bundle(tmp_path, compress_member(other))
    want = hashlib.sha256(MODEL).hexdigest()
    _assert_refused(tmp_path, bundle, f"sha256 of the decompressed content expected {want}")


def test_a_stored_size_other_than_the_manifests_is_refused(tmp_path: Path) -> None:
    frame = compress_member(MODEL)
    members = {"model.onnx": MODEL, "golden.npz": GOLDEN}
    doc = compressed_manifest_for(
        members, {"model.onnx": frame + b"x", "golden.npz": compress_member(GOLDEN)}
    )
    entries = [
        ("manifest.json", json.dumps(doc).encode()),
        ("model.onnx.zst", frame),
        ("golden.npz.zst", compress_member(GOLDEN)),
    ]
    bundle = write_tar(tmp_path / "b.tar", entries)
    _assert_refused(tmp_path, bundle, r"stored size expected \d+, got \d+")


def test_a_frame_asking_for_a_large_window_is_refused(tmp_path: Path) -> None:
    """A frame whose window (the decoder's memory) is over 8 MiB: refused before use."""
    params = zstandard.ZstdCompressionParameters.from_level(
        19, window_log=27, write_content_size=False
    )
    wide = zstandard.ZstdCompressor(compression_params=params)
    with io.BytesIO() as out:
        with wide.stream_writer(out, closefd=False) as writer:
            writer.write(MODEL)
        frame = out.getvalue()
    with pytest.raises(zstandard.ZstdError, match="memory"):  # the frame does ask for it
        zstandard.ZstdDecompressor(max_window_size=1 << 23).decompressobj().decompress(frame)
    _assert_refused(tmp_path, _bundle(tmp_path, frame), "not valid zstd data")


def test_a_compressed_bundle_with_uncompressed_member_names_is_refused(tmp_path: Path) -> None:
    entries = compressed_entries()
    entries[1] = ("model.onnx", entries[1][1])  # type: ignore[index]
    bundle = write_tar(tmp_path / "b.tar", entries)
    _assert_refused(tmp_path, bundle, r"stores members as <name>\.zst")


def test_the_declared_sizes_bound_the_unpacked_total_before_decompressing(
    tmp_path: Path,
) -> None:
    """A manifest declaring more than the device allows is refused from the manifest
    alone, however small the stored frames."""
    bundle = _bundle(tmp_path, compress_member(MODEL), declared=LIMIT + 1)
    _assert_refused(tmp_path, bundle, "over the limit of")


def test_manifest_schema_2_requires_the_encoding_and_1_forbids_it() -> None:
    entries = compressed_entries()
    doc = json.loads(entries[0][1])  # type: ignore[index]
    assert parse_manifest(json.dumps(doc).encode()).compressed
    del doc["members"]["model.onnx"]["encoding"]
    with pytest.raises(BundleError, match="missing field 'encoding'"):
        parse_manifest(json.dumps(doc).encode())
    doc["members"]["model.onnx"]["encoding"] = "gzip"
    with pytest.raises(BundleError, match="encoding expected 'zstd', got 'gzip'"):
        parse_manifest(json.dumps(doc).encode())
    doc["members"]["model.onnx"]["encoding"] = "zstd"
    doc["schema"] = "edgefleet.manifest/1"
    with pytest.raises(BundleError, match="manifest/1 members are not compressed"):
        parse_manifest(json.dumps(doc).encode())
    doc["schema"] = "edgefleet.manifest/3"
    with pytest.raises(BundleError, match=r"schema expected .*/1' or .*/2', got .*/3'"):
        parse_manifest(json.dumps(doc).encode())


def test_compression_is_deterministic() -> None:
    data = bytes(range(256)) * 4000
    assert compress_member(data) == compress_member(data)
    assert zstandard.ZstdDecompressor().decompress(compress_member(data)) == data


def test_members_that_would_not_fit_on_disk_are_not_started(tmp_path: Path) -> None:
    """The room checked before the download was for the compressed file; the manifest's
    declared sizes are checked against the free space before a member is written."""
    bundle = write_tar(tmp_path / "b.tar", compressed_entries())
    with pytest.raises(InsufficientSpaceError, match="unpack to 562 bytes, 561 are free"):
        unpack_bundle(
            bundle,
            tmp_path / "out" / "1.0.0",
            expected_name="m",
            expected_version="1.0.0",
            max_member_bytes=LIMIT,
            max_total_bytes=LIMIT,
            free_space=lambda _: len(MODEL) + len(GOLDEN) - 1,
        )
    assert list((tmp_path / "out").iterdir()) == []
