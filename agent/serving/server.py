"""Local inference: the Open Inference Protocol v2 (REST) over a Unix socket.

The stack is deliberately lean for per-request latency: a thread per connection on a
blocking socket, httptools (llhttp) as the HTTP/1.1 parser, precomputed response heads,
no framework, no hop between threads per request. Three layers:

- ``agent.serving.server`` (this module): the ``InferenceServer`` lifecycle — listeners, the
  thread that accepts connections, limits, peer credentials and the allow-list,
  ``from_config``;
- ``agent.serving.routes``: routing each request to its endpoint, admission and deadlines;
- ``agent.serving.http11``: the HTTP/1.1 transport of one connection — parsing, timeouts,
  pipelining, response writing;
- ``agent.serving.http_messages``: the request and response passed between the two.

Invariants:
- Bad input never gets a 5xx and never crashes the server: a peer outside the
  allow-list → 403 and too many connections → 503 with Retry-After (here); the
  transport and the router map the rest (see their docstrings).
- No one client can take what the others need: a client (a uid, by SO_PEERCRED; every
  TCP client together) holds at most ``peer_share`` of ``max_connections`` and of the
  large request bodies in memory (``max_body_buffer_bytes``, ``agent.serving.quota``).
- Peers are told apart by the kernel's credentials (``agent.serving.peers``); where the
  agent's user namespace cannot tell users apart (``PrivateUsers=``), a peer whose uid
  reads as the overflow id matches no allow-list entry and may not use shared memory.
- The socket is created with its mode (and group) before it listens, so no client can
  connect through a wider mode, and ``stop`` removes the socket file.
- ``start`` and ``stop`` are coroutines for the agent's event loop, but serving never
  touches that loop: a busy loop (MQTT, an install) does not delay inference, and a
  slow model does not delay the loop.
"""

from __future__ import annotations

import asyncio
import grp
import json
import logging
import os
import pwd
import selectors
import socket
import stat
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import agent
from agent.base.errors import ConfigError
from agent.device.config import check_body_limits
from agent.oip.documents import EXTENSIONS
from agent.oip.shm import SharedMemoryRegistry
from agent.runtime.registry import ModelRegistry
from agent.runtime.stats import RequestStats
from agent.serving.http11 import Connection
from agent.serving.http_messages import RETRY_AFTER, Response, refuse
from agent.serving.metrics import InferenceMetrics
from agent.serving.peers import IdMap, PeerCredentials, read_credentials, read_id_map
from agent.serving.quota import TCP_PEER, Quota, share_of
from agent.serving.routes import Router
from agent.serving.triton import EXTENSIONS as TRITON_EXTENSIONS
from agent.serving.triton import READY, IndexEntry, RepositoryIndex

if TYPE_CHECKING:
    from agent.device.config import InferenceConfig

__all__ = ["InferenceServer"]

logger = logging.getLogger(__name__)

_UNIX_PATH_MAX: Final = 107


class InferenceServer:
    """OIP v2 over a Unix socket (and optionally loopback TCP), serving the live models of
    a ``ModelRegistry``.

    ``is_ready`` says whether the agent as a whole may serve (default: at least one
    model is live); when it returns False, health/ready answers 503 and infer requests
    get 503. ``agent_status`` gives what ``/v2/health/agent`` adds to ``live`` and
    ``ready`` (the agent's broker connection). Every infer request is recorded in
    ``stats`` (a fresh one when not given) under the version that served it, and in
    ``metrics``. ``repository`` lists the versions the device holds for Triton's
    repository index (default: the live ones).
    ``from_config`` builds one from ``[inference]``.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        socket_path: Path,
        *,
        socket_mode: int = 0o660,
        socket_group: str = "",
        max_body_bytes: int = 64 * 1024 * 1024,
        max_body_buffer_bytes: int = 256 * 1024 * 1024,
        max_json_bytes: int = 4 * 1024 * 1024,
        max_concurrency: int = 4,
        max_queue: int = 32,
        max_connections: int = 256,
        peer_share: float = 0.5,
        header_timeout_s: float = 10.0,
        body_timeout_s: float = 30.0,
        request_deadline_s: float = 30.0,
        idle_timeout_s: float = 60.0,
        busy_poll_s: float = 0.0002,
        allowed_uids: Iterable[int] = (),
        allowed_gids: Iterable[int] = (),
        tcp_port: int = 0,
        tcp_host: str = "127.0.0.1",
        shared_memory: bool = True,
        is_ready: Callable[[], bool] | None = None,
        agent_status: Callable[[], Mapping[str, Any]] | None = None,
        stats: RequestStats | None = None,
        metrics: InferenceMetrics | None = None,
        id_map: IdMap | None = None,
        repository: RepositoryIndex | None = None,
    ) -> None:
        positive = {
            "max_body_bytes": max_body_bytes,
            "max_body_buffer_bytes": max_body_buffer_bytes,
            "max_json_bytes": max_json_bytes,
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
        if max_queue < 0 or busy_poll_s < 0:
            raise ConfigError(
                f"max_queue and busy_poll_s expected >= 0, got {max_queue}, {busy_poll_s}"
            )
        check_body_limits(max_body_bytes, max_body_buffer_bytes, peer_share)
        self.registry = registry
        self.stats = stats if stats is not None else RequestStats()
        self.metrics = metrics if metrics is not None else InferenceMetrics()
        self.socket_path = Path(socket_path)
        self.socket_mode = socket_mode
        self.socket_group = socket_group
        self.max_body_bytes = max_body_bytes
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.max_connections = max_connections
        self.connection_quota = Quota(
            max_connections,
            share_of(max_connections, peer_share),
            "connections",
            "[inference] max_connections × peer_share",
        )
        self.body_quota = Quota(
            max_body_buffer_bytes,
            share_of(max_body_buffer_bytes, peer_share),
            "bytes of request bodies in memory",
            "[inference] max_body_buffer_bytes × peer_share",
        )
        body_quota = self.body_quota
        self.metrics.body_buffer_bytes.set_function(lambda: body_quota.held)
        self.id_map = id_map if id_map is not None else read_id_map()
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.request_deadline_s = request_deadline_s
        self.idle_timeout_s = idle_timeout_s
        self.busy_poll_s = busy_poll_s
        self._cores = len(os.sched_getaffinity(0))  # what systemd's CPUAffinity= leaves us
        self._machine_cores = max(os.cpu_count() or 1, self._cores)  # where clients run
        self.allowed_uids = frozenset(allowed_uids)
        self.allowed_gids = frozenset(allowed_gids)
        self.tcp_port = tcp_port
        self.tcp_host = tcp_host
        ids = self.id_map
        unknown = frozenset() if ids.uids_complete else frozenset({ids.overflow_uid})
        self.shm = SharedMemoryRegistry(unknown_uids=unknown) if shared_memory else None
        self._listeners: list[socket.socket] = []
        self._acceptor: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1  # a pipe that wakes the acceptor to stop
        self._connections: set[Connection] = set()
        self._connections_lock = threading.Lock()
        self._serial = 0
        extensions = [e for e in EXTENSIONS if shared_memory or e != "system_shared_memory"]
        extensions += TRITON_EXTENSIONS
        self._router = Router(
            registry,
            server_metadata=json.dumps(
                {"name": "edge-agent", "version": agent.__version__, "extensions": extensions}
            ).encode(),
            shm=self.shm,
            metrics=self.metrics,
            stats=self.stats,
            repository=repository or (lambda: live_versions(registry)),
            is_ready=is_ready or (lambda: len(registry) > 0),
            agent_status=agent_status,
            max_concurrency=max_concurrency,
            max_queue=max_queue,
            request_deadline_s=request_deadline_s,
            max_json_bytes=max_json_bytes,
        )

    @classmethod
    def from_config(
        cls,
        registry: ModelRegistry,
        config: InferenceConfig,
        *,
        is_ready: Callable[[], bool] | None = None,
        agent_status: Callable[[], Mapping[str, Any]] | None = None,
        stats: RequestStats | None = None,
        metrics: InferenceMetrics | None = None,
        repository: RepositoryIndex | None = None,
    ) -> InferenceServer:
        """A server with every limit and listener taken from the ``[inference]`` section."""
        return cls(
            registry,
            config.socket_path,
            socket_mode=config.socket_mode,
            socket_group=config.socket_group,
            max_body_bytes=config.max_body_bytes,
            max_body_buffer_bytes=config.max_body_buffer_bytes,
            max_json_bytes=config.max_json_bytes,
            max_concurrency=config.max_concurrency,
            max_queue=config.max_queue,
            max_connections=config.max_connections,
            peer_share=config.peer_share,
            header_timeout_s=config.header_timeout_s,
            body_timeout_s=config.body_timeout_s,
            request_deadline_s=config.request_deadline_s,
            idle_timeout_s=config.idle_timeout_s,
            busy_poll_s=config.busy_poll_s,
            allowed_uids=_ids(config.allowed_users, "user"),
            allowed_gids=_ids(config.allowed_groups, "group"),
            tcp_port=config.tcp_port,
            tcp_host=config.tcp_host,
            shared_memory=config.shared_memory,
            is_ready=is_ready,
            agent_status=agent_status,
            stats=stats,
            metrics=metrics,
            repository=repository,
        )

    @property
    def has_allow_list(self) -> bool:
        return bool(self.allowed_uids or self.allowed_gids)

    @property
    def admitted(self) -> int:
        """Infer requests running or waiting for a slot."""
        return self._router.admission.admitted

    @property
    def is_accepting(self) -> bool:
        """Whether the acceptor thread runs (after ``start``, before ``stop``)."""
        return self._acceptor is not None and self._acceptor.is_alive()

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
        sock.listen(1024)
        self._listeners.append(sock)
        logger.info("serving OIP v2 on %s (mode %o)", path, self.socket_mode)
        if self.tcp_port:
            try:
                self._listeners.append(self._listen_tcp())
            except OSError as exc:
                await self.stop(grace_s=0)
                raise ConfigError(
                    f"cannot listen on {self.tcp_host}:{self.tcp_port}: {exc}"
                ) from None
            logger.info("serving OIP v2 on http://%s:%d", self.tcp_host, self.tcp_port)
        if not self.id_map.is_complete:
            logger.warning(
                "the agent's user namespace does not map every user (PrivateUsers=): peers "
                "whose uid or gid reads as %d match no allow-list entry and may not use "
                "shared memory; run the agent without PrivateUsers= (docs/operations.md)",
                self.id_map.overflow_uid,
            )
        self._router.start()
        self._wake_r, self._wake_w = os.pipe()
        self._acceptor = threading.Thread(target=self._accept, name="infer-accept", daemon=True)
        self._acceptor.start()

    def _listen_tcp(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.tcp_host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.tcp_host, self.tcp_port))
            sock.listen(1024)
        except OSError:
            sock.close()
            raise
        return sock

    def tcp_address(self) -> tuple[str, int] | None:
        """The bound TCP (host, port), or None when TCP is off."""
        for sock in self._listeners:
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

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, answer the requests in progress (up to ``grace_s``), close
        every connection, unmap shared memory and remove the socket file."""
        self._router.stop()
        if self._acceptor is not None:
            os.write(self._wake_w, b"x")
            await asyncio.to_thread(self._acceptor.join, 5)
            self._acceptor = None
            os.close(self._wake_r)
            os.close(self._wake_w)
        for listener in self._listeners:
            listener.close()
        self._listeners = []
        for connection in self._snapshot():
            connection.shut_down()
        deadline = time.monotonic() + grace_s
        while self._snapshot() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for connection in self._snapshot():
            connection.abort()
        while self._snapshot() and time.monotonic() < deadline + 1.0:
            await asyncio.sleep(0.01)
        self._router.close()
        if self.shm is not None:
            self.shm.close()
        try:
            if stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                self.socket_path.unlink()
        except FileNotFoundError:
            pass
        logger.info("stopped serving on %s", self.socket_path)

    # -- connections

    def _accept(self) -> None:
        """The acceptor thread: accept on every listener until ``stop`` wakes it."""
        with selectors.DefaultSelector() as selector:
            for listener in self._listeners:
                listener.setblocking(False)
                selector.register(listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    if key.fileobj == self._wake_r:
                        return
                    assert isinstance(key.fileobj, socket.socket)
                    try:
                        sock, _ = key.fileobj.accept()
                    except OSError:  # the peer went away before accept, or no fds left
                        continue
                    self._open(sock)

    def _open(self, sock: socket.socket) -> None:
        """Serve an accepted socket on its own thread, or refuse it: a Unix peer outside
        the allow-list (403), past ``max_connections`` or past its client's share of
        them (503)."""
        sock.setblocking(True)
        peer_uid: int | None = None
        peer_key: Hashable = TCP_PEER
        if sock.family == socket.AF_UNIX:
            peer_uid, refusal = self._check_peer(sock)
            if refusal is not None:
                logger.warning("refused a connection: %s", refusal)
                refuse(sock, Response.error(403, refusal, close=True))
                return
            peer_key = peer_uid
        else:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        over = self.connection_quota.take(peer_key, 1)
        if over is not None:
            message = "too many connections: " + self.connection_quota.explain(over, peer_key)
            refuse(sock, Response.error(503, message, close=True, extra=RETRY_AFTER))
            return
        connection = Connection(
            sock, self, self._router.dispatch, peer_uid=peer_uid, peer_key=peer_key
        )
        with self._connections_lock:
            self._connections.add(connection)
            self.metrics.connections.set(len(self._connections))
            self._serial += 1
            name = f"infer-conn-{self._serial}"
        try:
            threading.Thread(target=connection.serve, name=name, daemon=True).start()
        except RuntimeError as exc:  # no thread to be had (a tasks limit): refuse, go on
            logger.error("cannot serve a connection: %s", exc)
            self.connection_closed(connection)
            message = "the agent cannot take another connection now"
            refuse(sock, Response.error(503, message, close=True, extra=RETRY_AFTER))

    def may_busy_poll(self) -> bool:
        """A core is free to poll on (see ``may_poll``)."""
        return may_poll(self._router.admission.running, self._cores, self._machine_cores)

    def connection_closed(self, connection: Connection) -> None:
        """Forget a connection that has closed (its thread calls this, once)."""
        with self._connections_lock:
            self._connections.discard(connection)
            self.metrics.connections.set(len(self._connections))
        self.connection_quota.give(connection.peer_key, 1)

    def _snapshot(self) -> list[Connection]:
        with self._connections_lock:
            return list(self._connections)

    # -- peers

    def _check_peer(self, sock: socket.socket) -> tuple[int | None, str | None]:
        """The Unix peer's uid (SO_PEERCRED), and why it is refused (None: it may connect)."""
        try:
            peer = read_credentials(sock)
        except OSError:
            return None, "cannot read the peer's credentials" if self.has_allow_list else None
        return peer.uid, self._refusal(peer)

    def _refusal(self, peer: PeerCredentials) -> str | None:
        """Why a Unix peer is refused, or None when it may connect: an allow-list entry
        matches its uid, its gid or one of its supplementary groups (SO_PEERGROUPS). An
        id every unmapped user reads as (``PrivateUsers=``) matches nothing."""
        if not self.has_allow_list:
            return None
        ids = self.id_map
        if ids.is_known_uid(peer.uid) and peer.uid in self.allowed_uids:
            return None
        groups = {g for g in (peer.gid, *peer.groups) if ids.is_known_gid(g)}
        if not self.allowed_gids.isdisjoint(groups):
            return None
        if not ids.is_known_uid(peer.uid):
            return (
                f"peer uid {peer.uid} is the id every user outside the agent's user "
                "namespace reads as, so it matches no allow-list entry; run the agent "
                'without PrivateUsers= (docs/operations.md, "The service")'
            )
        return (
            f"peer uid {peer.uid} gid {peer.gid} is not in the allow-list "
            f"([inference] allowed_users / allowed_groups)"
        )


def live_versions(registry: ModelRegistry) -> list[IndexEntry]:
    """The repository index of a server told nothing else: the live version of each model."""
    return [IndexEntry(n, m.version, READY, "") for n, m in registry.snapshot().items()]


def may_poll(running: int, agent_cores: int, machine_cores: int) -> bool:
    """Whether a connection may poll for its client's next request, with ``running``
    runs in flight: one of the agent's cores is left for the poller, and one of the
    machine's for the client besides the poller and the runs. Never on a single core,
    where polling would only delay the client it waits for; on an agent pinned to one
    core of several (``CPUAffinity=``), while no run is in flight."""
    return running + 1 <= agent_cores and running + 2 <= machine_cores


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
