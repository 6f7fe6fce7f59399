"""What keeps going during a chaos run: the clients, the operator and the monitor.

- ``Client``: one thread per device calling its agent's socket continuously (real OIP
  requests over the real Unix socket, JSON so every answer names the version that
  computed it); each answer is judged at once (``invariants.judge_answer``), each failure
  classified (``invariants.classify_failure``). Half the requests carry an input the bad
  release's model fails on, so its probation and the rollout's gates have something to
  catch.
- ``Operator``: sends the plan's releases and staged rollouts with the real `edgectl`
  commands; it adds a version to what its fleet may serve just before signing it. Before
  a new staged rollout it clears the fleet's active one as an operator would: promotes a
  good one to the end, aborts a bad one.
- ``Monitor``: every half second, closes agents' down windows, restarts an agent that
  exited on its own (a violation), samples every agent's RSS and every fleet's desired
  state (the versions it ever named).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import psutil  # type: ignore[import-untyped]

from agent.base.errors import InferenceError
from agent.client.http import UnixHTTPConnection
from agent.oip.response import build_infer_request, parse_infer_response
from controller.repository.release import current_desired_state
from controller.repository.repo import Repository
from controller.rollout.stages import RolloutState
from controller.rollout.store import RolloutStore
from tests.chaos import invariants as inv
from tests.chaos.fleet import AgentProcess
from tests.chaos.schedule import Release
from tests.e2e_support import edgectl

MODEL = "linear"
SMALL = np.array([[0.5, -1.0, 2.0, 0.25]], dtype=np.float32)
# The bad release's model fails whenever |x[0]| >= 8 (tests.helpers.make_misbehaving_model).
LARGE = np.array([[12.0, -1.0, 2.0, 0.25]], dtype=np.float32)
INFER_PATH = f"/v2/models/{MODEL}/infer"
# No p99 rule on a shared 2-core machine: a test must not depend on timings.
# Shadows off: chaos judges the probation path (its bad releases fail their probation).
PROBATION = ("--probation-s", "2", "--probation-max-p99-ratio", "1000", "--no-shadow")
GATES = "error_rate<0.05,p99_ratio=off,failed_installs<0.5,min_devices=2"


class Signed:
    """Per fleet, the versions the operator has signed for it (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._versions: dict[str, frozenset[str]] = {}
        self.bad: frozenset[str] = frozenset()

    def add(self, fleet: str, version: str, bad: bool = False) -> None:
        with self._lock:
            self._versions[fleet] = self._versions.get(fleet, frozenset()) | {version}
            if bad:
                self.bad = self.bad | {version}

    def of(self, fleet: str) -> frozenset[str]:
        with self._lock:
            return self._versions.get(fleet, frozenset())


class Client(threading.Thread):
    """Calls one agent's socket until stopped; judges every answer."""

    def __init__(
        self,
        agent: AgentProcess,
        signed: Signed,
        expected: Mapping[str, Mapping[str, np.ndarray]],
        violations: inv.Violations,
        stop: threading.Event,
    ) -> None:
        super().__init__(name=f"client-{agent.device}", daemon=True)
        self.agent = agent
        self._signed = signed
        self._expected = expected  # "small"/"large" → version → output
        self._violations = violations
        self._halt = stop
        self.counts: Counter[str] = Counter()
        # When the current run of bad-release errors began (None: a good version answered
        # since the last one).
        self._bad_since: float | None = None
        self.served: Counter[str] = Counter()
        self._bodies = {
            "small": build_infer_request({"x": SMALL}),
            "large": build_infer_request({"x": LARGE}),
        }

    def run(self) -> None:
        connection: UnixHTTPConnection | None = None
        n = 0
        while not self._halt.is_set():
            which = "large" if n % 2 else "small"
            n += 1
            started = time.monotonic()
            try:
                if connection is None:
                    connection = UnixHTTPConnection(self.agent.socket, timeout=30.0)
                status, _, data = connection.request("POST", INFER_PATH, [self._bodies[which]])
            except (InferenceError, OSError) as exc:
                if connection is not None:
                    connection.close()
                connection = None
                self._failed(which, f"{type(exc).__name__}: {exc}", started)
            else:
                if status == 200:
                    self._answered(which, data)
                else:
                    self._failed(which, f"HTTP {status}: {_error_text(data)}", started)
            self._halt.wait(0.05)
        if connection is not None:
            connection.close()

    def _answered(self, which: str, data: bytearray) -> None:
        try:
            version = str(json.loads(data)["model_version"])
            output = parse_infer_response(data)["y"]
        except (ValueError, KeyError) as exc:
            self.counts["violations"] += 1
            self._violations.add(inv.UNVERIFIED, self.agent.device, f"unreadable answer: {exc}")
            return
        self.counts["answers"] += 1
        self.served[version] += 1
        if version not in self._signed.bad:
            self._bad_since = None
        problem = inv.judge_answer(
            self.agent.fleet,
            self._signed.of(self.agent.fleet),
            self._expected[which],
            version,
            np.asarray(output),
        )
        if problem is not None:
            self.counts["violations"] += 1
            self._violations.add(inv.UNVERIFIED, self.agent.device, problem)

    def _failed(self, which: str, message: str, started: float) -> None:
        ended = time.monotonic()
        bad = inv.is_bad_release_error(message, MODEL, self._signed.bad)
        if bad and self._bad_since is None:
            self._bad_since = started
        streak_s = ended - self._bad_since if bad and self._bad_since is not None else 0.0
        excuse = inv.classify_failure(
            message,
            large_input=which == "large",
            model=MODEL,
            bad_versions=self._signed.bad,
            windows=self.agent.down_windows(),
            started=started,
            ended=ended,
            bad_streak_s=streak_s,
        )
        if excuse is not None:
            self.counts[excuse] += 1
            return
        self.counts["violations"] += 1
        why = f"a {which} request failed while its agent ran (pid {self.agent.pid}): {message}"
        if bad:
            why = (
                f"the bad release has failed requests for {streak_s:.1f} s (more than "
                f"{inv.BAD_RELEASE_GRACE_S:.0f} s): its probation did not roll it back: {message}"
            )
        self._violations.add(inv.CLIENT_FAILURE, self.agent.device, why)


def _error_text(data: bytearray) -> str:
    try:
        return str(json.loads(data)["error"])
    except (ValueError, KeyError, TypeError):
        return bytes(data[:200]).decode("utf-8", "replace")


# ---------------------------------------------------------------------------- operator


class Operator:
    """Sends releases and staged rollouts with `edgectl`, as an operator types them."""

    def __init__(
        self,
        repo: Path,
        bundles: Mapping[str, Path],
        signed: Signed,
        canaries: tuple[str, ...],
        on_desired: Callable[[], None],
    ) -> None:
        self._repo = repo
        self._bundles = bundles
        self._signed = signed
        self._canaries = canaries
        self._on_desired = on_desired
        self.done: list[str] = []

    def send(self, release: Release) -> None:
        fleet, version = release.fleet, release.version
        self._signed.add(fleet, version, release.bad)
        bundle = self._bundles[version]
        if release.how == "release":
            self._edgectl("release", bundle, "--fleet", fleet, "--repo", self._repo, *PROBATION)
        else:
            self._clear_active_rollout(fleet)
            self._edgectl(
                "rollout", "start", MODEL, version, "--fleet", fleet, "--repo", self._repo,
                "--bundle", bundle, "--stages", "50,100", "--wait", "3s", "--deadline", "20s",
                "--gate", GATES, "--canary", ",".join(self._canaries), *PROBATION,
            )  # fmt: skip
        self._on_desired()
        self.done.append(f"{release.how} {fleet} {version}{' (bad)' if release.bad else ''}")

    def _clear_active_rollout(self, fleet: str) -> None:
        for _ in range(6):
            active = RolloutStore(self._repo).find(fleet, MODEL, active_only=True)
            if not active:
                return
            rollout = active[0]
            bad = rollout.version in self._signed.bad
            action = "abort" if bad else "promote"
            if rollout.state not in (RolloutState.RUNNING, RolloutState.PAUSED):
                return
            self._edgectl("rollout", action, MODEL, "--fleet", fleet, "--repo", self._repo)
        raise AssertionError(f"the active rollout of fleet {fleet} would not clear")

    def _edgectl(self, *args: str | Path) -> None:
        """A command, tried three times (it may race the rollout job's tick)."""
        last = ""
        for _ in range(3):
            out = edgectl(*args, check=False)
            if out.returncode == 0:
                return
            last = out.stderr or out.stdout
            time.sleep(1.0)
        raise AssertionError(f"edgectl {' '.join(map(str, args))} kept failing: {last}")


# ---------------------------------------------------------------------------- monitor


class Monitor(threading.Thread):
    """Watches the agents and samples RSS and desired state until stopped."""

    def __init__(
        self,
        agents: list[AgentProcess],
        repo: Path,
        fleets: tuple[str, ...],
        violations: inv.Violations,
        rss_bound_bytes: int,
        stop: threading.Event,
    ) -> None:
        super().__init__(name="chaos-monitor", daemon=True)
        self._agents = agents
        self._repo = repo
        self._fleets = fleets
        self._violations = violations
        self._rss_bound = rss_bound_bytes
        self._halt = stop
        self._lock = threading.Lock()
        self.max_rss: dict[str, int] = {}
        self.desired_seen: dict[str, set[str]] = {f: set() for f in fleets}

    def run(self) -> None:
        while not self._halt.wait(0.5):
            self.tick()

    def tick(self) -> None:
        for agent in self._agents:
            exited = agent.watch()
            if exited is not None:
                self._violations.add(inv.AGENT_EXIT, agent.device, exited)
            self._sample_rss(agent)
        self.sample_desired()

    def _sample_rss(self, agent: AgentProcess) -> None:
        pid = agent.pid
        if pid is None:
            return
        try:
            rss = int(psutil.Process(pid).memory_info().rss)
        except psutil.Error:
            return
        with self._lock:
            self.max_rss[agent.device] = max(rss, self.max_rss.get(agent.device, 0))
        problem = inv.judge_rss(rss, self._rss_bound)
        if problem is not None:
            self._violations.add(inv.RSS, agent.device, problem)

    def sample_desired(self) -> None:
        try:
            repo = Repository.open(self._repo)
            states = {fleet: current_desired_state(repo, fleet) for fleet in self._fleets}
        except Exception:  # a command may be writing it: the next sample reads it
            return
        with self._lock:
            for fleet, state in states.items():
                release = state.models.get(MODEL) if state is not None else None
                if release is not None:
                    self.desired_seen[fleet].add(release.version)
                    if release.previous:
                        self.desired_seen[fleet].add(release.previous)

    def seen(self, fleet: str) -> set[str]:
        with self._lock:
            return set(self.desired_seen[fleet])
