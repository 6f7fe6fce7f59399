"""``make demo``: the walking skeleton end to end on one machine, on embedded defaults.

It starts its own private mosquitto on a free loopback port, a controller
(``edgectl serve``) and one agent (``edge-agent run``), builds a small real model,
releases v1, runs inference through the device's Unix socket, releases v2 and shows
the agent swapping to it without a restart, then cleans everything up (also on Ctrl-C).
Every step prints the command it runs, so the demo doubles as a tour of the CLI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from agent.client import InferenceClient

BIN = Path(sys.executable).parent
FLEET = "demo"
DEVICE = "device-1"
MODEL = "digits-mlp"
T = TypeVar("T")


def _step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(probe: Callable[[], T | None], timeout_s: float, what: str) -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            value = probe()
            if value:
                return value
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def _can_connect(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True


def _run(*args: str | Path) -> str:
    shown = " ".join(str(a) for a in args)
    print(f"$ {shown}", flush=True)
    out = subprocess.run(
        [str(BIN / str(args[0])), *map(str, args[1:])], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise RuntimeError(f"{shown} failed:\n{out.stdout}{out.stderr}")
    for line in out.stdout.strip().splitlines():
        print(f"    {line}")
    return out.stdout


def _mosquitto() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if found is None:
        raise RuntimeError("the demo needs mosquitto: sudo apt-get install mosquitto")
    return found


def _make_model(path: Path, seed: int) -> Path:
    """A small real classifier: 64 inputs (an 8x8 image), a hidden layer, 10 classes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = rng.normal(scale=0.3, size=(64, 32)).astype(np.float32)
    b1 = rng.normal(scale=0.1, size=(32,)).astype(np.float32)
    w2 = rng.normal(scale=0.3, size=(32, 10)).astype(np.float32)
    b2 = rng.normal(scale=0.1, size=(10,)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["pixels", "w1"], ["h0"]),
            helper.make_node("Add", ["h0", "b1"], ["h1"]),
            helper.make_node("Relu", ["h1"], ["h2"]),
            helper.make_node("MatMul", ["h2", "w2"], ["l0"]),
            helper.make_node("Add", ["l0", "b2"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        "digits_mlp",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        [
            numpy_helper.from_array(a, n)
            for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


class Demo:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def spawn(self, name: str, args: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.work / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append((name, proc))
        return proc, log

    def stop_all(self) -> None:
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for _name, proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    def run(self) -> None:
        _step("a private MQTT broker on a free loopback port")
        port = _free_port()
        conf = self.work / "mosquitto.conf"
        conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\n"
            "persistence false\nset_tcp_nodelay true\n"
        )
        self.spawn("mosquitto", [_mosquitto(), "-c", str(conf)])
        _wait(
            lambda: _can_connect(port),
            10,
            "mosquitto",
        )
        print(f"    mosquitto on 127.0.0.1:{port}")

        repo = self.work / "repo"
        _step("a signed TUF repository (keys for root, targets, snapshot, timestamp, rollout)")
        _run("edgectl", "init", repo)

        _step("build bundle v1 from a model (quantize, golden vectors, manifest)")
        v1 = self.work / f"{MODEL}-1.0.0.bundle"
        _run(
            "edgectl",
            "bundle",
            "build",
            _make_model(self.work / "v1.onnx", 1),
            "--name",
            MODEL,
            "--version",
            "1.0.0",
            "-o",
            v1,
        )
        _step(f"release v1 to fleet {FLEET!r}")
        _run("edgectl", "release", v1, "--fleet", FLEET, "--repo", repo)

        _step("the controller: repository over HTTP, announcements over MQTT")
        _serve, serve_log = self.spawn(
            "controller",
            [
                str(BIN / "edgectl"),
                "serve",
                "--repo",
                str(repo),
                "--mqtt",
                f"127.0.0.1:{port}",
                "--listen",
                "127.0.0.1:0",
            ],
        )
        url = _wait(
            lambda: re.search(r"listening on (http://\S+)", serve_log.read_text()),
            20,
            "edgectl serve",
        ).group(1)
        print(f"    repository at {url}")

        _step(f"an agent ({DEVICE}) with the fleet's root of trust")
        device = self.work / DEVICE
        device.mkdir()
        shutil.copy(repo / "metadata" / "root.json", device / "root.json")
        sock = device / "infer.sock"
        config = device / "agent.toml"
        config.write_text(
            f'device_id = "{DEVICE}"\nfleet = "{FLEET}"\n'
            'state_dir = "state"\ntrusted_root = "root.json"\n'
            f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\n'
            f'[repository]\nurl = "{url}"\npoll_interval_s = 3600\npoll_jitter_s = 0\n'
            f'[inference]\nsocket_path = "{sock}"\n'
        )
        print(f"$ edge-agent run --config {config}")
        agent, agent_log = self.spawn(
            "agent", [str(BIN / "edge-agent"), "run", "--config", str(config)]
        )
        client = InferenceClient(sock)
        _wait(
            lambda: client.model_metadata(MODEL)["versions"] == ["1.0.0"],
            60,
            "the agent to serve v1",
        )
        print(f"    {DEVICE} serves {MODEL} 1.0.0 on {sock}")

        sample = self.work / "sample.npy"
        np.save(sample, np.random.default_rng(7).random((1, 64), dtype=np.float32))
        _step("local inference over the Unix socket (Open Inference Protocol v2)")
        self._infer(sample, sock)

        _step(
            "build and release v2: the announcement reaches the agent,"
            " which swaps without a restart"
        )
        v2 = self.work / f"{MODEL}-2.0.0.bundle"
        _run(
            "edgectl",
            "bundle",
            "build",
            _make_model(self.work / "v2.onnx", 2),
            "--name",
            MODEL,
            "--version",
            "2.0.0",
            "-o",
            v2,
        )
        _run("edgectl", "release", v2, "--fleet", FLEET, "--repo", repo)
        started = time.monotonic()
        _wait(
            lambda: client.model_metadata(MODEL)["versions"] == ["2.0.0"],
            60,
            "the agent to serve v2",
        )
        print(
            f"    {DEVICE} serves {MODEL} 2.0.0 after {time.monotonic() - started:.1f}s"
            f" (same process, pid {agent.pid})"
        )
        self._infer(sample, sock)

        _step("what the agent logged")
        for line in agent_log.read_text().splitlines():
            if any(k in line for k in ("announcement", "installing", "now serving", "refused")):
                print(f"    {line}")
        _step("done: everything is cleaned up on exit")

    def _infer(self, sample: Path, sock: Path) -> None:
        out = _run("edge-agent", "infer", MODEL, "--input", sample, "--socket", sock)
        probs: dict[str, Any] = json.loads(out)
        data = np.asarray(probs["probabilities"]["data"])
        print(f"    predicted class {int(data.argmax())} (p={float(data.max()):.3f})")


@contextlib.contextmanager
def _workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))
    try:
        yield path
    finally:
        if keep:
            print(f"(kept {path})")
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgefleet-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the work folder for inspection")
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    with _workdir(args.keep) as work:
        demo = Demo(work)
        try:
            demo.run()
        except KeyboardInterrupt:
            print("\ninterrupted: cleaning up")
            return 130
        except RuntimeError as exc:
            print(f"\ndemo failed: {exc}", file=sys.stderr)
            for name in ("controller", "agent"):
                log = work / f"{name}.log"
                if log.exists():
                    print(f"--- {name}.log (last lines)", file=sys.stderr)
                    print("\n".join(log.read_text().splitlines()[-15:]), file=sys.stderr)
            return 1
        finally:
            demo.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
