"""The bundle file: a plain tar with a fixed member list (see ``agent.contracts``).

Invariants of what ``pack_bundle`` writes:
- Uncompressed POSIX (ustar) tar; members exactly ``manifest.json``, ``model.onnx``,
  ``golden.npz``, in that order; regular files only; uid/gid 0, no user/group names,
  mode 0644, mtime ``BUNDLE_MTIME``. Same inputs → same bytes.

``read_bundle`` is the controller's check before publishing: it accepts exactly what
``pack_bundle`` writes and verifies every member against the manifest's size and sha256.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent.base.errors import BundleError
from agent.contracts import (
    BUNDLE_GOLDEN,
    BUNDLE_MANIFEST,
    BUNDLE_MODEL,
    BUNDLE_OPTIONAL_MEMBERS,
    BUNDLE_REQUIRED_MEMBERS,
    Manifest,
    parse_manifest,
)
from agent.contracts.bundle_container import TAR_V1, write_container
from controller.base.errors import BundleFileError, UsageError

# A bundle is refused beyond this size; models for edge devices are far smaller.
MAX_BUNDLE_BYTES: Final = 4 << 30


@dataclass(frozen=True)
class BundleInfo:
    """A validated bundle: its manifest and the sha256 and length of the whole file."""

    manifest: Manifest
    sha256: str
    length: int


def member_digest(data: bytes) -> dict[str, int | str]:
    """The ``members`` entry of the manifest for one member's bytes."""
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def pack_bundle(manifest: bytes, model: bytes, golden: bytes) -> bytes:
    """The bytes of a bundle holding the three members, in contract order (the container
    writer is ``agent.contracts.bundle_container``: deltas rebuild through it too)."""
    return write_container(
        TAR_V1, [(BUNDLE_MANIFEST, manifest), (BUNDLE_MODEL, model), (BUNDLE_GOLDEN, golden)]
    )


def read_bundle(path: Path) -> BundleInfo:
    """Validate the bundle at ``path``; return its manifest, sha256 and length.

    Raises UsageError when the file is missing, BundleFileError when it is malformed:
    not a tar, unexpected or non-regular members, a manifest the agent would refuse,
    or a member whose size or sha256 differs from the manifest.
    """
    if not path.is_file():
        raise UsageError(f"bundle {path} does not exist or is not a file")
    data = path.read_bytes()
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleFileError(f"bundle {path} is {len(data)} bytes, over {MAX_BUNDLE_BYTES}")
    members = _read_members(path, data)
    try:
        manifest = parse_manifest(members[BUNDLE_MANIFEST])
    except BundleError as exc:
        raise BundleFileError(f"bundle {path}: {exc}") from None
    if set(manifest.members) != set(members) - {BUNDLE_MANIFEST}:
        raise BundleFileError(
            f"bundle {path}: manifest lists {sorted(manifest.members)}, "
            f"the tar holds {sorted(set(members) - {BUNDLE_MANIFEST})}"
        )
    for name, expected in manifest.members.items():
        got = member_digest(members[name])
        if got != {"size": expected["size"], "sha256": expected["sha256"]}:
            raise BundleFileError(
                f"bundle {path}: member {name} expected size {expected['size']} sha256 "
                f"{expected['sha256']}, got size {got['size']} sha256 {got['sha256']}"
            )
    return BundleInfo(manifest, hashlib.sha256(data).hexdigest(), len(data))


def _read_members(path: Path, data: bytes) -> dict[str, bytes]:
    allowed = BUNDLE_REQUIRED_MEMBERS + BUNDLE_OPTIONAL_MEMBERS
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                if not info.isreg():
                    raise BundleFileError(f"bundle {path}: member {info.name!r} is not a file")
                if info.name not in allowed or info.name in members:
                    raise BundleFileError(
                        f"bundle {path}: unexpected member {info.name!r}; "
                        f"expected {', '.join(allowed)}"
                    )
                extracted = tar.extractfile(info)
                assert extracted is not None  # a regular file always has content
                members[info.name] = extracted.read()
    except tarfile.TarError as exc:
        raise BundleFileError(f"{path} is not a bundle (not an uncompressed tar): {exc}") from None
    names = list(members)
    if names[:3] != list(BUNDLE_REQUIRED_MEMBERS):
        raise BundleFileError(
            f"bundle {path}: members expected to start {list(BUNDLE_REQUIRED_MEMBERS)}, got {names}"
        )
    return members
