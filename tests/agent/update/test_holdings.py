"""Which versions the device holds and in what state (Triton's repository index): pure."""

from __future__ import annotations

from agent.update.holdings import Held, held_versions
from agent.update.journal import JournalRecord, Phase


def _record(
    phase: Phase, version: str | None, previous: str | None, reason: str = ""
) -> JournalRecord:
    return JournalRecord("m", phase=phase, version=version, previous=previous, reason=reason)


def test_a_candidate_on_probation_serves_and_the_previous_waits_for_a_rollback() -> None:
    held = held_versions(_record(Phase.ACTIVE, "2.0.0", "1.0.0"), ["2.0.0", "1.0.0"], "2.0.0")
    assert held == [
        Held("1.0.0", "UNAVAILABLE", "the previous version, kept for a rollback"),
        Held("2.0.0", "READY", "serving, on probation"),
    ]


def test_a_candidate_being_installed_is_loading_even_before_it_is_unpacked() -> None:
    for phase in (Phase.DOWNLOADING, Phase.SMOKE_TESTED):
        held = held_versions(_record(phase, "2.0.0", "1.0.0"), ["1.0.0"], "1.0.0")
        assert held == [
            Held("1.0.0", "READY", "serving"),
            Held("2.0.0", "LOADING", f"installing ({phase.value})"),
        ]


def test_failed_and_rolled_back_candidates_say_why_and_old_versions_are_on_disk() -> None:
    record = _record(Phase.ROLLED_BACK, "2.0.0", "1.0.0", "error rate 0.4 over 0.05")
    held = held_versions(record, ["2.0.0", "1.0.0", "0.9.0"], "1.0.0")
    assert held == [
        Held("0.9.0", "UNAVAILABLE", "on disk, not loaded"),
        Held("1.0.0", "READY", "serving"),
        Held("2.0.0", "UNAVAILABLE", "rolled_back: error rate 0.4 over 0.05"),
    ]
    gone = held_versions(_record(Phase.FAILED, "2.0.0", "1.0.0", "golden vectors"), [], "1.0.0")
    assert gone == [  # removed from disk, still known and said why
        Held("1.0.0", "READY", "serving"),
        Held("2.0.0", "UNAVAILABLE", "failed: golden vectors"),
    ]
    committed = held_versions(_record(Phase.COMMITTED, "2.0.0", "1.0.0"), ["1.0.0"], "2.0.0")
    assert committed == [
        Held("1.0.0", "UNAVAILABLE", "the previous version, on disk, not loaded"),
        Held("2.0.0", "READY", "serving"),
    ]
    assert held_versions(_record(Phase.IDLE, None, None), [], None) == []


def test_a_candidate_in_shadow_is_loading_beside_the_version_serving() -> None:
    held = held_versions(_record(Phase.SHADOW, "2.0.0", "1.0.0"), ["2.0.0", "1.0.0"], "1.0.0")
    assert held == [
        Held("1.0.0", "READY", "serving"),
        Held(
            "2.0.0",
            "LOADING",
            "in shadow beside 1.0.0: given copies of live requests, answers no client",
        ),
    ]
