"""agent.runtime.shadow: the comparisons as pure functions, and the runner on real ONNX
Runtime sessions (two versions of a small softmax model)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from agent.contracts import TensorSpec
from agent.runtime.loading import load_model
from agent.runtime.models import LoadedModel
from agent.runtime.registry import ModelRegistry
from agent.runtime.shadow import (
    Comparison,
    OutputMismatchError,
    ShadowFigures,
    ShadowRunner,
    add_comparison,
    compare_outputs,
    cosine,
    is_class_scores,
    median_ratio,
)
from tests.agent._model_dir import make_model_dir
from tests.helpers import make_linear_model


def test_class_scores_are_2d_float_with_more_than_one_class() -> None:
    assert is_class_scores(np.zeros((4, 10), np.float32))
    assert not is_class_scores(np.zeros((4, 1), np.float32))
    assert not is_class_scores(np.zeros((4, 10), np.int64))
    assert not is_class_scores(np.zeros((2, 4, 10), np.float32))


def test_identical_outputs_agree_fully() -> None:
    y = np.array([[0.1, 0.9], [0.7, 0.3]], np.float32)
    assert compare_outputs({"y": y}, {"y": y.copy()}) == Comparison(2, 2, 1.0, 0.0)


def test_top1_counts_rows_and_figures_are_the_worst_over_outputs() -> None:
    serving = {
        "scores": np.array([[0.1, 0.9], [0.8, 0.2], [0.6, 0.4]], np.float32),
        "embedding": np.array([1.0, 0.0, 0.0], np.float32),
    }
    candidate = {
        "scores": np.array([[0.2, 0.8], [0.3, 0.7], [0.6, 0.4]], np.float32),
        "embedding": np.array([0.0, 1.0, 0.0], np.float32),  # orthogonal: cosine 0
    }
    c = compare_outputs(serving, candidate)
    assert (c.top1_rows, c.top1_agreed) == (3, 2)  # the 1-D embedding is not class scores
    assert c.cosine_min == pytest.approx(0.0)
    assert c.max_abs == pytest.approx(1.0)


def test_cosine_edge_cases() -> None:
    zeros = np.zeros(3)
    assert cosine(zeros, zeros) == 1.0
    assert cosine(zeros, np.ones(3)) == 0.0
    assert cosine(np.ones(3), -np.ones(3)) == pytest.approx(-1.0)


@pytest.mark.parametrize(
    ("candidate", "message"),
    [
        ({}, "no output 'y'"),
        (
            {"y": np.zeros((2, 3), np.float32)},
            "shape [2, 3] differs from the serving version's [2, 2]",
        ),
        ({"y": np.array([[np.nan, 1], [0, 1]], np.float32)}, "NaN or infinity"),
    ],
)
def test_outputs_that_cannot_be_compared_are_named(
    candidate: dict[str, np.ndarray], message: str
) -> None:
    serving = {"y": np.array([[0.5, 0.5], [0.1, 0.9]], np.float32)}
    with pytest.raises(OutputMismatchError) as refused:
        compare_outputs(serving, candidate)
    assert message in str(refused.value)


def test_figures_sum_comparisons_and_the_median_ratio() -> None:
    f = ShadowFigures(version="2.0.0", serving="1.0.0")
    assert f.agreement is None
    f = add_comparison(f, Comparison(4, 4, 0.99, 0.01))
    f = add_comparison(f, Comparison(4, 2, 0.90, 0.20))
    assert (f.samples, f.top1_rows, f.top1_agreed) == (2, 8, 6)
    assert (f.agreement, f.cosine_min, f.max_abs) == (0.75, 0.90, 0.20)
    assert median_ratio([1.0, 5.0, 2.0]) == 2.0 and median_ratio([]) is None


# ---------------------------------------------------------------- the runner, real sessions


def _model(tmp_path: Path, seed: int, version: str) -> LoadedModel:
    onnx_path = make_linear_model(tmp_path / f"m{seed}.onnx", seed=seed, out_features=5)
    directory, manifest = make_model_dir(
        tmp_path / version,
        onnx_path,
        version=version,
        outputs=(TensorSpec("y", "FP32", (-1, 5)),),
    )
    return load_model(directory, manifest)


def _feed(runner: ShadowRunner, serving: LoadedModel, requests: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(requests):
        x = {"x": rng.normal(size=(8, 4)).astype(np.float32)}
        assert runner.claim(serving.version)
        runner.submit(x, serving.infer(x), wall_s=1e-4, cpu_s=1e-4)
        assert runner.wait_idle(10.0)


def test_a_candidate_identical_to_the_serving_version_agrees(tmp_path: Path) -> None:
    serving = _model(tmp_path, seed=1, version="1.0.0")
    same = _model(tmp_path / "again", seed=1, version="2.0.0")
    runner = ShadowRunner(same, "1.0.0", 1.0)
    try:
        _feed(runner, serving, 5)
        f = runner.figures()
        assert (f.samples, f.errors, f.agreement, f.max_abs) == (5, 0, 1.0, 0.0)
        assert f.cosine_min == pytest.approx(1.0) and f.latency_ratio is not None
    finally:
        runner.close()


def test_a_candidate_with_other_weights_disagrees(tmp_path: Path) -> None:
    serving = _model(tmp_path, seed=1, version="1.0.0")
    other = _model(tmp_path, seed=7, version="2.0.0")
    runner = ShadowRunner(other, "1.0.0", 1.0)
    try:
        _feed(runner, serving, 5)
        f = runner.figures()
        assert f.samples == 5 and f.top1_rows == 40
        assert f.agreement is not None and f.agreement < 0.9
        assert f.max_abs is not None and f.max_abs > 0.1
    finally:
        runner.close()


def test_one_run_in_flight_others_are_dropped_and_counted(tmp_path: Path) -> None:
    serving = _model(tmp_path, seed=1, version="1.0.0")
    runner = ShadowRunner(_model(tmp_path, seed=2, version="2.0.0"), "1.0.0", 1.0)
    try:
        assert runner.claim("1.0.0")
        # Claimed and not yet submitted: the slot is taken.
        assert not runner.claim("1.0.0") and not runner.claim("1.0.0")
        assert runner.figures().dropped == 2
        runner.release()  # the serving run failed: nothing to compare
        assert runner.claim("1.0.0")
        x = {"x": np.ones((1, 4), np.float32)}
        runner.submit(x, serving.infer(x), wall_s=1e-4, cpu_s=1e-4)
        assert runner.wait_idle(10.0)
        assert runner.figures().samples == 1
        # A request another version served is not the serving version's: not offered.
        assert not runner.claim("0.9.0")
    finally:
        runner.close()


def test_sample_rate_picks_a_share_with_the_injected_draws(tmp_path: Path) -> None:
    draws = iter([0.1, 0.6, 0.4, 0.9])
    runner = ShadowRunner(
        _model(tmp_path, seed=2, version="2.0.0"), "1.0.0", 0.5, rng=lambda: next(draws)
    )
    try:
        picked = []
        for _ in range(4):
            claimed = runner.claim("1.0.0")
            picked.append(claimed)
            if claimed:
                runner.release()
        assert picked == [True, False, True, False]
        assert runner.figures().dropped == 0  # not sampled is not dropped
    finally:
        runner.close()


def test_a_candidate_that_fails_on_the_input_counts_an_error(tmp_path: Path) -> None:
    serving = _model(tmp_path, seed=1, version="1.0.0")
    runner = ShadowRunner(_model(tmp_path, seed=2, version="2.0.0"), "1.0.0", 1.0)
    try:
        assert runner.claim("1.0.0")
        # The serving version's outputs name one the candidate lacks.
        x = {"x": np.ones((1, 4), np.float32)}
        runner.submit(x, {"z": serving.infer(x)["y"]}, wall_s=1e-4, cpu_s=1e-4)
        assert runner.wait_idle(10.0)
        f = runner.figures()
        assert (f.samples, f.errors) == (0, 1) and "'z'" in f.last_error
    finally:
        runner.close()


def test_the_registry_holds_a_shadow_beside_what_serves(tmp_path: Path) -> None:
    serving = _model(tmp_path, seed=1, version="1.0.0")
    registry = ModelRegistry()
    registry.activate(serving)
    runner = ShadowRunner(_model(tmp_path, seed=2, version="2.0.0"), "1.0.0", 1.0)
    assert registry.set_shadow("linear", runner) is None
    assert registry.shadow("linear") is runner and registry.get("linear") is serving
    assert registry.set_shadow("linear", None) is runner and registry.shadow("linear") is None
    runner.close()
    assert not runner.claim("1.0.0")
    assert all(t.name != "shadow:linear" or not t.is_alive() for t in _joined(runner))


def _joined(runner: ShadowRunner) -> list[threading.Thread]:
    runner._thread.join(10.0)
    return [runner._thread]


def test_the_candidate_thread_takes_the_lowest_priority(tmp_path: Path) -> None:
    import os

    serving = _model(tmp_path, seed=1, version="1.0.0")
    runner = ShadowRunner(_model(tmp_path, seed=2, version="2.0.0"), "1.0.0", 1.0)
    try:
        _feed(runner, serving, 1)  # the thread has run a candidate: it set its priority first
        tid = runner._thread.native_id
        assert tid is not None
        assert (
            os.sched_getscheduler(tid) == os.SCHED_IDLE
            or os.getpriority(os.PRIO_PROCESS, tid) == 19
        )
        # The serving threads keep theirs.
        assert os.sched_getscheduler(0) != os.SCHED_IDLE
    finally:
        runner.close()
