"""The model store across agent upgrades (issue #18, defect 10): the files an older agent
left are migrated once, a journal of a newer agent stops the agent instead of being read
as "never installed". Real files; the records are bytes older agents wrote
(tests/agent/update/_old_records.py says where each comes from)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from agent.base.errors import IncompatibleStateError
from agent.update.journal import (
    JOURNAL_SCHEMA,
    JOURNAL_SCHEMA_1,
    Phase,
    parse_record,
    serving_version,
)
from agent.update.store import ModelStore
from tests.agent.update._old_records import POINTERS_WRITTEN_BY_E3FAC1E, V1_WRITTEN_BY_3C52CD2


def _model(root: Path, model: str, files: dict[str, bytes]) -> Path:
    folder = root / model
    (folder / "1.1.0").mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def test_pointer_files_become_a_journal_once(tmp_path: Path) -> None:
    p = POINTERS_WRITTEN_BY_E3FAC1E
    folder = _model(tmp_path, "digits", {"active.json": p["active"], "failed.json": p["failed"]})
    store = ModelStore(tmp_path)
    assert store.read_journal("digits").phase is Phase.IDLE  # not migrated yet
    record = store.migrate_pointers("digits", now=7.0)
    assert record is not None and store.read_journal("digits") == record
    assert (record.phase, record.version, serving_version(record)) == (
        Phase.FAILED, "2.0.0", "1.1.0"
    )  # fmt: skip
    assert sorted(p.name for p in folder.iterdir()) == ["1.1.0", "journal.json"]
    assert json.loads((folder / "journal.json").read_bytes())["schema"] == JOURNAL_SCHEMA_1
    assert store.migrate_pointers("digits", now=8.0) is None  # nothing left to migrate
    assert store.read_journal("digits") == record


def test_a_migration_interrupted_after_its_journal_keeps_the_journal(tmp_path: Path) -> None:
    journal = V1_WRITTEN_BY_3C52CD2["committed"]
    folder = _model(
        tmp_path,
        "digits",
        {"active.json": POINTERS_WRITTEN_BY_E3FAC1E["active"], "journal.json": journal},
    )
    store = ModelStore(tmp_path)
    assert store.migrate_pointers("digits", now=7.0) is None
    assert (folder / "journal.json").read_bytes() == journal
    assert not (folder / "active.json").exists()


def test_unreadable_pointer_files_are_left_and_the_model_is_not_installed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _model(tmp_path, "digits", {"active.json": b'{"version": "one"}'})
    store = ModelStore(tmp_path)
    assert store.migrate_pointers("digits", now=7.0) is None
    assert "cannot migrate" in caplog.text and "active.json" in caplog.text
    assert (folder / "active.json").exists() and not (folder / "journal.json").exists()
    assert store.read_journal("digits").phase is Phase.IDLE


def test_a_journal_from_the_first_schema_reads_as_written(tmp_path: Path) -> None:
    _model(tmp_path, "digits", {"journal.json": V1_WRITTEN_BY_3C52CD2["active"]})
    record = ModelStore(tmp_path).read_journal("digits")
    assert record == parse_record(V1_WRITTEN_BY_3C52CD2["active"])
    assert (record.phase, record.version, record.previous) == (Phase.ACTIVE, "2.0.0", "1.0.0")


def test_a_journal_of_a_newer_agent_is_refused_naming_the_file_and_schemas(
    tmp_path: Path,
) -> None:
    doc = json.loads(V1_WRITTEN_BY_3C52CD2["committed"])
    doc.update(schema="edgefleet.journal/3", signature="zz")
    raw = json.dumps(doc).encode()
    folder = _model(tmp_path, "digits", {"journal.json": raw})
    with pytest.raises(IncompatibleStateError) as refused:
        ModelStore(tmp_path).read_journal("digits")
    message = str(refused.value)
    assert str(folder / "journal.json") in message
    assert "'edgefleet.journal/3'" in message and f"'{JOURNAL_SCHEMA}'" in message
    assert re.search(r"edge-agent \d+\.\d+\.\d+", message)
    assert (folder / "journal.json").read_bytes() == raw
