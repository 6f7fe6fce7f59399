"""How ``edgectl`` shows the progress of long work (``controller.base.progress``), on stderr.

- stderr is a terminal (and no ``-v``): a live display (rich): one line per phase with a
  spinner, then a tick and the time it took; the current step below it, with a bar when
  it counts units.
- otherwise (a log, CI, a pipe; or ``-v``, whose log lines would tear a live display):
  one plain line per phase and per step, ``<command>: <text>``, and for a long counted
  one a line with its count (``12/33``) at most every ``PLAIN_COUNT_EVERY_S``.
- ``--json``: nothing at all (``SILENT``).

stdout is never touched: it carries the command's result only. While the live display
runs, whatever else goes to stderr (log lines, warnings) prints above it, whole.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console, RenderableType
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Progress as RichProgress
from rich.table import Column
from rich.text import Text

from controller.base.progress import SILENT, Progress

# Plain lines say how far a counted phase or step is at most this often.
PLAIN_COUNT_EVERY_S = 15.0


class _Plain:
    """One line per phase and per step on stderr; a long counted one also says how far it
    is, at most every ``every_s`` seconds."""

    def __init__(self, command: str, every_s: float = PLAIN_COUNT_EVERY_S) -> None:
        self._prefix = f"{command}: "
        self._every_s = every_s
        self._text = ""
        self._done = 0
        self._total: int | None = None
        self._last = 0.0

    def phase(self, text: str, total: int | None = None) -> None:
        self._start(text, total)

    def step(self, text: str, total: int | None = None) -> None:
        self._start(f"  {text}", total)

    def advance(self, count: int = 1) -> None:
        self._done += count
        due = time.monotonic() - self._last >= self._every_s
        if due and self._total and self._done < self._total:
            self._line(f"{self._text}: {self._done}/{self._total}")

    def _start(self, text: str, total: int | None) -> None:
        self._text, self._total, self._done = text, total, 0
        self._line(text)

    def _line(self, text: str) -> None:
        self._last = time.monotonic()
        print(self._prefix + text, file=sys.stderr, flush=True)


class _Counted(ProgressColumn):
    """Renders ``inner`` only for tasks that count units (the ``counted`` field)."""

    def __init__(self, inner: ProgressColumn) -> None:
        super().__init__()
        self._inner = inner

    def render(self, task: Task) -> RenderableType:
        return self._inner.render(task) if task.fields.get("counted") else Text("")


class _Status(SpinnerColumn):
    """A spinner while a task runs, a tick when it is done, a cross when it failed."""

    def render(self, task: Task) -> RenderableType:
        if task.fields.get("failed"):
            return Text("✗", style="red")
        return super().render(task)


class _Live:
    """A rich display: the phases so far, each ticked with its time, and the current step."""

    def __init__(self, display: RichProgress) -> None:
        self._display = display
        self._phase: TaskID | None = None
        self._phase_text = ""
        self._step: TaskID | None = None

    def phase(self, text: str, total: int | None = None) -> None:
        self.finish()
        self._phase_text = escape(text)
        self._phase = self._display.add_task(
            self._phase_text, total=total, counted=total is not None
        )

    def step(self, text: str, total: int | None = None) -> None:
        self._end_step()
        self._step = self._display.add_task(
            "  " + escape(text), total=total, counted=total is not None
        )

    def advance(self, count: int = 1) -> None:
        task = self._step if self._step is not None else self._phase
        if task is not None:
            self._display.advance(task, count)

    def finish(self, failed: bool = False) -> None:
        """End the current phase: ticked with its time, or marked failed."""
        self._end_step()
        if self._phase is None:
            return
        if failed:
            self._display.update(
                self._phase, description=f"{self._phase_text} [red]failed", failed=True
            )
            self._display.stop_task(self._phase)
        else:
            task = next(t for t in self._display.tasks if t.id == self._phase)
            done = task.total if task.total is not None else 1
            self._display.update(self._phase, total=done, completed=done)
        self._phase = None

    def _end_step(self) -> None:
        if self._step is not None:
            self._display.remove_task(self._step)
            self._step = None


@contextmanager
def progress_display(
    command: str, quiet: bool = False, verbose: bool = False
) -> Iterator[Progress]:
    """The ``Progress`` for one run of ``command`` (see the module docstring): SILENT when
    ``quiet`` (``--json``), plain lines when stderr is not a terminal or ``verbose``."""
    if quiet:
        yield SILENT
        return
    console = Console(stderr=True)
    if verbose or not console.is_terminal or console.is_dumb_terminal:
        yield _Plain(command)
        return
    display = RichProgress(
        _Status(finished_text=Text("✓", style="green")),
        # The description gives way (…) before the status and the time do.
        TextColumn(
            "{task.description}", table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis")
        ),
        _Counted(BarColumn(bar_width=24)),
        _Counted(MofNCompleteColumn()),
        TimeElapsedColumn(),
        console=console,
        redirect_stdout=False,
        redirect_stderr=True,  # what is written to stderr meanwhile prints above the display
        expand=True,
    )
    live = _Live(display)
    terminal = sys.stderr
    with display:
        # Log lines (warnings) too: a handler holds the stream it was given at set-up.
        moved = [
            h
            for h in logging.getLogger().handlers
            if type(h) is logging.StreamHandler and h.stream is terminal
        ]
        for handler in moved:
            handler.setStream(sys.stderr)
        try:
            try:
                yield live
            except BaseException:
                live.finish(failed=True)
                raise
            live.finish()
        finally:
            for handler in moved:
                handler.setStream(terminal)
