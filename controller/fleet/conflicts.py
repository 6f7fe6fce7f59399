"""Two agents with one identity (a copied configuration): telling them apart from a
restart by their event streams. Pure: no clock, no store, no broker.

Each agent numbers its lifecycle events ``seq`` 1, 2, ... within a ``stream``, a random
id its outbox file chooses when it is created (``agent.telemetry.outbox``). Both live on
the device's disk: a restarted agent, a crash or a power cut included, continues its
stream and its numbers. A new stream, its numbers restarting at 1, means a new outbox
file: the agent was installed afresh or its state folder was wiped, which takes a restart,
so its first message after is its retained ``online`` status (a new connection). Two
agents sharing one identity each keep their own stream, and their events interleave.

The rule, per device, over its status messages and events in the order they arrive:
- an event of the stream it reported last, or an event already seen (``seq`` no higher
  than the last one seen of its stream: a redelivery), says nothing;
- an event of a *new* stream with no status message since the last event of the old
  one: its numbers restarted while it stayed online with no reconnect in between; a
  conflict;
- an event of a stream it switched away from earlier, numbered past where that stream
  stopped: the two streams alternate, whatever statuses came in between (each agent
  takes the connection over from the other, and each says ``online`` as it does); a
  conflict;
- otherwise (a new stream after a status message: a reinstalled agent reconnecting) it
  switches to the new stream.

Not seen by this rule: two agents sharing a copied state folder too (one stream, one
``seq`` counter copied: their events collide on (stream, seq) and are stored once), and
conflicts split between several ``edgectl serve`` ingest workers (each sees part of a
device's messages). The rule starts afresh when ``edgectl serve`` starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

# Streams remembered per device that it switched away from (the newest ones).
KEPT_STREAMS: Final = 4


@dataclass(frozen=True)
class StreamState:
    """What the rule remembers of one device."""

    stream: str
    seq: int
    # A status message arrived since the last new event of ``stream``.
    status_since: bool = False
    # Streams it switched away from, oldest first, with the last seq seen of each.
    left: tuple[tuple[str, int], ...] = field(default=())


@dataclass(frozen=True)
class Conflict:
    """Why the rule thinks two agents share a device's identity."""

    previous_stream: str
    previous_seq: int
    stream: str
    seq: int
    alternating: bool  # the stream was one the device had switched away from

    def describe(self) -> str:
        if self.alternating:
            return (
                f"identity conflict? events of streams {self.previous_stream} and "
                f"{self.stream} alternate ({self.stream} seq {self.seq} after "
                f"{self.previous_stream} seq {self.previous_seq}): two agents with this "
                "device's identity (a copied configuration)?"
            )
        return (
            f"identity conflict? event seq restarted while online (stream {self.stream} "
            f"seq {self.seq} after {self.previous_stream} seq {self.previous_seq}, no "
            "reconnect in between): two agents with this device's identity (a copied "
            "configuration)?"
        )


def after_status(state: StreamState | None) -> StreamState | None:
    """The state after a status message of the device (online or offline)."""
    if state is None or state.status_since:
        return state
    return StreamState(state.stream, state.seq, True, state.left)


def after_event(
    state: StreamState | None, stream: str, seq: int
) -> tuple[StreamState, Conflict | None]:
    """The state after an event numbered ``seq`` in ``stream``, and the conflict it shows
    (None when it shows none); see the module docstring."""
    if state is None:
        return StreamState(stream, seq), None
    if stream == state.stream:
        if seq <= state.seq:
            return state, None
        return StreamState(stream, seq, False, state.left), None
    left = dict(state.left)
    if stream in left and seq <= left[stream]:
        return state, None  # an old event of a stream it left, sent again
    conflict = None
    if stream in left or not state.status_since:
        conflict = Conflict(state.stream, state.seq, stream, seq, alternating=stream in left)
    left.pop(stream, None)
    left.pop(state.stream, None)
    kept = [*((s, n) for s, n in state.left if s in left), (state.stream, state.seq)]
    return StreamState(stream, seq, False, tuple(kept[-KEPT_STREAMS:])), conflict


class ConflictWatch:
    """``after_status`` and ``after_event`` for every device, keyed (fleet, device)."""

    def __init__(self) -> None:
        self._states: dict[tuple[str, str], StreamState] = {}

    def status(self, fleet: str, device: str) -> None:
        key = (fleet, device)
        state = after_status(self._states.get(key))
        if state is not None:
            self._states[key] = state

    def event(self, fleet: str, device: str, stream: str, seq: int) -> Conflict | None:
        key = (fleet, device)
        self._states[key], conflict = after_event(self._states.get(key), stream, seq)
        return conflict
