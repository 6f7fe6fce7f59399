"""The processes of a chaos run and what the plan does to them.

A private persistent mosquitto (``Broker``: stopped with SIGTERM so it saves its sessions
and queued messages, started again on the same port), `edgectl serve` (``Serve``: SIGKILL,
then started again; it listens on a new port, which the HTTP proxies follow), the agents
(``Agent``: real ``edge-agent run`` processes, SIGKILLed and started again; each keeps the
windows during which it was down, for the client-failure invariant), one agent's state
folder on a small tmpfs (``StateDisk``: filled to the last byte, then freed) and one
agent's wall clock under libfaketime (``SteppedClock``).

Nothing here judges (``tests.chaos.invariants``) or decides when (``tests.chaos.schedule``).
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar

from tests.chaos.invariants import DownWindow
from tests.chaos.proxy import FaultProxy
from tests.e2e_support import BIN, Proc, start_serve, write_agent_config
from tests.helpers import Broker, start_broker, stop_process

ROOT = Path(__file__).resolve().parents[2]
LISTENING = "inference socket listening on"
FAKETIME_GLOB = "/usr/lib/*/faketime/libfaketime.so.1"
_TRACEBACK = re.compile(r"Traceback \(most recent call last\):\n(?:[ \t].*\n)*.*")


def faketime_library() -> Path | None:
    """libfaketime's preload library (Debian package ``faketime``), or None."""
    found = sorted(glob.glob(FAKETIME_GLOB))
    return Path(found[0]) if found else None


def spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> Proc:
    """Start ``args`` from the repository's root (so ``-m tests...`` imports this tree),
    output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        process = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=ROOT,
        )
    return Proc(process=process, log=log)


# ---------------------------------------------------------------------------- broker, serve


class BrokerProcess:
    """A persistent private mosquitto on a fixed port, restartable."""

    def __init__(self, workdir: Path) -> None:
        self._workdir = workdir
        self.broker: Broker | None = start_broker(workdir, persistent=True)
        self.port = self.broker.port
        self.address = self.broker.address

    def stop(self) -> None:
        if self.broker is not None:
            self.broker.stop()  # SIGTERM: mosquitto saves its persistence file
            self.broker = None

    def start(self) -> None:
        if self.broker is None:
            self.broker = start_broker(self._workdir, self.port, persistent=True)


class ServeProcess:
    """`edgectl serve` on a port of its own; the HTTP proxies follow it across restarts."""

    SETTINGS: ClassVar[dict[str, float]] = {
        "rollout_tick_interval_s": 0.5,
        "heartbeat_interval_s": 1.0,
    }

    def __init__(self, repo: Path, broker: str, folder: Path) -> None:
        self._repo, self._broker, self._folder = repo, broker, folder
        self._starts = 0
        folder.mkdir(parents=True, exist_ok=True)
        self.proc: Proc | None = None
        self.port = 0
        self.proxies: list[FaultProxy] = []
        self.start()

    def start(self) -> None:
        if self.proc is not None:
            return
        self._starts += 1
        log = self._folder / f"serve-{self._starts}.log"
        self.proc, url = start_serve(self._repo, self._broker, log, dict(self.SETTINGS))
        self.port = int(url.rsplit(":", 1)[1])
        for proxy in self.proxies:
            proxy.upstream_port = self.port

    def sigkill(self) -> None:
        if self.proc is not None:
            self.proc.process.kill()
            self.proc.process.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def logs(self) -> list[Path]:
        return sorted(self._folder.glob("serve-*.log"))


# ---------------------------------------------------------------------------- agents


AGENT_SETTINGS = {
    "[mqtt]\n": "keepalive_s = 5\nreconnect_min_s = 0.5\nreconnect_max_s = 2\n",
    "[repository]\n": (
        "connect_timeout_s = 2\nread_timeout_s = 4\ndownload_deadline_s = 30\nmin_bytes_per_s = 0\n"
    ),
}
AGENT_TAIL = "[telemetry]\nheartbeat_interval_s = 1\nevent_ack_timeout_s = 2\n" + (
    "[install]\nprobation_tick_s = 0.25\n"
)


class AgentProcess:
    """One device: its config, its process (restartable) and the windows it was down."""

    def __init__(
        self,
        folder: Path,
        device: str,
        fleet: str,
        *,
        broker_port: int,
        repo_port: int,
        root: Path,
        state_dir: Path | None = None,
        clock: SteppedClock | None = None,
    ) -> None:
        self.device, self.fleet, self.folder = device, fleet, folder
        self.config = write_agent_config(
            folder,
            device=device,
            fleet=fleet,
            broker=f"127.0.0.1:{broker_port}",
            repo_url=f"http://127.0.0.1:{repo_port}",
            root=root,
            poll_interval_s=1.0,
        )
        text = self.config.read_text()
        for section, lines in AGENT_SETTINGS.items():
            text = text.replace(section, section + lines)
        if state_dir is not None:
            text = text.replace(f'state_dir = "{folder / "state"}"', f'state_dir = "{state_dir}"')
        self.config.write_text(text + AGENT_TAIL)
        self.state_dir = state_dir or folder / "state"
        self.socket = folder / "infer.sock"
        self.clock = clock
        self._lock = threading.Lock()
        self._starts = 0
        self.proc: Proc | None = None
        self.windows: list[DownWindow] = []
        self._awaiting_listen = False
        self.unexpected_exits = 0

    def start(self) -> None:
        """Start the process; its down window (if any) closes once it listens."""
        with self._lock:
            if self.proc is not None:
                return
            self._starts += 1
            log = self.folder / f"agent-{self._starts}.log"
            if self.clock is None:
                args = [str(BIN / "edge-agent"), "run", "--config", str(self.config)]
                env = None
            else:
                args = [str(BIN / "python"), "-m", "tests.chaos.faked_clock_agent"]
                args += ["run", "--config", str(self.config)]
                env = self.clock.environment()
            self.proc = spawn(args, log, env)
            self._awaiting_listen = True

    def sigkill(self) -> None:
        """SIGKILL now; the window opens just before the signal."""
        with self._lock:
            if self.proc is None:
                return
            self.windows.append(DownWindow(time.monotonic()))
            self.proc.process.send_signal(signal.SIGKILL)
            self.proc.process.wait()
            self.proc = None
            self._awaiting_listen = False

    def stop(self) -> None:
        with self._lock:
            if self.proc is not None:
                stop_process(self.proc.process, timeout_s=20)
                self.proc = None

    def watch(self) -> str | None:
        """Called by the monitor: close the down window once the restarted process listens;
        return the log's tail when the process exited on its own (it is then started
        again, as systemd would)."""
        with self._lock:
            proc = self.proc
            if proc is None:
                return None
            if proc.process.poll() is not None:
                self.proc = None
                self.unexpected_exits += 1
                exited = (
                    f"exited with status {proc.process.returncode} ({proc.log.name}): "
                    + _last_error(proc.text())
                )
            else:
                exited = None
                if self._awaiting_listen and LISTENING in proc.text():
                    self._awaiting_listen = False
                    if self.windows and self.windows[-1].end is None:
                        self.windows[-1].end = time.monotonic()
        if exited is not None:
            self.start()
        return exited

    def down_windows(self) -> list[DownWindow]:
        with self._lock:
            return [DownWindow(w.start, w.end) for w in self.windows]

    @property
    def pid(self) -> int | None:
        with self._lock:
            return self.proc.process.pid if self.proc is not None else None

    def logs(self) -> list[Path]:
        return sorted(self.folder.glob("agent-*.log"), key=lambda p: int(p.stem.split("-")[1]))

    def logged_events(self) -> dict[int, str]:
        """seq → kind, from ``event N: KIND`` lines of every run of this agent."""
        pattern = re.compile(r"agent\.telemetry\.reporter: event (\d+): (\w+)")
        out: dict[int, str] = {}
        for log in self.logs():
            for seq, kind in pattern.findall(log.read_text(errors="replace")):
                out[int(seq)] = kind
        return out

    def dump_stacks(self) -> None:
        """Have the running agent write every thread's stack to its log (SIGUSR1: the
        agent's faulthandler), for a device that did not converge: what it waits on."""
        with self._lock:
            if self.proc is None or self.proc.process.poll() is not None:
                return
            self.proc.process.send_signal(signal.SIGUSR1)
        time.sleep(1.0)

    def diagnose(self) -> str:
        """Evidence for a device that did not converge, read from its logs (after it
        stopped: an update loop that died shows its exception only at shutdown), with
        the agent's own threads from the last stack dump (``dump_stacks``)."""
        texts = [(log.name, log.read_text(errors="replace")) for log in self.logs()]
        stacks = agent_threads(texts[-1][1]) if texts else ""
        stacks = f"; its threads at the end: {stacks}" if stacks else ""
        for name, text in reversed(texts):
            died = [m.group(0) for m in _TRACEBACK.finditer(text) if _is_loop_death(m.group(0))]
            if died:
                return f"its update loop had died ({name}): {_summary(died[-1])}{stacks}"
        notes = [
            line
            for _, text in texts
            for line in text.splitlines()
            if (" WARNING " in line or " ERROR " in line or "waits until" in line)
            and "agent.serving.routes" not in line
        ]
        return "its update loop ran; its last notes: " + " | ".join(notes[-3:]) + stacks


_THREAD = re.compile(
    r"^(?:Current thread|Thread) 0x[0-9a-f]+ \(most recent call first\):\n((?:  .*\n?)*)", re.M
)
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<func>\S+)')


def agent_threads(text: str) -> str:
    """The threads of a log's last faulthandler dump that stand in the project's code,
    each as its innermost frames (file:line func), innermost first."""
    found = list(_THREAD.finditer(text))
    last = found[-1:]
    for earlier in reversed(found[:-1]):  # one dump: blocks separated by blank lines only
        if text[earlier.end() : last[0].start()].strip():
            break
        last.insert(0, earlier)
    out = []
    for match in last:
        frames = [f.groupdict() for f in _FRAME.finditer(match.group(1))]
        if not any("/agent/" in f["file"] for f in frames):
            continue
        # The innermost frames (what it waits in), then the project's frames above them.
        picked = frames[:5] + [f for f in frames[5:] if "/agent/" in f["file"]][:6]
        shown = [f"{Path(f['file']).name}:{f['line']} {f['func']}" for f in picked]
        out.append(" < ".join(shown))
    return " || ".join(out)


def _is_loop_death(traceback: str) -> bool:
    """An exception that ended the update loop's task, raised again when shutdown awaits it."""
    return "in _update_loop" in traceback and "in _shutdown" in traceback


def _summary(traceback: str) -> str:
    """A traceback's innermost frame and its exception, on one line."""
    return " | ".join(line.strip() for line in traceback.splitlines()[-3:])


def _last_error(text: str) -> str:
    """The last two tracebacks of a log (a chained exception's cause and itself), each as
    its innermost frame and exception; else the log's last lines."""
    found = list(_TRACEBACK.finditer(text))
    if found:
        return " ... then: ".join(_summary(m.group(0)) for m in found[-2:])
    return " | ".join(text.strip().splitlines()[-5:])


# ---------------------------------------------------------------------------- disk, clock


class StateDisk:
    """A small tmpfs for one agent's state folder; ``fill`` takes every free byte."""

    def __init__(self, mountpoint: Path, size_mib: int = 16) -> None:
        self.mountpoint = mountpoint
        mountpoint.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "tmpfs", str(mountpoint)],
            check=True,
            capture_output=True,
            text=True,
        )
        self.state_dir = mountpoint / "state"
        self.state_dir.mkdir()
        self._filler = mountpoint / "filler"

    def fill(self) -> int:
        """Write until the file system is full, to the last byte; return the bytes written."""
        written = 0
        block = b"\xa5" * (1024 * 1024)
        with open(self._filler, "ab", buffering=0) as out:
            for size in (len(block), 64 * 1024, 4096, 1):
                with contextlib.suppress(OSError):
                    while n := out.write(block[:size]):
                        written += n
        return written

    def free(self) -> None:
        self._filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        result = subprocess.run(["umount", str(self.mountpoint)], capture_output=True)
        if result.returncode != 0:
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)


class SteppedClock:
    """The wall clock of one agent, through libfaketime: ``step`` moves it, at once, to
    ``offset_s`` from real time (the monotonic clock is left alone)."""

    def __init__(self, folder: Path, library: Path) -> None:
        self._file = folder / "faketime.rc"
        self._library = library
        self.offset_s = 0.0
        self._file.write_text("+0\n")

    def environment(self) -> dict[str, str]:
        return {
            "LD_PRELOAD": str(self._library),
            "FAKETIME_TIMESTAMP_FILE": str(self._file),
            "FAKETIME_CACHE_DURATION": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        }

    def step(self, offset_s: float) -> None:
        self.offset_s = offset_s
        tmp = self._file.with_suffix(".tmp")
        tmp.write_text(f"{offset_s:+.0f}\n")
        tmp.replace(self._file)


def python_exe() -> str:
    return str(BIN / "python") if (BIN / "python").exists() else sys.executable


def have_root() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None
