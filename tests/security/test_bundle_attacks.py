"""Signed bundles that are bad inside their compression (issue 22), against the real
update path of a device.

The whole-file hash of a bundle is signed (attack 7), so these bundles must come from the
release key itself: a controller bug, or a key holder fooled into releasing a hostile
file. ``release_unchecked`` publishes one past the controller's own check (which refuses
each of them: ``read_bundle`` decompresses under the agent's bounds). Each test starts
from a device serving 1.0.0, releases a 2.0.0 whose model member is hostile, and asserts
the specific refusal and that the device still serves 1.0.0 and kept nothing of 2.0.0.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.contracts import parse_manifest
from agent.contracts.compression import compress_member
from controller.base.errors import BundleFileError
from controller.build import bundle_file
from controller.build.bundle_file import BundleInfo, pack_bundle, read_bundle
from controller.repository import release as release_module
from controller.repository.repo import Repository
from tests.helpers import bundle_members
from tests.security.conftest import MODEL, Device, release


def hostile_bundle(
    good: Path, out: Path, stored_model: bytes, *, model_size: int | None = None
) -> Path:
    """``good`` (a /2 bundle) with ``stored_model`` as its model.onnx.zst, its manifest
    saying the stored size, and the model's size ``model_size`` if given (the good
    model's size and sha256 otherwise)."""
    members = bundle_members(good)
    doc = json.loads(members["manifest.json"])
    assert doc["schema"] == "edgefleet.manifest/2"
    entry = doc["members"]["model.onnx"]
    entry["stored_size"] = len(stored_model)
    if model_size is not None:
        entry["size"] = model_size
    manifest = json.dumps(doc, indent=2, sort_keys=True).encode()
    data = pack_bundle(
        manifest, stored_model, compress_member(members["golden.npz"]), compressed=True
    )
    out.write_bytes(data)
    return out


def release_unchecked(repo: Repository, bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Release ``bundle`` signed by the release key, skipping only the controller's
    member checks (which refuse it: asserted first)."""
    with pytest.raises(BundleFileError):
        read_bundle(bundle)

    def manifest_only(path: Path) -> BundleInfo:
        with tarfile.open(path, "r:") as tar:
            member = tar.extractfile("manifest.json")
            assert member is not None
            manifest = parse_manifest(member.read())
        data = path.read_bytes()
        return BundleInfo(manifest, hashlib.sha256(data).hexdigest(), len(data))

    monkeypatch.setattr(release_module, "read_bundle", manifest_only)
    release(repo, bundle)
    monkeypatch.setattr(release_module, "read_bundle", bundle_file.read_bundle)


@pytest.fixture
def release_hostile(
    repo: Repository, bundles: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., None]:
    """Release as 2.0.0 the good 2.0.0 bundle with ``stored_model`` as its model member
    (see ``hostile_bundle``), past the controller's check (``release_unchecked``)."""

    def mount(name: str, stored_model: bytes, *, model_size: int | None = None) -> None:
        out = tmp_path / f"{name}.bundle"
        bundle = hostile_bundle(bundles["2.0.0"], out, stored_model, model_size=model_size)
        release_unchecked(repo, bundle, monkeypatch)

    return mount


def assert_refused_and_still_serving(device: Device, reason: str) -> None:
    result = device.check()
    assert MODEL in result.refused, result
    assert reason in result.refused[MODEL], result.refused[MODEL]
    assert device.serving() == "1.0.0"
    models = device.config.state_dir / "models" / MODEL
    assert not [p for p in models.rglob("*") if "2.0.0" in p.name], list(models.rglob("*"))


@pytest.mark.bundle_attack("bomb")
def test_a_compression_bomb_stops_at_the_declared_size(
    device: Device, release_hostile: Callable[..., None]
) -> None:
    """64 MiB of zeros in a frame of a few kB, under a manifest that declares the real
    model's few hundred bytes: decompression stops one byte past the declared size."""
    bomb = compress_member(b"\0" * (64 << 20))
    release_hostile("bomb", bomb)
    assert_refused_and_still_serving(device, "decompresses to more than the")


@pytest.mark.bundle_attack("garbage")
def test_a_garbage_zstd_frame_is_refused(
    device: Device, bundles: dict[str, Path], release_hostile: Callable[..., None]
) -> None:
    good = bundle_members(bundles["2.0.0"])["model.onnx"]
    frame = bytearray(compress_member(good))
    frame[len(frame) // 2 :] = bytes(len(frame) - len(frame) // 2)  # the tail zeroed
    release_hostile("garbage", bytes(frame))
    assert_refused_and_still_serving(device, "is not valid zstd data")


@pytest.mark.bundle_attack("truncated")
def test_a_truncated_zstd_frame_is_refused(
    device: Device, bundles: dict[str, Path], release_hostile: Callable[..., None]
) -> None:
    good = bundle_members(bundles["2.0.0"])["model.onnx"]
    frame = compress_member(good)
    release_hostile("cut", frame[: len(frame) // 2])
    assert_refused_and_still_serving(device, "a truncated or corrupt zstd frame")


@pytest.mark.bundle_attack("hash")
def test_content_of_another_hash_after_decompression_is_refused(
    device: Device, bundles: dict[str, Path], release_hostile: Callable[..., None]
) -> None:
    """A valid frame of another model (the evil 6.6.6's) under 2.0.0's sha256."""
    evil = bundle_members(bundles["6.6.6"])["model.onnx"]
    release_hostile("swap", compress_member(evil), model_size=len(evil))
    assert_refused_and_still_serving(device, "sha256 of the decompressed content expected")
