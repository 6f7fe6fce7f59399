"""Progress of long work, as the work reports it: the ``Progress`` protocol and ``SILENT``.

A long operation (``bundle build``) takes a ``Progress`` and calls ``phase`` when a
phase begins (which ends the one before), ``step`` for a named part of the current
phase, and ``advance`` as the counted units of a phase or step finish. How (and whether)
that is shown is the command line's business (``controller.commands.progress``: a live
display on a terminal, one plain line per phase otherwise, nothing with ``--json``);
library callers get ``SILENT``, which shows nothing.

Invariant: reporting never changes what the work does or returns; a ``Progress`` only
shows text, on stderr, never on stdout.
"""

from __future__ import annotations

from typing import Final, Protocol


class Progress(Protocol):
    """Where long work reports how far it is."""

    def phase(self, text: str, total: int | None = None) -> None:
        """A phase begins (the previous one ends); ``total``: the units it counts, if any."""

    def step(self, text: str, total: int | None = None) -> None:
        """A named part of the current phase begins; ``total``: the units it counts."""

    def advance(self, count: int = 1) -> None:
        """``count`` units of the current phase or step are done."""


class _Silent:
    """Shows nothing."""

    def phase(self, text: str, total: int | None = None) -> None:
        pass

    def step(self, text: str, total: int | None = None) -> None:
        pass

    def advance(self, count: int = 1) -> None:
        pass


SILENT: Final[Progress] = _Silent()
