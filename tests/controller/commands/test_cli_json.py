"""``--json`` on the commands that act rather than read: init, keys, releases retire and
prune, device revoke, broker config. Real runs of ``edgectl`` against a repository made
by ``edgectl init`` in tmp_path; stdout must be exactly one JSON document."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

import controller.cli
from agent.contracts import bundle_target_path
from controller.identity.devices import load_registry
from controller.repository.ceremony import key_status
from controller.repository.history import read_retired, retire_release
from controller.repository.release import publish_bundle
from controller.repository.repo import Repository
from tests.controller.conftest import MODEL

ROLES = {"root", "targets", "rollout", "snapshot", "timestamp"}


def _run_json(
    capsys: pytest.CaptureFixture[str], argv: list[str], expect_code: int = 0
) -> dict[str, Any]:
    code = controller.cli.main([*argv, "--json"])
    out = capsys.readouterr()
    assert code == expect_code, out.err
    doc = json.loads(out.out)  # the whole of stdout is one JSON document
    assert isinstance(doc, dict)
    return doc


def _parse_iso(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


@pytest.fixture
def repo_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    repo = tmp_path / "repo"
    assert controller.cli.main(["init", str(repo)]) == 0
    capsys.readouterr()
    return repo


def test_init_json_names_roles_key_ids_and_files_but_no_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    doc = _run_json(capsys, ["init", str(repo), "--expiry-days-timestamp", "2"])
    assert doc["repo"] == str(repo)
    assert doc["root_metadata"] == str(repo / "metadata" / "root.json")
    by_role = {r["role"]: r for r in doc["roles"]}
    assert set(by_role) == ROLES
    status = {row.role: row for row in key_status(Repository.open(repo))}
    now = datetime.now(UTC)
    for role, row in by_role.items():
        assert row["keyids"] == status[role].keyids
        assert row["key_files"] == [str(repo / "keys" / f"{role}.pem")]
        assert Path(row["key_files"][0]).is_file()
        assert _parse_iso(row["expires"]) > now
    assert _parse_iso(by_role["timestamp"]["expires"]) < now + timedelta(days=2, minutes=1)
    text = json.dumps(doc)
    for pem in (repo / "keys").glob("*.pem"):
        assert "PRIVATE KEY" not in text and pem.read_text().splitlines()[1] not in text


def test_keys_rotate_json_reports_new_and_revoked_keys(
    repo_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = {row.role: row.keyids for row in key_status(Repository.open(repo_dir))}
    doc = _run_json(capsys, ["keys", "rotate", "timestamp", "--repo", str(repo_dir)])
    after = {row.role: row.keyids for row in key_status(Repository.open(repo_dir))}
    assert doc["role"] == "timestamp" and doc["waits_for_signatures"] is False
    assert [k["keyid"] for k in doc["new_keys"]] == after["timestamp"]
    assert Path(doc["new_keys"][0]["file"]).is_file()
    assert doc["revoked"] == before["timestamp"]
    # the bridge timestamp is signed by the old and the new key (before root 2), the next
    # one by the new key alone
    assert doc["root_version"] == 2 and doc["resigned"]["timestamp"] > 1
    assert doc["pending"] is None and doc["missing"] is None


def test_offline_root_flow_json_keeps_exit_3_while_root_waits(
    repo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    offline = tmp_path / "offline"
    offline.mkdir()
    old_root = offline / "root.pem"
    (repo_dir / "keys" / "root.pem").rename(old_root)
    repo = str(repo_dir)

    rotated = _run_json(capsys, ["keys", "rotate", "root", "--repo", repo], expect_code=3)
    assert rotated["waits_for_signatures"] is True and rotated["root_version"] is None
    assert rotated["pending"] == str(repo_dir / "root-pending.json")
    assert "lacks signatures" in rotated["missing"]

    exported = tmp_path / "root.json"
    doc = _run_json(capsys, ["keys", "export-root", "--repo", repo, "-o", str(exported)])
    assert doc == {"output": str(exported), "complete": False, "missing": rotated["missing"]}

    old_keyid = key_status(Repository.open(repo_dir))[0].keyids[0]
    signed = _run_json(capsys, ["keys", "sign-root", str(exported), "--key", str(old_root)])
    assert signed == {"file": str(exported), "signed_by": [old_keyid]}

    imported = _run_json(capsys, ["keys", "import-root", str(exported), "--repo", repo])
    assert imported["file"] == str(exported) and imported["root_version"] == 2
    assert imported["waits_for_signatures"] is False
    root = key_status(Repository.open(repo_dir))[0]
    assert root.version == 2 and root.keyids == [k["keyid"] for k in rotated["new_keys"]]


def test_keys_expiry_json_reports_the_new_lifetime_and_expiry(
    repo_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    now = datetime.now(UTC)
    doc = _run_json(capsys, ["keys", "expiry", "timestamp", "0.25", "--repo", str(repo_dir)])
    assert (doc["role"], doc["days"], doc["next_signature_applies"]) == ("timestamp", 0.25, False)
    assert list(doc["resigned"]) == ["timestamp"] and doc["resigned"]["timestamp"] > 1
    expires = _parse_iso(doc["expires"])
    assert now < expires <= now + timedelta(hours=6, seconds=2)

    doc = _run_json(capsys, ["keys", "expiry", "root", "30", "--repo", str(repo_dir)])
    assert (doc["resigned"], doc["next_signature_applies"]) == ({}, True)
    assert _parse_iso(doc["expires"]) > now + timedelta(days=300)  # the root signed at init


def test_releases_retire_and_prune_json_name_what_was_removed_and_kept(
    repo_dir: Path, bundles: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    for key in ("v1", "v2"):
        publish_bundle(bundles[key], repo_dir, delta_from=0)  # deltas: test_history.py
    repo = str(repo_dir)
    # 1.0.0 was retired two days ago, 2.0.0 now: a one-day grace prunes only 1.0.0.
    old = retire_release(repo_dir, MODEL, "1.0.0", now=datetime.now(UTC) - timedelta(days=2))
    stored_old = repo_dir / "targets" / _stored_name(repo_dir, old.target_path)
    assert stored_old.is_file()

    now = datetime.now(UTC).replace(microsecond=0)
    retired = _run_json(capsys, ["releases", "retire", MODEL, "2.0.0", "--repo", repo])
    target = bundle_target_path(MODEL, "2.0.0")
    assert (retired["model"], retired["version"], retired["target_path"]) == (
        MODEL,
        "2.0.0",
        target,
    )
    assert retired["targets_version"] == Repository.open(repo_dir).versions()["targets"]
    assert retired["pruned"] == []  # 1.0.0 is within the default 7-day grace
    prune_after = _parse_iso(retired["prune_after"])
    assert timedelta(days=7) <= prune_after - now <= timedelta(days=7, seconds=2)

    pruned = _run_json(capsys, ["release", "prune", "--repo", repo, "--grace-days", "1"])
    assert pruned["pruned"] == [old.target_path]
    assert not stored_old.exists()
    assert [k["target_path"] for k in pruned["kept"]] == [target]
    kept_at = _parse_iso(pruned["kept"][0]["retired_at"])
    assert _parse_iso(pruned["kept"][0]["prune_after"]) == kept_at + timedelta(days=1)
    assert list(read_retired(repo_dir)) == [target]

    assert _run_json(capsys, ["releases", "prune", "--repo", repo, "--grace-days", "0"]) == {
        "pruned": [target],
        "kept": [],
    }


def _stored_name(repo_dir: Path, target_path: str) -> str:
    """The consistent-snapshot file name of a retired target (``<sha256>.<basename>``)."""
    directory, _, basename = target_path.rpartition("/")
    sha = read_retired(repo_dir)[target_path]["sha256"]
    return f"{directory}/{sha}.{basename}"


def test_broker_config_and_device_revoke_json(
    repo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = str(repo_dir)
    folder = tmp_path / "broker"
    broker = _run_json(
        capsys, ["broker", "config", "--repo", repo, "--host", "mq.example", "-o", str(folder)]
    )
    assert broker["folder"] == str(folder.resolve())
    assert broker["config"] == str(folder.resolve() / "mosquitto.conf")
    written = {Path(p).name for p in broker["files_written"]}
    assert written == {
        "broker.key",
        "broker.crt",
        "controller.key",
        "controller.crt",
        "mosquitto.conf",
        "acl",
        "ca.crt",
        "crl.pem",
    }
    assert all(Path(p).is_file() for p in broker["files_written"])
    assert "PRIVATE KEY" not in json.dumps(broker)

    for device in ("cam-1", "cam-2"):
        argv = ["device", "add", device, "--fleet", "north", "--repo", repo]
        argv += ["-o", str(tmp_path / f"{device}.tar"), "--repository-url", "https://u.example/"]
        assert controller.cli.main([*argv, "--broker", "mq.example:8883"]) == 0
    capsys.readouterr()

    revoked = _run_json(capsys, ["device", "revoke", "cam-1", "--repo", repo])
    record = load_registry(repo_dir)["cam-1"]
    assert record.revoked_at is not None
    assert (revoked["device_id"], revoked["fleet"]) == ("cam-1", "north")
    assert (revoked["serial"], revoked["revoked_at"]) == (str(record.serial), record.revoked_at)
    assert revoked["crl"] == str(repo_dir / "ca" / "crl.pem")
    crl = x509.load_pem_x509_crl(Path(revoked["crl"]).read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(int(revoked["serial"])) is not None
    refreshed = [Path(p) for p in revoked["broker_files_refreshed"]]
    assert {p.name for p in refreshed} == {"acl", "ca.crt", "crl.pem"}
    assert {p.parent for p in refreshed} == {folder.resolve()}
    assert "user cam-1" not in (folder / "acl").read_text().splitlines()
