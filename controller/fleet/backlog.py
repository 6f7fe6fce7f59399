"""What ingestion holds for its writer: every QoS 1 message, QoS 0 ones within a bound.

paho's network thread ``put``s each message as it arrives; the ``ingest-writer`` thread
``take``s them, oldest first, to store them in batches. While the store refuses a batch
(or is slower than the fleet) messages pile up here:

- QoS 1 messages are all kept: they are acknowledged only once stored, and the broker
  sends no more than the Receive Maximum of them unacknowledged, so they are bounded there.
- QoS 0 messages (heartbeats by default) are bounded here, by ``qos0_max``. Below the
  bound every one is kept: a short outage loses nothing. Past it, one gives way:
  the heartbeat superseded longest ago, if any (``COALESCED``: a newer heartbeat of
  the same device, a ``telemetry`` topic, is held; a device's state is latest-wins, so
  only a history row is lost); else the oldest QoS 0 message (``DROPPED``: nothing
  newer on its topic is held).

So a store down for an hour costs at most ``qos0_max`` QoS 0 messages of memory, and
while the bound is at least the number of devices heard from (plus any other QoS 0
message held), nothing is dropped: every device's latest heartbeat is stored once the
store is back, and the history loses the oldest rows first.

Invariants:
- At most ``qos0_max`` QoS 0 messages are held; no QoS 1 message is ever dropped.
- ``take`` returns messages in the order they were put; a replacing heartbeat takes its
  own place in that order, not the place of the one it replaced.
- After ``close``, ``take`` returns only what was put before it; ``take_rest`` the rest.

Thread-safe: every method holds one lock, for O(1) work per message.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict, deque
from typing import Final

# A message as received: (topic, payload, received at, qos, packet id, connection number).
Item = tuple[str, bytes, float, int, int, int]

QUEUED: Final = "queued"
COALESCED: Final = "coalesced"
DROPPED: Final = "dropped"

_HEARTBEAT_TOPIC_END: Final = "/telemetry"


class Backlog:
    """Messages waiting for the writer, QoS 0 ones bounded by ``qos0_max``."""

    def __init__(self, qos0_max: int) -> None:
        """Raises ValueError when ``qos0_max`` is below 1."""
        if qos0_max < 1:
            raise ValueError(
                f"the QoS 0 backlog bound (qos0_backlog_max) expected at least 1 message, "
                f"got {qos0_max}"
            )
        self.qos0_max = qos0_max
        self._lock = threading.Lock()
        self._ready = threading.Event()  # set while there is something to take, or closed
        self._next = 0  # the number of the next message put: their order
        self._qos1: deque[tuple[int, Item]] = deque()
        self._qos0: OrderedDict[int, Item] = OrderedDict()
        self._newest_beat: dict[str, int] = {}  # heartbeat topic -> its newest held number
        # Held heartbeats a newer one of their topic supersedes, earliest superseded first.
        self._superseded: OrderedDict[int, None] = OrderedDict()
        self._closed_at: float = math.inf

    @property
    def qos0_held(self) -> int:
        return len(self._qos0)

    @property
    def is_closed(self) -> bool:
        return self._closed_at != math.inf

    @property
    def is_finished(self) -> bool:
        """Closed, and everything put before ``close`` was taken."""
        with self._lock:
            return self.is_closed and self._head() >= self._closed_at

    def put(self, item: Item) -> str:
        """Hold ``item``; return QUEUED, or COALESCED or DROPPED when a QoS 0 message
        gave way (at the bound)."""
        with self._lock:
            outcome = self._put(item)
            if not self._ready.is_set():
                self._ready.set()
        return outcome

    def put_many(self, items: list[Item]) -> list[str]:
        """Hold ``items``, in order, as ``put`` each; return the outcomes other than
        QUEUED (a QoS 0 message that gave way for each)."""
        with self._lock:
            put = self._put
            shed = [outcome for item in items if (outcome := put(item)) != QUEUED]
            if items and not self._ready.is_set():
                self._ready.set()
        return shed

    def _put(self, item: Item) -> str:
        number = self._next
        self._next += 1
        if item[3]:
            self._qos1.append((number, item))
            return QUEUED
        return self._put_qos0(number, item)

    def _put_qos0(self, number: int, item: Item) -> str:
        topic = item[0]
        self._qos0[number] = item
        if topic.endswith(_HEARTBEAT_TOPIC_END):
            previous = self._newest_beat.get(topic)
            if previous is not None:
                self._superseded[previous] = None
            self._newest_beat[topic] = number
        if len(self._qos0) <= self.qos0_max:
            return QUEUED
        if self._superseded:
            victim, _ = self._superseded.popitem(last=False)
            outcome = COALESCED
        else:
            victim = next(iter(self._qos0))  # not ``item``: qos0_max >= 1
            outcome = DROPPED
        self._forget(victim, self._qos0.pop(victim)[0])
        return outcome

    def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for something to take (or ``close``); True if so."""
        return self._ready.wait(timeout_s)

    def take(self, limit: int) -> list[Item]:
        """Up to ``limit`` messages, oldest first; after ``close`` only those put before it.
        Never waits."""
        with self._lock:
            items = self._take(limit, self._closed_at)
            if not self._qos1 and not self._qos0 and not self.is_closed:
                self._ready.clear()
        return items

    def take_rest(self) -> list[Item]:
        """Everything held, oldest first, what was put after ``close`` too."""
        with self._lock:
            return self._take(math.inf, math.inf)

    def close(self) -> None:
        """Let ``take`` return only what was put until now, and wake ``wait``."""
        with self._lock:
            self._closed_at = self._next
            self._ready.set()

    def _head(self) -> float:
        """The number of the oldest message held (infinity when none is)."""
        first_qos1 = self._qos1[0][0] if self._qos1 else math.inf
        first_qos0 = next(iter(self._qos0)) if self._qos0 else math.inf
        return min(first_qos1, first_qos0)

    def _take(self, limit: float, end: float) -> list[Item]:
        items: list[Item] = []
        if not self._qos1 and self._next <= end:  # QoS 0 only, all before ``end``
            qos0, forget = self._qos0, self._forget
            for _ in range(int(min(limit, len(qos0)))):
                number, item = qos0.popitem(last=False)
                forget(number, item[0])
                items.append(item)
            return items
        while len(items) < limit:
            head = self._head()
            if head >= end:
                break
            if self._qos1 and self._qos1[0][0] == head:
                items.append(self._qos1.popleft()[1])
            else:
                number, item = self._qos0.popitem(last=False)
                self._forget(number, item[0])
                items.append(item)
        return items

    def _forget(self, number: int, topic: str) -> None:
        """Message ``number`` of ``topic`` is no longer held."""
        self._superseded.pop(number, None)
        if self._newest_beat.get(topic) == number:
            del self._newest_beat[topic]
