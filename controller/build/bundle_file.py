"""The bundle file: a plain tar with a fixed member list (see ``agent.contracts``).

Invariants of what ``pack_bundle`` writes:
- Uncompressed POSIX (ustar) tar; members exactly ``manifest.json``, then ``model.onnx``
  and ``golden.npz`` (schema /1) or ``model.onnx.zst`` and ``golden.npz.zst`` (schema /2,
  one zstd frame each, ``stored_members``), in that order; regular files only; uid/gid 0,
  no user/group names, mode 0644, mtime ``BUNDLE_MTIME``
  (``agent.contracts.bundle_container`` writes and reads the tar). Same inputs → same bytes (for
  /2: with the same libzstd release).

``read_bundle`` is the controller's check before publishing: it accepts exactly what
``pack_bundle`` writes and verifies every member against the manifest's size and sha256
(for /2, of the content decompressed under the same bounds as the agent's).
"""

from __future__ import annotations

import hashlib
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
from agent.contracts.bundle_container import TAR_V1, TAR_V2_ZSTD, read_stored, unstore, write_stored
from agent.contracts.compression import ENCODING_ZSTD, STORED_SUFFIX
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


def stored_member_digest(data: bytes, stored: bytes) -> dict[str, int | str]:
    """The ``members`` entry of a schema /2 manifest: ``stored`` is ``data``'s zstd frame."""
    return {**member_digest(data), "encoding": ENCODING_ZSTD, "stored_size": len(stored)}


def pack_bundle(
    manifest: bytes, model: bytes, golden: bytes, *, compressed: bool = False
) -> bytes:
    """The bytes of a bundle holding the three members, in contract order.

    With ``compressed``, ``model`` and ``golden`` are already zstd frames (schema /2,
    made by ``compress_member``) and are stored as ``model.onnx.zst`` and
    ``golden.npz.zst``. The container writer is ``agent.contracts.bundle_container``:
    deltas rebuild through it too.
    """
    return write_stored(
        TAR_V2_ZSTD if compressed else TAR_V1,
        [(BUNDLE_MANIFEST, manifest), (BUNDLE_MODEL, model), (BUNDLE_GOLDEN, golden)],
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
        if manifest.compressed:
            members = _decompressed(manifest, members)
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


def _decompressed(manifest: Manifest, stored: dict[str, bytes]) -> dict[str, bytes]:
    """A /2 bundle's members decompressed under the agent's bounds (BundleError if not)."""
    return dict(unstore(manifest, list(stored.items())))


def _read_members(path: Path, data: bytes) -> dict[str, bytes]:
    compressed = BUNDLE_REQUIRED_MEMBERS[:1] + tuple(
        m + STORED_SUFFIX for m in BUNDLE_REQUIRED_MEMBERS[1:] + BUNDLE_OPTIONAL_MEMBERS
    )
    allowed = BUNDLE_REQUIRED_MEMBERS + BUNDLE_OPTIONAL_MEMBERS + compressed[1:]
    members: dict[str, bytes] = {}
    try:
        stored = read_stored(data)
    except BundleError as exc:
        raise BundleFileError(f"bundle {path}: {exc}") from None
    for name, content in stored:
        if name not in allowed or name in members:
            raise BundleFileError(
                f"bundle {path}: unexpected member {name!r}; expected {', '.join(allowed)}"
            )
        members[name] = content
    names = list(members)
    if names[:3] not in (list(BUNDLE_REQUIRED_MEMBERS), list(compressed[:3])):
        raise BundleFileError(
            f"bundle {path}: members expected to start {list(BUNDLE_REQUIRED_MEMBERS)} "
            f"(or {list(compressed[:3])} compressed), got {names}"
        )
    return members
