"""Shared test helpers: a private mosquitto on a free port, stopping a child process,
small real ONNX models, and a clock a test moves by hand."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class ManualClock:
    """A clock for pure rules: ``now`` moves only when the test moves it."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s}s")


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if found is None:
        raise RuntimeError(
            "mosquitto is not installed: run `make test` (it installs it)"
            " or apt-get install mosquitto"
        )
    return found


def stop_process(process: subprocess.Popen[Any], timeout_s: float = 10.0) -> None:
    """SIGTERM ``process`` if it still runs and wait for it; SIGKILL it after ``timeout_s``."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Broker:
    host: str
    port: int
    process: subprocess.Popen[bytes]
    config: Path

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        stop_process(self.process, timeout_s=5)


def start_broker(workdir: Path, port: int | None = None, *, persistent: bool = False) -> Broker:
    """Start a private mosquitto on 127.0.0.1 and a free port; anonymous.

    ``persistent`` keeps sessions and queued messages across a restart (on disk in
    ``workdir``), as a production broker must for the controller's persistent session.
    """
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "mosquitto.conf"
    persistence = (
        "persistence true\n"
        f"persistence_location {workdir}/\n"
        # Started as root, mosquitto would switch to its own user, which cannot write
        # the test's private folder (ignored when not started as root).
        "user root\n"
        if persistent
        else "persistence false\n"
    )
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        f"{persistence}"
        "set_tcp_nodelay true\n"
        "max_queued_messages 100000\n"
        "log_dest stderr\n"
        "log_type error\n"
        "log_type warning\n"
    )
    log = open(workdir / "mosquitto.log", "ab")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=log, stderr=log)
    try:
        wait_for_port(port)
    except TimeoutError:
        proc.kill()
        raise
    return Broker(host="127.0.0.1", port=port, process=proc, config=conf)


def make_linear_model(path: Path, seed: int, in_features: int = 4, out_features: int = 3) -> Path:
    """A small real ONNX model: y = softmax(x @ W + b), x float32 [N, in_features].

    Different seeds give different weights, so two versions compute different outputs.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.normal(size=(in_features, out_features)).astype(np.float32)
    b = rng.normal(size=(out_features,)).astype(np.float32)
    graph = helper.make_graph(
        nodes=[
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["y"], axis=-1),
        ],
        name=f"linear_{seed}",
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", in_features])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_features])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    return _save_model(graph, path)


def make_nonzero_model(path: Path) -> Path:
    """y = NonZero(x), x float32 [N, 4], y int64 [2, K]: the output's shape depends on the
    input's values."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("NonZero", ["x"], ["y"])],
        "nonzero",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [2, "K"])],
    )
    return _save_model(graph, path, check=False)


def make_misbehaving_model(path: Path, seed: int, kind: str) -> Path:
    """A model that passes its golden vectors (batch 1) but misbehaves on real requests.

    ``kind="errors"``: fails inside ONNX Runtime whenever ``|x[:, 0]| >= 8``, which
    standard-normal build inputs practically never reach. ``kind="slow"``: a heavy branch
    that depends on the input (so it cannot be folded away) is multiplied by zero and
    added to the logits, so the outputs are right but every request costs milliseconds
    instead of microseconds.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.normal(size=(4, 3)).astype(np.float32)
    b = rng.normal(size=(3,)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["logits"]),
    ]
    if kind == "errors":
        # A lookup indexed by |x[:, 0]|: in range for the standard-normal inputs the build
        # evaluates and checks golden vectors on, out of range (an ONNX Runtime error) for
        # real requests whose first feature is 8 or more. The lookup adds zero.
        inits += [
            numpy_helper.from_array(np.zeros((8,), dtype=np.float32), "table"),
            numpy_helper.from_array(np.array([0], dtype=np.int64), "zero_i"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "one_i"),
        ]
        nodes += [
            helper.make_node("Slice", ["x", "zero_i", "one_i", "one_i"], ["first"]),
            helper.make_node("Abs", ["first"], ["magnitude"]),
            helper.make_node("Floor", ["magnitude"], ["floored"]),
            helper.make_node("Cast", ["floored"], ["index"], to=TensorProto.INT64),
            helper.make_node("Gather", ["table", "index"], ["looked_up"]),
            helper.make_node("Reshape", ["looked_up", "shape_n1"], ["offset"]),
            helper.make_node("Add", ["logits", "offset"], ["logits2"]),
            helper.make_node("Softmax", ["logits2"], ["y"], axis=-1),
        ]
        inits.append(numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), "shape_n1"))
    elif kind == "slow":
        width = 2048
        inits += [
            numpy_helper.from_array(rng.normal(size=(4, width)).astype(np.float32), "A"),
            numpy_helper.from_array(rng.normal(size=(width, width)).astype(np.float32) / 45, "B"),
            numpy_helper.from_array(np.zeros((1,), dtype=np.float32), "zero"),
        ]
        nodes += [helper.make_node("MatMul", ["x", "A"], ["h0"])]
        for i in range(6):
            nodes.append(helper.make_node("MatMul", [f"h{i}", "B"], [f"h{i + 1}"]))
        nodes += [
            helper.make_node("ReduceSum", ["h6"], ["total"], keepdims=0),
            helper.make_node("Mul", ["total", "zero"], ["nothing"]),
            helper.make_node("Add", ["logits", "nothing"], ["logits2"]),
            helper.make_node("Softmax", ["logits2"], ["y"], axis=-1),
        ]
    else:
        raise ValueError(kind)
    graph = helper.make_graph(
        nodes,
        f"{kind}_{seed}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    return _save_model(graph, path)


def _save_model(graph: Any, path: Path, *, check: bool = True) -> Path:
    """``graph`` as an opset-17 model (IR version 8) at ``path``; ``check`` runs the ONNX
    checker first."""
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if check:
        onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def bundle_members(path: Path) -> dict[str, bytes]:
    """Every member of a bundle file by its unpacked name, decompressed (schema /2 stores
    ``model.onnx`` as ``model.onnx.zst``), in tar order. For tests: no bounds."""
    import tarfile

    import zstandard

    out: dict[str, bytes] = {}
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            f = tar.extractfile(info)
            assert f is not None
            data = f.read()
            if info.name.endswith(".zst"):
                data = zstandard.ZstdDecompressor().decompress(data)
            out[info.name.removesuffix(".zst")] = data
    return out
