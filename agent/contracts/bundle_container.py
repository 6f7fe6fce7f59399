"""The bundle container: how a bundle's members become the one file TUF signs, and back.

This is the single place that knows the container's bytes. The controller writes bundles
with ``write_container`` (``controller.build.bundle_file.pack_bundle``); a delta
(``agent.contracts.delta``) rebuilds the exact published file by writing the rebuilt
members through the same function, so both must produce the same bytes from the same
members.

Containers, by the name a delta records:
- ``tar/1``: an uncompressed POSIX (ustar) tar; members in the given order, regular
  files, mode 0644, uid/gid 0, no user/group names, mtime ``BUNDLE_MTIME``. Same members
  → same bytes.

A new bundle format adds its name here (``write_container``/``read_container``) and to
``CONTAINERS``; deltas name the container they were made for, and an agent refuses a
delta of a container it does not know (then downloads the full bundle).
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Sequence
from typing import Final

from agent.base.errors import BundleError

# A fixed member mtime keeps bundles reproducible (2000-01-01T00:00:00Z).
BUNDLE_MTIME: Final = 946_684_800
TAR_V1: Final = "tar/1"
CONTAINERS: Final = (TAR_V1,)


def write_container(kind: str, members: Sequence[tuple[str, bytes]]) -> bytes:
    """The bytes of a bundle file of container ``kind`` holding ``members`` in order.

    Raises BundleError for an unknown container.
    """
    if kind != TAR_V1:
        raise BundleError(f"unknown bundle container {kind!r}; known: {', '.join(CONTAINERS)}")
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = BUNDLE_MTIME
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def read_container(data: bytes) -> tuple[str, list[tuple[str, bytes]]]:
    """The container kind and the members (in order) of a bundle file's bytes, for a
    writer of deltas. It does not judge the members (``read_bundle`` and ``unpack`` do);
    it only guarantees that ``write_container`` of the result gives ``data`` back, and
    raises BundleError when it cannot (a file this module did not write).
    """
    members: list[tuple[str, bytes]] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                if not info.isreg():
                    raise BundleError(f"bundle member {info.name!r} is not a regular file")
                extracted = tar.extractfile(info)
                assert extracted is not None  # a regular file always has content
                members.append((info.name, extracted.read()))
    except tarfile.TarError as exc:
        raise BundleError(f"not a bundle container this version knows: {exc}") from None
    if write_container(TAR_V1, members) != data:
        raise BundleError("the bundle's bytes are not what write_container writes for its members")
    return TAR_V1, members
