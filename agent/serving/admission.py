"""Who may run a model now, and cutting runs at their deadline.

``Admission`` bounds the work of the inference server: at most ``slots`` requests run on
ONNX Runtime at once, at most ``queue`` more wait for a slot, and a waiter gives up at its
deadline. ``RunWatch`` cancels runs that outlive their deadline through ONNX Runtime's
``RunOptions.terminate``, so a stuck request frees its slot instead of holding it.

Invariants:
- ``running <= slots`` and ``waiting <= queue`` at all times; a request refused for a
  full queue never waited, a request whose deadline passed while waiting never ran.
- Waiters are served in arrival order: a newcomer does not take a slot while others wait.
- ``Admission.stop`` wakes every waiter, which then gives up (the server is stopping).
- A run's own ``RunOptions.terminate`` says whether the watch cancelled it: the caller
  tells a run cut at its deadline from a model that failed. It checks every ``period_s`` while runs
  are in flight and sleeps otherwise (a run started while it sleeps is checked within a
  second).
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import TYPE_CHECKING, Final

from agent.base.errors import NotReadyError

if TYPE_CHECKING:
    import onnxruntime as ort

_IDLE_CHECK_S: Final = 1.0


class DeadlineExceeded(NotReadyError):
    """The request outlived its deadline (waiting for a slot, or running)."""


class Overloaded(NotReadyError):
    """Every slot is busy and the queue is full."""


class Admission:
    """At most ``slots`` runs at once and ``queue`` waiters (thread-safe; ``running`` and
    ``waiting`` may be read without the lock, as gauges)."""

    def __init__(self, slots: int, queue: int) -> None:
        self.slots = slots
        self.queue = queue
        self.running = 0
        self.waiting = 0
        # The lock alone on the common path (a free slot, nobody waiting): the
        # Condition's Python-level wrappers cost more than the work they guard.
        self._lock = threading.Lock()
        self._condition = threading.Condition(self._lock)
        self._stopping = False

    @property
    def admitted(self) -> int:
        """Requests running or waiting."""
        return self.running + self.waiting

    def enter(self, deadline: float) -> None:
        """Take a slot, waiting until ``deadline`` (``time.monotonic``) at most.

        Raises Overloaded when the queue is full, DeadlineExceeded when the deadline
        passes before a slot frees, NotReadyError when the server stops meanwhile.
        """
        with self._lock:
            if self.running < self.slots and not self.waiting and not self._stopping:
                self.running += 1
                return
            if self.waiting >= self.queue:
                raise Overloaded(
                    f"overloaded: {self.slots} requests running and {self.queue} waiting; "
                    f"retry later"
                )
            self.waiting += 1
            try:
                while self.running >= self.slots or self._stopping:
                    if self._stopping:
                        raise NotReadyError("the agent is stopping")
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise DeadlineExceeded(
                            "the request waited past its deadline for a free slot"
                        )
                    self._condition.wait(remaining)
                self.running += 1
            finally:
                self.waiting -= 1

    def leave(self) -> None:
        """Give a slot back."""
        with self._lock:
            self.running -= 1
            if self.waiting:
                self._condition.notify()

    def stop(self) -> None:
        """Refuse to admit anyone from now on; wake every waiter."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()


class RunWatch:
    """Sets ``terminate`` on the ``RunOptions`` of runs past their deadline.

    Lock-free: ``begin`` and ``end`` are one dict operation each (atomic under the GIL);
    the watch may set the flag of a run that has just ended, which is harmless, since
    every run has its own ``RunOptions`` and the flag is only ever set past the run's
    deadline.
    """

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self._runs: dict[int, tuple[float, ort.RunOptions]] = {}
        self._keys = itertools.count()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="infer-deadlines", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def begin(
        self, deadline: float, options: ort.RunOptions | None = None
    ) -> tuple[int, ort.RunOptions]:
        """Watch a run that must end by ``deadline``; returns its key and its options:
        ``options`` when given, which must be fresh or those of a run that ended before
        its deadline (the watch only ever sets the flag of a run past its deadline, so
        theirs is still clear and stays so), else new ones (~10 µs after a model run has
        flushed the caches)."""
        if options is None:
            import onnxruntime as ort  # imported already: a model loaded (lookup only)

            options = ort.RunOptions()
        key = next(self._keys)
        self._runs[key] = (deadline, options)
        return key, options

    def end(self, key: int, options: ort.RunOptions) -> bool:
        """Stop watching a run; True when the watch cancelled it (it hit its deadline)."""
        self._runs.pop(key, None)
        return bool(options.terminate)

    def check(self, now: float) -> int:
        """Cancel every watched run past its deadline at ``now``; return how many."""
        cancelled = 0
        for deadline, options in list(self._runs.values()):
            if now >= deadline and not options.terminate:
                options.terminate = True
                cancelled += 1
        return cancelled

    def _watch(self) -> None:
        while not self._stop.wait(self.period_s if self._runs else _IDLE_CHECK_S):
            self.check(time.monotonic())
