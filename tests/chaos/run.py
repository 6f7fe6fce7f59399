"""One chaos run, start to end: set up the world, apply the plan, then judge.

1. **Set up** (no faults): a persistent private mosquitto, a repository with a bundle of
   every version the plan will ship (built in-process by the real builder), the first
   release of each fleet, `edgectl serve`, a fault proxy per agent for HTTP and one for
   MQTT, six agents (one with its state folder on a small tmpfs, one with a libfaketime
   clock), all serving their fleet's first release; then a client per agent and the
   monitor.
2. **Faults** for ``duration_s``: the proxies' switch is on; the driver applies the plan's
   steps on time, the operator sends its releases and rollouts on time. Every episode
   closes before the end (agents, serve and broker up, disk freed).
3. **Convergence**, within ``CONVERGE_S`` of the faults stopping: every agent serves what
   its fleet's desired state names for it (or documentedly went back from), then a final
   good release to both fleets is committed by every agent: its update loop is alive.
4. **Events**: the outboxes drain; every agent and serve stop; every event each outbox
   numbered is in the store, once, in order.

Everything found goes to ``Violations``; the run itself raises only when the harness
cannot do its job (a process that cannot start, a command that keeps failing).
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent.contracts import bundle_target_path, resolve_release
from agent.update.journal import Phase
from controller.build.builder import build_bundle
from controller.repository.release import current_desired_state
from controller.repository.repo import Repository
from tests.chaos import invariants as inv
from tests.chaos import observe
from tests.chaos import schedule as sch
from tests.chaos.fleet import (
    AgentProcess,
    BrokerProcess,
    ServeProcess,
    StateDisk,
    SteppedClock,
)
from tests.chaos.proxy import FaultLog, FaultProxy, ProxyHub, Switch
from tests.chaos.traffic import (
    LARGE,
    MODEL,
    PROBATION,
    SMALL,
    Client,
    Monitor,
    Operator,
    Signed,
)
from tests.e2e_support import bundle_output, edgectl, wait_until
from tests.helpers import make_linear_model, make_misbehaving_model

FLEETS = ("lab", "field")
DEVICES = {
    "dev-00": "lab",
    "dev-01": "lab",
    "dev-02": "lab",
    "dev-03": "lab",
    "dev-04": "field",
    "dev-05": "field",
}
CANARIES = ("dev-00", "dev-01")
DISK_DEVICE = "dev-03"
CLOCK_DEVICE = "dev-01"
CONVERGE_S = 60.0
# Phase A (what desired state says now) gets at most this much of CONVERGE_S; the final
# release gets the rest.
SETTLE_S = 30.0
DRAIN_S = 30.0
# An agent serving a tiny model runs at about 100 MiB here; a leak or an unbounded
# buffer shows long before this.
RSS_BOUND_BYTES = 300 * 2**20


@dataclass
class Outcome:
    seed: int
    duration_s: float
    faults: dict[str, int] = field(default_factory=dict)
    converged_s: float | None = None
    judged: bool = False  # the run got as far as judging convergence
    notes: list[str] = field(default_factory=list)

    def tally(self, violations: int) -> str:
        if not self.judged:
            converged = "the run stopped before convergence was judged (see its error)"
        elif self.converged_s is None:
            converged = f"did not converge within {CONVERGE_S:.0f} s"
        else:
            converged = f"converged in {self.converged_s:.1f} s"
        return (
            f"faults injected: {sum(self.faults.values())} ({len(self.faults)} kinds); "
            f"invariant violations: {violations}; {converged}; seed {self.seed}"
        )


class ChaosRun:
    def __init__(
        self, tmp: Path, seed: int, duration_s: float, disk: StateDisk, faketime: Path
    ) -> None:
        self.tmp = tmp
        self.seed = seed
        self.plan = sch.make_plan(
            seed,
            duration_s,
            list(DEVICES),
            disk_device=DISK_DEVICE,
            clock_device=CLOCK_DEVICE,
            fleets=FLEETS,
        )
        self.violations = inv.Violations(seed)
        self.outcome = Outcome(seed, duration_s)
        self.faults = FaultLog(tmp / "faults.log")
        self.switch = Switch()
        self.signed = Signed()
        self.stop_traffic = threading.Event()
        self._disk = disk
        self._faketime = faketime
        self.repo = tmp / "repo"
        self.broker: BrokerProcess | None = None
        self.serve: ServeProcess | None = None
        self.hub: ProxyHub | None = None
        self.agents: dict[str, AgentProcess] = {}
        self.clients: list[Client] = []
        self.monitor: Monitor | None = None
        self.operator: Operator | None = None
        self.clock: SteppedClock | None = None
        self._unconverged: dict[str, str] = {}
        self._operator_errors: list[BaseException] = []
        self._faults_stopped_at = 0.0

    # ------------------------------------------------------------------ 1. set up

    def setup(self) -> None:
        self.broker = BrokerProcess(self.tmp / "broker")
        edgectl("init", self.repo)
        bundles, expected = self._build_bundles()
        for fleet in FLEETS:
            version = sch.initial_version(FLEETS, fleet)
            self.signed.add(fleet, version)
            edgectl("release", bundles[version], "--fleet", fleet, "--repo", self.repo, *PROBATION)
        self.serve = ServeProcess(self.repo, self.broker.address, self.tmp / "serve")
        self.hub = ProxyHub()
        self.clock = SteppedClock(self.tmp, self._faketime)
        root = self.repo / "metadata" / "root.json"
        for device, fleet in DEVICES.items():
            http = self._proxy(f"{device}/http", "http", self.serve.port)
            mqtt = self._proxy(f"{device}/mqtt", "mqtt", self.broker.port)
            self.serve.proxies.append(http)
            self.agents[device] = AgentProcess(
                self.tmp / "devices" / device,
                device,
                fleet,
                broker_port=mqtt.port,
                repo_port=http.port,
                root=root,
                state_dir=self._disk.state_dir if device == DISK_DEVICE else None,
                clock=self.clock if device == CLOCK_DEVICE else None,
            )
        for agent in self.agents.values():
            agent.start()
        self.monitor = Monitor(
            list(self.agents.values()),
            self.repo,
            FLEETS,
            self.violations,
            RSS_BOUND_BYTES,
            self.stop_traffic,
        )
        self.operator = Operator(
            self.repo, bundles, self.signed, CANARIES, self.monitor.sample_desired
        )
        self.monitor.sample_desired()
        self.monitor.start()
        for device, agent in self.agents.items():
            want = sch.initial_version(FLEETS, agent.fleet)
            wait_until(
                lambda a=agent, v=want: observe.serving(a) == v,  # type: ignore[misc]
                90,
                f"{device} to serve {want} before the faults start",
            )
        for agent in self.agents.values():
            client = Client(agent, self.signed, expected, self.violations, self.stop_traffic)
            self.clients.append(client)
            client.start()

    def _proxy(self, name: str, protocol: str, upstream: int) -> FaultProxy:
        assert self.hub is not None
        proxy = FaultProxy(
            name, protocol, upstream, seed=self.seed, log=self.faults, switch=self.switch
        )
        return self.hub.add(proxy)

    def _build_bundles(self) -> tuple[dict[str, Path], dict[str, dict[str, np.ndarray]]]:
        """A bundle per version the run ships (real builder), and what each computes for
        the clients' two inputs (a bad model has no answer for the large one)."""
        folder = self.tmp / "bundles"
        wanted: list[tuple[str, bool]] = []
        for fleet in FLEETS:
            wanted.append((sch.initial_version(FLEETS, fleet), False))
            wanted.append((sch.final_version(self.plan, FLEETS, fleet), False))
        wanted += [(r.version, r.bad) for r in self.plan.releases]
        bundles: dict[str, Path] = {}
        expected: dict[str, dict[str, np.ndarray]] = {"small": {}, "large": {}}
        for n, (version, bad) in enumerate(sorted(set(wanted)), start=1):
            onnx = folder / f"{version}.onnx"
            if bad:
                make_misbehaving_model(onnx, seed=100 + n, kind="errors")
            else:
                make_linear_model(onnx, seed=100 + n)
            bundles[version] = build_bundle(onnx, MODEL, version, folder / f"{version}.bundle").path
            expected["small"][version] = bundle_output(bundles[version], SMALL)
            if not bad:
                expected["large"][version] = bundle_output(bundles[version], LARGE)
        return bundles, expected

    # ------------------------------------------------------------------ 2. faults

    def run_faults(self) -> None:
        assert self.operator is not None
        started = time.monotonic()
        self.switch.set(True)
        operator = threading.Thread(target=self._operate, args=(started,), name="chaos-operator")
        operator.start()
        errors: list[BaseException] = self._operator_errors
        try:
            for step in self.plan.steps:
                _sleep_until(started + step.at_s)
                self._apply(step)
            _sleep_until(started + self.plan.duration_s)
        finally:
            self.switch.set(False)
            operator.join(120)
            self._restore()
            self._faults_stopped_at = time.monotonic()
        if operator.is_alive() or errors:
            raise AssertionError(f"the operator could not do its job: {errors or 'still busy'}")
        self.outcome.notes += [f"operator: {d}" for d in self.operator.done]

    def _operate(self, started: float) -> None:
        assert self.operator is not None
        try:
            for release in self.plan.releases:
                _sleep_until(started + release.at_s)
                self.operator.send(release)
        except BaseException as exc:  # reported by run_faults
            self._operator_errors.append(exc)

    def _apply(self, step: sch.Step) -> None:
        assert self.serve is not None and self.broker is not None and self.clock is not None
        agent = self.agents.get(step.target)
        if step.action == sch.AGENT_SIGKILL and agent is not None and agent.pid is not None:
            agent.sigkill()
            self.faults.record(step.action, step.target)
        elif step.action == sch.AGENT_START and agent is not None:
            agent.start()
        elif step.action == sch.SERVE_SIGKILL and self.serve.proc is not None:
            self.serve.sigkill()
            self.faults.record(step.action, "serve")
        elif step.action == sch.SERVE_START:
            self.serve.start()
        elif step.action == sch.BROKER_RESTART and self.broker.broker is not None:
            self.broker.stop()
            self.faults.record(step.action, "broker")
        elif step.action == sch.BROKER_START:
            self.broker.start()
        elif step.action == sch.DISK_FULL:
            filled = self._disk.fill()
            self.faults.record(step.action, step.target, f"{filled} bytes written")
        elif step.action == sch.DISK_FREE:
            self._disk.free()
        elif step.action == sch.CLOCK_STEP:
            before = self.clock.offset_s
            self.clock.step(step.offset_s)
            moved = f"{step.offset_s - before:+.0f} s (now {step.offset_s:+.0f} s)"
            self.faults.record(step.action, step.target, moved)

    def _restore(self) -> None:
        """Close any episode still open (only when the driver ran late)."""
        assert self.serve is not None and self.broker is not None
        self.broker.start()
        self.serve.start()
        self._disk.free()
        for agent in self.agents.values():
            agent.start()

    # ------------------------------------------------------------------ 3. convergence

    def converge(self) -> None:
        """Phase A then B (module docstring); records who did not converge."""
        assert self.operator is not None
        t0 = self._faults_stopped_at
        settled = self._wait(t0 + SETTLE_S, self._unsettled)
        for device, reason in settled.items():
            self._unconverged[device] = f"within {SETTLE_S:.0f} s: {reason}"
        for fleet in FLEETS:
            version = sch.final_version(self.plan, FLEETS, fleet)
            self.operator.send(sch.Release(0.0, fleet, version, "release"))
        final = self._wait(t0 + CONVERGE_S, self._not_final)
        for device, reason in final.items():
            then = f"final release, by {CONVERGE_S:.0f} s: {reason}"
            earlier = self._unconverged.get(device)
            self._unconverged[device] = f"{earlier}; then the {then}" if earlier else then
        self.outcome.judged = True
        if not self._unconverged:
            self.outcome.converged_s = time.monotonic() - t0

    def _wait(self, deadline: float, judge: Callable[[], dict[str, str]]) -> dict[str, str]:
        while True:
            remaining = judge()
            if not remaining or time.monotonic() >= deadline:
                return remaining
            time.sleep(0.25)

    def _unsettled(self) -> dict[str, str]:
        repo = Repository.open(self.repo)
        out = {}
        for device, agent in self.agents.items():
            state = current_desired_state(repo, agent.fleet)
            release = state.models.get(MODEL) if state is not None else None
            desired = resolve_release(release, device) if release is not None else None
            problem = inv.judge_convergence(
                desired,
                release.rollout_id if release else "",
                observe.serving(agent),
                observe.journal(agent),
            )
            if problem is not None:
                out[device] = problem
        return out

    def _not_final(self) -> dict[str, str]:
        out = {}
        for device, agent in self.agents.items():
            want = sch.final_version(self.plan, FLEETS, agent.fleet)
            served, record = observe.serving(agent), observe.journal(agent)
            if served != want or record is None or record.phase is not Phase.COMMITTED:
                state = inv.describe_journal(record)
                out[device] = f"serves {served} ({state}), the final release is {want}"
        return out

    # ------------------------------------------------------------------ 4. events, stop

    def drain_and_stop(self) -> None:
        """Wait for the outboxes to drain into the store, stop everything, judge."""
        self._wait(time.monotonic() + DRAIN_S, self._undrained)
        self.stop_traffic.set()
        for client in self.clients:
            client.join(40)
        if self.monitor is not None:
            self.monitor.join(10)
        for device in self._unconverged:
            self.agents[device].dump_stacks()
        for agent in self.agents.values():
            agent.stop()
        for device, reason in self._unconverged.items():
            agent = self.agents[device]
            why = f"did not converge ({reason}); {agent.diagnose()}"
            if agent.clock is not None:
                why += f"; its wall clock ends {agent.clock.offset_s:+.0f} s off real time"
            self.violations.add(inv.CONVERGENCE, device, why)
        if self.serve is not None:
            self.serve.stop()
        for device, agent in self.agents.items():
            stored = observe.stored_events(self.repo, device)
            for problem in inv.check_events(observe.ledger(agent), stored, agent.logged_events()):
                self.violations.add(inv.EVENTS, device, problem)
        self._check_served()
        self.outcome.faults = self.faults.snapshot()

    def _undrained(self) -> dict[str, str]:
        out = {}
        for device, agent in self.agents.items():
            ledger = observe.ledger(agent)
            stored = {
                e.seq for e in observe.stored_events(self.repo, device) if e.stream == ledger.stream
            }
            if ledger.pending or not set(range(1, ledger.last_seq + 1)) <= stored:
                out[device] = f"{ledger.pending} pending"
        return out

    def _check_served(self) -> None:
        """Every version any client was served: signed in the targets, and named by its
        fleet's desired state at some point of the run."""
        assert self.monitor is not None
        targets = Repository.open(self.repo).load("targets").signed.targets
        for client in self.clients:
            fleet = client.agent.fleet
            for version in client.served:
                if bundle_target_path(MODEL, version) not in targets:
                    self.violations.add(
                        inv.UNVERIFIED, client.agent.device, f"served {version}, not in the targets"
                    )
                elif version not in self.monitor.seen(fleet):
                    self.violations.add(
                        inv.UNVERIFIED,
                        client.agent.device,
                        f"served {version}, which fleet {fleet}'s desired state never named",
                    )

    def summary(self) -> list[str]:
        lines = list(self.outcome.notes)
        for client in self.clients:
            counts = dict(client.counts)
            served = dict(client.served)
            lines.append(f"client {client.agent.device}: {counts}; served {served}")
        for device, agent in self.agents.items():
            rss = self.monitor.max_rss.get(device, 0) if self.monitor else 0
            lines.append(
                f"{device} ({agent.fleet}): killed {len(agent.windows)} times, "
                f"max RSS {rss / 2**20:.0f} MiB, exited on its own {agent.unexpected_exits} times"
            )
        return lines

    def close(self) -> None:
        """Stop whatever still runs (also after a failure)."""
        self.stop_traffic.set()
        self.switch.set(False)
        for agent in self.agents.values():
            with contextlib.suppress(Exception):
                agent.stop()
        if self.serve is not None:
            self.serve.stop()
        if self.hub is not None:
            self.hub.close()
        if self.broker is not None:
            self.broker.stop()
        self.faults.close()
        # The tmpfs goes with the test: keep its state folder for the report.
        with contextlib.suppress(OSError):
            shutil.copytree(self._disk.state_dir, self.tmp / "statefs-copy", dirs_exist_ok=True)


def _sleep_until(at: float) -> None:
    delay = at - time.monotonic()
    if delay > 0:
        time.sleep(delay)
