"""A candidate version in shadow: run on copies of live requests, beside the serving version,
and compared with it; it answers no client.

``compare_outputs`` (pure) compares one request's outputs; ``ShadowRunner`` runs the
candidate on a sampled share of live requests, off the request path, and sums the
comparisons into ``ShadowFigures``. The inference server offers a request to the runner
the registry holds for its model (``ModelRegistry.shadow``); the lifecycle
(``agent.update.lifecycle``) starts the runner, judges its figures and stops it.

Invariants:
- At most one candidate run is in flight: a sampled request that finds the runner busy is
  not copied and not queued, only counted (``dropped``). The request that was claimed
  copies its inputs and outputs (the server reuses their memory) and hands them over;
  its client's answer never waits for the candidate.
- The candidate runs on the runner's own thread, at the lowest CPU priority the system
  gives a thread: Linux's ``SCHED_IDLE`` policy (it runs only on a CPU nothing else
  wants, and any other thread that wakes takes the CPU from it at once), else ``nice``
  19. With ``intra_op_threads = 1`` (the default) ONNX Runtime runs the session on that
  thread, so the serving version's runs come first.
- Run times are compared like with like: the CPU time of the thread that ran each side
  (``cpu_timed``), so a shadow run slowed by the priority it yields is not read as a
  slower model; with more intra-op threads (ONNX Runtime's pool does the work, not the
  calling thread) wall time on both sides.
- Nothing here imports numpy before a runner exists (it comes with the first model).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from agent.base.errors import AgentError
from agent.runtime.models import LoadedModel

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

# Per-request run-time ratios kept for the median (the latest ones).
RATIO_WINDOW: Final = 512
# The candidate thread's niceness (19: the lowest priority a thread can take).
SHADOW_NICE: Final = 19


class OutputMismatchError(ValueError):
    """The candidate's outputs cannot be compared with the serving version's (a missing
    output, another shape, NaN or infinity where the serving version's are finite)."""


@dataclass(frozen=True)
class Comparison:
    """One request compared: top-1 rows compared and agreed (class-score outputs only),
    the lowest cosine and the largest absolute difference over its outputs."""

    top1_rows: int
    top1_agreed: int
    cosine_min: float
    max_abs: float


def is_class_scores(array: np.ndarray) -> bool:
    """Outputs that look like class scores: 2-D ``[N, C]`` floating point with C > 1."""
    return array.ndim == 2 and array.shape[1] > 1 and array.dtype.kind == "f"


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The cosine of two arrays taken as flat vectors (float64): 1.0 when both are all
    zeros, 0.0 when only one is."""
    import numpy as np

    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    if nx == 0.0 and ny == 0.0:
        return 1.0
    if nx == 0.0 or ny == 0.0:
        return 0.0
    return max(-1.0, min(1.0, float(np.dot(x, y)) / (nx * ny)))


def compare_outputs(
    serving: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]
) -> Comparison:
    """Compare one request's outputs, output by output (the serving version's names).

    Raises OutputMismatchError naming the output when the candidate lacks one, gives it
    another shape, or gives NaN or infinity where the serving version gives a finite
    value: the candidate failing on the request, not a figure.
    """
    import numpy as np

    rows = agreed = 0
    cos_min, max_abs = 1.0, 0.0
    for name, want in serving.items():
        got = candidate.get(name)
        if got is None:
            raise OutputMismatchError(f"the candidate gave no output {name!r}")
        if got.shape != want.shape:
            raise OutputMismatchError(
                f"output {name!r}: the candidate's shape {list(got.shape)} differs from "
                f"the serving version's {list(want.shape)}"
            )
        x = np.asarray(want, dtype=np.float64)
        y = np.asarray(got, dtype=np.float64)
        if not np.all(np.isfinite(y) | ~np.isfinite(x)):
            raise OutputMismatchError(
                f"output {name!r}: the candidate gave NaN or infinity where the serving "
                "version's values are finite"
            )
        finite = np.isfinite(x)
        if x.size:
            diff = np.abs(np.where(finite, x, 0.0) - np.where(finite, y, 0.0))
            max_abs = max(max_abs, float(diff.max()))
        cos_min = min(cos_min, cosine(np.where(finite, x, 0.0), np.where(finite, y, 0.0)))
        if is_class_scores(want) and want.shape[0]:
            rows += want.shape[0]
            agreed += int(np.count_nonzero(np.argmax(x, axis=1) == np.argmax(y, axis=1)))
    return Comparison(rows, agreed, cos_min, max_abs)


def median_ratio(ratios: Sequence[float]) -> float | None:
    """The median of per-request run-time ratios (candidate / serving); None for none."""
    if not ratios:
        return None
    ordered = sorted(ratios)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return float(ordered[middle])
    return (ordered[middle - 1] + ordered[middle]) / 2.0


@dataclass(frozen=True)
class ShadowFigures:
    """What a shadow has shown so far.

    ``samples``: requests compared (the candidate ran and its outputs compared);
    ``errors``: candidate runs that raised or gave outputs that cannot be compared
    (``last_error`` says the latest); ``dropped``: sampled requests not copied because a
    candidate run was in flight; ``agreement``: top-1 rows agreed / compared (None: no
    class-score output compared); ``cosine_min`` and ``max_abs``: the worst over every
    output compared (None before the first); ``latency_ratio``: the median of the
    per-request run-time ratios candidate / serving (None before the first).
    """

    version: str
    serving: str
    samples: int = 0
    errors: int = 0
    dropped: int = 0
    top1_rows: int = 0
    top1_agreed: int = 0
    cosine_min: float | None = None
    max_abs: float | None = None
    latency_ratio: float | None = None
    last_error: str = ""

    @property
    def agreement(self) -> float | None:
        return self.top1_agreed / self.top1_rows if self.top1_rows else None


def add_comparison(figures: ShadowFigures, c: Comparison) -> ShadowFigures:
    """``figures`` with one more request compared (pure)."""
    from dataclasses import replace

    return replace(
        figures,
        samples=figures.samples + 1,
        top1_rows=figures.top1_rows + c.top1_rows,
        top1_agreed=figures.top1_agreed + c.top1_agreed,
        cosine_min=c.cosine_min
        if figures.cosine_min is None
        else min(figures.cosine_min, c.cosine_min),
        max_abs=c.max_abs if figures.max_abs is None else max(figures.max_abs, c.max_abs),
    )


@dataclass
class _Job:
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    serving_s: float


class ShadowRunner:
    """Runs ``candidate`` on copies of a sampled share of the requests ``serving`` (the
    version that answers) serves, one at a time, and sums the comparisons. Thread-safe.

    The server calls ``claim`` for a request of the model before running it, and, when it
    returned True, either ``submit`` after the run or ``release`` (the run failed).
    """

    def __init__(
        self,
        candidate: LoadedModel,
        serving: str,
        sample_rate: float,
        *,
        cpu_timed: bool = True,
        rng: Callable[[], float] = random.random,
        nice: int | None = SHADOW_NICE,
    ) -> None:
        self.candidate = candidate
        self.serving = serving
        self.cpu_timed = cpu_timed
        self._rate = sample_rate
        self._rng = rng
        self._nice = nice
        self._cond = threading.Condition()
        self._busy = False  # claimed, submitted or running: the one slot is taken
        self._running = False
        self._job: _Job | None = None
        self._closed = False
        self._figures = ShadowFigures(version=candidate.version, serving=serving)
        self._ratios: deque[float] = deque(maxlen=RATIO_WINDOW)
        self._thread = threading.Thread(
            target=self._work, name=f"shadow:{candidate.name}", daemon=True
        )
        self._thread.start()

    # -- the request path (cheap: a lock, a random number)

    def claim(self, version: str) -> bool:
        """Whether this request (served by ``version``) is copied to the candidate: True
        reserves the one run in flight. A sampled request that finds it taken is counted
        as dropped."""
        if version != self.serving or self._rng() >= self._rate:
            return False
        with self._cond:
            if self._closed:
                return False
            if self._busy:
                self._figures = _bump(self._figures, dropped=1)
                return False
            self._busy = True
            return True

    def submit(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
        wall_s: float,
        cpu_s: float,
    ) -> None:
        """Hand over a claimed request: its inputs and the serving version's outputs
        (copied here) and how long the serving run took (wall and thread CPU time)."""
        import numpy as np

        job = _Job(
            {k: np.array(v, copy=True) for k, v in inputs.items()},
            {k: np.array(v, copy=True) for k, v in outputs.items()},
            cpu_s if self.cpu_timed else wall_s,
        )
        with self._cond:
            if self._closed:
                self._busy = False
                return
            self._job = job
            self._cond.notify_all()

    def release(self) -> None:
        """Give back a claim not submitted (the serving run failed: nothing to compare);
        nothing to do once it was submitted. The server calls it when each claimed request
        ends, whatever happened."""
        with self._cond:
            if self._busy and self._job is None and not self._running:
                self._busy = False
                self._cond.notify_all()

    # -- the lifecycle's side

    def figures(self) -> ShadowFigures:
        with self._cond:
            figures = self._figures
            ratios = list(self._ratios)
        from dataclasses import replace

        return replace(figures, latency_ratio=median_ratio(ratios))

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no candidate run is in flight (tests, and before a verdict)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._busy, timeout=timeout_s)

    def close(self) -> None:
        """Stop: no more claims; the worker ends after a run in flight."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- the candidate's thread

    def _work(self) -> None:
        if self._nice is not None:
            lowest(threading.get_native_id(), self._nice)
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._job is not None)
                if self._closed:
                    self._busy = False
                    self._cond.notify_all()
                    return
                job, self._job = self._job, None
                self._running = True
            assert job is not None
            self._run(job)
            with self._cond:
                self._busy = self._running = False
                self._cond.notify_all()

    def _run(self, job: _Job) -> None:
        timer = time.thread_time if self.cpu_timed else time.perf_counter
        started = timer()
        try:
            got = self.candidate.infer(job.inputs, list(job.outputs))
            spent = timer() - started
            comparison = compare_outputs(job.outputs, got)
        except Exception as exc:  # the candidate failing on a live request: evidence
            # An AgentError already names what failed; other types name themselves.
            named = isinstance(exc, AgentError)
            message = (str(exc) if named else f"{type(exc).__name__}: {exc}")[:500]
            with self._cond:
                self._figures = _bump(self._figures, errors=1, last_error=message)
            return
        with self._cond:
            self._figures = add_comparison(self._figures, comparison)
            if job.serving_s > 0:
                self._ratios.append(spent / job.serving_s)


def lowest(tid: int, nice: int) -> str:
    """Give thread ``tid`` the lowest CPU priority it can take (per thread on Linux, where
    a thread's id is a process id to these calls): ``SCHED_IDLE``, else ``nice``. Returns
    which it got ("" when neither)."""
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        return "SCHED_IDLE"
    except (OSError, AttributeError) as exc:
        logger.debug("shadow thread: no SCHED_IDLE (%s), trying nice %d", exc, nice)
    try:
        os.setpriority(os.PRIO_PROCESS, tid, nice)
        return f"nice {nice}"
    except (OSError, AttributeError) as exc:
        logger.debug("shadow thread keeps its priority: %s", exc)
        return ""


def _bump(
    figures: ShadowFigures, *, dropped: int = 0, errors: int = 0, last_error: str | None = None
) -> ShadowFigures:
    from dataclasses import replace

    return replace(
        figures,
        dropped=figures.dropped + dropped,
        errors=figures.errors + errors,
        last_error=figures.last_error if last_error is None else last_error,
    )
