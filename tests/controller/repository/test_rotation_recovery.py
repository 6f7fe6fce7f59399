"""A key rotation never strands the fleet (issue 19, items 1 and 5).

Real repositories, the real CLI (``controller.cli.main``, or a subprocess killed with
SIGKILL), and a python-tuf client bootstrapped with root v1 as a device is: after any
interruption, the next command or ``serve``'s re-sign check finishes the rotation and
the client verifies again."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from tuf.ngclient import Updater

from agent.base.fsutil import set_step_hook
from agent.contracts import ROLLOUT_ROLE, desired_target_path
from controller.app import _resign
from controller.base.fsio import repo_lock
from controller.build.builder import build_bundle
from controller.cli import main
from controller.repository import ceremony
from controller.repository.keys import key_files, load_key_file
from controller.repository.repo import Repository, resign_expiring
from controller.repository.rotation import JOURNAL_FILE, locked_repository, read_journal
from tests.controller.repository.test_keys import BASE, Client, DirFetcher
from tests.helpers import make_linear_model

ROOT = Path(__file__).resolve().parents[3]
ONLINE = ["timestamp", "snapshot", ROLLOUT_ROLE]


def _key_ids(folder: Path, role: str) -> list[str]:
    return [str(load_key_file(p).public_key.keyid) for p in key_files(folder, role)]


def _serve_resigns_later(repo_dir: Path, hours: float) -> dict[str, int]:
    """What ``serve``'s re-sign check does ``hours`` from now (no --key-dir: serve has
    none), through the same way in as ``controller.app._resign``."""
    later = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=hours)
    with locked_repository(repo_dir) as repo:
        return resign_expiring(repo, later)


# ---------------------------------------------------------------------------- item 1


@pytest.mark.parametrize("role", ONLINE)
def test_an_online_key_rotated_with_key_dir_stays_where_serve_signs(
    tmp_path: Path, repo: Repository, role: str
) -> None:
    client = Client(tmp_path, repo)
    client.refresh()
    usb = tmp_path / "usb"
    usb.mkdir()
    shutil.move(repo.keys_dir / "root.pem", usb / "root.pem")  # root offline, as advised
    shutil.move(repo.keys_dir / "targets.pem", usb / "targets.pem")

    argv = ["keys", "rotate", role, "--repo", str(repo.path), "--key-dir", str(usb)]
    assert main(argv) == 0

    new_keyids, _ = Repository.open(repo.path).role_keys(role)
    assert _key_ids(repo.keys_dir, role) == new_keyids  # in keys/, where serve signs
    assert key_files(usb, role) == []  # never on the offline medium
    # serve, without the medium, re-signs the online roles when they are due (rollout
    # after 20 days: past half of its 30), and a device follows.
    changed = _serve_resigns_later(repo.path, 24 * 20)
    assert set(changed) == {ROLLOUT_ROLE, "snapshot", "timestamp"}
    client.refresh()
    assert client.trusted("timestamp") == Repository.open(repo.path).versions()["timestamp"]


def test_an_offline_key_rotated_with_key_dir_goes_onto_the_medium(
    tmp_path: Path, repo: Repository
) -> None:
    usb = tmp_path / "usb"
    assert main(["keys", "rotate", "targets", "--repo", str(repo.path), "--key-dir", str(usb)]) == 0
    assert key_files(repo.keys_dir, "targets") == []
    assert _key_ids(usb, "targets") != []


# ---------------------------------------------------------------------------- item 5


class Interrupted(KeyboardInterrupt):
    """Ctrl-C at a chosen step."""


def _interrupt(monkeypatch: pytest.MonkeyPatch, target: object, name: str) -> None:
    def stop(*_args: object, **_kwargs: object) -> None:
        raise Interrupted(name)

    monkeypatch.setattr(target, name, stop)


@pytest.mark.parametrize("role", ["timestamp", "snapshot", "targets", ROLLOUT_ROLE])
def test_a_rotation_interrupted_after_publishing_is_finished_by_serves_check(
    tmp_path: Path, repo: Repository, role: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = Client(tmp_path, repo)
    client.refresh()
    old_keyids, _ = repo.role_keys(role)

    with monkeypatch.context() as m:  # Ctrl-C between the new root (or targets) and re-sign
        _interrupt(m, ceremony, "finish_rotation")
        assert main(["keys", "rotate", role, "--repo", str(repo.path)]) == 130
    assert (repo.path / JOURNAL_FILE).exists()
    # The role was signed by its old and new keys before the new root went out: a
    # device takes the new root and verifies (it used to fail with "signed by 0/1").
    client.refresh().get_targetinfo(desired_target_path("lab"))
    assert client.trusted("root") == Repository.open(repo.path).root_version()

    _resign(repo.path)  # serve's periodic check, as serve runs it

    assert not (repo.path / JOURNAL_FILE).exists()
    reopened = Repository.open(repo.path)
    new_keyids, _ = reopened.role_keys(role)
    assert new_keyids != old_keyids
    assert set(reopened.load(role).signatures) == set(new_keyids)
    assert _key_ids(repo.keys_dir, role) == new_keyids  # the revoked key's file is gone
    client.refresh().get_targetinfo(desired_target_path("lab"))  # reads rollout too
    assert client.trusted("root") == reopened.root_version()
    assert client.trusted(role) == reopened.versions()[role]


def test_a_rotation_interrupted_before_publishing_is_rolled_forward_by_the_next_command(
    tmp_path: Path, repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = Client(tmp_path, repo)
    client.refresh()
    with monkeypatch.context() as m:  # journaled, then Ctrl-C before root 2 is written
        _interrupt(m, Repository, "publish_root")
        assert main(["keys", "rotate", "timestamp", "--repo", str(repo.path)]) == 130
    journal = read_journal(repo.path)
    assert journal is not None and journal.version == 2
    assert Repository.open(repo.path).root_version() == 1

    assert main(["releases", "prune", "--repo", str(repo.path)]) == 0  # any change

    reopened = Repository.open(repo.path)
    assert reopened.root_version() == 2
    assert (repo.metadata_dir / "root.json").read_bytes() == (
        repo.metadata_dir / "2.root.json"
    ).read_bytes()
    assert read_journal(repo.path) is None
    client.refresh()
    assert client.trusted("root") == 2
    assert set(reopened.load("timestamp").signatures) == set(reopened.role_keys("timestamp")[0])


def test_a_rollout_rotation_interrupted_before_its_snapshot_is_rolled_forward(
    tmp_path: Path, repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = Client(tmp_path, repo)
    client.refresh()
    targets_before = repo.versions()["targets"]
    with monkeypatch.context() as m:  # targets is journaled; Ctrl-C before it is written
        _interrupt(m, Repository, "write_signed")
        assert main(["keys", "rotate", ROLLOUT_ROLE, "--repo", str(repo.path)]) == 130
    journal = read_journal(repo.path)
    assert journal is not None and journal.version > targets_before
    assert not (repo.metadata_dir / f"{journal.version}.targets.json").exists()

    assert main(["keys", "expiry", "timestamp", "1", "--repo", str(repo.path)]) == 0

    reopened = Repository.open(repo.path)
    new_keyids, _ = reopened.role_keys(ROLLOUT_ROLE)
    assert reopened.versions()["targets"] == journal.version  # the journaled one, published
    assert _key_ids(repo.keys_dir, ROLLOUT_ROLE) == new_keyids
    path = desired_target_path("lab")
    with locked_repository(repo.path) as locked:  # the new rollout key signs what follows
        locked.update_targets(ROLLOUT_ROLE, {path: locked.store_target(path, b"{}")})
        locked.publish()
    assert client.refresh().get_targetinfo(path) is not None


def test_a_rotation_killed_with_sigkill_is_finished_by_serves_check(
    tmp_path: Path, repo: Repository
) -> None:
    client = Client(tmp_path, repo)
    client.refresh()
    # The real edgectl in its own process, SIGKILLed (no cleanup runs, the kernel drops
    # the lock) right after root version 2 is published.
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from controller.repository import ceremony
        ceremony.finish_rotation = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        from controller.cli import main
        sys.exit(main(["keys", "rotate", "timestamp", "--repo", {str(repo.path)!r}]))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert Repository.open(repo.path).root_version() == 2
    client.refresh()  # the timestamp carries the old and the new key's signatures
    assert client.trusted("root") == 2

    _resign(repo.path)

    client.refresh()
    assert client.trusted("root") == 2
    assert not (repo.path / JOURNAL_FILE).exists()


def test_an_interrupted_offline_key_rotation_names_the_fix_and_keys_finish_does_it(
    tmp_path: Path,
    repo: Repository,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client = Client(tmp_path, repo)
    client.refresh()
    usb = tmp_path / "usb"
    argv = ["keys", "rotate", "targets", "--repo", str(repo.path), "--key-dir", str(usb)]
    with monkeypatch.context() as m:  # journaled, Ctrl-C before the new key signs anything
        _interrupt(m, ceremony, "bridge")
        assert main(argv) == 130
    # The medium is gone: serve cannot finish it and says how, and publishes no root
    # that names a key nobody here can sign with: devices keep verifying under root 1.
    capsys.readouterr()
    assert main(["keys", "expiry", "timestamp", "1", "--repo", str(repo.path)]) == 1
    err = capsys.readouterr().err
    assert "rotation of the targets key was interrupted" in err
    assert f"edgectl keys finish --repo {repo.path} --key-dir DIR" in err
    assert Repository.open(repo.path).root_version() == 1
    client.refresh()
    assert client.trusted("root") == 1

    assert main(["keys", "finish", "--repo", str(repo.path), "--key-dir", str(usb)]) == 0
    assert "finished an interrupted rotation" in capsys.readouterr().out
    client.refresh()
    assert client.trusted("root") == 2
    assert main(["keys", "finish", "--repo", str(repo.path)]) == 0  # idempotent
    assert "no rotation was interrupted" in capsys.readouterr().out


def test_an_interrupted_targets_rotation_is_finished_by_the_next_release(
    tmp_path: Path, repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_linear_model(tmp_path / "lin.onnx", seed=1)
    bundle = build_bundle(model, "lin", "1.0.0", tmp_path / "lin.bundle", 4).path
    client = Client(tmp_path, repo)
    client.refresh()
    with monkeypatch.context() as m:
        _interrupt(m, ceremony, "finish_rotation")
        assert main(["keys", "rotate", "targets", "--repo", str(repo.path)]) == 130
    client.refresh()  # root 2's new targets key signed targets before root 2 went out
    assert client.trusted("root") == 2

    assert main(["release", str(bundle), "--fleet", "lab", "--repo", str(repo.path)]) == 0

    updater = client.refresh()
    assert client.trusted("root") == 2
    assert updater.get_targetinfo("bundles/lin/1.0.0.bundle") is not None
    assert updater.get_targetinfo(desired_target_path("lab")) is not None
    assert not (repo.path / JOURNAL_FILE).exists()
    new_keyids, _ = Repository.open(repo.path).role_keys("targets")
    assert _key_ids(repo.keys_dir, "targets") == new_keyids  # the revoked key is deleted


# ---------------------------------------------------------------------------- no gap


class Killed(BaseException):
    """The process stops right after a durable step (what SIGKILL leaves on disk)."""


def _verifies(state: Path, cache: Path | None, bootstrap: bytes | None, work: Path) -> str:
    """'' when a device verifies the repository copy ``state`` (its metadata and rollout):
    with the TUF cache ``cache`` (a device that trusts what it cached) or, without one,
    bootstrapped with ``bootstrap`` (a device that trusts that root); else why not."""
    shutil.rmtree(work, ignore_errors=True)
    if cache is not None:
        shutil.copytree(cache, work)
    else:
        work.mkdir(parents=True)
    try:
        updater = Updater(
            metadata_dir=str(work),
            metadata_base_url=BASE + "metadata/",
            target_base_url=BASE + "targets/",
            fetcher=DirFetcher(state),
            bootstrap=bootstrap,
        )
        updater.refresh()
        updater.get_targetinfo(desired_target_path("lab"))  # walks into rollout too
    except Exception as exc:  # what python-tuf raises: the device cannot verify
        return f"{type(exc).__name__}: {exc}"
    return ""


@pytest.mark.parametrize("role", ["targets", "snapshot", "timestamp"])
def test_every_state_of_a_rotation_verifies_for_devices_at_root_n_and_at_root_n_plus_1(
    tmp_path: Path, repo: Repository, role: str
) -> None:
    """Issue 19, defect 5 at its root: the role is signed by its old and its new key
    before root N+1 goes out. A device that holds root N (its cache) and one that holds
    root N+1 both verify the repository after every durable write of the rotation, and
    after every durable write of the roll-forward that finishes it when it is stopped
    right after any one of them."""
    device = Client(tmp_path, repo)
    device.refresh()  # trusts root 1, and the current timestamp, snapshot and targets
    at_root_n = device.dir

    states: list[tuple[str, Path]] = []  # (what was written, a copy of the repository)

    def record(stop_at: int | None) -> None:
        def hook(path: Path) -> None:
            copy = tmp_path / "states" / str(len(states))
            shutil.copytree(repo.metadata_dir, copy / "metadata")
            states.append((path.name, copy))
            if stop_at is not None and len(states) == stop_at:
                raise Killed(path.name)

        set_step_hook(hook)

    def check(label: str, root_n_plus_1: bytes) -> None:
        """Every recorded state verifies at root N; at root N+1 from the state just
        before ``2.root.json`` is written (the bridge is out) on."""
        names = [name for name, _ in states]
        first_new = names.index("2.root.json") if "2.root.json" in names else len(names)
        problems = []
        for i, (name, state) in enumerate(states):
            work = tmp_path / "work"
            if why := _verifies(state, at_root_n, None, work):
                problems.append(f"{label}, after writing {name} (step {i + 1}), root N: {why}")
            if i >= first_new - 1 and (why := _verifies(state, None, root_n_plus_1, work)):
                problems.append(f"{label}, after writing {name} (step {i + 1}), root N+1: {why}")
        assert not problems, "\n".join(problems)
        assert "2.root.json" in names, f"{label}: root 2 was never published"

    pristine = tmp_path / "pristine"
    shutil.copytree(repo.path, pristine)
    # The uninterrupted rotation, step by step.
    record(None)
    try:
        with repo_lock(repo.path):
            ceremony.rotate(repo, role)
    finally:
        set_step_hook(None)
    total = len(states)
    root_2 = (repo.metadata_dir / "2.root.json").read_bytes()
    check("uninterrupted", root_2)
    done = Repository.open(repo.path)
    assert set(done.load(role).signatures) == set(done.role_keys(role)[0])  # new key alone
    assert _key_ids(repo.keys_dir, role) == done.role_keys(role)[0]
    assert total > 6  # key, journal, bridge, root, root.json, re-sign, deletes

    # Stopped after each step, then finished by serve's check.
    for k in range(1, total):
        shutil.rmtree(repo.path)
        shutil.rmtree(tmp_path / "states")
        shutil.copytree(pristine, repo.path)
        states.clear()
        record(k)
        try:
            with repo_lock(repo.path):
                ceremony.rotate(Repository.open(repo.path), role)
        except Killed:
            pass
        else:
            raise AssertionError(f"not stopped at step {k}")
        record(None)
        try:
            _resign(repo.path)  # serve's check: rolls the rotation forward
        finally:
            set_step_hook(None)
        finished = Repository.open(repo.path)
        if finished.root_version() == 1:  # stopped before the journal: nothing decided
            assert not (repo.path / JOURNAL_FILE).exists()
            continue
        root_2 = (repo.metadata_dir / "2.root.json").read_bytes()
        check(f"stopped after step {k}, then serve", root_2)
        assert not (repo.path / JOURNAL_FILE).exists()
        assert set(finished.load(role).signatures) == set(finished.role_keys(role)[0])


def test_import_root_refuses_before_publishing_when_a_new_key_is_not_here(
    tmp_path: Path, repo: Repository, capsys: pytest.CaptureFixture[str]
) -> None:
    """The new targets key is on a medium that is not mounted: publishing root 2 would
    leave targets unverifiable (nobody here can sign the bridge), so nothing is."""
    client = Client(tmp_path, repo)
    client.refresh()
    offline, usb = tmp_path / "offline", tmp_path / "usb"
    offline.mkdir()
    shutil.move(repo.keys_dir / "root.pem", offline / "root.pem")
    r = str(repo.path)
    assert main(["keys", "rotate", "targets", "--repo", r, "--key-dir", str(usb)]) == 3
    signed = tmp_path / "root-2.json"
    assert main(["keys", "export-root", "--repo", r, "-o", str(signed)]) == 0
    assert main(["keys", "sign-root", str(signed), "--key", str(offline / "root.pem")]) == 0
    capsys.readouterr()

    assert main(["keys", "import-root", str(signed), "--repo", r]) != 0
    assert "pass --key-dir" in capsys.readouterr().err
    assert Repository.open(repo.path).root_version() == 1
    assert not (repo.path / JOURNAL_FILE).exists()
    client.refresh()

    assert main(["keys", "import-root", str(signed), "--repo", r, "--key-dir", str(usb)]) == 0
    done = Repository.open(repo.path, (usb,))
    assert done.root_version() == 2
    assert set(done.load("targets").signatures) == set(done.role_keys("targets")[0])
    client.refresh()
    assert client.trusted("root") == 2
