"""Fixtures of the controller kill-point run (issue 19, section 2) and its tally.

Each test appends one ``Outcome`` per kill point to the session's list (before it
asserts), and the end of the run prints ``N/M controller kill points recovered``, with
every kill point that did not recover: the command, the step, the path written at that
step and what broke.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.build.builder import build_bundle
from controller.repository.release import release_bundle
from controller.repository.repo import init_repository
from tests.helpers import make_linear_model
from tests.kill_points.harness import (
    FLEET,
    MODEL,
    Case,
    Outcome,
    RepoHttp,
    Runner,
    device_refresh,
    edgectl_argv,
    run_edgectl,
)

_OUTCOMES = pytest.StashKey[list[Outcome]]()


@pytest.fixture
def kill_tally(request: pytest.FixtureRequest) -> list[Outcome]:
    return request.config.stash.setdefault(_OUTCOMES, [])


@pytest.fixture(scope="session")
def repo_http() -> Iterator[RepoHttp]:
    server = RepoHttp()
    yield server
    server.close()


def _cli(*args: str | Path) -> None:
    done = run_edgectl(edgectl_argv(*args))
    assert done.returncode == 0, f"edgectl {args} failed:\n{done.stdout}{done.stderr}"


@pytest.fixture(scope="session")
def kill_runner(tmp_path_factory: pytest.TempPathFactory, repo_http: RepoHttp) -> Runner:
    """The starting states, made once: ``released`` (1.0.0 released to the fleet),
    ``rolling`` (a rollout of 2.0.0 at its first stage, 10 %), ``paused`` (that rollout
    paused), ``three`` (1.0.0, 2.0.0 and 3.0.0 released in turn), ``retired`` (``three``
    with 1.0.0 retired, its file kept). Each has the TUF cache of a device that refreshed
    on it, enrolled with the first root."""
    top = tmp_path_factory.mktemp("kill-points")
    bundles = top / "bundles"
    bundles.mkdir()
    for seed, version in ((1, "1.0.0"), (2, "2.0.0"), (3, "3.0.0")):
        model = make_linear_model(bundles / f"{version}.onnx", seed=seed)
        build_bundle(model, MODEL, version, bundles / f"{version}.bundle", 4)
    templates: dict[str, Case] = {}
    enrolled = top / "enrolled-root.json"

    def derive(name: str, parent: str | None) -> Case:
        case = Case(top / "templates" / name, bundles, enrolled)
        if parent is None:
            init_repository(case.repo)
            shutil.copyfile(case.repo / "metadata" / "1.root.json", enrolled)
            release_bundle(bundles / "1.0.0.bundle", FLEET, case.repo)
        else:
            shutil.copytree(templates[parent].root, case.root, symlinks=True)
        templates[name] = case
        return case

    derive("released", None)
    rolling = derive("rolling", "released")
    _cli("rollout", "start", MODEL, "2.0.0", "--fleet", FLEET, "--repo", rolling.repo,
         "--bundle", bundles / "2.0.0.bundle", "--stages", "10,50,100", "--wait", "1h")  # fmt: skip
    paused = derive("paused", "rolling")
    _cli("rollout", "pause", MODEL, "--fleet", FLEET, "--repo", paused.repo)
    three = derive("three", "released")
    for version in ("2.0.0", "3.0.0"):
        _cli("release", bundles / f"{version}.bundle", "--fleet", FLEET, "--repo", three.repo)
    retired = derive("retired", "three")
    _cli("releases", "retire", MODEL, "1.0.0", "--repo", retired.repo)
    for case in templates.values():
        repo_http.directory = case.repo
        device_refresh(case, repo_http.url)
        shutil.rmtree(case.root / "downloads", ignore_errors=True)
    work = top / "cases"
    work.mkdir()
    return Runner(templates, work, repo_http)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    outcomes = config.stash.get(_OUTCOMES, [])
    if not outcomes:
        return
    tr = terminalreporter
    tr.section("controller kill points (issue 19)")
    by_spec: dict[str, list[Outcome]] = {}
    for o in outcomes:
        by_spec.setdefault(o.spec, []).append(o)
    for spec, points in by_spec.items():
        good = sum(o.recovered for o in points)
        tr.write_line(f"- {spec}: {good}/{len(points)} recovered")
        for o in points:
            if not o.recovered:
                known = f"[known, {o.known}] " if o.known else ""
                tr.write_line(f"    step {o.step} ({o.path}): {known}{o.problem}")
    recovered = sum(o.recovered for o in outcomes)
    tr.write_line(f"{recovered}/{len(outcomes)} controller kill points recovered")
