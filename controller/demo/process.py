"""Running real processes for the demo: commands it prints and runs, waits with a
deadline, the private broker's binary, free loopback ports and milestone lines.

Invariants: a command that exits non-zero, or a wait that passes its deadline, raises
``DemoError`` naming what failed; every ``MILESTONE <name> <json>`` line is flushed as
it is printed, so a reader of the output sees it even if the demo then dies.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

BIN = Path(sys.executable).parent
T = TypeVar("T")


class DemoError(RuntimeError):
    """A step of the demo did not reach its expected outcome (the message says which)."""


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(probe: Callable[[], T | None], timeout_s: float, what: str) -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            value = probe()
            if value:
                return value
        time.sleep(0.2)
    raise DemoError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def can_connect(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True


def run(*args: str | Path, quiet: bool = False) -> str:
    shown = " ".join(str(a) for a in args)
    if not quiet:
        print(f"$ {shown}", flush=True)
    out = subprocess.run(
        [str(BIN / str(args[0])), *map(str, args[1:])], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise DemoError(f"{shown} failed ({out.returncode}):\n{out.stdout}{out.stderr}")
    if not quiet:
        for line in out.stdout.rstrip().splitlines():
            print(f"    {line}")
    return out.stdout


def mosquitto() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if found is None:
        raise DemoError("the demo needs mosquitto: sudo apt-get install mosquitto")
    return found


def milestone(name: str, **facts: Any) -> dict[str, Any]:
    """Print one machine-checkable line: ``MILESTONE <name> <json facts>``."""
    print(f"MILESTONE {name} {json.dumps(facts, sort_keys=True)}", flush=True)
    return {"name": name, **facts}
