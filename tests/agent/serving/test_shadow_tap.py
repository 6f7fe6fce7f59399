"""The inference server offers a copy of live requests to a candidate in shadow
(``ModelRegistry.shadow``), over a real Unix socket with real ONNX Runtime: the serving
version alone answers, repeats and shared memory included, and the candidate compares
what it was given."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest

from agent.client import InferenceClient
from agent.oip.shm import SharedMemoryRegion
from agent.runtime.loading import load_model
from agent.runtime.models import LoadedModel
from agent.runtime.registry import ModelRegistry
from agent.runtime.shadow import ShadowRunner
from agent.serving.server import InferenceServer
from tests.agent._model_dir import make_model_dir
from tests.agent._serving import serving
from tests.helpers import make_linear_model


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoadedModel]:
    base = tmp_path_factory.mktemp("tap")
    found = {}
    # 2.0.0: 1.0.0's weights (agrees); 3.0.0: other weights (disagrees).
    for version, seed in (("1.0.0", 1), ("2.0.0", 1), ("3.0.0", 4)):
        onnx_path = make_linear_model(base / f"linear-{version}.onnx", seed=seed)
        found[version] = load_model(*make_model_dir(base / version, onnx_path, version=version))
    return found


@pytest.fixture
def server(models: dict[str, LoadedModel]) -> Iterator[InferenceServer]:
    registry = ModelRegistry()
    registry.activate(models["1.0.0"])
    with serving(registry) as running:
        yield running


def _frames(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(count)]


@pytest.mark.parametrize("binary", [True, False], ids=["binary-repeats", "json"])
def test_the_serving_version_answers_and_the_candidate_gets_copies(
    server: InferenceServer, models: dict[str, LoadedModel], binary: bool
) -> None:
    runner = ShadowRunner(models["3.0.0"], "1.0.0", 1.0)
    server.registry.set_shadow("linear", runner)
    try:
        with InferenceClient(server.socket_path) as client:
            for x in _frames(12):
                got = client.infer("linear", {"x": x}, binary=binary)["y"]
                want = models["1.0.0"].infer({"x": x})["y"]
                np.testing.assert_array_equal(got, want)  # never the candidate's
                assert runner.wait_idle(10.0)  # (so that none is dropped: figures exact)
        f = runner.figures()
        assert (f.samples, f.errors, f.dropped, f.top1_rows) == (12, 0, 0, 36)
        assert f.agreement is not None and f.agreement < 0.98
        assert f.latency_ratio is not None and f.latency_ratio > 0
    finally:
        server.registry.set_shadow("linear", None)
        runner.close()


def test_shared_memory_requests_are_copied_before_the_client_reuses_its_region(
    server: InferenceServer, models: dict[str, LoadedModel]
) -> None:
    runner = ShadowRunner(models["2.0.0"], "1.0.0", 1.0)
    server.registry.set_shadow("linear", runner)
    try:
        with (
            InferenceClient(server.socket_path) as client,
            SharedMemoryRegion(f"ef-tap-{os.getpid()}", 4096) as region,
        ):
            client.register_shared_memory("tap", region)
            frame = region.ndarray(0, np.float32, (3, 4))
            for x in _frames(8):
                frame[:] = x
                client.infer("linear", {"x": frame}, shm=region)
                # The client reuses its region as soon as it has its answer, maybe before
                # the candidate ran: the copy was taken before the answer was sent.
                frame[:] = 1e6
                assert runner.wait_idle(10.0)
        f = runner.figures()
        assert (f.samples, f.errors, f.agreement, f.max_abs) == (8, 0, 1.0, 0.0)
    finally:
        server.registry.set_shadow("linear", None)
        runner.close()


def test_a_runner_for_another_serving_version_gets_nothing(
    server: InferenceServer, models: dict[str, LoadedModel]
) -> None:
    runner = ShadowRunner(models["3.0.0"], "0.9.0", 1.0)
    server.registry.set_shadow("linear", runner)
    try:
        with InferenceClient(server.socket_path) as client:
            for x in _frames(3):
                client.infer("linear", {"x": x})
        assert runner.figures().samples == 0
    finally:
        server.registry.set_shadow("linear", None)
        runner.close()
