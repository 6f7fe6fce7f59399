"""The rule that tells two agents sharing one identity from a restarted or reinstalled
agent (issue 20, item 7): pure, over statuses and events in the order they arrive."""

from __future__ import annotations

from controller.fleet.conflicts import (
    KEPT_STREAMS,
    Conflict,
    ConflictWatch,
    StreamState,
    after_event,
    after_status,
)


def run(steps: list[tuple[str, int] | str]) -> list[Conflict]:
    """Feed ("stream", seq) events and "status" messages of one device; the conflicts."""
    state: StreamState | None = None
    found = []
    for step in steps:
        if step == "status":
            state = after_status(state)
            continue
        assert isinstance(step, tuple)
        state, conflict = after_event(state, *step)
        if conflict is not None:
            found.append(conflict)
    return found


def test_one_agent_numbering_its_events_is_no_conflict() -> None:
    assert run(["status", ("a", 1), ("a", 2), ("a", 3)]) == []


def test_a_restart_continues_the_stream_and_is_no_conflict() -> None:
    # The outbox file survives a restart, a crash or a power cut: same stream, next seq.
    assert run([("a", 1), ("a", 2), "status", "status", ("a", 3)]) == []
    assert run([("a", 1), ("a", 2), ("a", 3)]) == []  # a restart whose statuses were missed


def test_redelivered_events_are_no_conflict() -> None:
    assert run([("a", 1), ("a", 2), ("a", 3), ("a", 2), ("a", 3), ("a", 4)]) == []


def test_a_reinstalled_agent_reconnecting_with_a_new_stream_is_no_conflict() -> None:
    assert run([("a", 7), ("a", 8), "status", "status", ("b", 1), ("b", 2)]) == []
    # ... and late copies of the old stream's events, sent again, say nothing either.
    assert run([("a", 7), ("a", 8), "status", ("b", 1), ("a", 8), ("a", 7), ("b", 2)]) == []


def test_seq_restarting_in_a_new_stream_with_no_reconnect_is_a_conflict() -> None:
    (conflict,) = run(["status", ("a", 41), ("a", 42), ("b", 1)])
    assert conflict == Conflict("a", 42, "b", 1, alternating=False)
    assert "seq restarted while online" in conflict.describe()
    assert "stream b seq 1 after a seq 42" in conflict.describe()


def test_two_streams_alternating_is_a_conflict_whatever_the_statuses_between() -> None:
    # Two agents taking the connection from each other: each says "online" as it does.
    steps: list[tuple[str, int] | str] = [("a", 5), "status", ("b", 1), "status", ("a", 6)]
    (conflict,) = run(steps)
    assert conflict == Conflict("b", 1, "a", 6, alternating=True)
    assert "alternate" in conflict.describe()
    more = run([*steps, "status", ("b", 2), "status", ("a", 7), ("a", 8)])
    assert [(c.stream, c.seq) for c in more] == [("a", 6), ("b", 2), ("a", 7)]


def test_only_the_newest_streams_left_are_remembered() -> None:
    steps: list[tuple[str, int] | str] = []
    for i in range(KEPT_STREAMS + 2):  # s0 ... s5: s5 is the stream, s1 ... s4 are left
        steps += ["status", (f"s{i}", 1)]
    assert run(steps) == []
    assert run([*steps, "status", ("s1", 2)]) != []  # still remembered
    assert run([*steps, "status", ("s0", 2)]) == []  # forgotten: a new stream after a status


def test_the_watch_keeps_devices_apart() -> None:
    watch = ConflictWatch()
    watch.status("north", "cam-1")  # a status before any event is remembered as nothing
    assert watch.event("north", "cam-1", "a", 1) is None
    assert watch.event("north", "cam-2", "b", 1) is None
    assert watch.event("south", "cam-1", "c", 1) is None
    assert watch.event("north", "cam-1", "a", 2) is None
    conflict = watch.event("north", "cam-1", "d", 1)
    assert conflict is not None and conflict.previous_stream == "a"
    watch.status("north", "cam-2")
    assert watch.event("north", "cam-2", "e", 1) is None
