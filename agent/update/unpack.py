"""Safe unpacking of a bundle (an uncompressed tar) into a version directory.

The bundle's hash was verified by TUF before it gets here, but unpacking still trusts
nothing: a release key can sign a bad archive by mistake. Unpacking refuses

- members that are not regular files (links, devices, FIFOs, directories, sparse
  files, whose unpacked size is not what the header says),
- names that are absolute, contain ``/`` or ``..``, or are not in the fixed member set,
- duplicate members, a manifest that is not the first member or is over 1 MiB,
- members over ``max_member_bytes``, over the size their manifest gives them, or whose
  size or sha256 differ from the manifest,
- an archive whose unpacked total exceeds ``max_total_bytes``: judged from the
  manifest before anything but the manifest is written, and again while writing
  (and members that would not fit in the filesystem's free space: put back, not failed),
- a manifest whose model name or version differs from what desired state asked for.

A bundle of manifest schema /2 stores each member but the manifest as one zstd frame
named ``<member>.zst``; its stored size must be the manifest's ``stored_size``, and it is
decompressed as a stream straight into its file, refused as soon as the output passes the
declared size, when it ends short, or when the sha256 of the output differs
(``agent.contracts.compression``). A /1 bundle (uncompressed) unpacks as it always did.
No more than one chunk of a member is held in memory.

It writes into a fresh temporary directory beside the destination, fsyncs every file,
and renames the directory into place: a crash leaves either nothing or a whole version.
Raises ``BundleError`` naming the member and the rule.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from agent.base.errors import BundleError, InsufficientSpaceError
from agent.base.fsutil import durable_rename, free_bytes, fsync_dir, remove_tree
from agent.contracts import (
    BUNDLE_MANIFEST,
    BUNDLE_OPTIONAL_MEMBERS,
    BUNDLE_REQUIRED_MEMBERS,
    Manifest,
    parse_manifest,
)
from agent.contracts.bundle_container import (
    MAX_MANIFEST_BYTES,
    StoredMembers,
    check_manifest_member,
)
from agent.contracts.compression import STORED_SUFFIX, decompress_member

_COPY_CHUNK = 1024 * 1024


def _member_name(member: tarfile.TarInfo, manifest: Manifest | None) -> str:
    """The member's name once unpacked: ``model.onnx.zst`` → ``model.onnx`` under /2."""
    if manifest is None or not manifest.compressed:
        return member.name
    if not member.name.endswith(STORED_SUFFIX):
        raise BundleError(
            f"bundle member {member.name!r}: a {manifest.schema} bundle stores members as "
            f"<name>{STORED_SUFFIX}"
        )
    return member.name.removesuffix(STORED_SUFFIX)


def _check_member(
    member: tarfile.TarInfo, name: str, seen: set[str], max_member_bytes: int
) -> None:
    if not member.isreg() or member.issparse():
        raise BundleError(
            f"bundle member {name!r} is not a regular file (links and devices are refused)"
        )
    if name.startswith("/") or "/" in name or name in ("", ".", ".."):
        raise BundleError(f"bundle member {name!r} has a path; members must be plain file names")
    if name not in BUNDLE_REQUIRED_MEMBERS + BUNDLE_OPTIONAL_MEMBERS:
        raise BundleError(f"unexpected bundle member {name!r}")
    if name in seen:
        raise BundleError(f"bundle member {name!r} appears twice")
    if member.size > max_member_bytes:
        raise BundleError(
            f"bundle member {name!r} is {member.size} bytes, over the limit of {max_member_bytes}"
        )


def _copy_hashed(src: IO[bytes], dst_path: Path, limit: int) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(dst_path, "wb") as dst:
        while chunk := src.read(_COPY_CHUNK):
            size += len(chunk)
            if size > limit:
                raise BundleError(f"bundle member {dst_path.name!r} is larger than it claims")
            digest.update(chunk)
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    return size, digest.hexdigest()


def unpack_bundle(
    bundle: Path,
    destination: Path,
    *,
    expected_name: str,
    expected_version: str,
    max_member_bytes: int,
    max_total_bytes: int,
    free_space: Callable[[Path], int] = free_bytes,
) -> Manifest:
    """Unpack ``bundle`` into ``destination`` (which must not exist) and return its manifest.

    Raises InsufficientSpaceError (the install is put back, not failed) when the members
    the manifest declares would not fit in ``free_space`` of the destination's filesystem:
    a compressed bundle unpacks to more than the download that was checked for room.
    """
    if destination.exists():
        raise FileExistsError(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.with_name(f".unpack-{destination.name}-{os.getpid()}")
    remove_tree(staging)
    staging.mkdir()
    try:
        manifest = _extract(
            bundle,
            staging,
            expected_name,
            expected_version,
            (max_member_bytes, max_total_bytes),
            free_space,
        )
        fsync_dir(staging)
        durable_rename(staging, destination)
        return manifest
    except BaseException:
        remove_tree(staging)
        raise


def _extract(
    bundle: Path,
    staging: Path,
    expected_name: str,
    expected_version: str,
    limits: tuple[int, int],
    free_space: Callable[[Path], int],
) -> Manifest:
    max_member_bytes, max_total_bytes = limits
    manifest: Manifest | None = None
    seen: set[str] = set()
    total = 0
    # The one reader of bundle files (agent.contracts.bundle_container), streamed.
    with StoredMembers(bundle) as archive:
        try:
            for member in archive:
                name = _member_name(member, manifest)
                _check_member(member, name, seen, max_member_bytes)
                seen.add(name)
                total += member.size
                if total > max_total_bytes:
                    raise BundleError(
                        f"bundle unpacks to more than the limit of {max_total_bytes} bytes"
                    )
                source = archive.open(member)
                if manifest is None:
                    raw = _read_manifest_bytes(member, source)
                    manifest = _check_manifest(raw, expected_name, expected_version)
                    _check_declared_sizes(manifest, len(raw), max_member_bytes, max_total_bytes)
                    _check_room(manifest, staging, free_space)
                    _write_synced(staging / BUNDLE_MANIFEST, raw)
                    continue
                if manifest.compressed:
                    _extract_compressed(name, member, source, staging, manifest)
                else:
                    _extract_member(member, source, staging, manifest)
        except tarfile.TarError as exc:
            raise BundleError(f"bundle archive is corrupt: {exc}") from None
    if manifest is None:
        raise BundleError("bundle is empty")
    missing = sorted(set(manifest.members) - seen)
    if missing:
        raise BundleError(f"bundle lacks member(s) its manifest lists: {', '.join(missing)}")
    return manifest


def _read_manifest_bytes(member: tarfile.TarInfo, source: IO[bytes]) -> bytes:
    check_manifest_member(member)
    return source.read(MAX_MANIFEST_BYTES + 1)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _check_manifest(raw: bytes, expected_name: str, expected_version: str) -> Manifest:
    manifest = parse_manifest(raw)
    if (manifest.name, manifest.version) != (expected_name, expected_version):
        raise BundleError(
            f"bundle holds {manifest.name} {manifest.version}, "
            f"but desired state asked for {expected_name} {expected_version}"
        )
    return manifest


def _check_declared_sizes(
    manifest: Manifest, manifest_bytes: int, max_member_bytes: int, max_total_bytes: int
) -> None:
    """Refuse a manifest whose members could not be unpacked within the bounds."""
    allowed = set(BUNDLE_REQUIRED_MEMBERS + BUNDLE_OPTIONAL_MEMBERS) - {BUNDLE_MANIFEST}
    total = manifest_bytes
    for name, entry in manifest.members.items():
        if name not in allowed:
            raise BundleError(f"the manifest lists an unexpected member {name!r}")
        size = int(entry["size"])
        if size > max_member_bytes:
            raise BundleError(
                f"the manifest gives {name!r} {size} bytes, over the limit of {max_member_bytes}"
            )
        total += size
    if total > max_total_bytes:
        raise BundleError(
            f"bundle unpacks to more than the limit of {max_total_bytes} bytes "
            f"(its manifest declares {total})"
        )


def _check_room(manifest: Manifest, staging: Path, free_space: Callable[[Path], int]) -> None:
    """Refuse to start writing members that the filesystem cannot hold."""
    declared = sum(int(entry["size"]) for entry in manifest.members.values())
    available = free_space(staging)
    if available < declared:
        raise InsufficientSpaceError(
            f"not enough disk space to unpack {manifest.name} {manifest.version}: its members "
            f"unpack to {declared} bytes, {available} are free in {staging.parent}; free some "
            "space and the install resumes on the next check"
        )


def _extract_member(
    member: tarfile.TarInfo, source: IO[bytes], staging: Path, manifest: Manifest
) -> None:
    expected = manifest.members.get(member.name)
    if expected is None:
        raise BundleError(f"bundle member {member.name!r} is not listed in the manifest")
    if member.size > expected["size"]:
        raise BundleError(
            f"bundle member {member.name!r} is {member.size} bytes, over its manifest size "
            f"of {expected['size']}"
        )
    if member.size != expected["size"]:
        raise BundleError(
            f"bundle member {member.name!r}: size expected {expected['size']}, got {member.size}"
        )
    size, digest = _copy_hashed(source, staging / member.name, member.size)
    if size != member.size or digest != expected["sha256"]:
        raise BundleError(
            f"bundle member {member.name!r}: sha256 expected {expected['sha256']}, got {digest}"
        )


def _extract_compressed(
    name: str, member: tarfile.TarInfo, source: IO[bytes], staging: Path, manifest: Manifest
) -> None:
    """Stream one zstd member into its file, bounded by the sizes the manifest declares."""
    expected = manifest.members.get(name)
    if expected is None:
        raise BundleError(f"bundle member {name!r} is not listed in the manifest")
    if member.size != expected["stored_size"]:
        raise BundleError(
            f"bundle member {member.name!r}: stored size expected {expected['stored_size']}, "
            f"got {member.size}"
        )
    with open(staging / name, "wb") as dst:
        decompress_member(name, source, int(expected["size"]), str(expected["sha256"]), dst.write)
        dst.flush()
        os.fsync(dst.fileno())
