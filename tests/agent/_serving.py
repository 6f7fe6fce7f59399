"""Run a real InferenceServer on a real Unix socket in a background event loop (tests)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agent.runtime import ModelRegistry
from agent.server import InferenceServer


class ServerThread:
    """An InferenceServer whose event loop runs in a daemon thread."""

    def __init__(self, server: InferenceServer) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, make: Callable[[], Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(make(), self.loop).result(timeout=10)

    def start(self) -> None:
        self.call(self.server.start)

    def stop(self) -> None:
        self.call(self.server.stop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


def short_socket_dir() -> Path:
    """A directory short enough for a Unix socket path (pytest's tmp_path can be too long)."""
    return Path(tempfile.mkdtemp(prefix="ef-", dir="/tmp"))


@contextmanager
def serving(registry: ModelRegistry, **kwargs: Any) -> Iterator[InferenceServer]:
    """Start a server on a fresh socket; stop it, remove the socket and its directory after."""
    directory = short_socket_dir()
    thread = ServerThread(InferenceServer(registry, directory / "infer.sock", **kwargs))
    try:
        thread.start()
        yield thread.server
        thread.stop()
    finally:
        thread.close()
        shutil.rmtree(directory, ignore_errors=True)
