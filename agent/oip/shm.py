"""System shared memory for tensors: the server's region registry and the client's region.

A client creates a POSIX shared-memory object (``/dev/shm/<key>``), registers a window of
it under a name (``POST /v2/systemsharedmemory/region/<name>/register`` with ``key``,
``offset``, ``byte_size``), and then names that region in infer requests instead of
sending tensor bytes through the socket. The agent maps the object once, at registration.

Invariants:
- A key is one file name in ``/dev/shm`` (a leading ``/`` is allowed, as shm_open
  writes it): no other path, no links, only regular files.
- Only the object's owner (or root, or the agent's own user) may register it: the agent
  never lends its own access to another user's memory. The peer's uid comes from
  SO_PEERCRED, so registration is refused on listeners without one (TCP), and for a uid
  the agent cannot tell apart from other users (``unknown_uids``: the overflow id of a
  user namespace that does not map them).
- A region belongs to the uid that registered it: region names are per owner, and
  requests, unregistering and status reach only the caller's own regions
  (``SharedMemoryRegistry.scope``). Another user's regions are as if they did not
  exist: naming one is "not registered", status does not list it.
- Every access is bounds-checked against the registered window and against the object's
  current size, so a client that shrinks its object gets a 400, not a SIGBUS, unless it
  shrinks it during the copy itself (a race the docs call out).
- Registered regions are bounded in number per owner and in all; unregistering drops the
  mapping once the requests using it are done.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import re
import stat
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from agent.base.errors import InferenceError, InvalidRequestError, ModelNotFoundError
from agent.oip.acl import grant_user

if TYPE_CHECKING:  # numpy is imported where arrays are made: the agent's registry needs none
    import numpy as np

SHM_DIR: Final = Path("/dev/shm")
_KEY: Final = re.compile(r"/?[A-Za-z0-9_][A-Za-z0-9_.\-]{0,200}")
_NAME: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")


class SharedMemoryDenied(InvalidRequestError):
    """The peer may not register this object (not its owner, or no peer identity)."""


def _path_of(key: str) -> Path:
    if not _KEY.fullmatch(key) or ".." in key:
        raise InvalidRequestError(
            f"shared memory key expected a name in {SHM_DIR} like '/my-region', got {key!r}"
        )
    return SHM_DIR / key.lstrip("/")


@dataclass(frozen=True)
class _Region:
    name: str
    key: str
    offset: int
    byte_size: int
    fd: int
    mapping: mmap.mmap
    address: int  # of the mapping's first byte, for ONNX Runtime's I/O binding

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "key": self.key,
            "offset": self.offset,
            "byte_size": self.byte_size,
        }


_NONE: Final[MappingProxyType[str, _Region]] = MappingProxyType({})


class SharedMemoryRegistry:
    """Registered system shared-memory regions, by owner (the registering peer's uid).

    Thread-safe: readers never lock (they read an immutable snapshot, replaced whole on
    every change)."""

    def __init__(
        self,
        max_regions: int = 64,
        max_total_regions: int = 1024,
        unknown_uids: frozenset[int] = frozenset(),
    ) -> None:
        self.max_regions = max_regions  # per owner
        self.max_total_regions = max_total_regions  # each holds a descriptor
        self.unknown_uids = unknown_uids
        self._lock = threading.Lock()
        self._regions: MappingProxyType[int, MappingProxyType[str, _Region]] = MappingProxyType({})
        self._scopes: dict[int, OwnedRegions] = {}

    def scope(self, owner: int) -> OwnedRegions:
        """The regions ``owner`` registered, as requests reach them."""
        found = self._scopes.get(owner)
        if found is None:
            found = self._scopes.setdefault(owner, OwnedRegions(self, owner))
        return found

    def owned_by(self, owner: int) -> MappingProxyType[str, _Region]:
        return self._regions.get(owner, _NONE)

    def register(self, name: str, doc: Any, peer_uid: int | None) -> None:
        """Map ``doc["key"]`` (a register request body) under ``name``, owned by
        ``peer_uid``.

        Raises InvalidRequestError for a bad name, key, offset or size, an object that
        is missing, too small or not a regular file, a name the peer already registered,
        or too many regions; SharedMemoryDenied when the peer does not own the object or
        cannot be told apart from other users.
        """
        if not _NAME.fullmatch(name):
            raise InvalidRequestError(f"region name expected [A-Za-z0-9_.-]+, got {name!r}")
        if not isinstance(doc, dict):
            raise InvalidRequestError("register body expected {key, offset, byte_size}")
        key, offset, size = doc.get("key"), doc.get("offset", 0), doc.get("byte_size")
        if not isinstance(key, str):
            raise InvalidRequestError(f"register: 'key' expected a string, got {key!r}")
        for field, value in (("offset", offset), ("byte_size", size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidRequestError(
                    f"register: {field!r} expected an integer >= 0, got {value!r}"
                )
        assert isinstance(offset, int) and isinstance(size, int)
        if peer_uid is None:
            raise SharedMemoryDenied("shared memory is only available on the Unix socket")
        if peer_uid in self.unknown_uids:
            raise SharedMemoryDenied(
                f"the agent cannot tell uid {peer_uid} from other users (its user namespace "
                "does not map them: PrivateUsers=), so it lends shared memory to none of "
                'them; run it without PrivateUsers= (docs/operations.md, "The service")'
            )
        path = _path_of(key)
        self._check_room(name, peer_uid)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise InvalidRequestError(
                f"cannot open shared memory {key!r}: {exc.strerror}"
            ) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidRequestError(f"shared memory {key!r} is not a regular file")
            if peer_uid not in (0, os.getuid(), info.st_uid):
                raise SharedMemoryDenied(
                    f"shared memory {key!r} belongs to uid {info.st_uid}, not to the caller"
                )
            if offset + size > info.st_size or size == 0:
                raise InvalidRequestError(
                    f"region {name!r}: offset {offset} + byte_size {size} expected within "
                    f"the object's {info.st_size} bytes (and byte_size > 0)"
                )
            mapping = mmap.mmap(fd, info.st_size)
        except BaseException:
            os.close(fd)
            raise
        region = _Region(name, key, offset, size, fd, mapping, _address_of(mapping))
        with self._lock:
            try:
                self._check_room(name, peer_uid)
            except InvalidRequestError:
                _close(region)
                raise
            mine = MappingProxyType({**self.owned_by(peer_uid), name: region})
            self._regions = MappingProxyType({**self._regions, peer_uid: mine})

    def _check_room(self, name: str, owner: int) -> None:
        """Raise InvalidRequestError when ``owner`` has ``name`` already, or no room."""
        mine = self.owned_by(owner)
        if name in mine:
            raise InvalidRequestError(f"region {name!r} is already registered; unregister it first")
        if len(mine) >= self.max_regions:
            raise InvalidRequestError(
                f"at most {self.max_regions} regions may be registered by one user"
            )
        if sum(len(r) for r in self._regions.values()) >= self.max_total_regions:
            raise InvalidRequestError(
                f"at most {self.max_total_regions} regions may be registered in all"
            )

    def unregister(self, name: str | None, owner: int) -> None:
        """Forget ``owner``'s region ``name`` (None: every region of ``owner``). Unknown
        names are not an error."""
        with self._lock:
            mine = dict(self.owned_by(owner))
            if name is None:
                dropped, mine = list(mine.values()), {}
            else:
                found = mine.pop(name, None)
                dropped = [] if found is None else [found]
            regions = dict(self._regions)
            if mine:
                regions[owner] = MappingProxyType(mine)
            else:
                regions.pop(owner, None)
            self._regions = MappingProxyType(regions)
        for region in dropped:
            _close(region)

    def status(self, name: str | None, owner: int) -> list[dict[str, Any]]:
        """Status documents of ``owner``'s region ``name`` (None: all of them). Raises
        ModelNotFoundError if ``owner`` has no such region."""
        mine = self.owned_by(owner)
        if name is None:
            return [r.status() for r in mine.values()]
        if name not in mine:
            raise ModelNotFoundError(f"no shared memory region {name!r} is registered")
        return [mine[name].status()]

    def close(self) -> None:
        """Unmap every region of every owner."""
        with self._lock:
            dropped = [r for mine in self._regions.values() for r in mine.values()]
            self._regions = MappingProxyType({})
        for region in dropped:
            _close(region)


class OwnedRegions:
    """One owner's regions, as an infer request reaches them (``SharedMemory``)."""

    __slots__ = ("_owner", "_registry")

    def __init__(self, registry: SharedMemoryRegistry, owner: int) -> None:
        self._registry = registry
        self._owner = owner

    def view(self, region: str, offset: int, byte_size: int) -> memoryview:
        """Bytes ``offset..offset+byte_size`` of ``region``. Raises InvalidRequestError."""
        return self.views(((region, offset, byte_size),))[0]

    def views(
        self, refs: Sequence[tuple[str, int, int]], addresses: list[int] | None = None
    ) -> list[memoryview]:
        """A view of each ``(region, offset, byte_size)``; with ``addresses``, each
        view's address is appended to it. A view holds its mapping: while a caller holds
        it, the memory at its address stays mapped, even if the region is unregistered.

        Raises InvalidRequestError naming a region that is not registered (by this
        owner), a range outside its region, or a region whose object is now shorter than
        what was registered (reading a mapping past its object's end would kill the
        agent with SIGBUS): one ``lseek`` per region."""
        regions = self._registry.owned_by(self._owner)
        result: list[memoryview] = []
        checked: _Region | None = None  # requests name one region, mostly
        for region, offset, byte_size in refs:
            found = regions.get(region)
            if found is None:
                raise InvalidRequestError(f"shared memory region {region!r} is not registered")
            if offset + byte_size > found.byte_size:
                raise InvalidRequestError(
                    f"shared memory region {region!r}: offset {offset} + byte_size {byte_size} "
                    f"expected within its {found.byte_size} bytes"
                )
            if found is not checked:
                # The object's size: lseek is ~11 µs after a model run has flushed the
                # caches, fstat (and its stat_result) ~25 µs. The fd is only ever mapped,
                # so its offset is nobody's.
                if os.lseek(found.fd, 0, os.SEEK_END) < found.offset + found.byte_size:
                    raise InvalidRequestError(f"shared memory region {region!r} was truncated")
                checked = found
            start = found.offset + offset
            result.append(memoryview(found.mapping)[start : start + byte_size])
            if addresses is not None:
                addresses.append(found.address + start)
        return result


def _address_of(mapping: mmap.mmap) -> int:
    """Where ``mapping`` starts in memory (the export made to ask is dropped at once)."""
    anchor = ctypes.c_char.from_buffer(mapping)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


def _close(region: _Region) -> None:
    os.close(region.fd)
    # A request may still hold a view; the mapping then goes when it drops it.
    with contextlib.suppress(BufferError):
        region.mapping.close()


# ---------------------------------------------------------------------------- client side


class SharedMemoryRegion:
    """A client's POSIX shared-memory object, sized once, unlinked on ``close``.

    ``write(offset, array)`` copies an array in (returns its byte size); ``array`` gives a
    copy back; ``ndarray`` gives a writable array that lives *in* the region, so an
    application can produce its input there (decode a frame into it, say) and the client
    sends only where it is (``offset_of``), with no copy at all. Create it, register it
    with ``InferenceClient.register_shared_memory`` (which ``grant``s the agent access
    when it runs as another user), and pass it to ``InferenceClient.infer(..., shm=region)``.
    """

    def __init__(self, key: str, byte_size: int) -> None:
        if byte_size <= 0:
            raise InvalidRequestError(f"byte_size expected > 0, got {byte_size}")
        self.key = key if key.startswith("/") else "/" + key
        self.byte_size = byte_size
        self.name: str | None = None  # set when registered with the agent
        self.path = _path_of(self.key)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, byte_size)
            self._mapping = mmap.mmap(fd, byte_size)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        os.close(fd)
        self.buffer = memoryview(self._mapping)
        import numpy as np

        probe = np.frombuffer(self.buffer, dtype=np.uint8)
        self._base = int(probe.ctypes.data)  # the mapping's address, for offset_of
        del probe

    def grant(self, uid: int) -> None:
        """Let user ``uid`` (the agent's) open the object read-write, and no one else:
        an ACL entry for that uid (``agent.oip.acl``). The group-owner and other entries
        stay empty (``ls -l`` shows the ACL's mask, ``rw-``, in the group bits).

        Raises InferenceError naming the object when the ACL cannot be set (a
        filesystem without ACLs, say)."""
        try:
            grant_user(self.path, uid)
        except OSError as exc:
            raise InferenceError(
                f"cannot let the agent (uid {uid}) open shared memory {self.key}: "
                f"{exc.strerror or exc}; it runs as another user, so {SHM_DIR} must "
                "support POSIX ACLs (or run the agent as this user)"
            ) from None

    def write(self, offset: int, data: bytes | memoryview) -> int:
        end = offset + len(data)
        if end > self.byte_size:
            raise InvalidRequestError(
                f"{len(data)} bytes at offset {offset} do not fit region {self.key} "
                f"({self.byte_size} bytes)"
            )
        self.buffer[offset:end] = data
        return len(data)

    def array(self, offset: int, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
        """A copy of the array stored at ``offset``."""
        import numpy as np

        count = int(np.prod(shape))
        return (
            np.frombuffer(self.buffer, dtype=dtype, count=count, offset=offset)
            .reshape(shape)
            .copy()
        )

    def ndarray(self, offset: int, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        """A writable array of ``shape`` stored in the region at ``offset`` (no copy).

        Raises InvalidRequestError when it does not fit or ``offset`` is not aligned
        to the dtype.
        """
        import numpy as np

        kind = np.dtype(dtype)
        count = int(np.prod(shape))
        if offset < 0 or offset + count * kind.itemsize > self.byte_size:
            raise InvalidRequestError(
                f"{count * kind.itemsize} bytes at offset {offset} do not fit region "
                f"{self.key} ({self.byte_size} bytes)"
            )
        if offset % kind.alignment:
            raise InvalidRequestError(f"offset {offset} is not aligned for {kind}")
        return np.frombuffer(self.buffer, dtype=kind, count=count, offset=offset).reshape(shape)

    def offset_of(self, array: np.ndarray) -> int | None:
        """Where ``array``'s bytes start in the region, when it is a C-contiguous,
        little-endian array lying wholly inside it (as ``ndarray`` makes); else None."""
        if not array.flags.c_contiguous or array.dtype.byteorder == ">":
            return None
        start = int(array.__array_interface__["data"][0]) - self._base
        if start < 0 or start + array.nbytes > self.byte_size:
            return None
        return start

    def close(self) -> None:
        """Unlink the object and unmap it; while arrays from ``ndarray`` are still alive
        the mapping stays until the last of them goes."""
        self.path.unlink(missing_ok=True)
        with contextlib.suppress(BufferError):
            self.buffer.release()
            self._mapping.close()

    def __enter__(self) -> SharedMemoryRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
