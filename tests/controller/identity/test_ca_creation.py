"""A device CA interrupted while it is made (issue 19, section 2: `broker config` and the
first `device add` create it).

The interruption is the step hook of ``agent.base.fsutil`` raising after the Nth durable
step, in this process; ``tests/kill_points`` does the same with a real SIGKILL.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from agent.base.fsutil import set_step_hook
from controller.base.errors import RepositoryError
from controller.identity.ca import CREATING_DIR, DeviceCA, creation_pending, read_crl
from controller.identity.devices import ca_dir
from controller.repository.expiry import has_device_ca


class Interrupted(BaseException):
    """The process stopping right after a durable step."""


@pytest.fixture(autouse=True)
def no_hook_after() -> Iterator[None]:
    yield
    set_step_hook(None)


def _steps_of_a_creation(folder: Path) -> list[Path]:
    steps: list[Path] = []
    set_step_hook(steps.append)
    DeviceCA.open_or_create(folder)
    set_step_hook(None)
    return steps


def _interrupt_at(n: int) -> None:
    count = 0

    def hook(path: Path) -> None:
        nonlocal count
        count += 1
        if count == n:
            raise Interrupted(path)

    set_step_hook(hook)


def _check_whole(folder: Path) -> DeviceCA:
    ca = DeviceCA.open(folder)
    key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), None)
    assert key.public_key() == ca.certificate.public_key()
    assert read_crl(folder).is_signature_valid(ca.certificate.public_key())  # type: ignore[arg-type]
    return ca


def test_a_creation_interrupted_after_any_step_is_finished_or_made_again(tmp_path: Path) -> None:
    steps = _steps_of_a_creation(ca_dir(tmp_path / "whole"))
    names = [p.name for p in steps]
    # Staged (certificate last), then moved into place (certificate last).
    assert names == ["ca.key", "crl.pem", "ca.crt", "ca.key", "crl.pem", "ca.crt"]
    for n in range(1, len(steps) + 1):
        repo = tmp_path / f"interrupted-{n}"
        folder = ca_dir(repo)
        _interrupt_at(n)
        with pytest.raises(Interrupted):
            DeviceCA.open_or_create(folder)
        set_step_hook(None)
        assert creation_pending(folder)
        assert not has_device_ca(repo)  # /metrics waits for the whole CA
        moved_key = (folder / "ca.key").read_bytes() if (folder / "ca.key").exists() else None
        staged_whole = (folder / CREATING_DIR / "ca.crt").exists() or moved_key is not None

        ca = DeviceCA.open_or_create(folder)

        assert not creation_pending(folder) and has_device_ca(repo)
        opened = _check_whole(folder)
        assert opened.cert_pem == ca.cert_pem
        if moved_key is not None:  # finished, never made again: the key is the same
            assert (folder / "ca.key").read_bytes() == moved_key
        if staged_whole:
            assert DeviceCA.open_or_create(folder).cert_pem == ca.cert_pem


def test_a_key_without_its_certificate_is_never_replaced(tmp_path: Path) -> None:
    folder = ca_dir(tmp_path)
    DeviceCA.open_or_create(folder)
    key = (folder / "ca.key").read_bytes()
    (folder / "ca.crt").unlink()  # damage, not an interrupted creation
    with pytest.raises(RepositoryError, match=r"missing ca\.crt"):
        DeviceCA.open_or_create(folder)
    assert (folder / "ca.key").read_bytes() == key
