"""The agent's models on disk: unpacked versions and each model's install journal.

Layout under ``<state_dir>/models``::

    <model>/<version>/           an unpacked bundle (manifest.json, model.onnx, golden.npz)
    <model>/journal.json         the model's install record (agent.update.journal), atomic

Invariants: the journal is replaced atomically (temp file, fsync, rename, fsync dir), so
after a crash it holds the old record or the new one. A version directory exists only
whole: unpacking renames a finished directory into place.
"""

from __future__ import annotations

import logging
from pathlib import Path

from agent.base.fsutil import atomic_write, remove_tree
from agent.contracts import InvalidNameError, check_name, check_version
from agent.update.journal import JournalFormatError, JournalRecord, parse_record

logger = logging.getLogger(__name__)


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
        """The model's record; an idle one when there is none (never installed)."""
        path = self.root / check_name("model", model) / "journal.json"
        try:
            return parse_record(path.read_bytes())
        except FileNotFoundError:
            return JournalRecord(model=model)
        except (OSError, JournalFormatError) as exc:
            # Atomic writes make this a disk fault, not a crash artefact: say so loudly.
            logger.error("cannot read %s (%s); treating %s as never installed", path, exc, model)
            return JournalRecord(model=model)

    def write_journal(self, record: JournalRecord) -> None:
        atomic_write(
            self.root / check_name("model", record.model) / "journal.json", record.to_json_bytes()
        )

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
