"""HTTP/1.1 at the byte level, for the fault proxy: heads, lengths, and answers altered.

No HTTP library: the proxy must be able to send what no library would (a body cut short,
a Content-Length that matches altered bytes, garbage). Requests and answers are framed by
their head (through the blank line) and Content-Length; an answer without one is read to
the end of its connection.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)[ \t]*", re.I)
_VERSION_FIELD = re.compile(rb'"version":\s*(\d+)')
_CONNECTION_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.I)
MAX_HEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class HttpDecision:
    """One request's fault, drawn whole when the request arrives (``tests.chaos.proxy``)."""

    kind: str
    fraction: float
    early: bool
    stall_s: float
    status: int
    variant: str
    extra: int
    garbage: bytes


async def read_head(reader: asyncio.StreamReader) -> bytes | None:
    """Bytes through the blank line; None on a clean end of stream before any byte."""
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise
    except asyncio.LimitOverrunError:
        raise ValueError(f"a head longer than {MAX_HEAD_BYTES} bytes") from None


def content_length(head: bytes) -> int | None:
    match = CONTENT_LENGTH.search(head)
    return int(match.group(1)) if match else None


def request_path(request: bytes) -> str:
    line = request.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ")
    return parts[1] if len(parts) > 1 else line


def status(head: bytes) -> int:
    try:
        return int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0


def closes(head: bytes) -> bool:
    return _CONNECTION_CLOSE.search(head) is not None


def with_length(head: bytes, length: int) -> bytes:
    return CONTENT_LENGTH.sub(f"\r\nContent-Length: {length}".encode(), head, count=1)


def status_response(code: int) -> bytes:
    """A complete answer with status ``code``, as if from the server."""
    body = f"chaos proxy: {code}\n".encode()
    return (
        f"HTTP/1.1 {code} Chaos\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def alter(path: str, head: bytes, body: bytes, d: HttpDecision) -> tuple[str, bytes, str] | None:
    """The altered answer (kind, bytes, detail), or None when there is no body to alter."""
    if status(head) not in (200, 206) or not body or content_length(head) is None:
        return None
    if d.kind == "http.oversize":
        grown = body + bytes(d.garbage * (d.extra // len(d.garbage) + 1))[: d.extra]
        return "http.oversize", with_length(head, len(grown)) + grown, f"+{d.extra} bytes"
    metadata = "/metadata/" in path
    variant = d.variant if metadata else "flip"
    if variant == "flip":
        at = min(len(body) - 1, int(d.fraction * len(body)))
        changed = body[:at] + bytes([body[at] ^ (1 + d.extra % 255)]) + body[at + 1 :]
    elif variant == "truncate_json":
        changed = body[: int(d.fraction * len(body))]
    elif variant == "version" and _VERSION_FIELD.search(body):
        changed = _VERSION_FIELD.sub(
            lambda m: b'"version": ' + str(int(m.group(1)) + 1).encode(), body, count=1
        )
    else:
        changed, variant = b'{"signed": {"_type": "junk"}, "signatures": []}', "junk"
    kind = "http.corrupt_metadata" if metadata else "http.corrupt_target"
    return kind, with_length(head, len(changed)) + changed, variant
