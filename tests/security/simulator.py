"""A repository simulator for the attack suite: a real repository plus a hostile mirror.

``HostileMirror`` is a real HTTP server on 127.0.0.1 that serves a repository folder the
way any static host would (``Range`` included), until a test tells it to misbehave for a
path: serve other bytes (tamper, replay, roll back, mix and match), stream without end,
drip under the read timeout, or cut the connection half way; or to alter every file
under a prefix (``tamper_prefix``).

``Forger`` writes metadata the way an attacker holding some keys would: any role,
any version, signed by whatever keys the attacker has, published under a snapshot and
timestamp signed with the (compromised) online keys. ``evil_desired_state`` is the
desired state such an attacker signs with the rollout key.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from securesystemslib.signer import Signer
from tuf.api.metadata import Metadata, MetaFile
from tuf.api.serialization.json import JSONSerializer

from agent.contracts import (
    DesiredState,
    ModelRelease,
    ProbationPolicy,
    ShadowPolicy,
    bundle_target_path,
)
from controller.repository.repo import Repository
from controller.serve.http import resolve_static

# ---------------------------------------------------------------------------- behaviours


@dataclass
class Replace:
    """Serve these bytes instead of the file (tampered, replayed or mixed-in bytes)."""

    data: bytes


@dataclass
class Endless:
    """Claim nothing and stream filler until the client hangs up (or 30 s pass)."""

    chunk: bytes = b"A" * 65536


@dataclass
class Drip:
    """Send the real bytes, ``size`` bytes every ``interval_s`` (under the read timeout)."""

    size: int = 8
    interval_s: float = 0.2


@dataclass
class Cut:
    """Announce the whole length, send only the first ``fraction``, then hang up; once."""

    fraction: float = 0.5
    used: bool = False


Behaviour = Replace | Endless | Drip | Cut


class HostileMirror:
    """A static HTTP host for ``repo_dir`` with per-path misbehaviour."""

    def __init__(self, repo_dir: Path) -> None:
        self.repo_dir = repo_dir
        self.behaviours: dict[str, Behaviour] = {}
        self.metadata_dir: Path | None = None  # replay a captured metadata folder
        # Flip a byte in the middle of every file served under this URL path prefix (a
        # tampering mirror that does not know which file it will be asked for).
        self.tamper_prefix: str | None = None
        self.requests: list[tuple[str, str]] = []  # (path, Range header)
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                mirror._handle(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def set(self, path: str, behaviour: Behaviour) -> None:
        self.behaviours[path] = behaviour

    def clear(self) -> None:
        self.behaviours.clear()
        self.metadata_dir = None

    def fetched(self, path: str) -> list[str]:
        """The Range headers of every request for ``path`` ("" without one)."""
        return [rng for p, rng in self.requests if p == path]

    # ------------------------------------------------------------------ serving

    def _file(self, path: str) -> bytes | None:
        top, _, tail = path.lstrip("/").partition("/")
        if top not in ("metadata", "targets"):
            return None
        base = self.repo_dir / top
        if top == "metadata" and self.metadata_dir is not None:
            base = self.metadata_dir
        found = resolve_static(base, tail)
        return found.read_bytes() if found else None

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?", 1)[0]
        self.requests.append((path, h.headers.get("Range") or ""))
        behaviour = self.behaviours.get(path)
        if isinstance(behaviour, Endless):
            return _endless(h, behaviour)
        data = behaviour.data if isinstance(behaviour, Replace) else self._file(path)
        if data and self.tamper_prefix is not None and path.startswith(self.tamper_prefix):
            flipped = bytearray(data)
            flipped[len(flipped) // 2] ^= 0xFF
            data = bytes(flipped)
        if data is None:
            h.send_response(404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return None
        start = _range_start(h.headers.get("Range"))
        if start is not None and 0 < start < len(data):
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            start = 0
            h.send_response(200)
        body = data[start:]
        h.send_header("Content-Length", str(len(body)))
        if isinstance(behaviour, Cut | Drip):
            h.send_header("Connection", "close")
        h.end_headers()
        try:
            if isinstance(behaviour, Cut) and not behaviour.used:
                behaviour.used = True
                h.wfile.write(body[: int(len(data) * behaviour.fraction) - start])
                h.wfile.flush()
                h.close_connection = True
            elif isinstance(behaviour, Drip):
                _drip(h, body, behaviour)
            else:
                h.wfile.write(body)
        except OSError:
            h.close_connection = True
        return None


def _range_start(header: str | None) -> int | None:
    if not header or not header.startswith("bytes=") or not header.endswith("-"):
        return None
    text = header.removeprefix("bytes=").removesuffix("-")
    return int(text) if text.isdigit() else None


def _endless(h: BaseHTTPRequestHandler, behaviour: Endless) -> None:
    h.send_response(200)
    h.send_header("Connection", "close")
    h.end_headers()  # no length: the body ends when the connection does
    h.close_connection = True
    stop = time.monotonic() + 30
    try:
        while time.monotonic() < stop:
            h.wfile.write(behaviour.chunk)
    except OSError:
        return


def _drip(h: BaseHTTPRequestHandler, body: bytes, drip: Drip) -> None:
    h.close_connection = True
    stop = time.monotonic() + 30
    for i in range(0, len(body), drip.size):
        if time.monotonic() > stop:
            return
        h.wfile.write(body[i : i + drip.size])
        h.wfile.flush()
        time.sleep(drip.interval_s)


# ---------------------------------------------------------------------------- forging


class Forger:
    """Writes metadata as an attacker would, straight into the repository folder."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self._serializer = JSONSerializer(compact=False)

    def _now(self) -> datetime:
        return datetime.now(UTC).replace(microsecond=0)

    def make(
        self,
        role: str,
        mutate: Callable[[Any], None],
        signers: list[Signer],
        *,
        expires: datetime | None = None,
    ) -> Metadata[Any]:
        """The current ``role`` changed by ``mutate``, as the next version, signed by
        ``signers`` only (not written anywhere: serve it with the mirror)."""
        md = self.repo.load(role)
        mutate(md.signed)
        md.signed.version += 1
        md.signed.expires = expires or self._now() + self.repo.policy.lifetime(role)
        md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)
        return md

    def write(
        self,
        role: str,
        mutate: Callable[[Any], None],
        signers: list[Signer],
        *,
        expires: datetime | None = None,
    ) -> Metadata[Any]:
        """``make``, then write it into the repository under its consistent-snapshot name
        (the repository's own view follows it, as a compromised server's would)."""
        md = self.make(role, mutate, signers, expires=expires)
        name = "timestamp.json" if role == "timestamp" else f"{md.signed.version}.{role}.json"
        (self.repo.metadata_dir / name).write_bytes(md.to_bytes(self._serializer))
        return md

    def publish(self, role: str, version: int) -> None:
        """A snapshot naming ``role`` at ``version`` and a timestamp naming it, signed by
        the real online keys (what a compromised controller can do)."""
        snapshot_keys = list(self.repo.signers("snapshot").values())
        timestamp_keys = list(self.repo.signers("timestamp").values())
        snapshot = self.write(
            "snapshot",
            lambda s: s.meta.__setitem__(f"{role}.json", MetaFile(version=version)),
            snapshot_keys,
        )
        self.write(
            "timestamp",
            lambda t: setattr(t, "snapshot_meta", MetaFile(version=snapshot.signed.version)),
            timestamp_keys,
        )


def evil_desired_state(fleet: str, model: str, version: str) -> bytes:
    """A desired state sending every device of ``fleet`` from ``model`` 1.0.0 to
    ``version`` at once, with no probation nor shadow: what an attacker signs with the
    rollout key."""
    entry = ModelRelease(
        version=version,
        target=bundle_target_path(model, version),
        rollout_id=f"evil-{version}",
        percent=100.0,
        previous="1.0.0",
        previous_target=bundle_target_path(model, "1.0.0"),
        probation=ProbationPolicy(duration_s=0),
        shadow=ShadowPolicy(enabled=False),
    )
    return DesiredState(fleet=fleet, models={model: entry}, issued_at="x").to_json_bytes()


def capture_metadata(repo: Repository, into: Path) -> Path:
    """A copy of the metadata folder as it is now (for replays)."""
    shutil.copytree(repo.metadata_dir, into)
    return into
