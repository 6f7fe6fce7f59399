"""Why a device does not install what desired state names: the pure decisions of
agent.update.waiting, and the board that keeps each model's reason between checks."""

from __future__ import annotations

import pytest

from agent.base.errors import (
    AgentError,
    FetchError,
    InsufficientSpaceError,
    ModelError,
    StorageError,
    TamperedDownloadError,
    UntrustedInputError,
)
from agent.contracts import MAX_DETAIL, WAITING_CODES, Waiting
from agent.update.journal import JournalRecord, Phase
from agent.update.waiting import (
    WaitingBoard,
    after_check_error,
    after_install_error,
    before_install,
    carry,
)

AGENT = "0.1.0"


def _record(phase: Phase, version: str = "1.0.0", **kw: object) -> JournalRecord:
    return JournalRecord(model="m", phase=phase, version=version, **kw)  # type: ignore[arg-type]


def test_a_release_waits_for_the_probation_of_the_version_serving_and_says_how_long() -> None:
    active = _record(Phase.ACTIVE, previous="0.9.0", rollout_id="r1")
    waits = before_install(active, "2.0.0", "r2", probation_left_s=29.6, agent_version=AGENT)
    assert waits == Waiting("probation", "waits until probation of 1.0.0 ends (in 30 s)", "2.0.0")
    # Not known yet (no probation tick in this process): no time promised.
    waits = before_install(active, "2.0.0", "r2", agent_version=AGENT)
    assert waits is not None and waits.detail == "waits until probation of 1.0.0 ends"
    # Overdue (the next tick ends it): never a negative time.
    waits = before_install(active, "2.0.0", "r2", probation_left_s=-3.0, agent_version=AGENT)
    assert waits is not None and waits.detail.endswith("(in 0 s)")


def test_the_version_on_probation_or_the_one_before_does_not_wait() -> None:
    active = _record(Phase.ACTIVE, previous="0.9.0")
    assert (
        before_install(active, "1.0.0", "r1", agent_version=AGENT) is None
    )  # it is the one serving
    assert (
        before_install(active, "0.9.0", "r0", agent_version=AGENT) is None
    )  # going back: a rollback, at once


@pytest.mark.parametrize(
    ("phase", "code", "how"),
    [(Phase.FAILED, "failed", "failed"), (Phase.ROLLED_BACK, "rolled_back", "was rolled back")],
)
def test_a_version_that_failed_here_for_this_rollout_waits_for_another_rollout(
    phase: Phase, code: str, how: str
) -> None:
    record = _record(phase, "2.0.0", rollout_id="r2", reason="smoke test: output mismatch")
    waits = before_install(record, "2.0.0", "r2", agent_version=AGENT)
    assert waits is not None and (waits.code, waits.version) == (code, "2.0.0")
    assert waits.detail == (
        f"2.0.0 {how} here for rollout r2 (smoke test: output mismatch); not retried until "
        "desired state names another rollout"
    )
    # Another rollout of the same version, or another version: it may be installed.
    assert before_install(record, "2.0.0", "r3", agent_version=AGENT) is None
    assert before_install(record, "2.0.1", "r2", agent_version=AGENT) is None


def test_an_idle_or_committed_device_does_not_wait() -> None:
    assert before_install(_record(Phase.COMMITTED), "2.0.0", "r2", agent_version=AGENT) is None
    assert before_install(JournalRecord(model="m"), "2.0.0", "r2", agent_version=AGENT) is None


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InsufficientSpaceError("not enough disk space in /s: need 10 bytes, have 1"), "no_space"),
        (StorageError("cannot write /s/x.part: read-only file system"), "storage"),
        (FetchError("connection refused"), "fetch_failed"),
        (TamperedDownloadError("length or hash mismatch"), "refused"),
        (ModelError("smoke test failed"), "failed"),
        (UntrustedInputError("desired state names t, which no signed targets list"), "failed"),
    ],
)
def test_an_install_error_gives_its_reason(error: AgentError, code: str) -> None:
    waits = after_install_error(error, "2.0.0")
    assert (waits.code, waits.version) == (code, "2.0.0")
    assert str(error) in waits.detail
    assert waits.code in WAITING_CODES


def test_a_check_that_read_no_desired_state_gives_its_reason_without_a_version() -> None:
    unreachable = after_check_error(FetchError("metadata refresh from http://r/: refused"))
    assert unreachable.code == "check_failed" and unreachable.version is None
    assert "cannot reach the repository: metadata refresh from http://r/" in unreachable.detail
    assert after_check_error(UntrustedInputError("metadata expired")).code == "untrusted"
    assert after_check_error(StorageError("disk full")).code == "check_failed"


def test_a_detail_is_one_storable_line_of_bounded_length() -> None:
    waits = after_install_error(FetchError("a\nb\x00c " + "x" * 5000), "2.0.0")
    assert "\n" not in waits.detail and "\x00" not in waits.detail
    assert len(waits.detail) == MAX_DETAIL and waits.detail.endswith("…")


def test_since_stays_while_the_code_and_version_stay() -> None:
    first = carry(None, Waiting("probation", "in 30 s", "2.0.0"), "T1")
    assert first.since == "T1"
    later = carry(first, Waiting("probation", "in 20 s", "2.0.0"), "T2")
    assert (later.since, later.detail) == ("T1", "in 20 s")
    assert carry(later, Waiting("no_space", "need 10", "2.0.0"), "T3").since == "T3"
    assert carry(later, Waiting("probation", "in 30 s", "3.0.0"), "T4").since == "T4"


def test_the_board_keeps_each_models_reason_until_a_check_clears_it() -> None:
    times = iter(["T1", "T2", "T3", "T4", "T5"])
    board = WaitingBoard(clock=lambda: next(times))
    board.set("a", Waiting("probation", "in 30 s", "2.0.0"))
    board.set("b", Waiting("no_space", "need 10", "1.1.0"))
    board.set("a", Waiting("probation", "in 10 s", "2.0.0"))
    assert board.snapshot()["a"] == Waiting("probation", "in 10 s", "2.0.0", "T1")
    # A check that read no desired state: every known model, the versions they waited for.
    board.set_all(["a", "b", "c"], after_check_error(FetchError("refused")))
    snap = board.snapshot()
    assert {m: (w.code, w.version) for m, w in snap.items()} == {
        "a": ("check_failed", "2.0.0"),
        "b": ("check_failed", "1.1.0"),
        "c": ("check_failed", None),
    }
    assert {w.since for w in snap.values()} == {"T4"}
    board.set("a", None)  # installed, or found installed
    board.keep_only(["b"])  # desired state no longer names c
    assert set(board.snapshot()) == {"b"}


def test_a_version_in_shadow_waits_with_code_shadow_and_another_does_not() -> None:
    record = JournalRecord("m", phase=Phase.SHADOW, version="2.0.0", previous="1.0.0")
    waits = before_install(record, "2.0.0", "r2", agent_version=AGENT)
    assert waits is not None and waits.code == "shadow" and waits.code in WAITING_CODES
    assert "in shadow beside 1.0.0" in waits.detail and waits.version == "2.0.0"
    # the updater cancels the shadow
    assert before_install(record, "3.0.0", "r3", agent_version=AGENT) is None
