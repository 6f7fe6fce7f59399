"""``edge-agent`` for a process whose wall clock libfaketime steps: ``python -m
tests.chaos.faked_clock_agent run --config agent.toml``.

The chaos run steps one agent's wall clock with libfaketime (``LD_PRELOAD``, the offset
read from ``FAKETIME_TIMESTAMP_FILE``), leaving its monotonic clock alone
(``FAKETIME_DONT_FAKE_MONOTONIC=1``): a device whose NTP corrects its time sees exactly
that. libfaketime 0.9.10 (Debian 12) then breaks Python ≥ 3.11's ``time.sleep``, which
sleeps with ``clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME)``: the library shifts the
absolute deadline by the faked wall clock and the kernel answers EINVAL
(wolfcw/libfaketime#426, fixed after 0.9.10). Faking the monotonic clock too is no way
out: it would read as the wall clock, and every lock or event wait with a timeout
(``sem_clockwait``, not intercepted) would sleep for decades.

So this runs the very same ``agent.cli.main`` after replacing ``time.sleep`` with a
relative wait that libfaketime does not touch (``select`` with a timeout). Nothing else
differs from ``edge-agent``; the replacement happens before any agent module is imported,
so every later ``time.sleep`` (paho's reconnect wait among them) gets it.
"""

from __future__ import annotations

import select
import sys
import time


def _relative_sleep(seconds: float) -> None:
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        select.select([], [], [], left)


def main() -> int:
    time.sleep = _relative_sleep
    from agent.cli import main as agent_main

    return agent_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
