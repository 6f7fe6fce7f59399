"""Memory across swaps: the allocator settings and the trim call, on a real ONNX Runtime.

Behaviour only (what is returned, what goes back to the kernel), never timings.
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest

from agent.contracts import Manifest
from agent.runtime import memory
from agent.runtime.loading import check_golden, load_model, warm_up
from agent.runtime.models import LoadedModel
from tests.agent._model_dir import make_model_dir
from tests.helpers import make_linear_model

WIDTH = 1536  # a 1536 x 1536 float32 weight: 9 MiB, well above the mmap threshold
WEIGHT_BYTES = WIDTH * WIDTH * 4

on_glibc = pytest.mark.skipif(memory.glibc() is None, reason="glibc allocator only")


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, Manifest]]:
    """Two versions of a wide linear model, unpacked as the store keeps them."""
    folder = tmp_path_factory.mktemp("wide")
    built = []
    for seed in (1, 2):
        onnx_path = make_linear_model(
            folder / f"wide-{seed}.onnx", seed=seed, in_features=WIDTH, out_features=WIDTH
        )
        built.append(
            make_model_dir(
                folder / f"v{seed}", onnx_path, name="wide", version=f"{seed}.0.0", width=WIDTH
            )
        )
    return built


def _load(version: tuple[Path, Manifest]) -> LoadedModel:
    model = load_model(*version)
    check_golden(model)
    warm_up(model)
    return model


def _rss() -> int:
    value = memory.rss_bytes()
    assert value is not None
    return value


@on_glibc
def test_loading_a_model_configures_the_allocator() -> None:
    memory.configure_allocator.cache_clear()
    assert memory.configure_allocator() is True
    assert memory.configure_allocator() is True  # idempotent, cached


@on_glibc
def test_a_dropped_session_goes_back_to_the_kernel_without_a_trim(
    versions: list[tuple[Path, Manifest]],
) -> None:
    model = _load(versions[0])
    x = np.ones((2, WIDTH), dtype=np.float32)
    model.infer({"x": x})
    loaded = _rss()
    del model
    gc.collect()
    released = loaded - _rss()
    assert released >= WEIGHT_BYTES // 2, f"only {released} bytes returned on drop"


@on_glibc
def test_release_memory_reports_bytes_released() -> None:
    released = memory.release_memory()
    assert isinstance(released, int) and released >= 0


def test_release_memory_is_a_no_op_off_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "glibc", lambda: None)
    assert memory.release_memory() is None
    assert memory.configure_allocator.__wrapped__() is False


def test_the_operators_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert memory.configure_allocator.__wrapped__() is False


def test_a_threshold_must_be_positive() -> None:
    with pytest.raises(ValueError, match="mmap_threshold_bytes expected > 0, got 0"):
        memory.configure_allocator(0)


def test_rss_of_a_process_that_does_not_exist_is_none() -> None:
    assert memory.rss_bytes(2**22 + 7) is None
    assert _rss() > 0
