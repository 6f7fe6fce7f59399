"""A candidate this agent refused for a contract it lacks is retried by another agent
version; one refused for what it is (integrity, golden vectors, probation) never is.

The convergence defect: an agent older than manifest /2 refused a /2 bundle and its
journal said ``failed`` for that rollout; once upgraded, ``should_skip`` still skipped
it, so the device never installed the release until a new one. The pure rule
(``should_skip`` over records, old and new) first, then the real lifecycle (a real
bundle unpacked, loaded into ONNX Runtime, the journal on disk) classifying refusals.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from agent.base.errors import (
    BundleError,
    GoldenMismatchError,
    NewerFormatError,
    RuntimeTooOldError,
    TamperedDownloadError,
    UnsupportedContractError,
)
from agent.contracts import ProbationPolicy, parse_manifest
from agent.contracts.bundle_container import TAR_V1, read_stored, write_container, write_stored
from agent.device.config import AgentConfig, InferenceConfig
from agent.runtime.registry import ModelRegistry
from agent.telemetry.reporter import IntervalStats
from agent.update.journal import (
    JOURNAL_SCHEMA,
    LEGACY_REFUSER,
    JournalRecord,
    Phase,
    begin_install,
    fail,
    parse_record,
    serving_version,
    should_skip,
    transition,
)
from agent.update.lifecycle import ModelLifecycle
from agent.update.store import ModelStore
from agent.update.waiting import after_install_error, before_install
from controller.build.builder import build_bundle
from tests.agent.update._old_records import (
    V1_FORMAT_REFUSED_BY_3ADA5D0,
    V1_WRITTEN_BY_3C52CD2,
)
from tests.helpers import ManualClock, make_linear_model

OLD, NEW = "0.0.9", "0.1.0"
POLICY = ProbationPolicy(duration_s=0.0)


def _failed(reason: str, refused_by: str = "", version: str = "2.0.0") -> JournalRecord:
    record = JournalRecord(model="m", phase=Phase.COMMITTED, version="1.0.0", rollout_id="r1")
    record = begin_install(record, version, "r2", POLICY, now=10.0, deadline_s=60)
    record = transition(record, Phase.VERIFIED, 11.0)
    return fail(record, 12.0, reason, refused_by)


# ---------------------------------------------------------------------------- the rule


def test_a_contract_refusal_is_retried_by_another_agent_version_only() -> None:
    record = _failed("manifest.json: schema expected …, got 'edgefleet.manifest/3'", OLD)
    assert serving_version(record) == "1.0.0"
    # The agent that refused it does not try again for this rollout, and says why.
    skip = should_skip(record, "2.0.0", "r2", OLD)
    assert skip is not None and "another agent version retries it" in skip
    # An upgraded (or any other) agent tries it.
    assert should_skip(record, "2.0.0", "r2", NEW) is None
    # What was never skipped still is not: another rollout, another version.
    assert should_skip(record, "2.0.0", "r3", OLD) is None
    assert should_skip(record, "2.1.0", "r2", OLD) is None
    # Retried by NEW and refused again: NEW records itself and stops there.
    again = fail(
        begin_install(record, "2.0.0", "r2", POLICY, now=20.0, deadline_s=60),
        21.0,
        "refused again",
        NEW,
    )
    assert should_skip(again, "2.0.0", "r2", NEW) is not None
    assert should_skip(again, "2.0.0", "r2", OLD) is None  # a downgrade may read it


@pytest.mark.parametrize(
    "reason",
    [
        "golden vectors differ: max abs error 0.31 > atol 0.0001",
        "manifest.json: members['model.onnx'] size or sha256 differ",
        "install interrupted 3 times (last in staged): the agent restarted",
        "the smoke test (phase staged) exceeded its deadline of 60s",
    ],
)
def test_any_other_failure_stays_skipped_whatever_the_agent_version(reason: str) -> None:
    record = _failed(reason)
    for agent_version in (OLD, NEW, "9.9.9"):
        assert should_skip(record, "2.0.0", "r2", agent_version) is not None


def test_a_rollback_stays_skipped_whatever_the_agent_version() -> None:
    record = JournalRecord(model="m", phase=Phase.COMMITTED, version="1.0.0")
    record = begin_install(record, "2.0.0", "r2", POLICY, now=10.0, deadline_s=60)
    for phase in (Phase.VERIFIED, Phase.STAGED, Phase.SMOKE_TESTED, Phase.ACTIVE):
        record = transition(record, phase, 11.0)
    rolled = transition(record, Phase.ROLLED_BACK, 12.0, reason="error rate 0.5 over 0.05")
    # Even a record that (by hand) names a refusing agent: a rollback is the candidate's.
    for candidate in (rolled, replace(rolled, format_refused_by=OLD)):
        for agent_version in (OLD, NEW):
            assert should_skip(candidate, "2.0.0", "r2", agent_version) is not None


def test_a_new_install_forgets_who_refused_the_last_candidate() -> None:
    record = _failed("schema expected 'edgefleet.manifest/1', got 'edgefleet.manifest/2'", OLD)
    started = begin_install(record, "2.0.0", "r2", POLICY, now=30.0, deadline_s=60)
    assert started.format_refused_by == ""
    failed = fail(transition(started, Phase.VERIFIED, 31.0), 32.0, "golden vectors differ")
    assert should_skip(failed, "2.0.0", "r2", OLD) is not None
    assert should_skip(failed, "2.0.0", "r2", NEW) is not None


def test_the_waiting_reason_follows_the_same_rule() -> None:
    record = _failed("manifest.json: schema expected …, got 'edgefleet.manifest/3'", OLD)
    waits = before_install(record, "2.0.0", "r2", agent_version=OLD)
    assert waits is not None and waits.code == "failed"
    assert "another agent version retries it" in waits.detail
    assert before_install(record, "2.0.0", "r2", agent_version=NEW) is None
    error = NewerFormatError("manifest.json: schema expected …, got 'edgefleet.manifest/3'")
    assert "another agent version retries it" in after_install_error(error, "2.0.0").detail
    golden = after_install_error(GoldenMismatchError("golden vectors differ"), "2.0.0")
    assert "another agent version" not in golden.detail


# ---------------------------------------------------------------------------- old records


def test_the_previous_release_s_refusal_of_a_format_2_bundle_is_retried_after_upgrade() -> None:
    record = parse_record(V1_FORMAT_REFUSED_BY_3ADA5D0)
    assert (record.phase, record.version, record.rollout_id) == (Phase.FAILED, "2.0.0", "r-2")
    assert record.format_refused_by == LEGACY_REFUSER
    assert should_skip(record, "2.0.0", "r-2", NEW) is None
    # Written back, it is this agent's schema and says the same.
    doc = json.loads(record.to_json_bytes())
    assert doc["schema"] == JOURNAL_SCHEMA and doc["format_refused_by"] == LEGACY_REFUSER
    assert parse_record(record.to_json_bytes()) == record


@pytest.mark.parametrize("phase", sorted(V1_WRITTEN_BY_3C52CD2))
def test_old_records_of_other_failures_load_as_they_were(phase: str) -> None:
    record = parse_record(V1_WRITTEN_BY_3C52CD2[phase])
    assert record.format_refused_by == ""
    if phase in ("failed", "rolled_back"):
        assert should_skip(record, "2.0.0", "r-2", NEW) is not None  # golden vectors, probation


@pytest.mark.parametrize(
    "reason",
    [
        # the agents reading /1 and /2 (this tree before the journal's /2)
        "manifest.json: schema expected 'edgefleet.manifest/1' or 'edgefleet.manifest/2', "
        "got 'edgefleet.manifest/3'",
        "manifest.json members['model.onnx']: encoding expected 'zstd', got 'lz4'",
        "lin 2.0.0 needs ONNX Runtime >= 9.1.0, this agent has 1.20.1",
    ],
)
def test_old_records_of_the_other_contract_refusals_are_retried(reason: str) -> None:
    doc = json.loads(V1_WRITTEN_BY_3C52CD2["failed"])
    doc["reason"] = reason
    record = parse_record(json.dumps(doc).encode())
    assert record.format_refused_by == LEGACY_REFUSER
    assert should_skip(record, "2.0.0", "r-2", NEW) is None


def test_an_old_record_with_the_new_field_is_not_an_old_record() -> None:
    doc = json.loads(V1_FORMAT_REFUSED_BY_3ADA5D0)
    doc["format_refused_by"] = OLD
    with pytest.raises(ValueError, match="format_refused_by"):
        parse_record(json.dumps(doc).encode())


# ---------------------------------------------------------------------------- classification


def test_which_errors_are_contract_refusals() -> None:
    manifest = {"schema": "edgefleet.manifest/3", "name": "m", "version": "2.0.0"}
    with pytest.raises(NewerFormatError):
        parse_manifest(json.dumps(manifest).encode())
    for garbled in ("edgefleet.manifest/x", "other/3", "edgefleet.manifest/0"):
        with pytest.raises(BundleError) as refused:
            parse_manifest(json.dumps({**manifest, "schema": garbled}).encode())
        assert not isinstance(refused.value, UnsupportedContractError)
    with pytest.raises(NewerFormatError):
        write_container("tar/9-brotli", [])
    assert issubclass(RuntimeTooOldError, UnsupportedContractError)
    for integrity in (GoldenMismatchError, TamperedDownloadError, BundleError):
        assert not issubclass(integrity, UnsupportedContractError)


class Device:
    """One device's lifecycle on a real state folder, as the agent of ``agent_version``."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.clock = ManualClock(now=1_780_000_000.0)

    def lifecycle(self, agent_version: str) -> ModelLifecycle:
        config = AgentConfig(
            device_id="dev-1",
            fleet="lab",
            state_dir=self.tmp / "state",
            trusted_root=self.tmp / "root.json",
            inference=InferenceConfig(socket_path=self.tmp / "infer.sock"),
        )
        return ModelLifecycle(
            config,
            ModelRegistry(),
            ModelStore(self.tmp / "state" / "models"),
            IntervalStats(),
            clock=self.clock,
            agent_version=agent_version,
        )

    def install(self, lifecycle: ModelLifecycle, version: str, bundle: Path) -> None:
        download = self.tmp / "download" / f"{version}.bundle"
        download.parent.mkdir(exist_ok=True)
        shutil.copy(bundle, download)
        self.clock.now += 10
        lifecycle.install("lin", version, f"r-{version}", POLICY, lambda: download)


def _rewritten(bundle: Path, out: Path, edit: dict[str, object], swap_golden: Path | None) -> Path:
    """``bundle`` with its manifest edited (and golden.npz taken from ``swap_golden``),
    stored as it was: the member bytes are not recompressed."""
    stored = read_stored(bundle.read_bytes())
    manifest = json.loads(stored[0][1])
    manifest.update(edit)
    if swap_golden is not None:
        other = read_stored(swap_golden.read_bytes())
        other_manifest = json.loads(other[0][1])
        manifest["members"]["golden.npz"] = other_manifest["members"]["golden.npz"]
        golden = {name: data for name, data in other if name.startswith("golden.npz")}
        stored = [(name, golden.get(name, data)) for name, data in stored]
    members = [("manifest.json", json.dumps(manifest).encode()), *stored[1:]]
    out.write_bytes(write_stored(TAR_V1, members))  # names as given: already stored names
    return out


@pytest.mark.parametrize(
    ("case", "contract"),
    [("newer manifest schema", True), ("member hash differs", False), ("golden differs", False)],
)
def test_the_lifecycle_records_who_refused_only_for_a_contract(
    tmp_path: Path, case: str, contract: bool
) -> None:
    bundles = {}
    for seed, version in ((1, "1.0.0"), (2, "2.0.0")):
        onnx_path = make_linear_model(tmp_path / f"{version}.onnx", seed=seed)
        bundles[version] = build_bundle(onnx_path, "lin", version, tmp_path / version, 2).path
    good = bundles["2.0.0"]
    bad = tmp_path / "bad.bundle"
    if case == "newer manifest schema":
        _rewritten(good, bad, {"schema": "edgefleet.manifest/3"}, None)
    elif case == "member hash differs":
        manifest = json.loads(read_stored(good.read_bytes())[0][1])
        members = manifest["members"]
        members["model.onnx"] = {**members["model.onnx"], "sha256": "0" * 64}
        _rewritten(good, bad, {"members": members}, None)
    else:
        _rewritten(good, bad, {}, bundles["1.0.0"])
    device = Device(tmp_path)
    old = device.lifecycle(OLD)
    device.install(old, "1.0.0", bundles["1.0.0"])
    old.judge_probation()
    assert old.record("lin").phase is Phase.COMMITTED
    expected = (UnsupportedContractError,) if contract else (BundleError, GoldenMismatchError)
    with pytest.raises(expected) as refused:
        device.install(old, "2.0.0", bad)
    assert isinstance(refused.value, UnsupportedContractError) is contract
    record = old.record("lin")
    assert (record.phase, record.version, serving_version(record)) == (
        Phase.FAILED,
        "2.0.0",
        "1.0.0",
    )
    assert record.format_refused_by == (OLD if contract else "")
    # The journal on disk, read back by an upgraded agent, decides the same.
    new = device.lifecycle(NEW)
    on_disk = new.record("lin")
    assert on_disk == record
    assert (should_skip(on_disk, "2.0.0", "r-2.0.0", NEW) is None) is contract
    assert should_skip(on_disk, "2.0.0", "r-2.0.0", OLD) is not None
