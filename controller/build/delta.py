"""Writing a delta between two bundle files (the format: ``agent.contracts.delta``).

``make_delta(old_bundle, new_bundle)`` reads both containers (``read_container``: the
members unpacked, a format 2 bundle's frames decompressed under its manifest's bounds;
the old bundle's format does not matter, the device holds its members unpacked), then for
each member of the new bundle:

- ``model.onnx`` is split into its tensors (each initializer's ``raw_data``) and the rest
  of the protobuf. A tensor whose bytes exist in the old model is ``copy``; one of the
  same name and size is the smaller of ``xor`` against the old tensor and plain
  ``zstd``; any other is ``zstd`` (new). The rest of the protobuf is ``zstd`` with the old
  model's rest as dictionary. Byte planes (the element size) are tried for tensors.
- ``golden.npz`` (a stored zip) is split the same way into its arrays, matched by name.
- every other member is ``copy`` when unchanged, else ``zstd`` with its old counterpart as
  dictionary (or without, whichever is smaller).

The result is checked before it is returned: applying it to the old members must give the
new bundle's exact bytes (``DeltaError`` otherwise, saying so when the new bundle itself
is not what ``write_container`` writes, e.g. a format 2 bundle compressed by another
libzstd release). A format 2 delta records this process's libzstd release, the one that
reproduced the bundle. Pure: bytes in, bytes out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from agent.contracts import BUNDLE_GOLDEN, BUNDLE_MANIFEST, BUNDLE_MODEL, parse_manifest
from agent.contracts.bundle_container import TAR_V2_ZSTD, read_container, write_container
from agent.contracts.compression import libzstd_version
from agent.contracts.delta import (
    DELTA_SCHEMA,
    DeltaError,
    apply_delta,
    pack_delta,
    to_planes,
    xor_bytes,
    zstd_dict,
)

# Dictionary (patch-from) compression costs time on large inputs and gains only when the
# ranges line up; above this, a part is compressed without one.
_MAX_DICT_BYTES: Final = 2 << 20
# Element size of ONNX TensorProto.DataType values, for byte planes.
_ELEMENT_SIZE: Final = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}


@dataclass(frozen=True)
class Tensor:
    """One initializer's ``raw_data`` inside a model file."""

    name: str
    offset: int
    size: int
    planes: int


def _level(size: int, ref: bytes) -> int:
    # A raw-content dictionary finds far matches only at the high levels.
    return 19 if size <= (1 << 20) or ref else 9


def _zstd(data: bytes, ref: bytes = b"") -> bytes:
    import zstandard

    window = max(10, min(27, (len(data) + len(ref)).bit_length() + 1))
    params = zstandard.ZstdCompressionParameters.from_level(
        _level(len(data), ref), window_log=window, source_size=len(data), write_content_size=True
    )
    return zstandard.ZstdCompressor(dict_data=zstd_dict(ref), compression_params=params).compress(
        data
    )


# ---------------------------------------------------------------------------- ONNX protobuf


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value start, value end or the varint value) in a message."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, pos, value
        elif wire == 1:
            pos += 8
            yield number, wire, pos - 8, pos
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise ValueError("field past its message")
            yield number, wire, pos, pos + length
            pos += length
        elif wire == 5:
            pos += 4
            yield number, wire, pos - 4, pos
        else:
            raise ValueError(f"unsupported wire type {wire}")
    if pos != end:
        raise ValueError("message overruns its end")


def onnx_tensors(model: bytes) -> list[Tensor]:
    """The ``raw_data`` of each initializer of the main graph (ModelProto.graph = 7,
    GraphProto.initializer = 5, TensorProto name = 8, data_type = 2, raw_data = 9), in
    file order. An unparsable model gives no tensors (it is then patched as bytes)."""
    found: list[Tensor] = []
    try:
        for number, wire, start, end in _fields(model, 0, len(model)):
            if number != 7 or wire != 2:
                continue
            for gnum, gwire, gstart, gend in _fields(model, start, end):
                if gnum != 5 or gwire != 2:
                    continue
                name, dtype, raw = "", 0, None
                for tnum, twire, tstart, tend in _fields(model, gstart, gend):
                    if tnum == 8 and twire == 2:
                        name = model[tstart:tend].decode("utf-8", "replace")
                    elif tnum == 2 and twire == 0:
                        dtype = tend
                    elif tnum == 9 and twire == 2:
                        raw = (tstart, tend)
                if raw is not None and raw[1] > raw[0]:
                    planes = _ELEMENT_SIZE.get(dtype, 1)
                    size = raw[1] - raw[0]
                    found.append(Tensor(name, raw[0], size, planes if size % planes == 0 else 1))
    except ValueError:
        return []
    return sorted(found, key=lambda t: t.offset)


def npz_arrays(npz: bytes) -> list[Tensor]:
    """The data of each entry of a stored (uncompressed) zip, as written for
    ``golden.npz``: local file headers in order; [] for anything else."""
    import struct

    found: list[Tensor] = []
    pos = 0
    while npz[pos : pos + 4] == b"PK\x03\x04":
        if pos + 30 > len(npz):
            return []
        flags, method = struct.unpack("<HH", npz[pos + 6 : pos + 10])
        size = struct.unpack("<I", npz[pos + 18 : pos + 22])[0]
        name_len, extra_len = struct.unpack("<HH", npz[pos + 26 : pos + 30])
        start = pos + 30 + name_len + extra_len
        if method != 0 or flags & 0x08 or start + size > len(npz):
            return []
        name = npz[pos + 30 : pos + 30 + name_len].decode("utf-8", "replace")
        if size:
            found.append(Tensor(name, start, size, 4 if size % 4 == 0 else 1))
        pos = start + size
    return found


def _rest_ranges(size: int, tensors: list[Tensor]) -> list[tuple[int, int]]:
    """(offset, length) of the bytes of a model outside its tensors."""
    out, cursor = [], 0
    for t in tensors:
        if t.offset > cursor:
            out.append((cursor, t.offset - cursor))
        cursor = t.offset + t.size
    if size > cursor:
        out.append((cursor, size - cursor))
    return out


# ---------------------------------------------------------------------------- encoding


class _Payload:
    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, blob: bytes) -> list[int]:
        self.parts.append(blob)
        self.size += len(blob)
        return [self.size - len(blob), len(blob)]


def _best(
    payload: _Payload, data: bytes, ref_ranges: list[list[Any]], ref: bytes, planes: int
) -> dict[str, Any]:
    """The smallest part that makes ``data`` from ``ref`` (the bytes of ``ref_ranges``)."""
    if ref == data:
        return {"op": "copy", "size": len(data), "base": ref_ranges}
    candidates: list[tuple[bytes, dict[str, Any]]] = []
    plane_options = sorted({1, planes})
    for k in plane_options:
        candidates.append((_zstd(to_planes(data, k)), {"op": "zstd", "planes": k}))
    if ref and len(ref) == len(data):
        diff = xor_bytes(data, ref)
        for k in plane_options:
            candidates.append(
                (_zstd(to_planes(diff, k)), {"op": "xor", "planes": k, "base": ref_ranges})
            )
    if ref and len(ref) <= _MAX_DICT_BYTES and len(data) <= _MAX_DICT_BYTES:
        candidates.append((_zstd(data, ref), {"op": "zstd", "planes": 1, "base": ref_ranges}))
    blob, part = min(candidates, key=lambda c: len(c[0]))
    part = {"size": len(data), **part, "blob": payload.add(blob)}
    if part["planes"] == 1:
        del part["planes"]
    return part


def _segmented_member(
    payload: _Payload,
    member: str,
    new: bytes,
    old: bytes | None,
    segments: Callable[[bytes], list[Tensor]],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(body part, inserts) of a member split into named segments (tensors, arrays)."""
    new_tensors = segments(new)
    old_tensors = segments(old) if old is not None else []
    old_rest = _rest_ranges(len(old), old_tensors) if old is not None else []
    rest = b"".join(new[o : o + n] for o, n in _rest_ranges(len(new), new_tensors))
    old_rest_bytes = b"".join(old[o : o + n] for o, n in old_rest) if old is not None else b""
    body = _best(payload, rest, [[member, o, n] for o, n in old_rest], old_rest_bytes, planes=1)
    old_bytes = old or b""
    by_hash = {
        hashlib.sha256(old_bytes[t.offset : t.offset + t.size]).digest(): t for t in old_tensors
    }
    by_name = {t.name: t for t in old_tensors}
    inserts = []
    removed = 0  # tensor bytes before this one, which the body does not hold
    for t in new_tensors:
        data = new[t.offset : t.offset + t.size]
        same = by_hash.get(hashlib.sha256(data).digest())
        base = same or by_name.get(t.name)
        if base is not None and old is not None:
            ranges = [[member, base.offset, base.size]]
            ref = old[base.offset : base.offset + base.size]
        else:
            ranges, ref = [], b""
        part = _best(payload, data, ranges, ref, t.planes)
        inserts.append({"at": t.offset - removed, "part": part})
        removed += t.size
    return body, inserts


_SEGMENTS: Final[dict[str, Callable[[bytes], list[Tensor]]]] = {
    BUNDLE_MODEL: onnx_tensors,
    BUNDLE_GOLDEN: npz_arrays,
}


def make_delta(old_bundle: bytes, new_bundle: bytes) -> bytes:
    """A delta that rebuilds ``new_bundle`` from the members of ``old_bundle``.

    Raises DeltaError when the bundles are not two versions of one model, or a container
    this version cannot reproduce, or when the delta would not rebuild the exact bytes.
    """
    # The old container does not matter (the device holds its members unpacked); the new
    # one's reproduction is checked below by the rebuild itself, without compressing twice.
    _, old_members = read_container(old_bundle, verify=False)
    kind, new_members = read_container(new_bundle, verify=False)
    old_map = dict(old_members)
    new_manifest = parse_manifest(dict(new_members)[BUNDLE_MANIFEST])
    old_manifest = parse_manifest(old_map[BUNDLE_MANIFEST])
    if old_manifest.name != new_manifest.name:
        raise DeltaError(
            f"a delta joins two versions of one model, not {old_manifest.name} and "
            f"{new_manifest.name}"
        )
    payload = _Payload()
    members = []
    for name, data in new_members:
        old = old_map.get(name)
        if name in _SEGMENTS:
            body, inserts = _segmented_member(payload, name, data, old, _SEGMENTS[name])
        else:
            ranges = [[name, 0, len(old)]] if old is not None else []
            body, inserts = _best(payload, data, ranges, old or b"", planes=1), []
        member: dict[str, Any] = {
            "name": name,
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "body": body,
        }
        if inserts:
            member["inserts"] = inserts
        members.append(member)
    parts = [p for m in members for p in [m["body"], *(i["part"] for i in m.get("inserts", []))]]
    used = sorted({r[0] for p in parts for r in p.get("base", [])})
    header = {
        "schema": DELTA_SCHEMA,
        "model": new_manifest.name,
        "from": old_manifest.version,
        "to": new_manifest.version,
        "container": kind,
        **({"libzstd": libzstd_version()} if kind == TAR_V2_ZSTD else {}),
        "target": {"length": len(new_bundle), "sha256": hashlib.sha256(new_bundle).hexdigest()},
        "base": {
            n: {"size": len(old_map[n]), "sha256": hashlib.sha256(old_map[n]).hexdigest()}
            for n in used
        },
        "members": members,
    }
    delta = pack_delta(header, b"".join(payload.parts))
    rebuilt = apply_delta(
        delta,
        lambda n: old_map[n],
        model=new_manifest.name,
        old=old_manifest.version,
        new=new_manifest.version,
        max_output_bytes=max(len(new_bundle), 1) * 2,
    )
    if rebuilt != new_bundle:
        if write_container(kind, new_members) != new_bundle:
            raise DeltaError(
                f"the new bundle is not what write_container ({kind}) writes for its members"
                + (
                    f" (compressed by another libzstd than this one, {libzstd_version()}?)"
                    if kind == TAR_V2_ZSTD
                    else ""
                )
                + ": no delta can rebuild it"
            )
        raise DeltaError("the delta does not rebuild the new bundle's exact bytes")
    return delta
