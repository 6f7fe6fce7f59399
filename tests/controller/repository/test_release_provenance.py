"""Provenance in the release history (issue 25 part 2), on a real repository and real Git.

lin 1.0.0 is built from a clean work tree at tag v1.0.0; 1.1.0 from the next commit (the
model retrained) with ``--source svn_revision=r1234``; 1.2.0 from a dirty tree; 0.9.0
outside any work tree. ``release show``/``diff`` print the source, ``release
--require-clean`` refuses the last two before writing anything, deltas carry the key.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from agent.contracts import parse_manifest
from agent.contracts.bundle_container import read_container
from agent.contracts.delta import apply_delta
from controller.base.errors import UsageError
from controller.build.builder import BuildOptions, build_bundle
from controller.build.delta import make_delta
from controller.repository.history import diff_releases, find_release, load_releases
from controller.repository.history_view import (
    diff_json,
    release_json,
    render_diff,
    render_list,
    render_show,
)
from controller.repository.release import release_bundle
from controller.repository.repo import init_repository
from controller.rollout.gates import parse_gates
from controller.rollout.service import start_rollout
from tests.controller.build.test_provenance import git, make_repo
from tests.controller.conftest import edgectl_cmd
from tests.helpers import make_linear_model

UNTIMED = BuildOptions(latency_runs=0)
COMMITS: dict[str, str] = {}  # version -> the commit it was built from (set by `built`)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("provenance")
    repo, model = make_repo(out / "models")
    git(repo, "tag", "v1.0.0")
    COMMITS["1.0.0"] = git(repo, "rev-parse", "HEAD")
    found = {}
    found["1.0.0"] = build_bundle(model, "lin", "1.0.0", out / "1.0.0.bundle", options=UNTIMED).path
    make_linear_model(model, seed=2)
    git(repo, "commit", "-q", "-am", "retrained")
    COMMITS["1.1.0"] = git(repo, "rev-parse", "HEAD")
    svn = BuildOptions(latency_runs=0, source={"svn_revision": "r1234"})
    found["1.1.0"] = build_bundle(model, "lin", "1.1.0", out / "1.1.0.bundle", options=svn).path
    (repo / "README").write_text("uncommitted\n")
    found["1.2.0"] = build_bundle(model, "lin", "1.2.0", out / "1.2.0.bundle", options=UNTIMED).path
    plain = make_linear_model(out / "plain" / "m.onnx", seed=4)
    found["0.9.0"] = build_bundle(plain, "lin", "0.9.0", out / "0.9.0.bundle", options=UNTIMED).path
    return found


@pytest.fixture
def released(tmp_path: Path, built: dict[str, Path]) -> Path:
    repo_dir = tmp_path / "repo"
    init_repository(repo_dir)
    release_bundle(built["1.0.0"], "lab", repo_dir, require_clean=True)
    release_bundle(built["1.1.0"], "lab", repo_dir, require_clean=True)
    return repo_dir


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_show_prints_where_the_release_came_from(released: Path, built: dict[str, Path]) -> None:
    release = find_release(released, "lin", "1.1.0")
    text = render_show(release)
    commit = COMMITS["1.1.0"]
    assert (
        "  source:\n"
        f"    git: https://example.com/org/models.git {commit} (branch main; clean)\n"
        "      model: models/m.onnx (committed)\n"
        "    svn_revision: r1234\n"
    ) in text
    doc = release_json(release)
    assert doc["source"]["git_commit"] == commit
    assert doc["source"]["svn_revision"] == "r1234"
    assert doc["manifest"]["source"] == doc["source"]
    assert "token" not in json.dumps(doc)


def test_show_says_when_nothing_was_recorded(tmp_path: Path, built: dict[str, Path]) -> None:
    repo_dir = tmp_path / "repo"
    init_repository(repo_dir)
    release_bundle(built["0.9.0"], "lab", repo_dir)
    release = find_release(repo_dir, "lin", "0.9.0")
    assert "\n  source: not recorded\n" in render_show(release)
    assert release_json(release)["source"] is None


def test_diff_prints_each_source_key_that_changed(released: Path, built: dict[str, Path]) -> None:
    d = diff_releases(released, "lin", "1.0.0", "1.1.0")
    text = render_diff(d)
    assert f"  source.git_commit: {COMMITS['1.0.0']} -> {COMMITS['1.1.0']}" in text
    assert "  source.git_tags: v1.0.0 -> -" in text
    assert "  source.svn_revision: - -> r1234" in text
    assert "source.git_remote" not in text  # unchanged
    changes = {c["field"]: (c["before"], c["after"]) for c in diff_json(d)["changes"]}
    assert changes["source.svn_revision"] == (None, "r1234")


def test_the_cli_prints_source_in_show_and_diff(released: Path, built: dict[str, Path]) -> None:
    def edgectl(*args: str) -> str:
        done = subprocess.run(edgectl_cmd(*args), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    show = edgectl("release", "show", "lin", "1.0.0", "--repo", str(released))
    assert "(branch main, tag v1.0.0; clean)" in show
    doc = json.loads(edgectl("releases", "show", "lin", "1.0.0", "--repo", str(released), "--json"))
    assert doc["source"]["git_tags"] == "v1.0.0"
    diff = edgectl("release", "diff", "lin", "1.0.0", "1.1.0", "--repo", str(released), "--json")
    assert "source.git_commit" in {c["field"] for c in json.loads(diff)["changes"]}


@pytest.mark.parametrize(
    ("version", "why"),
    [
        ("1.2.0", r"it was built from a Git work tree with uncommitted changes \(commit "),
        ("0.9.0", r"it has no Git record \(built outside a Git work tree"),
    ],
)
def test_require_clean_refuses_before_writing_anything(
    released: Path, built: dict[str, Path], version: str, why: str
) -> None:
    before = _files(released)
    with pytest.raises(UsageError, match=rf"--require-clean refuses .* \(lin {version}\): {why}"):
        release_bundle(built[version], "lab", released, require_clean=True)
    assert _files(released) == before
    done = subprocess.run(
        edgectl_cmd("release", built[version], "--fleet", "lab", "--repo", released,
                    "--require-clean"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "Commit the changes and rebuild it from the clean work tree" in done.stderr
    assert "nothing was published" in done.stderr
    assert _files(released) == before
    release_bundle(built[version], "lab", released)  # without the flag: published
    assert find_release(released, "lin", version).version == version


def test_a_delta_rebuilds_the_manifest_with_its_source(built: dict[str, Path]) -> None:
    old, new = built["1.0.0"].read_bytes(), built["1.1.0"].read_bytes()
    base = dict(read_container(old)[1])
    rebuilt = apply_delta(
        make_delta(old, new), lambda n: base[n], model="lin", old="1.0.0", new="1.1.0",
        max_output_bytes=1 << 24,
    )  # fmt: skip
    assert rebuilt == new
    manifest = parse_manifest(dict(read_container(rebuilt)[1])["manifest.json"])
    assert manifest.source is not None
    assert manifest.source["svn_revision"] == "r1234"
    assert manifest.source["git_commit"] == COMMITS["1.1.0"]


def test_rollout_start_require_clean_judges_the_bundle_it_publishes(
    released: Path, built: dict[str, Path]
) -> None:
    def start(version: str, bundle: Path | None) -> None:
        start_rollout(
            released, fleet="lab", model="lin", version=version, stages=(100,), wait_s=1,
            deadline_s=60, gates=parse_gates("error_rate<0.01"), bundle=bundle, require_clean=True,
        )  # fmt: skip

    before = _files(released)
    with pytest.raises(UsageError, match=r"--require-clean refuses .* \(lin 1\.2\.0\): it was"):
        start("1.2.0", built["1.2.0"])
    with pytest.raises(UsageError, match=r"--require-clean judges the bundle .* --bundle FILE"):
        start("1.0.0", None)
    assert _files(released) == before


def test_list_shows_each_release_source_in_a_column(released: Path, built: dict[str, Path]) -> None:
    release_bundle(built["1.2.0"], "lab", released)  # dirty; no --require-clean
    release_bundle(built["0.9.0"], "lab", released)  # outside any work tree
    lines = render_list(load_releases(released, "lin")).splitlines()
    start, end = lines[0].index("SOURCE"), lines[0].index("AGREE")
    cells = {line.split()[1]: line[start:end].split() for line in lines[1:]}
    assert cells["1.0.0"][0] == COMMITS["1.0.0"][:10]
    assert cells["1.1.0"] == [COMMITS["1.1.0"][:10], "1", "key"]  # and one --source key
    assert cells["1.2.0"][0] == f"{COMMITS['1.1.0'][:10]}+dirty"
    assert cells["0.9.0"][0] == "-"
