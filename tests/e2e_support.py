"""Real processes for end-to-end tests: `edgectl` commands, `edgectl serve`, `edge-agent run`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

BIN = Path(sys.executable).parent
T = TypeVar("T")


def edgectl(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [str(BIN / "edgectl"), *map(str, args)], capture_output=True, text=True, timeout=120
    )
    if check and out.returncode != 0:
        raise AssertionError(
            f"edgectl {args} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
        )
    return out


def wait_until(probe: Callable[[], T | None], timeout_s: float, what: str) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = probe()
            if value:
                return value
        except Exception as exc:  # a probe may fail until the thing is up
            last_error = exc
        time.sleep(0.1)
    raise AssertionError(
        f"timed out after {timeout_s}s waiting for {what} (last error: {last_error})"
    )


@dataclass
class Proc:
    process: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> Proc:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        process = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    return Proc(process=process, log=log)


def start_serve(
    repo: Path, mqtt: str, log: Path, settings: dict[str, float] | None = None
) -> tuple[Proc, str]:
    """Start `edgectl serve`; ``settings`` go to its ``[serve]`` table (controller.toml)."""
    args = [str(BIN / "edgectl"), "serve", "--repo", str(repo), "--mqtt", mqtt]
    args += ["--listen", "127.0.0.1:0"]
    if settings:
        config = log.with_suffix(".toml")
        config.write_text("[serve]\n" + "".join(f"{k} = {v!r}\n" for k, v in settings.items()))
        args += ["--config", str(config)]
    proc = _spawn(
        args,
        log,
    )

    def url() -> str | None:
        if proc.process.poll() is not None:
            raise AssertionError(f"edgectl serve exited:\n{proc.text()}")
        match = re.search(r"edgectl serve: listening on (http://\S+)", proc.text())
        return match.group(1) if match else None

    return proc, wait_until(url, 20, "edgectl serve to listen")


def write_agent_config(
    folder: Path,
    *,
    device: str,
    fleet: str,
    broker: str,
    repo_url: str,
    root: Path,
    poll_interval_s: float = 3600.0,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(root, folder / "root.json")
    host, port = broker.rsplit(":", 1)
    config = folder / "agent.toml"
    config.write_text(
        f'device_id = "{device}"\n'
        f'fleet = "{fleet}"\n'
        f'state_dir = "{folder / "state"}"\n'
        f'trusted_root = "{folder / "root.json"}"\n'
        'log_level = "INFO"\n'
        "[mqtt]\n"
        f'host = "{host}"\n'
        f"port = {port}\n"
        "[repository]\n"
        f'url = "{repo_url}"\n'
        f"poll_interval_s = {poll_interval_s}\n"
        "poll_jitter_s = 0\n"
        "[inference]\n"
        f'socket_path = "{folder / "infer.sock"}"\n'
    )
    return config


def start_agent(
    config: Path, *, env: dict[str, str] | None = None, log_name: str = "agent.log"
) -> Proc:
    return _spawn(
        [str(BIN / "edge-agent"), "run", "--config", str(config)], config.parent / log_name, env
    )


def bundle_output(bundle: Path, x: np.ndarray) -> np.ndarray:
    """What the bundle's model computes for input ``x`` (its first output), run by ONNX
    Runtime in this process: the answer a device serving that bundle must give."""
    import onnxruntime as ort

    with tarfile.open(bundle) as tar:
        member = tar.extractfile("model.onnx")
        assert member is not None
        session = ort.InferenceSession(member.read(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])
