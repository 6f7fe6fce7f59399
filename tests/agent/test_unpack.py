"""Unpacking refuses every unsafe or inconsistent archive and leaves nothing behind."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from agent.errors import BundleError
from agent.unpack import unpack_bundle
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


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda e: e.append(("../evil", b"x")), "has a path"),
        (lambda e: e.append(("/etc/evil", b"x")), "has a path"),
        (lambda e: e.append(("sub/model.onnx", b"x")), "has a path"),
        (lambda e: e.append(("evil.sh", b"x")), "unexpected bundle member 'evil.sh'"),
        (lambda e: e.append(_link("labels.txt", tarfile.SYMTYPE)), "not a regular file"),
        (lambda e: e.append(_link("labels.txt", tarfile.LNKTYPE)), "not a regular file"),
        (lambda e: e.append(_link("labels.txt", tarfile.CHRTYPE)), "not a regular file"),
        (lambda e: e.append(("model.onnx", b"model-bytes")), "appears twice"),
        (lambda e: e.insert(0, e.pop(1)), "first bundle member must be manifest.json"),
        (lambda e: e.__setitem__(1, ("model.onnx", b"MODEL-bytes")), "sha256 expected"),
        (lambda e: e.__setitem__(1, ("model.onnx", b"model-bytes!")), "size expected"),
        (lambda e: e.pop(), "lacks member"),
        (lambda e: e.append(("labels.txt", b"x" * (LIMIT + 1))), "over the limit"),
    ],
)
def test_hostile_archives_are_refused(tmp_path: Path, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    entries = good_entries()
    mutate(entries)
    bundle = write_tar(tmp_path / "b.tar", entries)
    dest = tmp_path / "out" / "1.0.0"
    with pytest.raises(BundleError, match=message):
        _unpack(bundle, dest)
    assert not dest.exists()
    assert list((tmp_path / "out").iterdir()) == []  # no staging leftovers


def test_bundle_for_another_model_is_refused(tmp_path: Path) -> None:
    bundle = write_tar(tmp_path / "b.tar", good_entries(name="other"))
    with pytest.raises(
        BundleError, match=r"holds other 1\.0\.0, but desired state asked for m 1\.0\.0"
    ):
        _unpack(bundle, tmp_path / "out" / "1.0.0")


def test_total_size_bound(tmp_path: Path) -> None:
    members = {"model.onnx": b"a" * 600, "golden.npz": b"b" * 600}
    manifest = json.dumps(manifest_for(members)).encode()
    bundle = write_tar(tmp_path / "b.tar", [("manifest.json", manifest), *members.items()])
    with pytest.raises(BundleError, match="unpacks to more than the limit"):
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
