"""Installing an enrollment as one set: an install killed (SIGKILL, in a real process)
between its steps is completed or discarded by the next `edge-agent enroll`, and the
agent meanwhile starts with a certificate that matches its key, or refuses a key that
matches none. Enroll and request hold the folder's install lock against another process
that holds it (paused mid-install, or killed), and a request refuses a pending install.
Real archives from the controller, real files, real keys, real processes.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from agent.base.errors import AgentError, ConfigError
from agent.cli import main as agent_main
from agent.contracts.enrollment import MEMBERS
from agent.device.config import load_config
from agent.device.enroll import (
    EnrollmentError,
    enroll_from_file,
    install_enrollment,
    read_enrollment,
    request_enrollment,
    request_renewal,
)
from agent.device.enroll_install import (
    JOURNAL,
    InstallLockedError,
    InstallPendingError,
    install_lock,
    recover,
    staged_path,
)
from agent.device.tls_identity import resolve_tls_files, tls_context
from controller.identity.devices import add_device, renew_device
from controller.repository.repo import init_repository
from tests.controller.enroll_support import OPTIONS, archive_members

ROOT = Path(__file__).resolve().parents[3]

# Installs the archive in a process of its own that SIGKILLs itself after one step.
KILLED_INSTALL = """
import os, signal, sys
from pathlib import Path
from agent.device.enroll import install_enrollment, read_enrollment

archive, etc, step = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

def crash(name):
    if name == step:
        os.kill(os.getpid(), signal.SIGKILL)

install_enrollment(read_enrollment(archive.read_bytes(), etc), etc, after_step=crash)
"""


# Installs the archive under the install lock and pauses after its journal (nothing
# renamed yet), saying so on stdout, until its stdin closes.
PAUSED_INSTALL = """
import sys
from pathlib import Path
from agent.device.enroll import install_enrollment, read_enrollment
from agent.device.enroll_install import install_lock

archive, etc = Path(sys.argv[1]), Path(sys.argv[2])

def pause(name):
    if name == "journal":
        print("paused", flush=True)
        sys.stdin.read()

with install_lock(etc, 0):
    install_enrollment(read_enrollment(archive.read_bytes(), etc), etc, after_step=pause)
"""


@dataclass(frozen=True)
class Renewal:
    etc: Path
    archive: Path  # the renewal, with a new key
    old: dict[str, bytes]  # the enrollment installed in etc
    new: dict[str, bytes]


@pytest.fixture(params=["renewed", "new CA"])
def renewal(tmp_path: Path, request: pytest.FixtureRequest) -> Renewal:
    """An enrolled device and the next archive for it: a renewal, or (``new CA``) its
    enrollment in a new repository, as after the device CA was lost."""
    repo = tmp_path / "repo"
    init_repository(repo)
    etc = tmp_path / "etc-edge-agent"
    first = tmp_path / "enroll.tar"
    first.write_bytes(add_device(repo, "cam-7", "north", OPTIONS)[1])
    assert agent_main(["enroll", str(first), "--config-dir", str(etc)]) == 0
    archive = tmp_path / "next.tar"
    if request.param == "renewed":
        archive.write_bytes(renew_device(repo, "cam-7")[1])
    else:
        init_repository(tmp_path / "repo2")
        archive.write_bytes(add_device(tmp_path / "repo2", "cam-7", "north", OPTIONS)[1])
    old, new = archive_members(first.read_bytes()), archive_members(archive.read_bytes())
    assert old["device.key"] != new["device.key"] and old["device.crt"] != new["device.crt"]
    assert (old["ca.crt"] != new["ca.crt"]) == (request.param == "new CA")
    return Renewal(etc, archive, old, new)


def _install_killed_after(step: str, r: Renewal) -> None:
    run = subprocess.run(
        [sys.executable, "-c", KILLED_INSTALL, str(r.archive), str(r.etc), step],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == -signal.SIGKILL, run.stderr


def _installed(etc: Path) -> dict[str, bytes]:
    return {name: (etc / name).read_bytes() for name in MEMBERS}


def _leftovers(etc: Path) -> list[str]:
    return sorted(p.name for p in etc.iterdir() if p.name.startswith("."))


def test_an_install_killed_between_key_and_certificate_is_completed_by_the_next_enroll(
    renewal: Renewal, caplog: pytest.LogCaptureFixture
) -> None:
    _install_killed_after("device.key", renewal)
    assert (renewal.etc / "device.key").read_bytes() == renewal.new["device.key"]
    assert (renewal.etc / "device.crt").read_bytes() == renewal.old["device.crt"]  # no pair
    assert (renewal.etc / JOURNAL).exists()

    with caplog.at_level(logging.WARNING, logger="agent.device.enroll_install"):
        assert agent_main(["enroll", str(renewal.archive), "--config-dir", str(renewal.etc)]) == 0
    assert "completed an install" in caplog.text and "device.crt" in caplog.text
    assert _installed(renewal.etc) == renewal.new
    assert _leftovers(renewal.etc) == []


def test_an_install_over_a_pending_one_is_refused_until_it_is_recovered(
    renewal: Renewal,
) -> None:
    _install_killed_after("journal", renewal)  # the old key in place, the new one staged
    with pytest.raises(AgentError, match="was interrupted and is pending"):
        install_enrollment(read_enrollment(renewal.archive.read_bytes(), renewal.etc), renewal.etc)
    assert _installed(renewal.etc) == renewal.old
    assert (renewal.etc / JOURNAL).exists()


@pytest.mark.parametrize(
    ("step", "left"),
    [
        ("staged", "old"),  # killed before its journal: discarded
        ("journal", "new"),  # after it: completed, whatever was renamed
        ("device.key", "new"),
        ("device.crt", "new"),
        ("enroll.json", "new"),
    ],
)
def test_recover_leaves_one_whole_set_after_a_kill_at_any_step(
    renewal: Renewal, step: str, left: str, caplog: pytest.LogCaptureFixture
) -> None:
    _install_killed_after(step, renewal)
    assert staged_path(renewal.etc, "agent.toml").exists()  # the kill was mid-install

    with caplog.at_level(logging.WARNING, logger="agent.device.enroll_install"):
        recover(renewal.etc)
    assert _installed(renewal.etc) == getattr(renewal, left)
    assert _leftovers(renewal.etc) == []
    said = "before its journal was written" if left == "old" else "completed an install"
    assert said in caplog.text


def test_staged_files_have_their_modes_whatever_the_umask(renewal: Renewal) -> None:
    old = os.umask(0o077)  # root's umask on some devices; the agent must read device.crt
    try:
        _install_killed_after("staged", renewal)
    finally:
        os.umask(old)
    assert staged_path(renewal.etc, "device.key").read_bytes() == renewal.new["device.key"]
    assert os.stat(staged_path(renewal.etc, "device.key")).st_mode & 0o777 == 0o600
    assert os.stat(staged_path(renewal.etc, "device.crt")).st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    ("step", "uses"),
    [
        ("staged", "old"),  # nothing decided: the old set, no journal
        ("journal", "old"),  # decided, nothing renamed: the old key is the old cert's
        ("device.key", "staged"),  # the new key, its certificate still staged
        ("device.crt", "new"),  # the new pair in place
    ],
)
def test_the_agent_starts_with_the_certificate_of_its_key_after_an_interrupted_install(
    renewal: Renewal, tmp_path: Path, step: str, uses: str, caplog: pytest.LogCaptureFixture
) -> None:
    _install_killed_after(step, renewal)
    # As under systemd: the key is a credential copied from device.key at start.
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    shutil.copy(renewal.etc / "device.key", credentials / "device.key")
    config = load_config(renewal.etc / "agent.toml", environ={})
    environ = {"CREDENTIALS_DIRECTORY": str(credentials)}

    with caplog.at_level(logging.WARNING, logger="agent.device.tls_identity"):
        files = resolve_tls_files(config.mqtt, environ)
        tls_context(config, environ)  # loads them: the pair matches
    expected = {
        "old": renewal.etc / "device.crt",
        "staged": staged_path(renewal.etc, "device.crt"),
        "new": renewal.etc / "device.crt",
    }[uses]
    assert files.cert_file == expected
    assert files.key_file == credentials / "device.key"
    key = "new" if uses != "old" else "old"
    assert files.cert_file.read_bytes() == getattr(renewal, key)["device.crt"]
    assert files.ca_file.read_bytes() == getattr(renewal, key)["ca.crt"]
    assert ("was interrupted" in caplog.text) == (step != "staged")


def test_the_agent_refuses_a_key_that_is_not_its_certificates(renewal: Renewal) -> None:
    request_enrollment("cam-7", renewal.etc, force=True)  # a new key, no certificate for it
    config = load_config(renewal.etc / "agent.toml", environ={})
    with pytest.raises(ConfigError) as info:
        tls_context(config, {})
    message = str(info.value)
    assert f"the key {renewal.etc / 'device.key'} is not the key of the certificate" in message
    assert "edge-agent enroll" in message and "--reuse-key" in message


def test_edge_agent_run_exits_2_naming_the_mismatch(renewal: Renewal, tmp_path: Path) -> None:
    request_enrollment("cam-7", renewal.etc, force=True)
    env = {
        **os.environ,
        "EDGE_AGENT_STATE_DIR": str(tmp_path / "state"),
        "EDGE_AGENT_INFERENCE_SOCKET_PATH": str(tmp_path / "infer.sock"),
    }
    env.pop("CREDENTIALS_DIRECTORY", None)
    run = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(renewal.etc / "agent.toml")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2, run.stderr
    assert "config error" in run.stderr and "is not the key of the certificate" in run.stderr


# ------------------------------------------------------------------ the install lock


@pytest.fixture
def paused(renewal: Renewal) -> Iterator[subprocess.Popen[str]]:
    """Another process installing the renewal, holding the lock, paused after its journal."""
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSED_INSTALL, str(renewal.archive), str(renewal.etc)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "paused\n"
    assert (renewal.etc / JOURNAL).exists()
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _resume(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0


def _untouched_by_the_paused_install(r: Renewal) -> bool:
    return (r.etc / JOURNAL).exists() and _installed(r.etc) == r.old


class _Said(logging.Handler):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text, self.messages, self.event = text, list[str](), threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.messages.append(record.getMessage())
            self.event.set()


def test_a_second_enroll_waits_for_the_lock_then_installs_after_the_first(
    renewal: Renewal, paused: subprocess.Popen[str]
) -> None:
    said = _Said("waiting up to")
    logger = logging.getLogger("agent.device.enroll_install")
    logger.addHandler(said)
    errors: list[BaseException] = []

    def enroll() -> None:
        try:
            enroll_from_file(renewal.archive, renewal.etc, lock_wait_s=600)
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)

    second = threading.Thread(target=enroll)
    try:
        second.start()
        while second.is_alive() and not said.event.wait(0.05):
            pass
        assert said.event.is_set(), f"the second enroll did not wait: {errors}"
        assert f"locked by process {paused.pid}" in said.messages[0]
        assert _untouched_by_the_paused_install(renewal)  # it neither recovered nor staged
        _resume(paused)
        second.join(timeout=60)
    finally:
        logger.removeHandler(said)
    assert not second.is_alive() and errors == []
    assert _installed(renewal.etc) == renewal.new
    assert _leftovers(renewal.etc) == []


def test_an_enroll_that_does_not_wait_fails_naming_the_lock_and_its_holder(
    renewal: Renewal, paused: subprocess.Popen[str]
) -> None:
    with pytest.raises(InstallLockedError) as info:
        enroll_from_file(renewal.archive, renewal.etc, lock_wait_s=0)
    message = str(info.value)
    assert f"{renewal.etc} is locked by process {paused.pid}" in message
    assert "let it finish, then run this again" in message
    assert _untouched_by_the_paused_install(renewal)

    _resume(paused)
    enroll_from_file(renewal.archive, renewal.etc, lock_wait_s=0)
    assert _installed(renewal.etc) == renewal.new
    assert _leftovers(renewal.etc) == []


def test_a_holder_killed_with_sigkill_leaves_no_lock_and_enroll_completes_its_install(
    renewal: Renewal, paused: subprocess.Popen[str], caplog: pytest.LogCaptureFixture
) -> None:
    paused.send_signal(signal.SIGKILL)
    assert paused.wait(timeout=60) == -signal.SIGKILL
    with caplog.at_level(logging.WARNING, logger="agent.device.enroll_install"):
        enroll_from_file(renewal.archive, renewal.etc, lock_wait_s=0)
    assert "completed an install" in caplog.text
    assert _installed(renewal.etc) == renewal.new
    assert _leftovers(renewal.etc) == []


def test_requests_wait_for_the_lock_too(renewal: Renewal, paused: subprocess.Popen[str]) -> None:
    with pytest.raises(InstallLockedError, match=f"locked by process {paused.pid}"):
        request_renewal("cam-7", renewal.etc, lock_wait_s=0)
    with pytest.raises(InstallLockedError, match=f"locked by process {paused.pid}"):
        request_enrollment("cam-7", renewal.etc, force=True, lock_wait_s=0)
    assert _untouched_by_the_paused_install(renewal)


def test_a_request_refuses_a_pending_install_and_says_to_enroll_again(
    renewal: Renewal, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _install_killed_after("journal", renewal)  # the old key in place, about to be replaced
    with pytest.raises(InstallPendingError, match=r"run `edge-agent enroll ARCHIVE` again"):
        request_renewal("cam-7", renewal.etc, lock_wait_s=0)
    with pytest.raises(InstallPendingError, match=r"then `edge-agent request cam-7` again"):
        request_enrollment("cam-7", renewal.etc, force=True, lock_wait_s=0)
    csr = tmp_path / "cam-7.csr"
    request = ["request", "cam-7", "--reuse-key", "--config-dir", str(renewal.etc), "-o", str(csr)]
    assert agent_main(request) == 1
    assert "edge-agent enroll ARCHIVE" in capsys.readouterr().err
    assert not csr.exists()
    assert _installed(renewal.etc) == renewal.old and (renewal.etc / JOURNAL).exists()

    assert agent_main(["enroll", str(renewal.archive), "--config-dir", str(renewal.etc)]) == 0
    assert agent_main(request) == 0  # for the key now in place: the new one
    request_key = x509.load_pem_x509_csr(csr.read_bytes()).public_key()
    assert request_key == x509.load_pem_x509_certificate(renewal.new["device.crt"]).public_key()


def test_the_lock_is_on_the_folder_and_leaves_nothing_in_it(renewal: Renewal) -> None:
    # A second descriptor conflicts like another process would.
    with (
        install_lock(renewal.etc, 0),
        pytest.raises(InstallLockedError),
        install_lock(renewal.etc, 0),
    ):
        pass
    with install_lock(renewal.etc, 0):  # released
        pass
    assert sorted(p.name for p in renewal.etc.iterdir()) == sorted(MEMBERS)  # as enrolled


def test_a_first_enroll_makes_the_folder_it_locks_only_for_an_archive_that_checks_out(
    renewal: Renewal, tmp_path: Path
) -> None:
    fresh = tmp_path / "fresh"
    (tmp_path / "bad.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(EnrollmentError, match="not an enrollment archive"):
        enroll_from_file(tmp_path / "bad.tar", fresh, lock_wait_s=0)
    assert not fresh.exists()
    enroll_from_file(renewal.archive, fresh, lock_wait_s=0)
    assert _installed(fresh) == renewal.new


def test_the_enroll_command_says_it_waits_for_the_lock_then_installs(
    renewal: Renewal, paused: subprocess.Popen[str]
) -> None:
    command = ["enroll", str(renewal.archive), "--config-dir", str(renewal.etc)]
    enroll = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", *command],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert enroll.stderr is not None
        said = enroll.stderr.readline()  # the operator sees why it does not return
        assert f"{renewal.etc} is locked by process {paused.pid}: waiting up to 30 s" in said
        assert _untouched_by_the_paused_install(renewal)
        _resume(paused)
        out, err = enroll.communicate(timeout=60)
    finally:
        if enroll.poll() is None:
            enroll.kill()
            enroll.wait()
    assert enroll.returncode == 0, err
    assert "enrolled cam-7" in out
    assert _installed(renewal.etc) == renewal.new
