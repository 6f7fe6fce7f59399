"""The repository over MQTT, on the wire: topics, chunk requests and chunk answers.

The contract (``docs/protocol.md``, "Repository over MQTT") lives here because the agent
owns its contracts; ``agent.update.mqtt_fetcher`` asks with it and
``controller.serve.mqtt_repo`` answers it.

- A device publishes chunk requests (JSON, ``edgefleet.repo-request/1``) on
  ``edgefleet/v1/fleets/{fleet}/devices/{device}/repo/request`` and reads answers on
  ``.../repo/response`` (QoS 1 both ways, never retained).
- An answer (``edgefleet.repo-chunk/1``) is one line of JSON, a newline, then the raw
  bytes: ``status`` 200 (bytes from ``offset``), 404 (no such file: the TUF client's
  404), 503 (busy: ask again later), 400 (bad request).
- A chunk carries at most ``MAX_CHUNK_BYTES``; both sides refuse to ask or answer more.

Invariants: parsers raise ``ValueError`` naming the field, what was expected and what was
got; topics are built only from names ``check_name`` accepts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from agent.contracts.names import TOPIC_ROOT, check_name

MAX_CHUNK_BYTES: Final = 1024 * 1024
REQUEST_SCHEMA: Final = "edgefleet.repo-request/1"
CHUNK_SCHEMA: Final = "edgefleet.repo-chunk/1"
REQUEST_FILTER: Final = f"{TOPIC_ROOT}/fleets/+/devices/+/repo/request"
REPO_DIRS: Final = ("metadata", "targets")


def _device_root(fleet: str, device: str) -> str:
    return (
        f"{TOPIC_ROOT}/fleets/{check_name('fleet', fleet)}/devices/{check_name('device', device)}"
    )


def request_topic(fleet: str, device: str) -> str:
    """Device → controller: chunk requests."""
    return f"{_device_root(fleet, device)}/repo/request"


def response_topic(fleet: str, device: str) -> str:
    """Controller → device: answers."""
    return f"{_device_root(fleet, device)}/repo/response"


def parse_request_topic(topic: str) -> tuple[str, str]:
    """``.../fleets/F/devices/D/repo/request`` → (F, D); ValueError otherwise."""
    parts = topic.split("/")
    if (
        len(parts) != 8
        or "/".join(parts[:3]) != f"{TOPIC_ROOT}/fleets"
        or parts[4] != "devices"
        or parts[6:] != ["repo", "request"]
    ):
        raise ValueError(f"not a repository request topic: {topic!r}")
    return check_name("fleet", parts[3]), check_name("device", parts[5])


@dataclass(frozen=True)
class ChunkRequest:
    transfer: str
    path: str
    offset: int
    size: int

    def to_bytes(self) -> bytes:
        doc = {
            "schema": REQUEST_SCHEMA,
            "transfer": self.transfer,
            "path": self.path,
            "offset": self.offset,
            "size": self.size,
        }
        return json.dumps(doc, separators=(",", ":")).encode()


def parse_request(raw: bytes) -> ChunkRequest:
    """Parse a chunk request; ValueError naming what is wrong."""
    doc = json.loads(raw)
    if not isinstance(doc, dict) or doc.get("schema") != REQUEST_SCHEMA:
        raise ValueError(f"schema expected {REQUEST_SCHEMA!r}")
    transfer, path = doc.get("transfer"), doc.get("path")
    offset, size = doc.get("offset"), doc.get("size")
    if not isinstance(transfer, str) or not 0 < len(transfer) <= 64:
        raise ValueError("transfer expected a short string")
    if not isinstance(path, str) or path.split("/", 1)[0] not in REPO_DIRS:
        raise ValueError(f"path expected metadata/... or targets/..., got {path!r}")
    for key, value in (("offset", offset), ("size", size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{key} expected an integer >= 0, got {value!r}")
    return ChunkRequest(transfer, path, int(offset), int(size))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Chunk:
    """One answer: ``status``, and for 200 the bytes at ``offset`` of a file of ``total``."""

    transfer: str
    status: int
    offset: int = 0
    total: int = 0
    data: bytes = b""
    error: str = ""

    def to_bytes(self) -> bytes:
        doc: dict[str, Any] = {
            "schema": CHUNK_SCHEMA,
            "transfer": self.transfer,
            "status": self.status,
            "offset": self.offset,
            "total": self.total,
        }
        if self.error:
            doc["error"] = self.error
        return json.dumps(doc, separators=(",", ":")).encode() + b"\n" + self.data


def parse_chunk(raw: bytes) -> Chunk:
    """Parse an answer; ValueError naming what is wrong."""
    head, sep, data = raw.partition(b"\n")
    if not sep:
        raise ValueError("no header line")
    doc = json.loads(head)
    if not isinstance(doc, dict) or doc.get("schema") != CHUNK_SCHEMA:
        raise ValueError(f"schema expected {CHUNK_SCHEMA!r}")
    fields = {k: doc.get(k) for k in ("status", "offset", "total")}
    for key, value in fields.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{key} expected an integer >= 0, got {value!r}")
    transfer = doc.get("transfer")
    if not isinstance(transfer, str):
        raise ValueError("transfer expected a string")
    error = doc.get("error", "")
    return Chunk(
        transfer=transfer,
        status=int(fields["status"]),  # type: ignore[arg-type]
        offset=int(fields["offset"]),  # type: ignore[arg-type]
        total=int(fields["total"]),  # type: ignore[arg-type]
        data=data,
        error=str(error)[:200],
    )
