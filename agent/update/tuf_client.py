"""python-tuf's ``Updater`` as the update check uses it, with a durable metadata cache.

Its own module so that python-tuf's client (and what it pulls in: urllib3, the crypto
of securesystemslib) is imported by the first update check, not when the agent starts
(``agent.update.updater`` imports it there).
"""

from __future__ import annotations

from pathlib import Path

from tuf.ngclient import Updater

from agent.base.fsutil import atomic_write


class DurableUpdater(Updater):
    """python-tuf's ``Updater`` with a metadata cache that survives a power cut.

    python-tuf writes each metadata file to a temporary file and renames it, without
    fsync: after a power cut the renamed file can be empty, and an empty cached root
    would refuse every later check. Here every file goes through ``atomic_write``
    (fsync of the file, rename, fsync of its folder), and a write of the bytes already
    there is skipped: each check persists the trusted root again, and flash wears.

    Overrides ``Updater._persist_file``, the one write path of python-tuf 6 and 7 (every
    role and ``root_history/N.root.json``); tests/security/test_update_faults.py checks
    it is still there.
    """

    def _persist_file(self, filename: str, data: bytes) -> None:
        path = Path(filename)
        try:
            if path.read_bytes() == data:
                return
        except OSError:
            pass  # absent or unreadable: write it
        atomic_write(path, data)
