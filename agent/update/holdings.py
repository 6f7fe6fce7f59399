"""The versions of a model the device holds, and the state of each: what the inference
server's repository index (Triton's model repository extension) lists.

A model's versions are those unpacked on disk, plus the candidate the journal names when
it is not there: not unpacked yet (being downloaded), or removed after it failed or was
rolled back (the device still says why). Each gets one of Triton's states, with why:

- ``READY``: the live version (serving; on probation when it is a candidate that went
  live);
- ``LOADING``: the candidate being installed (downloading, verified, staged,
  smoke-tested, in shadow), not serving yet;
- ``UNAVAILABLE``: not loaded: the previous version (kept for a rollback while the
  candidate is on probation), the candidate that failed or was rolled back (with its
  reason), an older version kept on disk.

Pure: a function of the journal record, the versions on disk and the live version.
"""

from __future__ import annotations

from typing import NamedTuple

from agent.update.journal import PRE_ACTIVE, JournalRecord, Phase

_REFUSED = frozenset({Phase.FAILED, Phase.ROLLED_BACK})


class Held(NamedTuple):
    """One version the device holds: its state (Triton's word) and why."""

    version: str
    state: str
    reason: str


def held_versions(record: JournalRecord, on_disk: list[str], live: str | None) -> list[Held]:
    """Every version of ``record.model`` the device holds (``on_disk``: the unpacked
    ones; ``live``: the one serving, if any), sorted by version string."""
    versions = set(on_disk) | ({live} if live else set())
    candidate = record.version
    if candidate and (
        record.phase in PRE_ACTIVE or record.phase in _REFUSED or record.phase is Phase.SHADOW
    ):
        versions.add(candidate)
    held = []
    for version in sorted(versions):
        if version == live:
            if record.phase is Phase.ACTIVE and version == candidate:
                reason = "serving, on probation"
            else:
                reason = "serving"
            held.append(Held(version, "READY", reason))
        elif version == candidate and record.phase is Phase.SHADOW:
            held.append(
                Held(
                    version,
                    "LOADING",
                    f"in shadow beside {record.previous}: given copies of live requests, "
                    "answers no client",
                )
            )
        elif version == candidate and record.phase in PRE_ACTIVE:
            held.append(Held(version, "LOADING", f"installing ({record.phase.value})"))
        elif version == candidate and record.phase in _REFUSED:
            why = f": {record.reason}" if record.reason else ""
            held.append(Held(version, "UNAVAILABLE", f"{record.phase.value}{why}"))
        elif version == record.previous and record.phase is Phase.ACTIVE:
            held.append(Held(version, "UNAVAILABLE", "the previous version, kept for a rollback"))
        elif version == record.previous:
            held.append(Held(version, "UNAVAILABLE", "the previous version, on disk, not loaded"))
        else:
            held.append(Held(version, "UNAVAILABLE", "on disk, not loaded"))
    return held
