"""Keep the agent's resident memory bounded across model swaps (glibc's allocator).

An ONNX Runtime session dropped is not memory returned. glibc's malloc serves a large
block (a model's weights, the session's arena chunks) with ``mmap`` only while it is
larger than the *mmap threshold*, and that threshold is dynamic: each time such a block is
freed, glibc raises the threshold to its size (up to 32 MiB). After the first swap, the
next session's weights are carved out of the heap arenas instead, and freeing them leaves
holes that the next, slightly different allocation pattern does not reuse: measured here,
100 swaps of a 6.5 MB CNN grew RSS from 127 to 260 MB. Fixing the threshold
(``mallopt(M_MMAP_THRESHOLD, 128 KiB)``) keeps large blocks on ``mmap``: they go back to
the kernel the moment the last in-flight request drops the old session, with no sweep
and no waiting (95 → 97 MB over 100 swaps). ``malloc_trim(0)`` after a swap returns what
is left in the arenas' free lists (a few MB) for ~2 ms. Fewer arenas
(``MALLOC_ARENA_MAX``) and ONNX Runtime's own arena switches did not help; figures in
docs/benchmarks.md ("Hot swap").

Invariants:
- Off glibc (musl, macOS) every function here is a no-op that says so (False / None).
- ``configure_allocator`` changes process-wide allocator settings once; an operator's
  ``MALLOC_MMAP_THRESHOLD_`` in the environment wins over it.
- Nothing here raises on a platform without these calls.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

logger = logging.getLogger(__name__)

# glibc's mallopt parameter numbers (malloc.h).
_M_MMAP_THRESHOLD: Final = -3
DEFAULT_MMAP_THRESHOLD_BYTES: Final = 128 * 1024
_ENV_MMAP_THRESHOLD: Final = "MALLOC_MMAP_THRESHOLD_"


@dataclass(frozen=True)
class Glibc:
    """The two glibc allocator calls the agent uses, behind a small typed face."""

    libc: ctypes.CDLL

    def set_mmap_threshold(self, size_bytes: int) -> bool:
        """``mallopt(M_MMAP_THRESHOLD, size_bytes)``; True when glibc accepted it."""
        return bool(self.libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(size_bytes)))

    def trim(self) -> bool:
        """``malloc_trim(0)``; True when some memory was returned to the kernel."""
        return bool(self.libc.malloc_trim(ctypes.c_size_t(0)))


@functools.cache
def glibc() -> Glibc | None:
    """The running C library when it is glibc with ``mallopt`` and ``malloc_trim``, else None."""
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError, AttributeError):  # not glibc, or no confstr at all
        return None
    if not version:
        return None
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols, glibc among them
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return Glibc(libc)


@functools.cache
def configure_allocator(mmap_threshold_bytes: int = DEFAULT_MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold so freed sessions go back to the kernel. Idempotent.

    Call once at start-up, before the first model loads (``agent.runtime.loading.load_model``
    calls it too). Returns True when applied; False off glibc, when glibc refused, or when
    ``MALLOC_MMAP_THRESHOLD_`` is set in the environment (the operator's choice stands).
    """
    if mmap_threshold_bytes <= 0:
        raise ValueError(f"mmap_threshold_bytes expected > 0, got {mmap_threshold_bytes}")
    if os.environ.get(_ENV_MMAP_THRESHOLD):
        logger.info(
            "allocator: keeping %s=%s from the environment",
            _ENV_MMAP_THRESHOLD,
            os.environ[_ENV_MMAP_THRESHOLD],
        )
        return False
    lib = glibc()
    if lib is None:
        logger.info("allocator: not glibc, leaving malloc settings alone")
        return False
    applied = lib.set_mmap_threshold(mmap_threshold_bytes)
    if applied:
        logger.info("allocator: glibc mmap threshold fixed at %d bytes", mmap_threshold_bytes)
    else:
        logger.warning("allocator: glibc refused mmap threshold %d", mmap_threshold_bytes)
    return applied


def release_memory() -> int | None:
    """Return free heap memory to the kernel (``malloc_trim(0)``) after a swap.

    Returns the bytes of resident memory released (RSS before minus after, never
    negative; 0 when there was nothing to give back), or None off glibc. Takes ~2 ms with
    ``configure_allocator`` applied (~14 ms without); run it in the update thread, never on
    the event loop. Memory the old session still holds (requests in flight on it) is
    returned when they finish, by the fixed mmap threshold, not by this call.
    """
    lib = glibc()
    if lib is None:
        return None
    before = rss_bytes()
    lib.trim()
    after = rss_bytes()
    if before is None or after is None:
        return 0
    return max(0, before - after)


def rss_bytes(pid: int | None = None) -> int | None:
    """Resident set size of ``pid`` (this process by default) from /proc, or None."""
    status = Path("/proc") / (str(pid) if pid is not None else "self") / "status"
    try:
        text = status.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None
