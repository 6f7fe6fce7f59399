"""Unpacking refuses every unsafe or inconsistent archive and leaves nothing behind."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from agent.base.errors import BundleError
from agent.update.unpack import unpack_bundle
from tests.agent._bundles import good_entries, manifest_for, write_tar

LIMIT = 1024 * 1024


def _unpack(bundle: Path, dest: Path, name: str = "m", version: str = "1.0.0") -> object:
    return unpack_bundle(
        bundle,
        dest,
        expected_name=name,
        expected_version=version,
        max_member_bytes=LIMIT,
        max_total_bytes=LIMIT,
    )


def test_good_bundle_unpacks(tmp_path: Path) -> None:
    bundle = write_tar(tmp_path / "b.tar", good_entries())
    _unpack(bundle, tmp_path / "out" / "1.0.0")
    assert sorted(p.name for p in (tmp_path / "out" / "1.0.0").iterdir()) == [
        "golden.npz",
        "manifest.json",
        "model.onnx",
    ]


def _link(name: str, kind: bytes, target: str = "/etc/passwd") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _special(name: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    return info


# One case per rule of issue 8 (and the older ones), named so a failure says which.
HOSTILE = {
    "dot-dot path": (lambda e: e.append(("../evil", b"x")), "has a path"),
    "absolute path": (lambda e: e.append(("/etc/evil", b"x")), "has a path"),
    "nested path": (lambda e: e.append(("sub/model.onnx", b"x")), "has a path"),
    "unexpected member": (
        lambda e: e.append(("evil.sh", b"x")),
        "unexpected bundle member 'evil.sh'",
    ),
    "symlink": (lambda e: e.append(_link("labels.txt", tarfile.SYMTYPE)), "not a regular file"),
    "hard link": (lambda e: e.append(_link("labels.txt", tarfile.LNKTYPE)), "not a regular file"),
    "char device": (
        lambda e: e.append(_link("labels.txt", tarfile.CHRTYPE)),
        "not a regular file",
    ),
    "block device": (
        lambda e: e.append(_special("labels.txt", tarfile.BLKTYPE)),
        "not a regular file",
    ),
    "fifo": (lambda e: e.append(_special("labels.txt", tarfile.FIFOTYPE)), "not a regular file"),
    "directory": (
        lambda e: e.append(_special("labels.txt", tarfile.DIRTYPE)),
        "not a regular file",
    ),
    "sparse file": (
        lambda e: e.append(_special("labels.txt", tarfile.GNUTYPE_SPARSE)),
        "not a regular file",
    ),
    "duplicate member": (lambda e: e.append(("model.onnx", b"model-bytes")), "appears twice"),
    "manifest not first": (
        lambda e: e.insert(0, e.pop(1)),
        "first bundle member must be manifest.json",
    ),
    "altered member": (
        lambda e: e.__setitem__(1, ("model.onnx", b"MODEL-bytes")),
        "sha256 expected",
    ),
    "member over its manifest size": (
        lambda e: e.__setitem__(1, ("model.onnx", b"model-bytes!")),
        "12 bytes, over its manifest size of 11",
    ),
    "member under its manifest size": (
        lambda e: e.__setitem__(1, ("model.onnx", b"model-byte")),
        "size expected 11, got 10",
    ),
    "missing member": (lambda e: e.pop(), "lacks member"),
    "member over the member limit": (
        lambda e: e.append(("labels.txt", b"x" * (LIMIT + 1))),
        "over the limit",
    ),
}


@pytest.mark.parametrize(("mutate", "message"), list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_archives_are_refused(tmp_path: Path, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    entries = good_entries()
    mutate(entries)
    bundle = write_tar(tmp_path / "b.tar", entries)
    dest = tmp_path / "out" / "1.0.0"
    with pytest.raises(BundleError, match=message):
        _unpack(bundle, dest)
    assert not dest.exists()
    assert list((tmp_path / "out").iterdir()) == []  # no staging leftovers


def _bundle_with_manifest(
    tmp_path: Path, members: dict[str, bytes], doc: dict[str, object]
) -> Path:
    manifest = json.dumps(doc).encode()
    return write_tar(tmp_path / "b.tar", [("manifest.json", manifest), *members.items()])


def test_a_manifest_declaring_more_than_the_bound_is_refused_before_unpacking(
    tmp_path: Path,
) -> None:
    members = {"model.onnx": b"a" * 10, "golden.npz": b"b" * 10}
    doc = manifest_for(members)
    doc["members"]["model.onnx"]["size"] = 10**12  # type: ignore[index]
    bundle = _bundle_with_manifest(tmp_path, members, doc)
    with pytest.raises(BundleError, match="over the limit of 1048576"):
        _unpack(bundle, tmp_path / "out" / "1.0.0")
    assert list((tmp_path / "out").iterdir()) == []


def test_a_manifest_listing_an_unexpected_member_is_refused(tmp_path: Path) -> None:
    members = {"model.onnx": b"a", "golden.npz": b"b"}
    doc = manifest_for({**members, "run.sh": b"x"})
    bundle = _bundle_with_manifest(tmp_path, members, doc)
    with pytest.raises(BundleError, match=r"unexpected member 'run\.sh'"):
        _unpack(bundle, tmp_path / "out" / "1.0.0")


def test_bundle_for_another_model_is_refused(tmp_path: Path) -> None:
    bundle = write_tar(tmp_path / "b.tar", good_entries(name="other"))
    with pytest.raises(
        BundleError, match=r"holds other 1\.0\.0, but desired state asked for m 1\.0\.0"
    ):
        _unpack(bundle, tmp_path / "out" / "1.0.0")


def test_unpacked_size_over_the_bound_is_refused(tmp_path: Path) -> None:
    members = {"model.onnx": b"a" * 600, "golden.npz": b"b" * 600}
    bundle = _bundle_with_manifest(tmp_path, members, manifest_for(members))
    with pytest.raises(BundleError, match="unpacks to more than the limit of 1000"):
        unpack_bundle(
            bundle,
            tmp_path / "o",
            expected_name="m",
            expected_version="1.0.0",
            max_member_bytes=1000,
            max_total_bytes=1000,
        )


def test_not_a_tar(tmp_path: Path) -> None:
    path = tmp_path / "b.tar"
    path.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(BundleError, match="not a readable tar archive"):
        _unpack(path, tmp_path / "out" / "1.0.0")
