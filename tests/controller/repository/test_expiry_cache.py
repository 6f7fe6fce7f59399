"""``/metrics`` parses the device registry and the CRL again only when their file changed.

Real repositories, registries and CRLs written by ``add_device`` / ``revoke_device`` (or
rewritten in place here); parses are counted by wrapping the function
``controller.repository.expiry`` calls, which still does the real work. ``now_s`` is injected, a
minute after the files were written unless a test says otherwise, so they have settled
(``controller.base.filememo``).
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import controller.repository.expiry as expiry
from controller.base.filememo import SETTLE_S, FileMemo
from controller.base.fsio import atomic_write
from controller.identity.ca import CRL_DAYS
from controller.identity.devices import EnrollOptions, add_device, ca_dir, revoke_device
from controller.repository.expiry import DeviceCertSummary, ExpiryReader
from controller.repository.repo import Repository


def options(days: int = 825) -> EnrollOptions:
    return EnrollOptions(
        repository_url="https://updates.example.net/", mqtt_host="mq.example", cert_days=days
    )


def epoch(iso: str) -> int:
    return int(dt.datetime.fromisoformat(iso).timestamp())


def counting(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Wrap ``controller.repository.expiry.<name>``; the returned list grows by one per call."""
    real: Callable[..., Any] = getattr(expiry, name)
    calls: list[int] = []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(expiry, name, wrapper)
    return calls


def later() -> float:
    return time.time() + 60


def test_an_unchanged_registry_is_parsed_once_and_each_write_is_seen(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    parses = counting(monkeypatch, "load_registry")
    long_lived, _ = add_device(repo.path, "cam-long", "north", options())
    reader = ExpiryReader(repo.path)

    first = reader.read(later())
    assert first.device_certs == DeviceCertSummary(epoch(long_lived.not_after), 0)
    assert reader.read(later()) == first
    assert reader.read(later()) == first
    assert len(parses) == 1

    # add_device replaces the registry atomically (a new inode).
    short_lived, _ = add_device(repo.path, "cam-short", "north", options(days=10))
    assert reader.read(later()).device_certs == DeviceCertSummary(epoch(short_lived.not_after), 1)
    reader.read(later())
    assert len(parses) == 2

    revoke_device(repo.path, "cam-short")
    assert reader.read(later()).device_certs == DeviceCertSummary(epoch(long_lived.not_after), 0)
    assert len(parses) == 3


def test_an_in_place_rewrite_of_the_same_size_is_seen(repo: Repository) -> None:
    record, _ = add_device(repo.path, "cam-1", "north", options())
    path = ca_dir(repo.path) / "devices.json"
    old_ns = time.time_ns() - 3600 * 10**9
    os.utime(path, ns=(old_ns, old_ns))
    reader = ExpiryReader(repo.path)
    assert reader.read(later()).device_certs == DeviceCertSummary(epoch(record.not_after), 0)

    # Another certificate end of the same length, written into the same inode.
    earlier = dt.datetime.fromisoformat(record.not_after) - dt.timedelta(days=800)
    text = path.read_text()
    assert text.count(record.not_after) == 1
    new_text = text.replace(record.not_after, earlier.isoformat())
    assert len(new_text) == len(text)
    inode = path.stat().st_ino
    with open(path, "r+") as f:
        f.write(new_text)
    os.utime(path, ns=(old_ns + 10**9, old_ns + 10**9))
    assert (path.stat().st_ino, path.stat().st_size) == (inode, len(text))

    assert reader.read(later()).device_certs == DeviceCertSummary(int(earlier.timestamp()), 1)


def test_a_registry_read_while_fresh_is_read_again_until_it_settles(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_device(repo.path, "cam-1", "north", options())
    parses = counting(monkeypatch, "load_registry")
    reader = ExpiryReader(repo.path)
    just_written = time.time()

    reader.read(just_written)
    reader.read(just_written)
    assert len(parses) == 2  # a same-tick in-place rewrite could hide behind its stat
    reader.read(just_written + 60)
    reader.read(just_written + 60)
    assert len(parses) == 3


def test_the_window_count_follows_the_clock_without_a_new_parse(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    record, _ = add_device(repo.path, "cam-1", "north", options(days=40))
    parses = counting(monkeypatch, "load_registry")
    reader = ExpiryReader(repo.path)
    now = later()
    assert reader.read(now).device_certs == DeviceCertSummary(epoch(record.not_after), 0)
    assert reader.read(now + 15 * 86400).device_certs == DeviceCertSummary(
        epoch(record.not_after), 1
    )
    assert len(parses) == 1


def test_a_vanished_registry_drops_the_earliest_series_and_its_return_is_seen(
    repo: Repository,
) -> None:
    record, _ = add_device(repo.path, "cam-1", "north", options(days=10))
    path = ca_dir(repo.path) / "devices.json"
    saved = path.read_bytes()
    reader = ExpiryReader(repo.path)
    assert reader.read(later()).device_certs == DeviceCertSummary(epoch(record.not_after), 1)

    path.unlink()
    # As before the cache: no registry is no device (load_registry gives {}).
    assert reader.read(later()).device_certs == DeviceCertSummary(None, 0)
    assert reader.read(later()).device_certs == DeviceCertSummary(None, 0)

    atomic_write(path, saved, 0o600)
    assert reader.read(later()).device_certs == DeviceCertSummary(epoch(record.not_after), 1)


def test_a_registry_damaged_after_a_good_read_is_not_served_from_the_cache(
    repo: Repository,
) -> None:
    record, _ = add_device(repo.path, "cam-1", "north", options())
    path = ca_dir(repo.path) / "devices.json"
    good = path.read_bytes()
    reader = ExpiryReader(repo.path)
    assert reader.read(later()).device_certs is not None

    atomic_write(path, b"{ broken", 0o600)
    assert reader.read(later()).device_certs is None
    assert reader.read(later()).device_certs is None  # a failure is not remembered

    atomic_write(path, good, 0o600)
    assert reader.read(later()).device_certs == DeviceCertSummary(epoch(record.not_after), 0)


def test_an_unchanged_crl_is_parsed_once_and_a_re_signed_one_is_seen(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_device(repo.path, "cam-1", "north", options())
    add_device(repo.path, "cam-2", "north", options())
    parses = counting(monkeypatch, "read_crl")
    reader = ExpiryReader(repo.path)
    first = reader.read(later()).crl_next_update_s
    assert first is not None
    reader.read(later())
    assert len(parses) == 1

    when = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=2)
    revoke_device(repo.path, "cam-2", now=when)
    # The re-signed list is read, not the cached one: its next update follows `when`
    # (the first one followed the clock at add_device, a second boundary may lie between).
    expected = (when + dt.timedelta(days=CRL_DAYS)).timestamp()
    assert reader.read(later()).crl_next_update_s == expected
    assert expected != first
    assert len(parses) == 2


# ------------------------------------------------------------------ FileMemo alone


def memo_on(path: Path) -> tuple[FileMemo[bytes | None], list[int]]:
    calls: list[int] = []

    def compute() -> bytes | None:
        calls.append(1)
        return path.read_bytes() if path.exists() else None

    return FileMemo(path, compute), calls


def test_file_memo_recomputes_when_the_file_appears_changes_or_vanishes(tmp_path: Path) -> None:
    path = tmp_path / "f"
    memo, calls = memo_on(path)
    now = time.time() + 60

    assert memo.get(now) is None
    assert memo.get(now) is None
    assert len(calls) == 1  # an absent file stays absent: nothing to read again

    path.write_bytes(b"one")
    assert memo.get(now) == b"one"
    assert memo.get(now) == b"one"
    assert len(calls) == 2

    os.replace(_written(tmp_path / "g", b"two"), path)
    assert memo.get(now) == b"two"
    path.unlink()
    assert memo.get(now) is None
    assert len(calls) == 4


def test_file_memo_reuses_only_a_value_read_once_the_file_had_settled(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"one")
    changed_s = max(path.stat().st_mtime_ns, path.stat().st_ctime_ns) / 1e9
    memo, calls = memo_on(path)

    memo.get(changed_s + SETTLE_S / 2)
    memo.get(changed_s + SETTLE_S / 2)
    assert len(calls) == 2
    memo.get(changed_s + SETTLE_S + 1)
    memo.get(changed_s + SETTLE_S + 1)
    assert len(calls) == 3
    memo.get(changed_s - 5)  # the clock stepped back: the stored value still matches
    assert len(calls) == 3


def test_file_memo_stores_nothing_when_compute_raises(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"one")
    outcomes: list[Exception | str] = [ValueError("damaged"), "two"]

    def compute() -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    memo = FileMemo(path, compute)
    with pytest.raises(ValueError, match="damaged"):
        memo.get(time.time() + 60)
    assert memo.get(time.time() + 60) == "two"
    assert memo.get(time.time() + 60) == "two"
    assert outcomes == []


def _written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
