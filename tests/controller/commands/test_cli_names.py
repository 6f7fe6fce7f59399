"""Commands that take a name or a version refuse one with a trailing newline or space
(issue #18, defect 8): exit 2, an error naming the value, and nothing written.

A name like ``"dev1\\n"`` would otherwise reach ACL lines, MQTT topics and file names.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli import main as agent_main
from controller.cli import main as edgectl_main
from controller.identity.devices import load_registry
from controller.repository.release import release_bundle
from controller.repository.repo import Repository
from tests.controller.conftest import MODEL

BAD_SUFFIXES = ["\n", "\r", " ", "\t"]


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str], what: str) -> str:
    code = edgectl_main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert what in err, err
    return err


@pytest.mark.parametrize("suffix", BAD_SUFFIXES)
def test_device_add_refuses_a_device_or_fleet_with_a_trailing_newline(
    repo: Repository, tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = tmp_path / "enroll.tar"
    common = ["--repo", str(repo.path), "-o", str(archive), "--repository-url",
              "https://updates.example.net/", "--broker", "mq.example:8883"]  # fmt: skip
    _refused(["device", "add", "cam-1" + suffix, "--fleet", "north", *common], capsys,
             f"invalid device name {'cam-1' + suffix!r}")  # fmt: skip
    _refused(["device", "add", "cam-1", "--fleet", "north" + suffix, *common], capsys,
             f"invalid fleet name {'north' + suffix!r}")  # fmt: skip
    assert not archive.exists()
    assert load_registry(repo.path) == {}


@pytest.mark.parametrize("suffix", BAD_SUFFIXES)
def test_release_refuses_a_fleet_with_a_trailing_newline(
    repo: Repository, bundles: dict[str, Path], suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = sorted(p.name for p in (repo.path / "metadata").iterdir())
    _refused(["release", str(bundles["v1"]), "--fleet", "lab" + suffix, "--repo", str(repo.path)],
             capsys, f"invalid fleet name {'lab' + suffix!r}")  # fmt: skip
    assert sorted(p.name for p in (repo.path / "metadata").iterdir()) == before


@pytest.mark.parametrize("suffix", BAD_SUFFIXES)
def test_rollout_start_refuses_names_and_versions_with_a_trailing_newline(
    repo: Repository, bundles: dict[str, Path], suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    release_bundle(bundles["v1"], "lab", repo.path)
    start = ["rollout", "start"]
    rest = ["--repo", str(repo.path), "--bundle", str(bundles["v2"])]
    _refused([*start, MODEL, "2.0.0" + suffix, "--fleet", "lab", *rest], capsys,
             f"invalid version {'2.0.0' + suffix!r}")  # fmt: skip
    _refused([*start, MODEL + suffix, "2.0.0", "--fleet", "lab", *rest], capsys,
             f"invalid model name {MODEL + suffix!r}")  # fmt: skip
    _refused([*start, MODEL, "2.0.0", "--fleet", "lab" + suffix, *rest], capsys,
             f"invalid fleet name {'lab' + suffix!r}")  # fmt: skip
    assert not (repo.path / "rollouts").exists() or not any((repo.path / "rollouts").iterdir())


@pytest.mark.parametrize("suffix", BAD_SUFFIXES)
def test_edge_agent_request_refuses_a_device_id_with_a_trailing_newline(
    tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    etc = tmp_path / "etc"
    code = agent_main(["request", "cam-1" + suffix, "--config-dir", str(etc), "-o", "-"])
    err = capsys.readouterr().err
    assert code == 1 and f"invalid device name {'cam-1' + suffix!r}" in err, err
    assert not (etc / "device.key").exists()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--controller-identity", "edgectl\ntopic readwrite #"),
        ("--controller-identity", "edgectl\n"),
        ("--host", "broker.example\nlistener 1883"),
        ("--bind", "0.0.0.0\nallow_anonymous true"),
    ],
)
def test_broker_config_refuses_values_that_would_add_lines(
    repo: Repository,
    tmp_path: Path,
    option: str,
    value: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "broker"
    args = {"--controller-identity": "edgectl", "--host": "broker.example", "--bind": ""}
    args[option] = value
    argv = ["broker", "config", "--repo", str(repo.path), "-o", str(out)]
    argv += [f"{k}={v}" for k, v in args.items()]
    assert repr(value) in _refused(argv, capsys, option)
    assert not out.exists()
