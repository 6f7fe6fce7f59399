"""Controllers that fail over (issue 24): three `edgectl serve` share one PostgreSQL store,
one private mosquitto and one repository folder; 20 real agents follow a staged rollout.

The lease (controller.fleet.lease) picks one leader; only it promotes, announces and
signs. Case A SIGKILLs the leader mid-rollout, case B stops it (SIGSTOP) past its lease
and continues it (SIGCONT). Either way the rollout completes, each promotion happens
once (the store's claims, the rollout record's history) and every agent ends on the new
version; in B, the old leader does nothing after it lost the lease (its log from the
SIGCONT on, the epochs of the claims).

Short lease (3 s) and ticks (0.5 s), four stages of 3 s: each case takes about a minute.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.update.journal import parse_record, serving_version
from controller.fleet.lease import LEASE_NAME, LeaseRow
from controller.fleet.store import Promotion, TelemetryStore
from controller.fleet.stores import open_store
from controller.rollout.stages import Rollout, RolloutState
from controller.rollout.store import RolloutStore
from tests.controller.test_store_support import fresh_pg_schema
from tests.e2e_support import (
    BIN,
    Proc,
    _spawn,
    edgectl,
    start_serve,
    wait_until,
    write_agent_config,
)
from tests.failover.conftest import RESULTS
from tests.helpers import Broker, make_linear_model

pytestmark = pytest.mark.slow

FLEET = "plant"
MODEL = "linear"
DEVICES = [f"dev-{i:02d}" for i in range(20)]
PER_PROCESS = 10
CANARIES = DEVICES[:2]
STAGES = "10,40,70,100"
WAIT_S = 3.0
LEASE_S = 3.0
GATES = "error_rate<0.01,p99_ratio=off,failed_installs<0.5,min_devices=2"


@dataclass
class Cluster:
    tmp: Path
    repo: Path
    dsn: str
    serves: dict[str, Proc]
    urls: dict[str, str]
    folders: dict[str, Path]
    store: TelemetryStore

    def lease(self) -> LeaseRow | None:
        return self.store.lease_read(LEASE_NAME)

    def leader(self) -> str | None:
        row = self.lease()
        return row.holder if row is not None and row.remaining_s > 0 else None

    def serving(self, device: str) -> str | None:
        path = self.folders[device] / "state" / "models" / MODEL / "journal.json"
        try:
            return serving_version(parse_record(path.read_bytes()))
        except OSError:
            return None

    def rollout(self, version: str) -> Rollout:
        (r,) = [r for r in RolloutStore(self.repo).all() if r.version == version]
        return r

    def promotions(self, rollout_id: str) -> list[Promotion]:
        return self.store.promotions(rollout_id)


def _serve(tmp: Path, repo: Path, broker: Broker, dsn: str, name: str) -> tuple[Proc, str]:
    return start_serve(
        repo,
        broker.address,
        tmp / f"{name}.log",
        {
            "store": dsn,
            "instance_id": name,
            "lease_s": LEASE_S,
            "mqtt_shared_group": "controllers",
            "ingest_client_id": f"ingest-{name}",
            "rollout_tick_interval_s": 0.5,
            "heartbeat_interval_s": 1.0,
        },
    )


@pytest.fixture
def cluster(tmp_path: Path, broker: Broker) -> Iterator[Cluster]:
    repo = tmp_path / "repo"
    edgectl("init", repo)
    with fresh_pg_schema() as dsn:
        store = open_store(dsn)
        serves: dict[str, Proc] = {}
        urls: dict[str, str] = {}
        procs: list[Proc] = []
        try:
            # ctl-1 first, so it leads; the agents fetch from ctl-0, which is never the
            # first leader (each case stops the first leader).
            serves["ctl-1"], urls["ctl-1"] = _serve(tmp_path, repo, broker, dsn, "ctl-1")
            wait_until(lambda: store.lease_read(LEASE_NAME), 20, "ctl-1 to take the lease")
            for name in ("ctl-0", "ctl-2"):
                serves[name], urls[name] = _serve(tmp_path, repo, broker, dsn, name)
            url = urls["ctl-0"]
            folders: dict[str, Path] = {}
            configs = []
            for device in DEVICES:
                folder = tmp_path / "devices" / device
                config = write_agent_config(
                    folder,
                    device=device,
                    fleet=FLEET,
                    broker=broker.address,
                    repo_url=url,
                    root=repo / "metadata" / "root.json",
                    poll_interval_s=30,
                )
                with open(config, "a") as f:
                    f.write(
                        "[telemetry]\nheartbeat_interval_s = 1.0\n"
                        "[install]\nprobation_tick_s = 0.25\n"
                    )
                folders[device] = folder
                configs.append(str(config))
            for i in range(0, len(configs), PER_PROCESS):
                procs.append(
                    _spawn(
                        [
                            str(BIN / "python"),
                            "-m",
                            "tests.fleet_agents",
                            *configs[i : i + PER_PROCESS],
                        ],
                        tmp_path / f"agents-{i // PER_PROCESS}.log",
                    )
                )
            c = Cluster(tmp_path, repo, dsn, serves, urls, folders, store)
            v1 = _bundle(tmp_path, 1, "1.0.0")
            edgectl("release", v1, "--fleet", FLEET, "--repo", repo, "--probation-s", "0.5",
                    "--no-shadow")  # fmt: skip
            wait_until(
                lambda: all(c.serving(d) == "1.0.0" for d in DEVICES), 90, "1.0.0 everywhere"
            )
            yield c
        finally:
            for p in procs:
                p.stop()
            for s in serves.values():
                if s.process.poll() is None:
                    os.kill(s.process.pid, signal.SIGCONT)
                s.stop()
            store.close()


def _bundle(tmp: Path, seed: int, version: str) -> Path:
    out = tmp / f"{MODEL}-{version}.bundle"
    onnx = make_linear_model(tmp / f"v{seed}.onnx", seed=seed)
    edgectl("bundle", "build", onnx, "--name", MODEL, "--version", version, "-o", out,
            "--latency-runs", "0")  # fmt: skip
    return out


def _start_rollout(c: Cluster, version: str, seed: int) -> Rollout:
    bundle = _bundle(c.tmp, seed, version)
    edgectl(
        "rollout", "start", MODEL, version, "--fleet", FLEET, "--repo", c.repo,
        "--store", c.dsn, "--bundle", bundle, "--stages", STAGES, "--wait", f"{WAIT_S:g}s",
        "--deadline", "90s", "--gate", GATES, "--canary", ",".join(CANARIES),
        "--probation-s", "1", "--no-shadow",
    )  # fmt: skip
    return c.rollout(version)


def _at_second_stage_when_due(c: Cluster, version: str) -> Rollout:
    """The rollout once its first promotion happened, returned when its second stage's
    wait is nearly over (the next promotion is due)."""

    def promoted() -> Rollout | None:
        r = c.rollout(version)
        return r if r.stage >= 1 or r.state is not RolloutState.RUNNING else None

    r = wait_until(promoted, 60, "the first promotion")
    assert r.state is RolloutState.RUNNING and r.stage == 1, r.history
    time.sleep(max(0.0, r.stage_started_at + WAIT_S - 0.3 - time.time()))
    return r


def _completed(c: Cluster, version: str) -> Rollout:
    def done() -> Rollout | None:
        r = c.rollout(version)
        assert r.state in (RolloutState.RUNNING, RolloutState.COMPLETED), r.history
        return r if r.state is RolloutState.COMPLETED else None

    return wait_until(done, 60, "the rollout to complete")


def _duplicates(r: Rollout, claims: list[Promotion]) -> int:
    """Promotions that happened more than once: by the record's history (each stage
    started, and the completion, noted once) and by the store's claims."""
    notes = Counter(
        note.rsplit("; ", 1)[-1]
        for _at, note in r.history
        if note.endswith("; completed") or "; stage " in note
    )
    by_history = sum(n - 1 for n in notes.values())
    expected = {f"stage {i + 1} ({float(p):g}%)" for i, p in enumerate(STAGES.split(",")) if i}
    assert expected | {"completed"} == set(notes), r.history
    stages = Counter(p.stage for p in claims)
    assert set(stages) == set(range(1, len(STAGES.split(",")) + 1)), claims
    return by_history + sum(n - 1 for n in stages.values())


def _everyone_on(c: Cluster, version: str) -> None:
    wait_until(
        lambda: all(c.serving(d) == version for d in DEVICES), 60, f"{version} on every device"
    )


def test_a_leader_killed_mid_rollout_is_replaced_and_the_rollout_completes_once(
    cluster: Cluster,
) -> None:
    c = cluster
    first = c.lease()
    assert first is not None and first.holder == "ctl-1"
    r = _start_rollout(c, "2.0.0", 2)
    _at_second_stage_when_due(c, "2.0.0")
    killed_at = time.time()
    c.serves["ctl-1"].process.send_signal(signal.SIGKILL)
    c.serves["ctl-1"].process.wait(10)

    def promoted_after_kill() -> Promotion | None:
        later = [p for p in c.promotions(r.id) if p.claimed_at > killed_at]
        return later[0] if later else None

    nxt = wait_until(promoted_after_kill, 30, "a promotion by the next leader")
    assert nxt.holder in ("ctl-0", "ctl-2") and nxt.epoch > first.epoch, nxt
    done = _completed(c, "2.0.0")
    claims = c.promotions(r.id)
    duplicated = _duplicates(done, claims)
    assert duplicated == 0
    _everyone_on(c, "2.0.0")
    # The leader says so in /metrics, the other one too; `fleet leader` names it.
    other = ({"ctl-0", "ctl-2"} - {nxt.holder}).pop()
    leader_metrics = _metrics(c.urls[nxt.holder])
    assert f'edgefleet_leader{{holder="{nxt.holder}"}} 1' in leader_metrics
    assert f"edgefleet_leader_epoch {nxt.epoch}" in leader_metrics
    assert f'edgefleet_leader{{holder="{other}"}} 0' in _metrics(c.urls[other])
    shown = json.loads(edgectl("fleet", "leader", "--store", c.dsn, "--json").stdout)
    assert (shown["leader"], shown["epoch"]) == (nxt.holder, nxt.epoch), shown
    after_s = nxt.claimed_at - killed_at
    RESULTS["killed"] = {"after_s": after_s, "duplicated": duplicated}
    print(f"leader killed; next promotion after {after_s:.1f} s by {nxt.holder} epoch {nxt.epoch}")
    for at, note in done.history:
        print(f"{at - done.created_at:6.1f}s {note}")


def _metrics(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as page:
        return str(page.read().decode())


STALE_ACTS = (
    "fleet plant: linear",  # desired state written (a promotion signed)
    "re-signed metadata",
    "announced timestamp version",
    "pruned ",
)


def test_a_leader_stopped_past_its_lease_does_not_act_once_continued(cluster: Cluster) -> None:
    c = cluster
    old = c.lease()
    assert old is not None and old.holder == "ctl-1"
    r = _start_rollout(c, "2.0.0", 2)
    _at_second_stage_when_due(c, "2.0.0")
    stopped = c.serves["ctl-1"]
    stopped_at = time.time()
    os.kill(stopped.process.pid, signal.SIGSTOP)
    try:

        def taken_over() -> LeaseRow | None:
            row = c.lease()
            return row if row is not None and row.holder != "ctl-1" else None

        new = wait_until(taken_over, 30, "another serve to take the lease")
        assert new.epoch > old.epoch
        # keep it stopped a while longer: the new leader promotes meanwhile
        time.sleep(LEASE_S)
    finally:
        log_at = stopped.log.stat().st_size
        os.kill(stopped.process.pid, signal.SIGCONT)
    done = _completed(c, "2.0.0")
    _everyone_on(c, "2.0.0")
    time.sleep(2 * LEASE_S)  # the old leader has had time to act, were it to
    claims = c.promotions(r.id)
    duplicated = _duplicates(done, claims)
    assert duplicated == 0
    # Nothing promoted by the old leader once it was stopped: every claim after the stop
    # is by a later epoch than the one it held.
    late = [p for p in claims if p.claimed_at > stopped_at]
    assert late and all(p.epoch > old.epoch and p.holder != "ctl-1" for p in late), claims
    # Nothing signed, announced or pruned by it after SIGCONT (its log from then on).
    after = stopped.log.read_bytes()[log_at:].decode(errors="replace")
    stale = [line for line in after.splitlines() if any(a in line for a in STALE_ACTS)]
    assert stale == [], stale
    # ... and it saw it lost the lease, and follows the new leader
    assert "ctl-1 lost the controller lease" in after, after
    assert f"the controller lease is held by {new.holder} (epoch" in after, after
    assert stopped.process.poll() is None, "the old leader must live on as a follower"
    nxt = min(late, key=lambda p: p.claimed_at)
    after_s = nxt.claimed_at - stopped_at
    RESULTS["stopped"] = {"after_s": after_s, "duplicated": duplicated, "stale_acts": len(stale)}
    print(f"old leader's log after SIGCONT:\n{after}")
    for at, note in done.history:
        print(f"{at - done.created_at:6.1f}s {note}")
