"""Local inference: the Open Inference Protocol v2 (REST) over a Unix socket.

The stack is deliberately lean for per-request latency: asyncio's servers, one
``asyncio.Protocol`` per connection, httptools (llhttp) as the HTTP/1.1 parser,
precomputed response heads, no framework. Three layers:

- ``agent.server`` (this module): the ``InferenceServer`` lifecycle — listeners, limits,
  the thread pool, peer credentials and the allow-list, timeouts, ``from_config``;
- ``agent.routes``: routing each request to its endpoint, and where an infer request
  runs (inline on the loop or in the pool);
- ``agent.http11``: the HTTP/1.1 transport — parsing, pipelining, response writing.

Invariants:
- Bad input never gets a 5xx and never crashes the server: a peer outside the
  allow-list → 403 and too many connections → 503 with Retry-After (here); the
  transport and the router map the rest (see their docstrings).
- The socket is created with its mode (and group) before it listens, so no client can
  connect through a wider mode, and ``stop`` removes the socket file.
- Header, body and idle timeouts are enforced by one sweeper task, at a quarter of the
  shortest timeout (at most 1 s between sweeps).
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import pwd
import socket
import stat
import struct
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Final

import agent
from agent.errors import ConfigError
from agent.http11 import RETRY_AFTER, Connection, Response
from agent.metrics import InferenceMetrics
from agent.oip import EXTENSIONS
from agent.routes import Router
from agent.routes import RunTimes as _RunTimes
from agent.runtime import LoadedModel, ModelRegistry
from agent.shm import SharedMemoryRegistry
from agent.stats import RequestStats

if TYPE_CHECKING:
    from agent.config import InferenceConfig

__all__ = ["InferenceServer", "_RunTimes"]  # _RunTimes: the limit tests import it here

logger = logging.getLogger(__name__)

_UNIX_PATH_MAX: Final = 107
_PEERCRED: Final = struct.Struct("3i")


class InferenceServer:
    """OIP v2 over a Unix socket (and optionally loopback TCP), serving the live models of
    a ``ModelRegistry``.

    ``is_ready`` says whether the agent as a whole may serve (default: at least one
    model is live); when it returns False, health/ready answers 503 and infer requests
    get 503. Every infer request is recorded in ``stats`` (when given) under the version
    that served it, and in ``metrics``. ``from_config`` builds one from ``[inference]``.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        socket_path: Path,
        *,
        socket_mode: int = 0o660,
        socket_group: str = "",
        max_body_bytes: int = 64 * 1024 * 1024,
        max_concurrency: int = 4,
        max_queue: int = 32,
        max_connections: int = 256,
        header_timeout_s: float = 10.0,
        body_timeout_s: float = 30.0,
        request_deadline_s: float = 30.0,
        idle_timeout_s: float = 60.0,
        inline_max_run_s: float = 0.001,
        allowed_uids: Iterable[int] = (),
        allowed_gids: Iterable[int] = (),
        tcp_port: int = 0,
        tcp_host: str = "127.0.0.1",
        shared_memory: bool = True,
        is_ready: Callable[[], bool] | None = None,
        stats: RequestStats | None = None,
        metrics: InferenceMetrics | None = None,
    ) -> None:
        positive = {
            "max_body_bytes": max_body_bytes,
            "max_concurrency": max_concurrency,
            "max_connections": max_connections,
            "header_timeout_s": header_timeout_s,
            "body_timeout_s": body_timeout_s,
            "request_deadline_s": request_deadline_s,
            "idle_timeout_s": idle_timeout_s,
        }
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{key} expected > 0, got {value}")
        if max_queue < 0 or inline_max_run_s < 0:
            raise ConfigError(
                f"max_queue and inline_max_run_s expected >= 0, got {max_queue}, {inline_max_run_s}"
            )
        self.registry = registry
        self.stats = stats
        self.metrics = metrics if metrics is not None else InferenceMetrics()
        self.socket_path = Path(socket_path)
        self.socket_mode = socket_mode
        self.socket_group = socket_group
        self.max_body_bytes = max_body_bytes
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.request_deadline_s = request_deadline_s
        self.idle_timeout_s = idle_timeout_s
        self.inline_max_run_s = inline_max_run_s
        self.allowed_uids = frozenset(allowed_uids)
        self.allowed_gids = frozenset(allowed_gids)
        self.tcp_port = tcp_port
        self.tcp_host = tcp_host
        self.shm = SharedMemoryRegistry() if shared_memory else None
        self._servers: list[asyncio.AbstractServer] = []
        self._executor: ThreadPoolExecutor | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._connections: set[Connection] = set()
        extensions = [e for e in EXTENSIONS if shared_memory or e != "system_shared_memory"]
        self._router = Router(
            registry,
            server_metadata=json.dumps(
                {"name": "edge-agent", "version": agent.__version__, "extensions": extensions}
            ).encode(),
            shm=self.shm,
            metrics=self.metrics,
            stats=stats,
            is_ready=is_ready or (lambda: len(registry) > 0),
            max_concurrency=max_concurrency,
            max_queue=max_queue,
            request_deadline_s=request_deadline_s,
            inline_max_run_s=inline_max_run_s,
        )

    @classmethod
    def from_config(
        cls,
        registry: ModelRegistry,
        config: InferenceConfig,
        *,
        is_ready: Callable[[], bool] | None = None,
        stats: RequestStats | None = None,
        metrics: InferenceMetrics | None = None,
    ) -> InferenceServer:
        """A server with every limit and listener taken from the ``[inference]`` section."""
        return cls(
            registry,
            config.socket_path,
            socket_mode=config.socket_mode,
            socket_group=config.socket_group,
            max_body_bytes=config.max_body_bytes,
            max_concurrency=config.max_concurrency,
            max_queue=config.max_queue,
            max_connections=config.max_connections,
            header_timeout_s=config.header_timeout_s,
            body_timeout_s=config.body_timeout_s,
            request_deadline_s=config.request_deadline_s,
            idle_timeout_s=config.idle_timeout_s,
            inline_max_run_s=config.inline_max_run_s,
            allowed_uids=_ids(config.allowed_users, "user"),
            allowed_gids=_ids(config.allowed_groups, "group"),
            tcp_port=config.tcp_port,
            tcp_host=config.tcp_host,
            shared_memory=config.shared_memory,
            is_ready=is_ready,
            stats=stats,
            metrics=metrics,
        )

    @property
    def has_allow_list(self) -> bool:
        return bool(self.allowed_uids or self.allowed_gids)

    # The limit tests watch admission and inline placement through these two.
    @property
    def _admitted(self) -> int:
        return self._router.admitted

    def _runs_inline(self, model: LoadedModel, body_bytes: int) -> bool:
        return self._router.runs_inline(model, body_bytes)

    # -- lifecycle

    async def start(self) -> None:
        """Listen on the socket: remove a stale socket file, bind, chmod/chown, listen;
        then on loopback TCP when ``tcp_port`` is set.

        Raises ConfigError when the path is too long, its directory is missing, it holds
        something other than a socket, another process is listening on it, the group
        does not exist or cannot be set, or the TCP port cannot be bound.
        """
        path = self.socket_path
        if len(os.fsencode(path)) > _UNIX_PATH_MAX:
            raise ConfigError(
                f"socket path {path} is longer than {_UNIX_PATH_MAX} bytes (a Unix socket limit)"
            )
        if not path.parent.is_dir():
            raise ConfigError(f"socket directory {path.parent} does not exist")
        gid = self._group_id()
        self._remove_stale_socket()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(os.fspath(path))
            # Before listen(): no connection sees a wider mode or another group.
            if gid is not None:
                os.chown(path, -1, gid)
            os.chmod(path, self.socket_mode)
        except OSError as exc:
            sock.close()
            path.unlink(missing_ok=True)
            raise ConfigError(f"cannot create socket {path}: {exc}") from None
        loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(
            max_workers=self.max_concurrency, thread_name_prefix="edge-agent-infer"
        )
        self._router.start(self._executor)
        self._servers.append(
            await loop.create_unix_server(
                lambda: Connection(self, self._router.dispatch, unix=True),
                sock=sock,
                backlog=1024,
            )
        )
        logger.info("serving OIP v2 on %s (mode %o)", path, self.socket_mode)
        if self.tcp_port:
            try:
                self._servers.append(
                    await loop.create_server(
                        lambda: Connection(self, self._router.dispatch, unix=False),
                        host=self.tcp_host,
                        port=self.tcp_port,
                        backlog=1024,
                    )
                )
            except OSError as exc:
                await self.stop(grace_s=0)
                raise ConfigError(
                    f"cannot listen on {self.tcp_host}:{self.tcp_port}: {exc}"
                ) from None
            logger.info("serving OIP v2 on http://%s:%d", self.tcp_host, self.tcp_port)
        self._sweeper = loop.create_task(self._sweep(), name="inference-timeouts")

    def tcp_address(self) -> tuple[str, int] | None:
        """The bound TCP (host, port), or None when TCP is off."""
        for server in self._servers:
            assert isinstance(server, asyncio.Server)
            for sock in server.sockets:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    host, port = sock.getsockname()[:2]
                    return str(host), int(port)
        return None

    def _group_id(self) -> int | None:
        if not self.socket_group:
            return None
        if self.socket_group.isdigit():
            return int(self.socket_group)
        try:
            return grp.getgrnam(self.socket_group).gr_gid
        except KeyError:
            raise ConfigError(
                f"socket group {self.socket_group!r} does not exist; create it "
                f"(groupadd --system {self.socket_group}) or change [inference] socket_group"
            ) from None

    def _remove_stale_socket(self) -> None:
        path = self.socket_path
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(os.fspath(path))
        except OSError:
            logger.info("removing stale socket %s", path)
            path.unlink(missing_ok=True)
        else:
            raise ConfigError(f"another process is already serving on {path}")
        finally:
            probe.close()

    async def _sweep(self) -> None:
        """Enforce header, body and idle timeouts (resolution: a quarter of the shortest)."""
        shortest = min(self.header_timeout_s, self.body_timeout_s, self.idle_timeout_s)
        period = min(max(shortest / 4, 0.01), 1.0)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            for connection in list(self._connections):
                connection.check_timeouts(now)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, answer the requests in progress (up to ``grace_s``), close
        every connection, unmap shared memory and remove the socket file."""
        self._router.stop()
        for server in self._servers:
            server.close()
        for connection in list(self._connections):
            connection.shut_down()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self._connections and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for connection in list(self._connections):
            connection.abort()
        for server in self._servers:
            await server.wait_closed()
        self._servers = []
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        if self.shm is not None:
            self.shm.close()
        try:
            if stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                self.socket_path.unlink()
        except FileNotFoundError:
            pass
        logger.info("stopped serving on %s", self.socket_path)

    # -- connections (the http11.Host protocol)

    def connection_opened(
        self, connection: Connection, transport: asyncio.Transport
    ) -> Response | None:
        """Count a new connection; refuse it past ``max_connections`` (503) or when its
        Unix peer is outside the allow-list (403)."""
        self._connections.add(connection)
        self.metrics.connections.set(len(self._connections))
        if len(self._connections) > self.max_connections:
            message = f"too many connections (at most {self.max_connections})"
            return Response.error(503, message, close=True, extra=RETRY_AFTER)
        if connection.unix:
            refusal = self._check_peer(connection, transport)
            if refusal is not None:
                logger.warning("refused a connection: %s", refusal)
                return Response.error(403, refusal, close=True)
        return None

    def connection_closed(self, connection: Connection) -> None:
        self._connections.discard(connection)
        self.metrics.connections.set(len(self._connections))

    # -- peers

    def _check_peer(self, connection: Connection, transport: asyncio.Transport) -> str | None:
        """Read the peer's credentials (SO_PEERCRED) into ``connection.peer_uid``; return
        why the peer is refused, or None."""
        sock = transport.get_extra_info("socket")
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            pid, uid, gid = _PEERCRED.unpack(raw)
        except (OSError, AttributeError):
            return "cannot read the peer's credentials" if self.has_allow_list else None
        connection.peer_uid = uid
        return self._refusal(pid, uid, gid)

    def _refusal(self, pid: int, uid: int, gid: int) -> str | None:
        """Why a Unix peer is refused, or None when it may connect."""
        if not self.has_allow_list or uid in self.allowed_uids or gid in self.allowed_gids:
            return None
        if self.allowed_gids and not self.allowed_gids.isdisjoint(_supplementary_groups(pid)):
            return None
        return (
            f"peer uid {uid} gid {gid} is not in the allow-list "
            f"([inference] allowed_uids / allowed_gids)"
        )


def _ids(names: str, kind: str) -> list[int]:
    """Numeric ids of a comma-separated list of user or group names (or numbers).

    Raises ConfigError naming an unknown name.
    """
    ids: list[int] = []
    for raw in names.split(","):
        name = raw.strip()
        if not name:
            continue
        if name.isdigit():
            ids.append(int(name))
            continue
        try:
            ids.append(pwd.getpwnam(name).pw_uid if kind == "user" else grp.getgrnam(name).gr_gid)
        except KeyError:
            key = "allowed_users" if kind == "user" else "allowed_groups"
            raise ConfigError(f"[inference] {key}: no {kind} named {name!r}") from None
    return ids


def _supplementary_groups(pid: int) -> set[int]:
    """The peer process's supplementary groups (empty when /proc cannot tell)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:] if g.isdigit()}
    except OSError:
        pass
    return set()
