"""The bundle container: how a bundle's members become the one file TUF signs, and back.

This is the single place that knows the container's bytes. The controller writes bundles
through ``write_stored`` (``controller.build.bundle_file.pack_bundle``, members already
compressed by the builder); a delta (``agent.contracts.delta``) rebuilds the exact
published file with ``write_container``, which stores the members the same way
(``agent.contracts.compression.compress_member``, the one place the zstd parameters
live) and writes them through the same ``write_stored``. Readers (the controller's
``read_bundle``, its history, delta writers) go through ``read_stored``,
``read_container`` and ``read_manifest_member``.

Containers, by the name a delta records:
- ``tar/1`` (manifest schema /1): an uncompressed POSIX (ustar) tar; members in the given
  order, regular files, mode 0644, uid/gid 0, no user/group names, mtime
  ``BUNDLE_MTIME``. Same members → same bytes.
- ``tar/2-zstd`` (manifest schema /2): the same tar, ``manifest.json`` stored as it is
  and first, every other member one zstd frame named ``<member>.zst``. Same members →
  same bytes *with the same libzstd release* (zstd does not promise identical frames
  across releases; a delta records the release, ``libzstd_version``).

In both, ``manifest.json`` is the first member and is not compressed, so reading a
bundle's manifest never touches the model (``read_manifest_member``).

A new bundle format adds its name here and to ``CONTAINERS``; deltas name the container
they were made for, and an agent refuses a delta of a container it does not know (then
downloads the full bundle).
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Final

from agent.base.errors import BundleError, NewerFormatError
from agent.contracts.bundle import BUNDLE_MANIFEST, Manifest, parse_manifest
from agent.contracts.compression import STORED_SUFFIX, compress_member, decompress_member

# A fixed member mtime keeps bundles reproducible (2000-01-01T00:00:00Z).
BUNDLE_MTIME: Final = 946_684_800
TAR_V1: Final = "tar/1"
TAR_V2_ZSTD: Final = "tar/2-zstd"
CONTAINERS: Final = (TAR_V1, TAR_V2_ZSTD)
# The manifest member is read whole; a larger one is refused (the agent's bound too).
MAX_MANIFEST_BYTES: Final = 1024 * 1024


def container_of(manifest: Manifest) -> str:
    """The container a bundle with this manifest is written in."""
    return TAR_V2_ZSTD if manifest.compressed else TAR_V1


def _check_kind(kind: str) -> None:
    if kind not in CONTAINERS:
        raise NewerFormatError(f"unknown bundle container {kind!r}; known: {', '.join(CONTAINERS)}")


def stored_name(kind: str, name: str) -> str:
    """The name of member ``name`` inside a container of ``kind``."""
    _check_kind(kind)
    if kind == TAR_V1 or name == BUNDLE_MANIFEST:
        return name
    return name + STORED_SUFFIX


def write_stored(kind: str, members: Sequence[tuple[str, bytes]]) -> bytes:
    """The bytes of a bundle file of ``kind`` whose members, in order, are stored as given
    (for ``tar/2-zstd``: each member but the manifest already its zstd frame, made by
    ``compress_member``). Raises BundleError for an unknown container."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(stored_name(kind, name))
            info.size = len(data)
            info.mode = 0o644
            info.mtime = BUNDLE_MTIME
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def write_container(kind: str, members: Sequence[tuple[str, bytes]]) -> bytes:
    """The bytes of a bundle file of container ``kind`` holding ``members`` (their
    unpacked contents) in order. Raises BundleError for an unknown container."""
    _check_kind(kind)
    return write_stored(
        kind,
        [
            (name, data if stored_name(kind, name) == name else compress_member(data))
            for name, data in members
        ],
    )


class StoredMembers:
    """The one reader of bundle files: their members as stored in the tar, streamed in
    order (``with StoredMembers(path) as members: for info in members: members.open(info)``).

    It judges nothing (the caller checks names, types and sizes on the ``TarInfo`` before
    opening); it turns the tar module's errors into BundleError: "not a readable tar
    archive" when opening, "archive is corrupt" while walking the members. Reading an
    opened member may still raise ``tarfile.TarError`` (a truncated file), which callers
    streaming large members catch around their loop."""

    def __init__(self, source: Path | IO[bytes]) -> None:
        try:
            if isinstance(source, Path):
                self._tar = tarfile.open(source, mode="r:")  # noqa: SIM115 - __exit__ closes
            else:
                self._tar = tarfile.open(fileobj=source, mode="r:")  # noqa: SIM115
        except (tarfile.TarError, OSError) as exc:
            raise BundleError(f"bundle is not a readable tar archive: {exc}") from None

    def __enter__(self) -> StoredMembers:
        return self

    def __exit__(self, *exc: object) -> None:
        self._tar.close()

    def __iter__(self) -> Iterator[tarfile.TarInfo]:
        while True:
            try:
                info = self._tar.next()
            except tarfile.TarError as exc:
                raise BundleError(f"bundle archive is corrupt: {exc}") from None
            if info is None:
                return
            yield info

    def open(self, info: tarfile.TarInfo) -> IO[bytes]:
        """The content of a regular member (BundleError for any other)."""
        if not info.isreg():
            raise BundleError(f"bundle member {info.name!r} is not a regular file")
        extracted = self._tar.extractfile(info)
        if extracted is None:
            raise BundleError(f"bundle member {info.name!r} has no content")
        return extracted


def read_stored(data: bytes) -> list[tuple[str, bytes]]:
    """The members of a bundle file as stored in the tar (names as in the tar, bytes not
    decompressed), in order. Raises BundleError when it is not a tar of regular files."""
    try:
        with StoredMembers(io.BytesIO(data)) as stored:
            return [(info.name, stored.open(info).read()) for info in stored]
    except tarfile.TarError as exc:
        raise BundleError(f"bundle archive is corrupt: {exc}") from None


def read_manifest_member(source: Path | IO[bytes]) -> bytes:
    """The bytes of the bundle's first member, which must be ``manifest.json`` (stored as
    it is in every container), without reading further. Raises BundleError or OSError."""
    try:
        with StoredMembers(source) as stored:
            for info in stored:
                check_manifest_member(info)
                return stored.open(info).read(MAX_MANIFEST_BYTES + 1)
    except tarfile.TarError as exc:
        raise BundleError(f"bundle archive is corrupt: {exc}") from None
    raise BundleError("bundle is empty")


def check_manifest_member(info: tarfile.TarInfo) -> None:
    """Refuse a first member that is not a ``manifest.json`` of at most 1 MiB."""
    if info.name != BUNDLE_MANIFEST:
        raise BundleError(f"the first bundle member must be {BUNDLE_MANIFEST}, got {info.name!r}")
    if info.size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{BUNDLE_MANIFEST} is {info.size} bytes, over {MAX_MANIFEST_BYTES}")


def unstore(manifest: Manifest, stored: Sequence[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """The unpacked members (in order) of a bundle's ``stored`` members under its manifest:
    for schema /2 each ``<member>.zst`` must have the manifest's ``stored_size`` and is
    decompressed under the agent's bounds (``decompress_member``: its declared size and
    sha256); /1 members are returned as they are. Raises BundleError naming the member."""
    if not manifest.compressed:
        return list(stored)
    out: list[tuple[str, bytes]] = []
    for stored_as, data in stored:
        if stored_as == BUNDLE_MANIFEST:
            out.append((stored_as, data))
            continue
        if not stored_as.endswith(STORED_SUFFIX):
            raise BundleError(f"member {stored_as!r} of a compressed bundle is not <name>.zst")
        name = stored_as.removesuffix(STORED_SUFFIX)
        expected = manifest.members.get(name)
        if expected is None:
            raise BundleError(f"member {stored_as!r} is not listed in the manifest")
        if len(data) != expected["stored_size"]:
            raise BundleError(
                f"member {stored_as!r}: stored size expected {expected['stored_size']}, "
                f"got {len(data)}"
            )
        parts: list[bytes] = []
        decompress_member(
            name, io.BytesIO(data), int(expected["size"]), str(expected["sha256"]), parts.append
        )
        out.append((name, b"".join(parts)))
    return out


def read_container(data: bytes, *, verify: bool = True) -> tuple[str, list[tuple[str, bytes]]]:
    """The container kind and the unpacked members (in order, the manifest first) of a
    bundle file's bytes, for a writer of deltas. It does not judge the members beyond
    the bounds of ``unstore`` (``read_bundle`` and ``unpack`` do); with ``verify`` it
    guarantees that ``write_container`` of the result gives ``data`` back, and raises
    BundleError when it does not (a file this module did not write, or a /2 bundle
    compressed by another libzstd release)."""
    stored = read_stored(data)
    if not stored or stored[0][0] != BUNDLE_MANIFEST:
        raise BundleError(f"the first bundle member must be {BUNDLE_MANIFEST}")
    manifest = parse_manifest(stored[0][1])
    kind = container_of(manifest)
    members = unstore(manifest, stored)
    if verify and write_container(kind, members) != data:
        raise BundleError(
            f"the bundle's bytes are not what write_container ({kind}) writes for its members"
            + (" (compressed by another libzstd release?)" if kind == TAR_V2_ZSTD else "")
        )
    return kind, members
