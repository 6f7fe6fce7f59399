"""How a bundle of manifest schema ``/2`` stores its members: one zstd frame each.

Writing (the controller, ``compress_member``): zstd level ``ZSTD_LEVEL``, one thread, the
content size and a checksum in the frame, no dictionary. The same bytes in give the same
bytes out with the same libzstd release (zstd does not promise identical frames across
releases; the manifest records the release in ``build.compression``, so a delta that
rebuilds a bundle can tell whether its zstd can reproduce the signed bytes).

Reading (agent and controller, ``decompress_member``): streams one member from a file
object into a sink in chunks of ``CHUNK_BYTES``, and refuses with ``BundleError``

- as soon as the output passes the size the manifest declares (a compression bomb stops
  after at most that size plus one chunk's worth of reading, never more),
- an output shorter than declared (a truncated frame),
- anything that is not zstd, a frame whose checksum fails, or a frame that asks for a
  window over ``MAX_WINDOW_BYTES`` (the decoder's memory),
- an output whose sha256 differs from the manifest's.

Never more than one chunk of output is held in memory. ``zstandard`` is imported on
first use (about 9 ms and 1 MiB): an agent that is not installing a bundle never loads it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import IO, Any, Final

from agent.base.errors import BundleError

ENCODING_ZSTD: Final = "zstd"
# A member stored compressed is named ``<member>.zst`` inside the tar.
STORED_SUFFIX: Final = ".zst"
# Level 16 (zstd's "btopt" strategy): on the real models it ships as small as 19 or
# smaller (int8 weights 4 % smaller), 10-40 % faster and with 36 MiB of match tables
# instead of 87 and a 4 MiB window instead of up to 8. Lower levels (6: 20-80 times
# faster) ship int8 weights 3-10 % bigger, which would undo pruning's gain there. A device
# pays compression whenever it rebuilds a bundle from a delta (the rebuilt bytes must match
# the signed ones): ~0.4-2.6 s of CPU for a 2-7 MB model here (docs/bundle-format.md, "Why
# these choices"). Changing the level changes every format 2 bundle's bytes, so it needs a
# new delta container kind (agent/contracts/bundle_container.py), or deltas stop matching.
ZSTD_LEVEL: Final = 16
MAX_WINDOW_BYTES: Final = 1 << 23
CHUNK_BYTES: Final = 1 << 20


def compress_member(data: bytes) -> bytes:
    """``data`` as one zstd frame: deterministic for a given libzstd release."""
    import zstandard

    compressor = zstandard.ZstdCompressor(
        level=ZSTD_LEVEL, write_checksum=True, write_content_size=True, threads=0
    )
    return compressor.compress(data)


def libzstd_version() -> str:
    """The libzstd release this process compresses with, e.g. ``1.5.6``."""
    import zstandard

    return ".".join(str(p) for p in zstandard.ZSTD_VERSION)


def codec_facts() -> dict[str, Any]:
    """What the manifest records about the compressor (``build.compression``)."""
    return {
        "codec": ENCODING_ZSTD,
        "level": ZSTD_LEVEL,
        "libzstd": libzstd_version(),
        "checksum": True,
        "threads": 1,
    }


def decompress_member(
    name: str,
    source: IO[bytes],
    size: int,
    sha256: str,
    sink: Callable[[bytes], object],
) -> None:
    """Decompress member ``name`` from ``source`` into ``sink``, bounded by ``size``.

    Raises BundleError naming the member and what was wrong (see the module docstring).
    """
    import zstandard

    decompressor = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_BYTES)
    digest = hashlib.sha256()
    total = 0
    try:
        with decompressor.stream_reader(
            source, read_size=CHUNK_BYTES, read_across_frames=True, closefd=False
        ) as reader:
            # Ask for one byte more than is left: any byte past the declared size is a bomb.
            while chunk := reader.read(min(CHUNK_BYTES, size - total + 1)):
                total += len(chunk)
                if total > size:
                    raise BundleError(
                        f"bundle member {name!r} decompresses to more than the {size} bytes "
                        "its manifest declares (refused: a compression bomb or a wrong manifest)"
                    )
                digest.update(chunk)
                sink(chunk)
    except zstandard.ZstdError as exc:
        raise BundleError(f"bundle member {name!r} is not valid zstd data: {exc}") from None
    if total < size:
        raise BundleError(
            f"bundle member {name!r} decompresses to {total} bytes, short of the {size} its "
            "manifest declares (a truncated or corrupt zstd frame)"
        )
    if digest.hexdigest() != sha256:
        raise BundleError(
            f"bundle member {name!r}: sha256 of the decompressed content expected {sha256}, "
            f"got {digest.hexdigest()}"
        )
