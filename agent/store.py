"""The agent's models on disk: unpacked versions and which one is active.

Layout under ``<state_dir>/models``::

    <model>/<version>/           an unpacked bundle (manifest.json, model.onnx, golden.npz)
    <model>/active.json          {"version": ..., "previous": ...}  (atomic)
    <model>/failed.json          {"version": ..., "reason": ...}     (atomic)

Invariants: ``active.json`` only ever names a version directory that passed its golden
vectors on this device; it is replaced atomically after the swap, so a crash leaves the
old or the new pointer, both of which name a good version. A version recorded as failed
is not installed again until desired state names a different one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.contracts import InvalidNameError, check_name, check_version
from agent.fsutil import atomic_write, remove_tree

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActiveRecord:
    version: str
    previous: str | None = None


@dataclass(frozen=True)
class FailedRecord:
    version: str
    reason: str


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

    def read_active(self, model: str) -> ActiveRecord | None:
        doc = self._read_json(self.root / model / "active.json")
        if doc is None:
            return None
        try:
            previous = doc.get("previous")
            return ActiveRecord(
                version=check_version(doc["version"]),
                previous=check_version(previous) if previous else None,
            )
        except (KeyError, TypeError, InvalidNameError):
            logger.warning("ignoring malformed %s/active.json", model)
            return None

    def write_active(self, model: str, record: ActiveRecord) -> None:
        data = json.dumps({"version": record.version, "previous": record.previous}).encode()
        atomic_write(self.root / model / "active.json", data)

    def read_failed(self, model: str) -> FailedRecord | None:
        doc = self._read_json(self.root / model / "failed.json")
        if doc is None or not isinstance(doc.get("version"), str):
            return None
        return FailedRecord(version=doc["version"], reason=str(doc.get("reason", "")))

    def write_failed(self, model: str, record: FailedRecord) -> None:
        data = json.dumps({"version": record.version, "reason": record.reason}).encode()
        atomic_write(self.root / model / "failed.json", data)

    def clear_failed(self, model: str) -> None:
        remove_tree(self.root / model / "failed.json")

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

    @staticmethod
    def _read_json(path: Path) -> dict[str, Any] | None:
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            logger.warning("ignoring unreadable %s", path)
            return None
        return doc if isinstance(doc, dict) else None
