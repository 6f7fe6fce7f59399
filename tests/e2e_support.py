"""Real processes for end-to-end tests: `edgectl` commands, `edgectl serve`, `edge-agent run`.

Also what those tests do to and ask of them: bundles built with `edgectl bundle build`, a
released bundle tampered with in the repository, a process paused, the version an agent
serves, the status a device publishes, and what a bundle's model computes in-process (the
answer a device serving it must give).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.client import InferenceClient
from tests.helpers import Broker, bundle_members, make_linear_model, stop_process

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


def edgectl_bundles(folder: Path, model: str, versions: list[str]) -> dict[str, Path]:
    """A bundle of ``model`` per version, built by `edgectl bundle build` from linear
    models of seeds 1, 2, ... (so each version computes different outputs)."""
    bundles = {}
    for seed, version in enumerate(versions, start=1):
        onnx_path = make_linear_model(folder / f"model-{seed}.onnx", seed=seed)
        bundles[version] = folder / f"{model}-{version}.bundle"
        edgectl(
            "bundle", "build", onnx_path, "--name", model, "--version", version,
            "-o", bundles[version],
        )  # fmt: skip
    return bundles


def tamper_stored_bundle(repo: Path, model: str, version: str) -> None:
    """Flip a byte in the middle of the released bundle of ``model`` ``version`` as it
    lies in ``repo``'s targets (its signed length and hash stay as they were)."""
    (stored,) = (repo / "targets" / "bundles" / model).glob(f"*.{version}.bundle")
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))


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
        stop_process(self.process)


@contextmanager
def paused(proc: Proc) -> Iterator[None]:
    """``proc`` stopped (SIGSTOP) for the block: its connections stay open, it answers
    nothing; continued (SIGCONT) after."""
    os.kill(proc.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.process.pid, signal.SIGCONT)


def _spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> Proc:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        process = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    return Proc(process=process, log=log)


def start_serve(
    repo: Path, mqtt: str, log: Path, settings: dict[str, float | str] | None = None
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
    mirrors: list[str] | None = None,
) -> Path:
    """An agent.toml for one device in ``folder``; ``mirrors``: repository URLs tried
    before ``repo_url`` (``[repository] mirrors``)."""
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
        + (f"mirrors = {json.dumps(mirrors)}\n" if mirrors else "")
        + f"poll_interval_s = {poll_interval_s}\n"
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


def start_serve_and_agent(folder: Path, repo: Path, broker: str, fleet: str) -> tuple[Proc, Proc]:
    """`edgectl serve` for ``repo`` (its log in ``folder``) and one `edge-agent`, dev-1 of
    ``fleet``, its files in ``folder / "device"``, trusting the repository's root and
    polling hourly: the set-up of the one-device end-to-end tests. (serve, agent)."""
    serve, url = start_serve(repo, broker, folder / "serve.log")
    config = write_agent_config(
        folder / "device",
        device="dev-1",
        fleet=fleet,
        broker=broker,
        repo_url=url,
        root=repo / "metadata" / "root.json",
    )
    return serve, start_agent(config)


def bundle_output(bundle: Path, x: np.ndarray) -> np.ndarray:
    """What the bundle's model computes for input ``x`` (its first output), run by ONNX
    Runtime in this process: the answer a device serving that bundle must give."""
    import onnxruntime as ort

    model = bundle_members(bundle)["model.onnx"]
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def served_version(client: InferenceClient, model: str) -> str | None:
    """The version of ``model`` the agent serves, or None while it is not ready."""
    if not client.ready():
        return None
    return str(client.model_metadata(model)["versions"][0])


class StatusWatcher:
    """Subscribes to a device's retained status topic with a real MQTT client."""

    def __init__(self, broker: Broker, fleet: str, device: str) -> None:
        self._messages: list[dict[str, object]] = []
        self._lock = threading.Lock()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"watch-{device}")
        self._client.on_message = self._on_message
        self._client.connect(broker.host, broker.port)
        self._client.subscribe(f"edgefleet/v1/fleets/{fleet}/devices/{device}/status", qos=1)
        self._client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self._messages.append(json.loads(msg.payload))

    def messages(self) -> list[dict[str, object]]:
        """Every status received so far, oldest first."""
        with self._lock:
            return list(self._messages)

    def last(self) -> dict[str, object] | None:
        with self._lock:
            return self._messages[-1] if self._messages else None

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()
