"""The agent's inference server in a process of its own, for the local adversary suite:
its RSS is then the agent's alone, and its socket is open to every local user (a
Unix socket 0666 in a 0755 folder), as the socket of a device with hostile users is.
Attackers run as another uid (``Attacker``): ``python -m tests.security.local_attacker``.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from agent.client import InferenceClient
from agent.runtime.memory import rss_bytes
from tests.agent._serving import OTHER_UID

TREE = Path(__file__).resolve().parents[2]
_ENV = {**os.environ, "PYTHONPATH": str(TREE), "HOME": "/"}

_SERVE = r"""
import asyncio, json, logging, sys
from pathlib import Path
from agent.contracts import BUNDLE_MANIFEST
from agent.contracts.bundle import parse_manifest
from agent.device.config import InferenceConfig
from agent.runtime.loading import load_model
from agent.runtime.registry import ModelRegistry
from agent.serving.server import InferenceServer

logging.basicConfig(level=logging.WARNING)
socket_path, model_dir, limits = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])

async def main():
    registry = ModelRegistry()
    manifest = parse_manifest((model_dir / BUNDLE_MANIFEST).read_bytes())
    registry.activate(load_model(model_dir, manifest))
    config = InferenceConfig(socket_path=Path(socket_path), socket_mode=0o666, **limits)
    server = InferenceServer.from_config(registry, config)
    await server.start()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await server.stop(grace_s=1)

asyncio.run(main())
"""


def _line(stream: IO[str], timeout_s: float, what: str) -> str:
    """The next line of a child's stdout, waiting at most ``timeout_s``."""
    ready, _, _ = select.select([stream], [], [], timeout_s)
    line = stream.readline() if ready else ""
    if not line:
        raise AssertionError(f"{what}: no line within {timeout_s} s")
    return line


class LocalAgent:
    """A running inference server with ``limits`` (``[inference]`` keys) serving the
    unpacked bundle in ``model_dir``; as user ``uid`` (and group) when given, as the
    shipped unit runs it as a user of its own (``model_dir`` must be readable by it)."""

    def __init__(self, model_dir: Path, uid: int | None = None, **limits: Any) -> None:
        self.limits = limits
        self.directory = Path(tempfile.mkdtemp(prefix="ef-local-", dir="/tmp"))
        self.directory.chmod(0o755)
        self.socket_path = self.directory / "infer.sock"
        self.log = self.directory / "agent.log"
        as_user = (
            [] if uid is None else ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        )
        if uid is not None:
            os.chown(self.directory, uid, uid)
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [*as_user, sys.executable, "-c", _SERVE, str(self.socket_path),
                 str(model_dir), json.dumps(limits)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=_ENV,
            )  # fmt: skip
        try:
            assert self.process.stdout is not None
            assert _line(self.process.stdout, 60, "the agent") == "ready\n"
        except BaseException:
            self.stop()
            raise

    def rss(self) -> int:
        found = rss_bytes(self.process.pid)
        assert found is not None, "the agent is gone"
        return found

    def metric(self, name: str) -> float:
        """One unlabelled series of the agent's ``/metrics``."""
        with InferenceClient(self.socket_path) as client:
            text = client.metrics()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} is not in /metrics")

    def stop(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""


class Attacker:
    """``tests.security.local_attacker MODE`` against ``agent``, as another local user
    (uid OTHER_UID, no supplementary groups). ``holding`` is what it got setting its
    attack up; ``result`` is what it saw once released (on leaving the ``with``)."""

    def __init__(self, agent: LocalAgent, mode: str, *args: str) -> None:
        self.process = subprocess.Popen(
            ["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups",
             sys.executable, "-m", "tests.security.local_attacker", mode,
             str(agent.socket_path), *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=_ENV, cwd=str(TREE),
        )  # fmt: skip
        self.holding: dict[str, Any] = {}
        self.result: dict[str, Any] = {}

    def __enter__(self) -> Attacker:
        assert self.process.stdout is not None
        try:
            self.holding = json.loads(_line(self.process.stdout, 120, "the attacker"))
        except BaseException:
            self._end()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            self.process.stdin.write("release\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass
        try:
            out, err = self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self._end()
            raise
        if kind is None:
            assert self.process.returncode == 0, err[-3000:]
            self.result = json.loads(out.strip().splitlines()[-1])

    def _end(self) -> None:
        self.process.kill()
        self.process.communicate(timeout=10)
