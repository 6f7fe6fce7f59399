"""The install state machine as pure functions, with an injected clock."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from agent.contracts import ProbationPolicy, ShadowPolicy
from agent.update.journal import (
    CRASH_LOOP_RESTARTS,
    JOURNAL_SCHEMA,
    JOURNAL_SCHEMA_1,
    MAX_INTERRUPTED_INSTALLS,
    TRANSITIONS,
    IllegalTransitionError,
    JournalFormatError,
    JournalRecord,
    NewerJournalError,
    Phase,
    abandon,
    begin_install,
    cancel_shadow,
    enter_shadow,
    parse_record,
    probation_carried_s,
    record_from_pointers,
    recover,
    retry_later,
    serving_version,
    should_skip,
    transition,
)
from tests.agent.update._old_records import (
    POINTERS_WRITTEN_BY_E3FAC1E,
    V1_SERVES,
    V1_WRITTEN_BY_3C52CD2,
)

POLICY = ProbationPolicy(duration_s=30)
AGENT = "0.1.0"


def _installing(phase: Phase = Phase.DOWNLOADING, serving: str | None = "1.0.0") -> JournalRecord:
    base = JournalRecord(
        model="m", phase=Phase.COMMITTED if serving else Phase.IDLE, version=serving
    )
    record = begin_install(base, "2.0.0", "r2", POLICY, now=100.0, deadline_s=10)
    for step in (Phase.VERIFIED, Phase.STAGED, Phase.SMOKE_TESTED, Phase.ACTIVE):
        if record.phase == phase:
            break
        record = transition(record, step, now=101.0)
    assert record.phase == phase
    return record


def test_every_phase_is_in_the_table_and_every_target_is_a_phase() -> None:
    assert set(TRANSITIONS) == set(Phase)
    assert all(targets <= set(Phase) for targets in TRANSITIONS.values())


def test_happy_path_and_what_serves_in_each_phase() -> None:
    record = _installing()
    assert (record.version, record.previous, record.deadline_at) == ("2.0.0", "1.0.0", 110.0)
    seen = {}
    for phase in (Phase.VERIFIED, Phase.STAGED, Phase.SMOKE_TESTED, Phase.ACTIVE, Phase.COMMITTED):
        seen[phase] = serving_version(record)
        record = transition(record, phase, now=200.0)
    seen[record.phase] = serving_version(record)
    assert seen[Phase.VERIFIED] == seen[Phase.SMOKE_TESTED] == "1.0.0"
    assert seen[Phase.COMMITTED] == "2.0.0"


@pytest.mark.parametrize(
    ("start", "to"),
    [
        (Phase.IDLE, Phase.ACTIVE),
        (Phase.DOWNLOADING, Phase.ACTIVE),
        (Phase.VERIFIED, Phase.COMMITTED),
        (Phase.ACTIVE, Phase.FAILED),
        (Phase.COMMITTED, Phase.ROLLED_BACK),
        (Phase.FAILED, Phase.ACTIVE),
    ],
)
def test_illegal_transitions_name_the_rule(start: Phase, to: Phase) -> None:
    record = JournalRecord(model="m", phase=start, version="1.0.0")
    with pytest.raises(
        IllegalTransitionError, match=f"illegal transition {start.value} -> {to.value}"
    ):
        transition(record, to, now=1.0)


def test_installing_what_already_serves_is_refused() -> None:
    with pytest.raises(IllegalTransitionError, match="already served"):
        begin_install(
            JournalRecord(model="m", phase=Phase.COMMITTED, version="1.0.0"),
            "1.0.0",
            "r",
            POLICY,
            0.0,
            1.0,
        )


def test_round_trip_and_bad_files() -> None:
    record = _installing(Phase.ACTIVE)
    assert parse_record(record.to_json_bytes()) == record
    for raw in (b"", b"{}", b'{"schema": "edgefleet.journal/1", "phase": "nope", "model": "m"}'):
        with pytest.raises(JournalFormatError):
            parse_record(raw)


@pytest.mark.parametrize(
    "phase", [Phase.DOWNLOADING, Phase.VERIFIED, Phase.STAGED, Phase.SMOKE_TESTED]
)
def test_restart_in_an_install_abandons_it_and_serves_the_previous(phase: Phase) -> None:
    plan = recover(_installing(phase), now=500.0)
    assert plan.record.phase is Phase.IDLE
    assert plan.load == "1.0.0" == serving_version(plan.record)
    assert plan.record.interrupted == 1 and plan.record.interrupted_version == "2.0.0"
    assert "abandoned" in plan.record.reason


def test_a_candidate_that_keeps_crashing_the_install_fails() -> None:
    record = JournalRecord(model="m", phase=Phase.COMMITTED, version="1.0.0")
    for attempt in range(1, MAX_INTERRUPTED_INSTALLS + 1):
        record = begin_install(record, "2.0.0", "r2", POLICY, now=float(attempt), deadline_s=5)
        record = recover(record, now=float(attempt) + 1).record
    assert record.phase is Phase.FAILED
    assert serving_version(record) == "1.0.0"
    assert f"interrupted {MAX_INTERRUPTED_INSTALLS} times" in record.reason
    assert should_skip(record, "2.0.0", "r2", AGENT) is not None
    assert should_skip(record, "2.0.0", "r3", AGENT) is None  # a new rollout retries
    assert should_skip(record, "3.0.0", "r2", AGENT) is None


def test_a_new_candidate_resets_the_interrupted_count() -> None:
    record = recover(_installing(), now=5.0).record
    fresh = begin_install(record, "3.0.0", "r3", POLICY, now=6.0, deadline_s=1)
    assert fresh.interrupted == 0 and fresh.previous == "1.0.0"


def test_restarts_during_probation_resume_then_roll_back_as_a_crash_loop() -> None:
    record = _installing(Phase.ACTIVE)
    for restart in range(1, CRASH_LOOP_RESTARTS):
        plan = recover(record, now=300.0)
        assert (plan.load, plan.fallback) == ("2.0.0", "1.0.0")
        record = plan.record
        assert record.restarts == restart
    plan = recover(record, now=301.0)
    assert plan.record.phase is Phase.ROLLED_BACK and plan.load == "1.0.0"
    assert "crash loop" in plan.record.reason


def test_settled_records_recover_to_themselves() -> None:
    for record in (
        JournalRecord(model="m"),
        JournalRecord(model="m", phase=Phase.COMMITTED, version="1.0.0"),
    ):
        assert recover(record, now=1.0).record == record


def test_transient_failures_go_back_to_idle_without_counting() -> None:
    record = retry_later(_installing(), now=5.0, reason="broker down")
    assert record.phase is Phase.IDLE and record.version == "1.0.0" and record.interrupted == 0


def test_abandon_only_applies_to_installs_in_progress() -> None:
    with pytest.raises(IllegalTransitionError):
        abandon(_installing(Phase.ACTIVE), now=1.0, reason="x")


def test_deadlines_are_recorded_for_the_phases_that_have_one() -> None:
    record = _installing()
    assert record.deadline_at == 110.0  # entered at 100 with a deadline of 10 s
    assert transition(record, Phase.FAILED, now=1.0).deadline_at is None


# ---------------------------------------------------------------- probation across a restart

STARTED = 1_780_000_000.0  # the wall clock at activation, as the journal records it
HOUR_S = 3600.0


def _on_probation(started_at: float = STARTED) -> JournalRecord:
    record = replace(_installing(Phase.ACTIVE), probation_started_at=started_at)
    assert record.probation.duration_s == 30
    return record


def test_a_quick_restart_resumes_probation_where_it_was() -> None:
    plan = recover(_on_probation(), now=STARTED + 12)
    assert plan.probation_carried_s == 12.0
    assert plan.record.probation_started_at == STARTED  # unchanged: the count goes on
    assert plan.note == "resuming probation of 2.0.0 after restart 1, 12s of 30s passed"


def test_a_wall_clock_stepped_back_across_a_restart_starts_probation_over() -> None:
    now = STARTED + 12 - 6 * HOUR_S  # 12 s in; the wall clock went back 6 h meanwhile
    assert probation_carried_s(_on_probation(), now)[0] == 0.0
    plan = recover(_on_probation(), now)
    assert (plan.load, plan.fallback, plan.probation_carried_s) == ("2.0.0", "1.0.0", 0.0)
    # The record's start is when the count began again, so the next restart reads sense.
    assert plan.record.probation_started_at == now
    assert plan.note == (
        "resuming probation of 2.0.0 after restart 1; the wall clock reads 21588s before "
        "the probation started: it went back, so the probation starts over"
    )
    again = recover(plan.record, now + 5)
    assert again.probation_carried_s == 5.0 and again.record.restarts == 2


def test_a_wall_clock_stepped_forward_across_a_restart_does_not_end_probation() -> None:
    now = STARTED + 12 + 6 * HOUR_S  # 12 s in; the wall clock jumped 6 h ahead meanwhile
    plan = recover(_on_probation(), now)
    assert plan.probation_carried_s == 0.0  # not 21612 s: that would commit at once
    assert plan.record.probation_started_at == now
    assert "the clock went forward or the agent was down meanwhile" in plan.note
    # The same for a device that was down past the probation's end: it watched the
    # version for less than 30 s, and has no figures of it left (they start from zero).
    assert probation_carried_s(_on_probation(), STARTED + 30)[0] == 0.0
    assert probation_carried_s(_on_probation(), STARTED + 29.5)[0] == 29.5


def test_a_record_without_a_probation_start_counts_from_activation() -> None:
    record = replace(_on_probation(), probation_started_at=None, entered_at=STARTED)
    assert probation_carried_s(record, STARTED + 7) == (7.0, "")


def test_a_probation_of_no_duration_never_starts_over() -> None:
    record = replace(_on_probation(), probation=ProbationPolicy(duration_s=0))
    assert probation_carried_s(record, STARTED + 99) == (99.0, "")


# ---------------------------------------------------------------- schemas and migrations
@pytest.mark.parametrize("phase", sorted(V1_WRITTEN_BY_3C52CD2))
def test_a_record_written_by_the_first_journal_still_reads_and_recovers(phase: str) -> None:
    record = parse_record(V1_WRITTEN_BY_3C52CD2[phase])
    assert (record.model, record.phase.value) == ("digits", phase)
    serves, load, fallback = V1_SERVES[phase]
    assert serving_version(record) == serves
    plan = recover(record, now=1_780_000_300.0)
    assert (plan.load, plan.fallback) == (load, fallback)
    assert parse_record(record.to_json_bytes()) == record


def test_a_newer_schema_is_refused_naming_both_schemas() -> None:
    doc = json.loads(V1_WRITTEN_BY_3C52CD2["committed"])
    doc.update(schema="edgefleet.journal/3", checksum="abc")
    with pytest.raises(NewerJournalError) as refused:
        parse_record(json.dumps(doc).encode())
    assert refused.value.found == "edgefleet.journal/3"
    assert "edgefleet.journal/3" in str(refused.value)
    assert JOURNAL_SCHEMA in str(refused.value)
    assert not isinstance(refused.value, JournalFormatError)  # never "treat as empty"


@pytest.mark.parametrize(
    "schema", [None, "", "edgefleet.journal/0", "edgefleet.journal/x", "other/1", 1]
)
def test_a_record_of_no_known_schema_is_unreadable(schema: object) -> None:
    doc = json.loads(V1_WRITTEN_BY_3C52CD2["committed"])
    doc["schema"] = schema
    with pytest.raises(JournalFormatError, match="schema"):
        parse_record(json.dumps(doc).encode())


def test_fields_this_agent_does_not_know_are_named() -> None:
    doc = json.loads(V1_WRITTEN_BY_3C52CD2["committed"])
    doc["surprise"] = 1
    with pytest.raises(JournalFormatError, match="surprise"):
        parse_record(json.dumps(doc).encode())


def test_pointer_files_of_an_agent_before_the_journal_become_a_record() -> None:
    p = POINTERS_WRITTEN_BY_E3FAC1E
    committed = record_from_pointers("digits", p["active"], None, now=5.0)
    assert (committed.phase, committed.version, committed.previous) == (
        Phase.COMMITTED, "1.1.0", "1.0.0"
    )  # fmt: skip
    assert serving_version(committed) == "1.1.0" and committed.entered_at == 5.0
    assert recover(committed, now=6.0).load == "1.1.0"
    first = record_from_pointers("other", p["active_first"], None, now=5.0)
    assert (first.phase, serving_version(first), first.previous) == (
        Phase.COMMITTED, "0.3.0", None
    )  # fmt: skip
    # A candidate refused here: failed, serving what active.json named.
    failed = record_from_pointers("digits", p["active"], p["failed"], now=5.0)
    assert (failed.phase, failed.version, serving_version(failed)) == (
        Phase.FAILED, "2.0.0", "1.1.0"
    )  # fmt: skip
    assert "golden vectors differ" in failed.reason
    nothing_yet = record_from_pointers("digits", None, p["failed"], now=5.0)
    assert (nothing_yet.phase, serving_version(nothing_yet)) == (Phase.FAILED, None)
    assert parse_record(failed.to_json_bytes()) == failed


@pytest.mark.parametrize(
    "active",
    [b"{", b"[]", b'{"previous": "1.0.0"}', b'{"version": "one"}', b'{"version": "1.0.0\\n"}'],
)
def test_unreadable_pointer_files_are_refused(active: bytes) -> None:
    with pytest.raises(JournalFormatError, match=r"active\.json"):
        record_from_pointers("digits", active, None, now=5.0)


# ---------------------------------------------------------------- shadow
SHADOW = ShadowPolicy(samples=5, max_duration_s=30.0)


def _in_shadow() -> JournalRecord:
    return enter_shadow(_installing(Phase.SMOKE_TESTED), SHADOW, now=150.0)


def test_shadow_sits_between_smoke_tested_and_active_and_serves_the_previous_version() -> None:
    record = _in_shadow()
    assert (record.phase, record.shadow, record.entered_at) == (Phase.SHADOW, SHADOW, 150.0)
    assert serving_version(record) == "1.0.0"  # the candidate answers no client
    live = transition(record, Phase.ACTIVE, now=160.0)
    assert serving_version(live) == "2.0.0" and live.shadow is None
    failed = transition(record, Phase.FAILED, now=160.0, reason="shadow: agreement 0.5")
    assert serving_version(failed) == "1.0.0" and failed.shadow is None
    assert should_skip(failed, "2.0.0", "r2", AGENT) is not None
    for illegal in (Phase.COMMITTED, Phase.ROLLED_BACK, Phase.DOWNLOADING, Phase.STAGED):
        with pytest.raises(IllegalTransitionError, match="shadow ->"):
            transition(record, illegal, now=160.0)
    with pytest.raises(IllegalTransitionError):
        enter_shadow(_installing(Phase.STAGED), SHADOW, now=1.0)


def test_cancelling_a_shadow_goes_idle_on_the_served_version_without_failing_it() -> None:
    idle = cancel_shadow(_in_shadow(), now=170.0, reason="desired state names 3.0.0")
    assert (idle.phase, idle.version, idle.previous, idle.shadow) == (
        Phase.IDLE, "1.0.0", None, None
    )  # fmt: skip
    assert should_skip(idle, "2.0.0", "r2", AGENT) is None
    with pytest.raises(IllegalTransitionError):
        cancel_shadow(_installing(Phase.ACTIVE), now=1.0, reason="x")


def test_a_restart_in_shadow_serves_the_previous_version_and_shadows_again() -> None:
    record = _in_shadow()
    plan = recover(record, now=500.0)
    assert (plan.load, plan.fallback) == ("1.0.0", None)
    again = plan.record
    assert (again.phase, again.shadow, again.entered_at, again.interrupted) == (
        Phase.SHADOW, SHADOW, 500.0, 1
    )  # fmt: skip
    assert "again from the start" in plan.note
    # A candidate that keeps crashing the agent in shadow fails, serving the previous one.
    for _ in range(MAX_INTERRUPTED_INSTALLS - 2):
        again = recover(again, now=600.0).record
        assert again.phase is Phase.SHADOW
    last = recover(again, now=700.0)
    assert (last.record.phase, last.load, last.record.shadow) == (Phase.FAILED, "1.0.0", None)
    assert f"interrupted {MAX_INTERRUPTED_INSTALLS} times" in last.record.reason


def test_only_a_record_in_shadow_is_written_in_schema_2() -> None:
    record = _in_shadow()
    doc = json.loads(record.to_json_bytes())
    assert doc["schema"] == JOURNAL_SCHEMA == "edgefleet.journal/2"
    assert doc["shadow"]["samples"] == 5
    assert parse_record(record.to_json_bytes()) == record
    # Everything else is schema 1 as an older agent wrote it: same keys, same schema.
    for phase in (Phase.SMOKE_TESTED, Phase.ACTIVE):
        other = json.loads(_installing(phase).to_json_bytes())
        assert other["schema"] == JOURNAL_SCHEMA_1 and "shadow" not in other
    older = json.loads(V1_WRITTEN_BY_3C52CD2["active"])
    assert set(json.loads(_installing(Phase.ACTIVE).to_json_bytes())) == set(older)


def test_a_schema_1_record_cannot_hold_a_shadow_and_a_shadow_needs_its_policy() -> None:
    doc = json.loads(_in_shadow().to_json_bytes())
    doc["schema"] = "edgefleet.journal/1"
    with pytest.raises(JournalFormatError, match="shadow"):
        parse_record(json.dumps(doc).encode())
    doc = json.loads(_in_shadow().to_json_bytes())
    doc["shadow"] = None
    with pytest.raises(JournalFormatError, match="shadow policy"):
        parse_record(json.dumps(doc).encode())
    doc["shadow"] = {"samples": -1}
    with pytest.raises(JournalFormatError, match="samples"):
        parse_record(json.dumps(doc).encode())
