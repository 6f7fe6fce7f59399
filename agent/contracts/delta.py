"""Deltas between two versions of a model's bundle: the file format and how to apply one.

A delta turns the installed files of version ``from`` (the members of its bundle as the
agent unpacked them: ``manifest.json``, ``model.onnx``, ``golden.npz``, ``labels.txt``)
into the exact bytes of version ``to``'s bundle file, which the caller then verifies
against the full bundle's *signed* length and sha256 (TUF targets metadata) before
anything else happens. The delta's own header is never trusted for that check.

File layout: ``DELTA_MAGIC`` (8 bytes), the header's length (4 bytes, big endian), the
header (UTF-8 JSON, sorted keys), then the payload (the blobs the header points into).

Header (``schema`` ``edgefleet.delta/1``)::

    {"schema", "model", "from", "to",
     "container": "tar/1" | "tar/2-zstd",  # agent.contracts.bundle_container
     "libzstd": "1.5.6",                   # tar/2-zstd only: the release that compressed
     "target": {"length", "sha256"},       # the full bundle (informative only)
     "base": {member: {"size", "sha256"}}, # the old members it reads; checked first
     "members": [{"name", "size", "sha256", "body": PART, "inserts": [{"at", "part"}]}]}

A member's bytes are its ``body`` with each insert's part spliced in at offset ``at`` of
the body (``at`` non-decreasing): the model's tensors are inserts into the rest of the
protobuf. A PART is ``{"op", "size", "blob": [offset, length], "base": [[member, offset,
length], ...], "planes": k}``:

- ``copy``: the base bytes (the concatenated ranges) as they are (an unchanged tensor);
- ``zstd``: the blob, zstd-decompressed, using the base bytes (if any) as a raw-content
  dictionary (zstd's ``--patch-from``), then byte planes put back (``planes``);
- ``xor``: the blob, zstd-decompressed and byte planes put back, XORed with the base
  bytes (same size): a tensor whose values moved a little.

``planes = k`` means the bytes were stored transposed as k planes (byte i of every
k-byte element, then byte i+1...), which turns float tensors into long runs zstd packs.

Applying never trusts a size: the header's sizes are bounded by ``max_output_bytes``
before any work, each part must produce exactly its declared size (decompression reads at
most that many bytes plus one), and every base member's size and sha256 are checked
before anything is rebuilt. Every refusal is a ``DeltaError`` naming the rule.

A ``tar/2-zstd`` delta rebuilds the members uncompressed and compresses them again the
way the controller did (``write_container``). zstd promises the same frames only from the
same libzstd release, so a delta records the controller's release, and an agent whose
libzstd differs refuses the delta before reading any installed file or rebuilding
anything (the caller downloads the full bundle). That is a shortcut, not the guard: the
rebuilt file is verified against the signed target whatever the header says.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from agent.base.errors import BundleError
from agent.contracts.bundle import BUNDLE_OPTIONAL_MEMBERS, BUNDLE_REQUIRED_MEMBERS
from agent.contracts.bundle_container import CONTAINERS, TAR_V2_ZSTD, write_container
from agent.contracts.compression import libzstd_version
from agent.contracts.names import InvalidNameError, check_name, check_version

DELTA_MAGIC: Final = b"EFDELTA\x00"
DELTA_SCHEMA: Final = "edgefleet.delta/1"
MAX_HEADER_BYTES: Final = 16 << 20
OPS: Final = ("copy", "zstd", "xor")
_MEMBERS: Final = BUNDLE_REQUIRED_MEMBERS + BUNDLE_OPTIONAL_MEMBERS
# zstd's largest window a delta may ask the device for (the encoder stays below it).
MAX_WINDOW_BYTES: Final = 1 << 27


class DeltaError(BundleError):
    """A delta is malformed, unsafe, not for the installed version, or does not rebuild."""


@dataclass(frozen=True)
class DeltaHeader:
    """A parsed, bounded header; ``doc`` is the JSON document itself."""

    model: str
    old: str
    new: str
    container: str
    target_length: int
    target_sha256: str
    base: Mapping[str, Mapping[str, Any]]
    output_bytes: int
    payload_offset: int
    doc: Mapping[str, Any]


def delta_target_path(model: str, version: str, old: str) -> str:
    """The TUF target path of the delta from ``old`` to ``version``:
    ``bundles/<model>/<version>.from-<old>.delta``."""
    name, new, base = check_name("model", model), check_version(version), check_version(old)
    return f"bundles/{name}/{new}.from-{base}.delta"


def parse_delta_target(path: str) -> tuple[str, str, str] | None:
    """(model, version, old) of a delta target path, or None when it is not one."""
    parts = path.split("/")
    if len(parts) != 3 or parts[0] != "bundles" or not parts[2].endswith(".delta"):
        return None
    version, sep, old = parts[2].removesuffix(".delta").partition(".from-")
    try:
        if not sep:
            return None
        return check_name("model", parts[1]), check_version(version), check_version(old)
    except InvalidNameError:
        return None


def pack_delta(header: Mapping[str, Any], payload: bytes) -> bytes:
    """The bytes of a delta file (the encoder's last step)."""
    raw = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return DELTA_MAGIC + struct.pack(">I", len(raw)) + raw + payload


# ---------------------------------------------------------------------------- byte planes


def to_planes(data: bytes, planes: int) -> bytes:
    """``data`` as ``planes`` byte planes (byte 0 of every element, then byte 1, ...)."""
    if planes <= 1:
        return data
    import numpy as np

    return np.frombuffer(data, dtype=np.uint8).reshape(-1, planes).T.tobytes()


def from_planes(data: bytes, planes: int) -> bytes:
    """The inverse of ``to_planes``."""
    if planes <= 1:
        return data
    import numpy as np

    return np.frombuffer(data, dtype=np.uint8).reshape(planes, -1).T.tobytes()


def xor_bytes(a: bytes, b: bytes) -> bytes:
    """Bytewise XOR of two equal-length byte strings."""
    import numpy as np

    return (np.frombuffer(a, dtype=np.uint8) ^ np.frombuffer(b, dtype=np.uint8)).tobytes()


def zstd_dict(base: bytes) -> Any:
    """A raw-content zstd dictionary of ``base`` (patch-from), or None for no base."""
    import zstandard

    if not base:
        return None
    return zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


# ---------------------------------------------------------------------------- parsing


def _int(doc: Mapping[str, Any], key: str, where: str, limit: int) -> int:
    value = doc.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
        raise DeltaError(f"delta {where}: {key} must be an integer in [0, {limit}], got {value!r}")
    return value


def parse_delta_header(delta: bytes, max_output_bytes: int) -> DeltaHeader:
    """Parse and bound a delta's header; raise DeltaError naming the problem.

    Checks, before any work: magic, schema, names, a known container, every declared
    size within ``max_output_bytes`` (each member, each part, the total), blob ranges
    inside the payload, base ranges inside the declared base members, and that each
    member's body and inserts add up to its size.
    """
    if len(delta) < 12 or delta[:8] != DELTA_MAGIC:
        raise DeltaError("not a delta (bad magic)")
    (length,) = struct.unpack(">I", delta[8:12])
    if length > MAX_HEADER_BYTES or 12 + length > len(delta):
        raise DeltaError(f"delta header of {length} bytes is over the limit or past the file")
    try:
        doc = json.loads(delta[12 : 12 + length])
    except (UnicodeDecodeError, ValueError) as exc:
        raise DeltaError(f"delta header is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("schema") != DELTA_SCHEMA:
        schema = doc.get("schema") if isinstance(doc, dict) else None
        raise DeltaError(f"delta schema expected {DELTA_SCHEMA!r}, got {schema!r}")
    try:
        model = check_name("model", str(doc.get("model")))
        old = check_version(str(doc.get("from")))
        new = check_version(str(doc.get("to")))
    except InvalidNameError as exc:
        raise DeltaError(f"delta header: {exc}") from None
    container = doc.get("container")
    if container not in CONTAINERS:
        raise DeltaError(f"delta for container {container!r}; this agent knows {CONTAINERS}")
    if container == TAR_V2_ZSTD and not isinstance(doc.get("libzstd"), str):
        raise DeltaError(f"delta header: a {TAR_V2_ZSTD} delta must name its libzstd release")
    target = doc.get("target")
    if not isinstance(target, dict) or not isinstance(target.get("sha256"), str):
        raise DeltaError("delta header: target must be {length, sha256}")
    target_length = _int(target, "length", "target", max_output_bytes)
    base = doc.get("base")
    if not isinstance(base, dict):
        raise DeltaError("delta header: base must be an object")
    for name, info in base.items():
        if name not in _MEMBERS or not isinstance(info, dict):
            raise DeltaError(f"delta header: unexpected base member {name!r}")
        # Not bounded by the output: an old member may be larger than the new one. Its
        # real size and sha256 are checked against the installed file before any work.
        _int(info, "size", f"base {name}", 1 << 62)
        if not isinstance(info.get("sha256"), str):
            raise DeltaError(f"delta header: base {name} has no sha256")
    payload_offset = 12 + length
    payload_len = len(delta) - payload_offset
    members = doc.get("members")
    if not isinstance(members, list) or not members:
        raise DeltaError("delta header: members must be a non-empty list")
    total = 0
    seen: set[str] = set()
    for i, member in enumerate(members):
        where = f"members[{i}]"
        if not isinstance(member, dict):
            raise DeltaError(f"delta {where}: expected an object")
        name = member.get("name")
        if name not in _MEMBERS or name in seen:
            raise DeltaError(f"delta {where}: unexpected or repeated member {name!r}")
        seen.add(str(name))
        size = _int(member, "size", where, max_output_bytes)
        total += size
        if total > max_output_bytes:
            raise DeltaError(
                f"delta declares more than {max_output_bytes} bytes of output (at {name})"
            )
        if not isinstance(member.get("sha256"), str):
            raise DeltaError(f"delta {where}: no sha256")
        body_size = _check_part(member.get("body"), f"{where} body", size, payload_len, base)
        inserts = member.get("inserts", [])
        if not isinstance(inserts, list):
            raise DeltaError(f"delta {where}: inserts must be a list")
        at_before, added = 0, 0
        for j, insert in enumerate(inserts):
            if not isinstance(insert, dict):
                raise DeltaError(f"delta {where} inserts[{j}]: expected an object")
            at = _int(insert, "at", f"{where} inserts[{j}]", body_size)
            if at < at_before:
                raise DeltaError(f"delta {where} inserts[{j}]: offsets must not go backwards")
            at_before = at
            added += _check_part(
                insert.get("part"), f"{where} inserts[{j}]", size, payload_len, base
            )
        if body_size + added != size:
            raise DeltaError(
                f"delta {where} ({name}): body and inserts make {body_size + added} bytes, "
                f"the member is declared {size}"
            )
    return DeltaHeader(
        model=model,
        old=old,
        new=new,
        container=str(container),
        target_length=target_length,
        target_sha256=str(target["sha256"]),
        base=base,
        output_bytes=total,
        payload_offset=payload_offset,
        doc=doc,
    )


def _check_part(
    part: Any, where: str, limit: int, payload_len: int, base: Mapping[str, Any]
) -> int:
    if not isinstance(part, dict):
        raise DeltaError(f"delta {where}: expected an object")
    op = part.get("op")
    if op not in OPS:
        raise DeltaError(f"delta {where}: unknown op {op!r}; expected one of {OPS}")
    size = _int(part, "size", where, limit)
    planes = part.get("planes", 1)
    if planes not in (1, 2, 4, 8) or size % planes:
        raise DeltaError(f"delta {where}: planes {planes!r} does not divide size {size}")
    ranges = part.get("base", [])
    if not isinstance(ranges, list):
        raise DeltaError(f"delta {where}: base must be a list of [member, offset, length]")
    base_len = 0
    for r in ranges:
        if (
            not isinstance(r, list)
            or len(r) != 3
            or r[0] not in base
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in r[1:])
            or r[1] + r[2] > base[r[0]]["size"]
        ):
            raise DeltaError(
                f"delta {where}: base range {r!r} is not inside a declared base member"
            )
        base_len += r[2]
    if op in ("copy", "xor") and base_len != size:
        raise DeltaError(f"delta {where}: {op} needs {size} base bytes, names {base_len}")
    if op != "copy":
        blob = part.get("blob")
        if (
            not isinstance(blob, list)
            or len(blob) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in blob)
            or blob[0] + blob[1] > payload_len
        ):
            raise DeltaError(f"delta {where}: blob {blob!r} is not inside the payload")
    return size


# ---------------------------------------------------------------------------- applying


def apply_delta(
    delta: bytes,
    read_base: Callable[[str], bytes],
    *,
    model: str,
    old: str,
    new: str,
    max_output_bytes: int,
) -> bytes:
    """Rebuild version ``new``'s bundle file from version ``old``'s installed members.

    ``read_base(name)`` returns the installed member's bytes (raising OSError when it is
    missing). The result must still be verified against the signed target by the caller.
    Raises DeltaError (a bad or foreign delta, a base that is not the one expected, an
    output that is not what the header declares) or OSError (a base member unreadable).
    """
    header = parse_delta_header(delta, max_output_bytes)
    if (header.model, header.old, header.new) != (model, old, new):
        raise DeltaError(
            f"delta is {header.model} {header.old} → {header.new}, expected {model} {old} → {new}"
        )
    if header.container == TAR_V2_ZSTD and header.doc["libzstd"] != libzstd_version():
        raise DeltaError(
            f"delta rebuilds a bundle compressed with libzstd {header.doc['libzstd']}, this "
            f"agent has libzstd {libzstd_version()} (frames may differ across releases): "
            "not tried"
        )
    base: dict[str, bytes] = {}
    for name, info in sorted(header.base.items()):
        data = read_base(name)
        if len(data) != info["size"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
            raise DeltaError(
                f"installed {name} of {model} {old} is not the one the delta was made from "
                f"(expected size {info['size']} sha256 {str(info['sha256'])[:16]}…)"
            )
        base[name] = data
    payload = memoryview(delta)[header.payload_offset :]
    members: list[tuple[str, bytes]] = []
    for member in header.doc["members"]:
        name = member["name"]
        body = _run_part(member["body"], payload, base, f"{name} body")
        pieces, cursor = [], 0
        for j, insert in enumerate(member.get("inserts", [])):
            pieces.append(body[cursor : insert["at"]])
            pieces.append(_run_part(insert["part"], payload, base, f"{name} inserts[{j}]"))
            cursor = insert["at"]
        pieces.append(body[cursor:])
        data = b"".join(pieces)
        if len(data) != member["size"] or hashlib.sha256(data).hexdigest() != member["sha256"]:
            raise DeltaError(f"delta rebuilt {name} with another size or sha256 than it declares")
        members.append((name, data))
    try:
        out = write_container(header.container, members)
    except BundleError as exc:
        raise DeltaError(str(exc)) from None
    if len(out) != header.target_length:
        raise DeltaError(f"delta rebuilt {len(out)} bytes, its header says {header.target_length}")
    return out


def _base_bytes(part: Mapping[str, Any], base: Mapping[str, bytes]) -> bytes:
    return b"".join(base[m][o : o + n] for m, o, n in part.get("base", []))


def _run_part(
    part: Mapping[str, Any], payload: memoryview, base: Mapping[str, bytes], where: str
) -> bytes:
    import zstandard

    size = part["size"]
    ref = _base_bytes(part, base)
    if part["op"] == "copy":
        return ref
    offset, length = part["blob"]
    blob = payload[offset : offset + length]
    dictionary = zstd_dict(ref) if part["op"] == "zstd" else None
    try:
        dctx = zstandard.ZstdDecompressor(dict_data=dictionary, max_window_size=MAX_WINDOW_BYTES)
        with dctx.stream_reader(bytes(blob)) as reader:
            data = reader.read(size + 1)
            # ``read`` may return less than asked before the end: read on to the bound.
            while len(data) <= size:
                more = reader.read(size + 1 - len(data))
                if not more:
                    break
                data += more
    except zstandard.ZstdError as exc:
        raise DeltaError(f"delta {where}: cannot decompress: {exc}") from None
    if len(data) != size:
        raise DeltaError(
            f"delta {where}: decompressed to {'more than' if len(data) > size else ''} "
            f"{len(data) if len(data) <= size else size} bytes, declared {size}"
        )
    data = from_planes(data, int(part.get("planes", 1)))
    if part["op"] == "xor":
        data = xor_bytes(data, ref)
    return data
