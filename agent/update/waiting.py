"""Why the device does not install the version desired state names: pure decisions.

The update check (``agent.update.updater``) asks these functions at each place it decides
not to install, or fails to: the version serving now is on probation (``before_install``),
this version failed or was rolled back here for this rollout (``before_install``), an
install put back or refused (``after_install_error``), a check that could not read the
repository (``after_check_error``). Each gives a ``Waiting`` (``agent.contracts``): a
code of ``WAITING_CODES``, one line for people, the version waited for and since when.
``WaitingBoard`` keeps the reason of each model between checks (``since`` stays while
the code and version stay) for the status and heartbeat messages.

Invariants:
- A model has a reason only while the last check left it off the version desired state
  names for it; a check that installs it, or finds it installed, clears the reason.
- ``since`` is the wall-clock time the device first gave this code for this version,
  not the time of the last check, so a reason that lasts shows how long it has lasted.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime

from agent.base.errors import (
    AgentError,
    FetchError,
    InsufficientSpaceError,
    StorageError,
    TamperedDownloadError,
    UnsupportedContractError,
    UntrustedInputError,
)
from agent.contracts import MAX_DETAIL, Waiting
from agent.update.journal import JournalRecord, Phase, should_skip


def _cut(text: str) -> str:
    text = " ".join(text.replace("\x00", "").split())  # one line, storable
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 1] + "…"


def before_install(
    record: JournalRecord,
    version: str,
    rollout_id: str,
    probation_left_s: float | None = None,
    *,
    agent_version: str,
) -> Waiting | None:
    """Why ``version`` (of rollout ``rollout_id``) is not installed now over ``record``
    by the agent of ``agent_version``, or None when it may be (or is served already).
    ``since`` is left empty. A failed or rolled-back candidate waits as ``should_skip``
    says (``agent.update.journal``).

    ``probation_left_s``: how long the probation of the active version has still to run,
    when known. A version desired state names while the previous one is on probation
    waits for the probation's end, unless it is the version before (a rollback, at once).
    """
    if record.phase is Phase.ACTIVE:
        if version in (record.version, record.previous):
            return None
        left = "" if probation_left_s is None else f" (in {max(probation_left_s, 0.0):.0f} s)"
        return Waiting(
            "probation",
            f"waits until probation of {record.version} ends{left}",
            version,
        )
    if record.phase is Phase.SHADOW and version == record.version:
        return Waiting(
            "shadow",
            f"in shadow beside {record.previous}: compared on copies of live requests "
            "before it answers a client",
            version,
        )
    if should_skip(record, version, rollout_id, agent_version) is not None:
        how = "failed" if record.phase is Phase.FAILED else "was rolled back"
        other = (
            " (a contract this agent lacks: another agent version retries it)"
            if record.format_refused_by
            else ""
        )
        return Waiting(
            record.phase.value,
            _cut(
                f"{version} {how} here for rollout {rollout_id} ({record.reason}); not "
                f"retried until desired state names another rollout{other}"
            ),
            version,
        )
    return None


def after_install_error(exc: AgentError, version: str) -> Waiting:
    """Why ``version`` is not installed after its install raised ``exc``."""
    detail = str(exc)
    if isinstance(exc, InsufficientSpaceError):
        return Waiting("no_space", _cut(detail), version)
    if isinstance(exc, StorageError):
        return Waiting("storage", _cut(detail), version)
    if isinstance(exc, TamperedDownloadError):  # a FetchError too: checked first
        return Waiting(
            "refused",
            _cut(f"download failed verification, fetched again on the next check: {detail}"),
            version,
        )
    if isinstance(exc, FetchError):
        detail = f"download failed, retried on the next check: {detail}"
        return Waiting("fetch_failed", _cut(detail), version)
    # The candidate itself: the journal says failed, and it is not retried for this rollout
    # (by this agent, when the agent lacked a contract the candidate needs).
    if isinstance(exc, UnsupportedContractError):
        return Waiting(
            "failed",
            _cut(
                f"{version} failed here ({detail}); not retried by this agent until desired "
                "state names another rollout; another agent version retries it"
            ),
            version,
        )
    return Waiting(
        "failed",
        _cut(
            f"{version} failed here ({detail}); not retried until desired state names "
            "another rollout"
        ),
        version,
    )


def after_check_error(exc: AgentError) -> Waiting:
    """Why nothing is installed after a check that could not read the repository."""
    if isinstance(exc, UntrustedInputError):
        return Waiting("untrusted", _cut(f"the repository was refused: {exc}"))
    if isinstance(exc, FetchError):
        return Waiting("check_failed", _cut(f"cannot reach the repository: {exc}"))
    return Waiting("check_failed", _cut(f"the update check failed: {exc}"))


def carry(previous: Waiting | None, new: Waiting, now: str) -> Waiting:
    """``new`` with its ``since``: ``previous``'s when the code and version are the same,
    else ``now``."""
    if previous is not None and (previous.code, previous.version) == (new.code, new.version):
        return replace(new, since=previous.since or now)
    return replace(new, since=now)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class WaitingBoard:
    """The reason each model waits, as the last check left it (thread-safe: the update
    check writes, status and heartbeats read)."""

    def __init__(self, clock: Callable[[], str] = utc_now) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._reasons: dict[str, Waiting] = {}

    def set(self, model: str, waiting: Waiting | None) -> None:
        """Record ``model``'s reason (None: it does not wait)."""
        with self._lock:
            if waiting is None:
                self._reasons.pop(model, None)
            else:
                self._reasons[model] = carry(self._reasons.get(model), waiting, self._clock())

    def keep_only(self, models: Iterable[str]) -> None:
        """Forget the models desired state no longer names."""
        keep = set(models)
        with self._lock:
            self._reasons = {m: w for m, w in self._reasons.items() if m in keep}

    def set_all(self, models: Iterable[str], waiting: Waiting) -> None:
        """Give every one of ``models`` the same reason (a check that read no desired
        state); the version each waited for, if known, stays."""
        with self._lock:
            now = self._clock()
            for model in models:
                known = self._reasons.get(model)
                version = known.version if known is not None else None
                self._reasons[model] = carry(known, replace(waiting, version=version), now)

    def snapshot(self) -> Mapping[str, Waiting]:
        with self._lock:
            return dict(self._reasons)
