"""Admission (slots, a bounded queue, deadlines) and the run watch, on real threads and a
real ONNX Runtime session; the clock is ``time.monotonic`` with deadlines set in the past
or far ahead, so no outcome depends on how fast this machine is."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from agent.base.errors import NotReadyError
from agent.serving.admission import Admission, DeadlineExceeded, Overloaded, RunWatch

FAR = 1e9  # a deadline that never passes in a test


def _start_waiter(admission: Admission, wait_for_slot: Callable[[], None]) -> threading.Thread:
    """``wait_for_slot`` on a thread of its own, returned once it waits in ``admission``'s
    queue (or after 5 s: the test's assertions then say what went wrong)."""
    waiter = threading.Thread(target=wait_for_slot)
    waiter.start()
    for _ in range(1000):
        if admission.waiting == 1:
            break
        time.sleep(0.005)
    return waiter


def test_slots_then_queue_then_overloaded() -> None:
    admission = Admission(1, 1)
    admission.enter(time.monotonic() + FAR)
    waiter_done = threading.Event()

    def wait_for_slot() -> None:
        admission.enter(time.monotonic() + FAR)
        waiter_done.set()

    waiter = _start_waiter(admission, wait_for_slot)
    assert admission.admitted == 2
    with pytest.raises(Overloaded, match="1 requests running and 1 waiting"):
        admission.enter(time.monotonic() + FAR)
    admission.leave()
    assert waiter_done.wait(10)
    waiter.join(10)
    assert (admission.running, admission.waiting) == (1, 0)
    admission.leave()
    assert (admission.running, admission.waiting) == (0, 0)


def test_a_waiter_gives_up_at_its_deadline_and_never_runs() -> None:
    admission = Admission(1, 4)
    admission.enter(time.monotonic() + FAR)
    with pytest.raises(DeadlineExceeded, match="waited past its deadline"):
        admission.enter(time.monotonic() - 1)  # already past: no slot, no wait
    assert (admission.running, admission.waiting) == (1, 0)


def test_stop_wakes_waiters() -> None:
    admission = Admission(1, 4)
    admission.enter(time.monotonic() + FAR)
    errors: list[BaseException] = []

    def wait_for_slot() -> None:
        try:
            admission.enter(time.monotonic() + FAR)
        except NotReadyError as exc:
            errors.append(exc)

    waiter = _start_waiter(admission, wait_for_slot)
    admission.stop()
    waiter.join(10)
    assert len(errors) == 1 and "stopping" in str(errors[0])
    with pytest.raises(NotReadyError):
        admission.enter(time.monotonic() + FAR)


def test_watch_cancels_only_runs_past_their_deadline(linear_model: Path) -> None:
    session = ort.InferenceSession(str(linear_model), providers=["CPUExecutionProvider"])
    x = np.ones((1, 4), np.float32)
    watch = RunWatch(period_s=0.01)
    late_key, late = watch.begin(deadline=10.0)
    on_time_key, on_time = watch.begin(deadline=30.0)
    assert watch.check(now=20.0) == 1  # only the first is past its deadline
    assert watch.check(now=20.0) == 0  # marked once
    with pytest.raises(Exception, match="terminate"):
        session.run(None, {"x": x}, late)
    assert session.run(None, {"x": x}, on_time)[0].shape == (1, 3)
    assert watch.end(late_key, late) is True
    assert watch.end(on_time_key, on_time) is False


def test_watch_thread_cancels_a_run_in_progress(linear_model: Path) -> None:
    watch = RunWatch(period_s=0.01)
    watch.start()
    try:
        key, options = watch.begin(deadline=time.monotonic() - 1)
        for _ in range(1000):
            if options.terminate:
                break
            time.sleep(0.005)
        assert options.terminate
        assert watch.end(key, options) is True
    finally:
        watch.stop()
