"""Where a model came from (issue 25 part 2): real Git repositories made by the test.

No network: remotes are URLs that are never fetched. Each repository is made with the
real ``git`` binary; ``read_git`` reads it the way ``bundle build`` does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from agent.contracts import parse_manifest
from controller.base.errors import UsageError
from controller.build import provenance
from controller.build.builder import BuildOptions, build_bundle
from controller.build.bundle_file import read_bundle
from controller.build.provenance import (
    collect,
    parse_source_options,
    read_git,
    strip_credentials,
    unclean_reason,
)
from controller.cli import main as cli_main
from tests.helpers import make_linear_model

REMOTE = "https://user:token@example.com/org/models.git"
UNTIMED = BuildOptions(latency_runs=0)


def git(repo: Path, *args: str) -> str:
    """The test's own git calls: a fixed identity, nothing from the user's config."""
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(repo),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    done = subprocess.run(
        ["git", *args], cwd=repo, env=env, capture_output=True, text=True, check=True, timeout=30
    )
    return done.stdout.strip()


def make_repo(root: Path, *, remote: str | None = REMOTE) -> tuple[Path, Path]:
    """A work tree with one commit holding models/m.onnx and a README; the model path."""
    root.mkdir(parents=True)
    git(root, "init", "-q", "-b", "main")
    (root / "models").mkdir()
    model = make_linear_model(root / "models" / "m.onnx", seed=1)
    (root / "README").write_text("models\n")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "first")
    if remote is not None:
        git(root, "remote", "add", "origin", remote)
    return root, model


def test_a_clean_tree_records_remote_without_credentials_commit_branch_and_path(
    tmp_path: Path,
) -> None:
    repo, model = make_repo(tmp_path / "r")
    found = read_git(model)
    assert found.entries == {
        "git_commit": git(repo, "rev-parse", "HEAD"),
        "git_path": "models/m.onnx",
        "git_detached": "false",
        "git_branch": "main",
        "git_remote": "https://example.com/org/models.git",
        "git_dirty": "false",
        "git_model_file": "committed",
    }
    assert found.notes == ("credentials removed from the remote URL",)
    assert "token" not in json.dumps(found.entries)


def test_a_dirty_tree_and_a_modified_model_file(tmp_path: Path) -> None:
    repo, model = make_repo(tmp_path / "r")
    (repo / "README").write_text("changed\n")
    assert read_git(model).entries["git_dirty"] == "true"
    assert read_git(model).entries["git_model_file"] == "committed"
    git(repo, "checkout", "-q", "--", "README")
    make_linear_model(model, seed=2)  # the model itself changed
    entries = read_git(model).entries
    assert (entries["git_dirty"], entries["git_model_file"]) == ("true", "modified")


def test_untracked_files_do_not_make_a_tree_dirty_but_an_untracked_model_is_said(
    tmp_path: Path,
) -> None:
    repo, _ = make_repo(tmp_path / "r")
    (repo / "notes.txt").write_text("scratch\n")
    other = make_linear_model(repo / "models" / "new.onnx", seed=3)
    entries = read_git(other).entries
    assert (entries["git_dirty"], entries["git_model_file"]) == ("false", "untracked")
    assert "untracked" in (unclean_reason(entries) or "")
    (repo / ".gitignore").write_text("*.onnx\n")
    git(repo, "add", ".gitignore")
    git(repo, "commit", "-q", "-m", "ignore built models")
    entries = read_git(other).entries
    assert entries["git_model_file"] == "ignored"
    assert unclean_reason(entries) is None  # a build output tracked elsewhere (DVC, LFS)
    git(repo, "add", "-f", "models/new.onnx")
    assert read_git(other).entries["git_model_file"] == "added"


def test_detached_head_with_a_tag(tmp_path: Path) -> None:
    repo, model = make_repo(tmp_path / "r")
    first = git(repo, "rev-parse", "HEAD")
    git(repo, "tag", "v1.0.0")
    git(repo, "tag", "-a", "-m", "release", "release-1")
    (repo / "README").write_text("second\n")
    git(repo, "commit", "-q", "-am", "second")
    git(repo, "checkout", "-q", "v1.0.0")
    entries = read_git(model).entries
    assert entries["git_commit"] == first
    assert entries["git_detached"] == "true"
    assert "git_branch" not in entries
    assert entries["git_tags"] == "release-1 v1.0.0"
    assert entries["git_dirty"] == "false"
    assert "detached HEAD, tag release-1 v1.0.0; clean" in "\n".join(provenance.describe(entries))


def test_no_remote_records_the_rest(tmp_path: Path) -> None:
    repo, model = make_repo(tmp_path / "r", remote=None)
    found = read_git(model)
    assert "git_remote" not in found.entries
    assert found.entries["git_commit"] == git(repo, "rev-parse", "HEAD")
    assert found.notes == ()
    assert "(no remote)" in provenance.describe(found.entries)[0]


def test_the_upstream_remote_wins_and_ssh_forms_are_kept(tmp_path: Path) -> None:
    repo, model = make_repo(tmp_path / "r", remote="git@github.com:org/models.git")
    assert read_git(model).entries["git_remote"] == "git@github.com:org/models.git"
    git(repo, "remote", "add", "mirror", "ssh://git:secret@mirror.example.com:2222/models.git")
    git(repo, "config", "branch.main.remote", "mirror")
    found = read_git(model)
    assert found.entries["git_remote"] == "ssh://git@mirror.example.com:2222/models.git"
    assert found.notes == ("credentials removed from the remote URL",)


def test_not_a_repository_and_no_commit_give_no_record_and_say_why(tmp_path: Path) -> None:
    model = make_linear_model(tmp_path / "plain" / "m.onnx", seed=1)
    found = read_git(model)
    assert found.entries == {}
    assert found.notes == (f"no Git record: {model.parent} is not in a Git work tree",)
    empty = tmp_path / "empty"
    empty.mkdir()
    git(empty, "init", "-q")
    fresh = make_linear_model(empty / "m.onnx", seed=1)
    assert read_git(fresh).notes == (
        f"no Git record: the Git repository {empty} has no commit yet",
    )


def test_git_missing_from_path(tmp_path: Path) -> None:
    _, model = make_repo(tmp_path / "r")
    nothing = tmp_path / "bin"
    nothing.mkdir()
    found = read_git(model, {"PATH": str(nothing), "HOME": str(tmp_path)})
    assert found == provenance.Provenance(
        notes=("no Git record: git is not installed (not on PATH)",)
    )


def test_a_git_that_hangs_is_cut_off_and_the_build_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stand-in binary named git that never answers: the call's bound, not git, is tested.
    hanging = tmp_path / "bin"
    hanging.mkdir()
    script = hanging / "git"
    script.write_text(f"#!/bin/sh\nexec {shutil.which('sleep')} 30\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(provenance, "GIT_TIMEOUT_S", 0.2)
    model = make_linear_model(tmp_path / "m.onnx", seed=1)
    found = read_git(model, {"PATH": str(hanging)})
    assert found.entries == {}
    assert found.notes == (f"no Git record: git rev-parse took over 0.2 s in {tmp_path}",)


def test_the_callers_git_variables_do_not_redirect_it(tmp_path: Path) -> None:
    repo, model = make_repo(tmp_path / "a")
    other, _ = make_repo(tmp_path / "b", remote="https://example.com/other.git")
    (other / "README").write_text("dirty elsewhere\n")
    hostile = {
        **os.environ,
        "GIT_DIR": str(other / ".git"),
        "GIT_WORK_TREE": str(other),
        "GIT_INDEX_FILE": str(other / ".git" / "index"),
        "GIT_CEILING_DIRECTORIES": str(tmp_path),
        "GIT_CONFIG_PARAMETERS": "'remote.origin.url'='https://evil.example.com/x.git'",
    }
    entries = read_git(model, hostile).entries
    assert entries["git_commit"] == git(repo, "rev-parse", "HEAD")
    assert entries["git_remote"] == "https://example.com/org/models.git"
    assert entries["git_dirty"] == "false"
    plain = make_linear_model(tmp_path / "plain" / "m.onnx", seed=1)
    assert read_git(plain, hostile).entries == {}  # not borrowed from GIT_DIR either
    assert provenance.git_environment(hostile).keys() == {
        "PATH", "HOME", "LC_ALL", "LANG", "GIT_TERMINAL_PROMPT", "GIT_OPTIONAL_LOCKS",
        "GIT_LITERAL_PATHSPECS",
    }  # fmt: skip


def test_a_symlinked_model_is_read_from_the_tree_it_points_into(tmp_path: Path) -> None:
    repo, model = make_repo(tmp_path / "r")
    link = tmp_path / "elsewhere" / "m.onnx"
    link.parent.mkdir()
    link.symlink_to(model)
    assert read_git(link).entries["git_path"] == "models/m.onnx"


@pytest.mark.parametrize(
    ("url", "clean", "removed"),
    [
        ("https://user:token@example.com/org/models.git", "https://example.com/org/models.git", True),
        ("https://ghp_TOKEN@github.com/o/r.git", "https://github.com/o/r.git", True),
        ("https://example.com/r.git?private_token=abc#frag", "https://example.com/r.git", True),
        ("http://u:p@[::1]:8080/r", "http://[::1]:8080/r", True),
        ("git@github.com:org/repo.git", "git@github.com:org/repo.git", False),
        ("ssh://git@host:2222/org/r.git", "ssh://git@host:2222/org/r.git", False),
        ("ssh://git:pw@host/r", "ssh://git@host/r", True),
        ("user:pw@host:org/r.git", "user@host:org/r.git", True),
        ("/srv/git/models.git", "/srv/git/models.git", False),
        ("../models", "../models", False),
        ("file:///srv/a@b/models.git", "file:///srv/a@b/models.git", False),
        ("https://example.com/~me@x/r.git", "https://example.com/~me@x/r.git", False),
    ],
)  # fmt: skip
def test_strip_credentials(url: str, clean: str, removed: bool) -> None:
    assert strip_credentials(url) == (clean, removed)


def test_source_options() -> None:
    assert parse_source_options(["svn_revision=r1234", "dataset.sha256=ab=cd"]) == {
        "svn_revision": "r1234",
        "dataset.sha256": "ab=cd",
    }


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["svn_revision"], r"--source 'svn_revision': expected KEY=VALUE"),
        (["SVN=r1"], r"the key 'SVN' must be lower-case ASCII"),
        (["1st=x"], r"the key '1st' must be"),
        (["révision=1"], r"the key 'révision' must be lower-case ASCII"),
        ([f"{'k' * 65}=x"], r"must be lower-case ASCII .* at most 64"),
        (["git_commit=abc"], r"keys starting with 'git_' are what the build reads .* upstream_commit"),
        (["run=a", "run=b"], r"run is given twice \('a' first\); give each key once"),
        (["run="], r"--source run=...: the value is empty"),
        (["run=a\nb"], r"the value holds control or unprintable characters"),
        (["run=\udcff"], r"the value holds control or unprintable characters"),
        ([f"run={'x' * 1025}"], r"the value is 1025 characters long, over 1024"),
        ([f"k{i}=v" for i in range(33)], r"--source given 33 times, at most 32"),
    ],
)  # fmt: skip
def test_bad_source_options_are_refused_naming_the_flag(values: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_source_options(values)


def test_bad_source_on_the_command_line_exits_2_before_building(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = make_linear_model(tmp_path / "m.onnx", seed=1)
    out = tmp_path / "m.bundle"
    argv = ["bundle", "build", str(model), "--name", "m", "--version", "1.0.0", "-o", str(out)]
    assert cli_main([*argv, "--source", "git_dirty=false"]) == 2
    assert "--source 'git_dirty=false': keys starting with 'git_'" in capsys.readouterr().err
    assert not out.exists()


def test_a_build_records_git_and_svn_style_source_in_the_signed_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo, model = make_repo(tmp_path / "r")
    git(repo, "tag", "v1.0.0")
    out = tmp_path / "m.bundle"
    argv = ["bundle", "build", str(model), "--name", "m", "--version", "1.0.0", "-o", str(out),
            "--latency-runs", "0", "--source", "svn_revision=r1234",
            "--source", "training_run=run-7"]  # fmt: skip
    assert cli_main(argv) == 0
    text = capsys.readouterr().out
    commit = git(repo, "rev-parse", "HEAD")
    assert (
        "  source:\n"
        f"    git: https://example.com/org/models.git {commit} (branch main, tag v1.0.0; clean)\n"
        "      model: models/m.onnx (committed)\n"
        "    svn_revision: r1234\n"
        "    training_run: run-7\n"
        "    (credentials removed from the remote URL)\n"
    ) in text
    manifest = read_bundle(out).manifest
    assert manifest.source == {
        "git_branch": "main",
        "git_commit": commit,
        "git_detached": "false",
        "git_dirty": "false",
        "git_model_file": "committed",
        "git_path": "models/m.onnx",
        "git_remote": "https://example.com/org/models.git",
        "git_tags": "v1.0.0",
        "svn_revision": "r1234",
        "training_run": "run-7",
    }
    raw = manifest.to_json_bytes()
    assert b"token" not in out.read_bytes()
    assert parse_manifest(raw) == manifest
    assert cli_main([*argv[:-4], "--json", "-o", str(tmp_path / "j.bundle")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["source"]["git_commit"] == commit
    assert doc["source_notes"] == ["credentials removed from the remote URL"]


def test_a_build_outside_git_or_without_git_writes_no_source_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_linear_model(tmp_path / "plain" / "m.onnx", seed=1)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    plain = build_bundle(model, "m", "1.0.0", tmp_path / "a.bundle", options=UNTIMED)
    assert plain.manifest.source is None
    assert "source" not in json.loads(plain.manifest.to_json_bytes())  # as before the key
    assert plain.source_notes == (f"no Git record: {model.parent} is not in a Git work tree",)
    _, tracked = make_repo(tmp_path / "r")
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    without_git = build_bundle(tracked, "m", "1.0.0", tmp_path / "b.bundle", options=UNTIMED)
    assert without_git.manifest.source is None
    assert without_git.source_notes == ("no Git record: git is not installed (not on PATH)",)
    only_svn = dataclasses.replace(UNTIMED, source={"svn_revision": "r1234"})
    result = build_bundle(tracked, "m", "1.0.0", tmp_path / "c.bundle", options=only_svn)
    assert result.manifest.source == {"svn_revision": "r1234"}


def test_collect_puts_operator_entries_beside_git(tmp_path: Path) -> None:
    _, model = make_repo(tmp_path / "r")
    found = collect(model, {"dataset_sha256": "ab" * 32})
    assert found.entries["dataset_sha256"] == "ab" * 32
    assert list(found.entries) == sorted(found.entries)
