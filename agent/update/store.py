"""The agent's models on disk: unpacked versions and each model's install journal.

Layout under ``<state_dir>/models``::

    <model>/<version>/           an unpacked bundle (manifest.json, model.onnx, golden.npz)
    <model>/journal.json         the model's install record (agent.update.journal), atomic

Invariants: the journal is replaced atomically (temp file, fsync, rename, fsync dir), so
after a crash it holds the old record or the new one. A version directory exists only
whole: unpacking renames a finished directory into place.

An agent from before the journal kept ``<model>/active.json`` and ``failed.json``
instead; ``migrate_pointers`` writes the journal they mean, then removes them (a crash in
between leaves the journal, which wins, and the next start removes the leftovers). A
journal of a newer schema stops the agent (``IncompatibleStateError``, naming the file
and both schemas) instead of being read as "never installed".
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Final

import agent
from agent.base.errors import IncompatibleStateError, StorageError
from agent.base.fsutil import atomic_write, fsync_dir, remove_tree
from agent.contracts import InvalidNameError, check_name, check_version
from agent.update.journal import (
    JOURNAL_SCHEMA,
    JournalFormatError,
    JournalRecord,
    NewerJournalError,
    parse_record,
    record_from_pointers,
    serving_version,
)

logger = logging.getLogger(__name__)

JOURNAL: Final = "journal.json"
# What an agent from before the journal kept instead, in each model's folder.
ACTIVE_POINTER: Final = "active.json"
FAILED_POINTER: Final = "failed.json"


class ModelStore:
    """Reads and writes the per-model files under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def version_dir(self, model: str, version: str) -> Path:
        return self.root / check_name("model", model) / check_version(version)

    def model_names(self) -> list[str]:
        names = []
        for entry in sorted(self.root.iterdir()):
            try:
                check_name("model", entry.name)
            except InvalidNameError:
                continue
            if entry.is_dir():
                names.append(entry.name)
        return names

    def read_journal(self, model: str) -> JournalRecord:
        """The model's record; an idle one when there is none (never installed).

        Raises IncompatibleStateError for a journal a newer agent wrote.
        """
        path = self.root / check_name("model", model) / JOURNAL
        try:
            return parse_record(path.read_bytes())
        except FileNotFoundError:
            return JournalRecord(model=model)
        except NewerJournalError as exc:
            raise IncompatibleStateError(
                f"{path} was written by a newer edge-agent: {exc}, and this is edge-agent "
                f"{agent.__version__}. Install that newer edge-agent again: this one will "
                "not run on it, so as not to forget or overwrite what it records"
            ) from None
        except (OSError, JournalFormatError) as exc:
            # Atomic writes make this a disk fault, not a crash artefact: say so loudly.
            logger.error("cannot read %s (%s); treating %s as never installed", path, exc, model)
            return JournalRecord(model=model)

    def write_journal(self, record: JournalRecord) -> None:
        """Replace the model's record atomically; raises StorageError when the disk refuses
        (the record on disk is then the previous one, whole)."""
        path = self.root / check_name("model", record.model) / JOURNAL
        try:
            atomic_write(path, record.to_json_bytes())
        except OSError as exc:
            raise StorageError(
                f"cannot write {path} (phase {record.phase.value}): {exc.strerror or exc}; "
                "free space on the device (or fix the state folder) and the next check resumes"
            ) from exc

    def migrate_pointers(self, model: str, now: float) -> JournalRecord | None:
        """Turn what an agent from before the journal left for ``model`` (``active.json``,
        ``failed.json``) into its journal, then remove those files; return the record
        written, or None when none was (nothing to migrate, or the journal was there).

        Unreadable pointer files are left as they are (logged): the model is then never
        installed, as the old agent also treated them. Raises OSError when the folder
        cannot be written.
        """
        folder = self.root / check_name("model", model)
        pointers = [folder / ACTIVE_POINTER, folder / FAILED_POINTER]
        found = {p.name: _read_if_present(p) for p in pointers}
        if all(raw is None for raw in found.values()):
            return None
        record = None
        if not (folder / JOURNAL).exists():  # else a migration wrote it and was interrupted
            try:
                record = record_from_pointers(
                    model, found[ACTIVE_POINTER], found[FAILED_POINTER], now
                )
            except JournalFormatError as exc:
                logger.error(
                    "cannot migrate %s (%s); treating %s as never installed", folder, exc, model
                )
                return None
            self.write_journal(record)
            logger.warning(
                "%s: migrated %s of an agent from before the install journal to %s "
                "(%s %s, serving %s)",
                model,
                " and ".join(n for n, raw in found.items() if raw is not None),
                JOURNAL_SCHEMA,
                record.phase.value,
                record.version,
                serving_version(record) or "nothing",
            )
        for path in pointers:
            path.unlink(missing_ok=True)
        fsync_dir(folder)
        return record

    def versions_on_disk(self, model: str) -> list[str]:
        """Version directories of ``model``, newest modification first."""
        folder = self.root / model
        if not folder.is_dir():
            return []
        found = []
        for entry in folder.iterdir():
            try:
                check_version(entry.name)
            except InvalidNameError:
                continue
            if entry.is_dir():
                found.append(entry)
        return [e.name for e in sorted(found, key=lambda e: e.stat().st_mtime, reverse=True)]

    def prune(self, model: str, keep: set[str]) -> list[str]:
        """Remove version directories (and leftovers of interrupted unpacks) not in ``keep``."""
        removed: list[str] = []
        folder = self.root / model
        if not folder.is_dir():
            return removed
        for entry in folder.iterdir():
            if not entry.is_dir() or entry.name in keep:
                continue
            remove_tree(entry)
            removed.append(entry.name)
        return removed


def _read_if_present(path: Path) -> bytes | None:
    with contextlib.suppress(FileNotFoundError):
        return path.read_bytes()
    return None
