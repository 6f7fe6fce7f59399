"""The repository's static HTTP face: ``/metadata/`` and ``/targets/`` over aiohttp.

Invariants:
- Only regular files below ``REPO_DIR/metadata`` and ``REPO_DIR/targets`` are served;
  everything else (keys, settings, directories, dot-files, symlinks leaving the tree,
  ``..``) is a 404. There is no directory listing.
- Metadata and target files are immutable under consistent snapshots, so they may be
  cached for long; ``timestamp.json`` and ``root.json`` change in place and are not.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

from aiohttp import web

logger = logging.getLogger(__name__)

_MUTABLE: Final = frozenset({"timestamp.json", "root.json"})


def resolve_static(root: Path, tail: str) -> Path | None:
    """The file ``tail`` names below ``root``, or None when it must not be served."""
    parts = tail.split("/")
    for part in parts:
        if not part or part.startswith(".") or "\\" in part or "\x00" in part:
            return None
    try:
        real_root = root.resolve(strict=True)
        real = root.joinpath(*parts).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not real.is_relative_to(real_root) or not real.is_file():
        return None
    return real


def _static_handler(root: Path) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        tail = request.match_info["tail"]
        path = resolve_static(root, tail)
        if path is None:
            raise web.HTTPNotFound(text="not found\n")
        immutable = "public, max-age=31536000, immutable"
        cache = "no-cache" if path.name in _MUTABLE else immutable
        return web.FileResponse(path, headers={"Cache-Control": cache})

    return handle


def make_app(repo_dir: Path) -> web.Application:
    """An aiohttp application serving the repository's public files."""
    app = web.Application()
    app.router.add_get("/metadata/{tail:.+}", _static_handler(repo_dir / "metadata"))
    app.router.add_get("/targets/{tail:.+}", _static_handler(repo_dir / "targets"))
    return app


async def start_http(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Bind and start serving; return the runner and the bound port (port 0 works).

    Raises OSError when the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner, int(sock.getsockname()[1])
