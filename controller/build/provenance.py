"""Where a model came from: the Git work tree it lies in, and the operator's ``--source``.

``bundle build`` records the result in the manifest's ``source`` key
(``agent.contracts.bundle.parse_source``; docs/bundle-format.md#source-where-the-model-came-from):
a flat object of ASCII keys to strings. The ``git_*`` keys are read here from the work
tree; every other key is an operator's ``--source KEY=VALUE`` (``parse_source_options``).

Reading Git:
- the ``git`` binary through ``subprocess`` (no shell, argument lists), each call bounded
  by ``GIT_TIMEOUT_S``, run in the folder of the model file (its real path, so a symlink
  into a work tree is read from that tree);
- a clean environment: ``PATH`` (to find git), ``HOME`` (the user's own configuration,
  where ``safe.directory`` lives), a C locale, no terminal prompt, no optional locks (a
  build never writes the repository's index), literal pathspecs; nothing else of the
  caller's environment, so a ``GIT_DIR``, ``GIT_WORK_TREE`` or ``GIT_INDEX_FILE`` left in
  the shell cannot make the record describe another repository than the one the file
  lies in;
- never a reason to fail the build: no git, a folder outside any work tree, a repository
  without a commit, a timeout or an error give no ``git_*`` keys and a note saying why.

The remote URL is recorded without credentials (``strip_credentials``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from agent.contracts.bundle import (
    SOURCE_GIT_PREFIX,
    SOURCE_KEY_RE,
    SOURCE_MAX_ENTRIES,
    source_value_problem,
)
from controller.base.errors import UsageError

GIT_TIMEOUT_S: Final = 10.0
# At most this many --source entries (the git_* keys need the rest of the manifest's 64).
MAX_OPERATOR_ENTRIES: Final = 32
# The git_* keys a build may record (docs/bundle-format.md).
GIT_KEYS: Final = (
    "git_remote",
    "git_commit",
    "git_branch",
    "git_detached",
    "git_tags",
    "git_dirty",
    "git_path",
    "git_model_file",
)
# More tags than this pointing at one commit are cut (the value stays bounded).
_MAX_TAGS: Final = 16
# Schemes whose whole user-info is dropped: a user name there is often a token
# (https://TOKEN@github.com/...); for ssh and git only a password is.
_DROP_USER_SCHEMES: Final = frozenset({"http", "https", "ftp", "ftps"})


@dataclass(frozen=True)
class Provenance:
    """What a build records (``entries``: the manifest's ``source``, possibly empty) and
    what it says about it (``notes``: why there is no Git record, what was removed)."""

    entries: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


# ---------------------------------------------------------------------------- --source


def parse_source_options(values: Sequence[str]) -> dict[str, str]:
    """``--source KEY=VALUE`` options → entries. Raises UsageError naming the option."""
    if len(values) > MAX_OPERATOR_ENTRIES:
        raise UsageError(
            f"--source given {len(values)} times, at most {MAX_OPERATOR_ENTRIES}: "
            "record the rest in one value or in a file whose hash you record"
        )
    out: dict[str, str] = {}
    for raw in values:
        key, sep, value = raw.partition("=")
        if not sep:
            raise UsageError(f"--source {raw!r}: expected KEY=VALUE, e.g. svn_revision=r1234")
        if not SOURCE_KEY_RE.fullmatch(key):
            raise UsageError(
                f"--source {raw!r}: the key {key!r} must be lower-case ASCII letters, digits "
                "and . _ - (starting with a letter, at most 64), e.g. dataset_sha256"
            )
        if key.startswith(SOURCE_GIT_PREFIX):
            raise UsageError(
                f"--source {raw!r}: keys starting with {SOURCE_GIT_PREFIX!r} are what the "
                "build reads from the Git work tree the model lies in, never given by hand; "
                f"name it otherwise, e.g. upstream_{key.removeprefix(SOURCE_GIT_PREFIX)}"
            )
        if key in out:
            raise UsageError(
                f"--source {raw!r}: {key} is given twice ({out[key]!r} first); give each "
                "key once"
            )
        problem = source_value_problem(value)
        if problem is not None:
            raise UsageError(f"--source {key}=...: the value {problem}; give 1 to 1024 "
                             "printable characters")  # fmt: skip
        out[key] = value
    return out


# ---------------------------------------------------------------------------- URLs


def strip_credentials(url: str) -> tuple[str, bool]:
    """``url`` without credentials, and whether any were removed.

    ``scheme://user:pass@host/path?query#frag``: for http(s) and ftp(s) the whole
    user-info goes (a user name alone is often a token), for other schemes the password
    only (``ssh://git@host/...`` keeps ``git``); the query and fragment go too (tokens
    travel there: ``?private_token=``). The scp-like form ``git@host:org/repo.git`` and
    local paths are kept as they are, less any ``:password`` in a user-info.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme or not all(c.isalnum() or c in "+.-" for c in scheme):
        return _strip_scp_password(url)
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    removed = False
    if "@" in authority:
        userinfo, _, host = authority.rpartition("@")
        user = userinfo.partition(":")[0]
        if scheme.lower() in _DROP_USER_SCHEMES or not user:
            authority, removed = host, True
        elif user != userinfo:
            authority, removed = f"{user}@{host}", True
    for mark in "?#":
        if mark in tail:
            tail, removed = tail.partition(mark)[0], True
    return f"{scheme}://{authority}{tail}", removed


def _strip_scp_password(url: str) -> tuple[str, bool]:
    at = url.find("@")
    colon = url.find(":")
    slash = url.find("/")
    if at > 0 and 0 <= colon < at and (slash < 0 or colon < slash):
        return url[:colon] + url[at:], True  # user:pass@host:path -> user@host:path
    return url, False


# ---------------------------------------------------------------------------- Git


class _GitUnavailable(Exception):
    """No Git record: the message says why (for the build's output)."""


def git_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment git runs in: nothing of the caller's but PATH and HOME."""
    env = {
        "LC_ALL": "C",
        "LANG": "C",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_OPTIONAL_LOCKS": "0",
        "GIT_LITERAL_PATHSPECS": "1",
    }
    for name in ("PATH", "HOME"):
        if environ.get(name):
            env[name] = environ[name]
    return env


def _run(
    git: str, cwd: Path, args: Sequence[str], env: Mapping[str, str]
) -> tuple[int, str, str]:
    """(exit code, stdout, the first line of stderr) of one bounded git call."""
    # -c core.fsmonitor=false: status never starts a monitor daemon or hook for a build.
    argv = [git, "-c", "core.fsmonitor=false", *args]
    try:
        done = subprocess.run(  # an argument list, no shell
            argv,
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise _GitUnavailable(f"git {args[0]} took over {GIT_TIMEOUT_S:g} s in {cwd}") from None
    except OSError as exc:
        raise _GitUnavailable(f"git could not be run: {exc}") from None
    errors = done.stderr.decode("utf-8", "replace").strip().splitlines()
    return done.returncode, done.stdout.decode("utf-8", "replace"), errors[0] if errors else ""


def read_git(model_path: Path, environ: Mapping[str, str] | None = None) -> Provenance:
    """The ``git_*`` entries for the model file at ``model_path``, or none and why."""
    env = git_environment(os.environ if environ is None else environ)
    git = shutil.which("git", path=env.get("PATH", ""))
    if git is None:
        return Provenance(notes=("no Git record: git is not installed (not on PATH)",))
    real = model_path.resolve()
    try:
        return _read_git(git, real, env)
    except _GitUnavailable as exc:
        return Provenance(notes=(f"no Git record: {exc}",))


def _read_git(git: str, model: Path, env: Mapping[str, str]) -> Provenance:
    folder = model.parent
    code, out, why = _run(git, folder, ["rev-parse", "--show-toplevel"], env)
    if code != 0:
        if "not a git repository" in why.lower() or not why:
            raise _GitUnavailable(f"{folder} is not in a Git work tree")
        raise _GitUnavailable(f"git cannot read the work tree of {folder}: {why}")
    top = Path(out.strip())
    code, out, _ = _run(git, top, ["rev-parse", "--verify", "--quiet", "HEAD^{commit}"], env)
    if code != 0:
        raise _GitUnavailable(f"the Git repository {top} has no commit yet")
    entries = {"git_commit": out.strip()}
    notes: list[str] = []
    try:
        entries["git_path"] = model.relative_to(top.resolve()).as_posix()
    except ValueError:
        raise _GitUnavailable(f"{model} is not inside the work tree {top}") from None
    code, out, _ = _run(git, top, ["symbolic-ref", "--quiet", "--short", "HEAD"], env)
    branch = out.strip() if code == 0 else ""
    entries["git_detached"] = "false" if branch else "true"
    if branch:
        entries["git_branch"] = branch
    code, out, _ = _run(git, top, ["tag", "--points-at", "HEAD"], env)
    tags = sorted(t for t in out.split() if t)[:_MAX_TAGS] if code == 0 else []
    if tags:
        entries["git_tags"] = " ".join(tags)
    remote, note = _remote(git, top, branch, env)
    if remote:
        entries["git_remote"] = remote
    if note:
        notes.append(note)
    code, out, _ = _run(
        git, top, ["status", "--porcelain=v1", "-z", "--untracked-files=no", "--ignore-submodules=none"],
        env,
    )  # fmt: skip
    if code != 0:
        raise _GitUnavailable(f"git status failed in {top}")
    entries["git_dirty"] = "true" if out.strip("\0") else "false"
    entries["git_model_file"] = _model_file_state(git, top, entries["git_path"], env)
    kept = {}
    for key, value in entries.items():
        problem = source_value_problem(value)
        if problem is None:
            kept[key] = value
        else:
            notes.append(f"{key} not recorded: the value {problem}")
    return Provenance(kept, tuple(notes))


def _remote(git: str, top: Path, branch: str, env: Mapping[str, str]) -> tuple[str, str]:
    """The remote URL, without credentials: the branch's upstream remote, else
    ``origin``, else the only remote; and a note when credentials were removed."""
    code, out, _ = _run(git, top, ["remote"], env)
    remotes = out.split() if code == 0 else []
    if not remotes:
        return "", ""
    name = ""
    if branch:
        code, out, _ = _run(git, top, ["config", "--get", f"branch.{branch}.remote"], env)
        if code == 0 and out.strip() in remotes:
            name = out.strip()
    if not name:
        name = "origin" if "origin" in remotes else (remotes[0] if len(remotes) == 1 else "")
    if not name:
        return "", f"no git_remote: {len(remotes)} remotes and none is origin or the upstream"
    code, out, _ = _run(git, top, ["config", "--get", f"remote.{name}.url"], env)
    if code != 0 or not out.strip():
        return "", ""
    url, removed = strip_credentials(out.strip())
    return url, ("credentials removed from the remote URL" if removed else "")


def _model_file_state(git: str, top: Path, path: str, env: Mapping[str, str]) -> str:
    """``committed`` (tracked, unchanged), ``modified``, ``added`` (staged, never
    committed), ``untracked`` or ``ignored``."""
    code, out, _ = _run(
        git, top, ["status", "--porcelain=v1", "-z", "--ignored=matching", "--untracked-files=all", "--", path],
        env,
    )  # fmt: skip
    if code != 0:
        raise _GitUnavailable(f"git status failed for {path} in {top}")
    record = out.split("\0")[0]
    if not record:
        return "committed"
    status = record[:2]
    if status == "??":
        return "untracked"
    if status == "!!":
        return "ignored"
    if status[0] == "A":
        return "added"
    return "modified"


# ---------------------------------------------------------------------------- both


def collect(
    model_path: Path, operator: Mapping[str, str], environ: Mapping[str, str] | None = None
) -> Provenance:
    """The manifest's ``source`` for a build: the Git record, then ``operator``'s entries
    (checked by ``parse_source_options``: they never name a ``git_*`` key)."""
    found = read_git(model_path, environ)
    entries = {**found.entries, **operator}
    assert len(entries) <= SOURCE_MAX_ENTRIES
    return Provenance(dict(sorted(entries.items())), found.notes)


def describe(source: Mapping[str, str] | None) -> list[str]:
    """The source in words, one line each, under a ``source:`` heading (build output,
    ``releases show``); no lines when nothing was recorded."""
    lines: list[str] = []
    if not source:
        return lines
    if "git_commit" in source:
        where = source.get("git_remote", "(no remote)")
        if source.get("git_detached") == "true":
            ref = "detached HEAD"
        else:
            ref = f"branch {source.get('git_branch', '?')}"
        if source.get("git_tags"):
            ref += f", tag {source['git_tags']}"
        state = "dirty (uncommitted changes)" if source.get("git_dirty") == "true" else "clean"
        lines.append(f"git: {where} {source['git_commit']} ({ref}; {state})")
        lines.append(f"  model: {source.get('git_path', '?')} ({source.get('git_model_file', '?')})")
    for key, value in source.items():
        if not key.startswith(SOURCE_GIT_PREFIX):
            lines.append(f"{key}: {value}")
    return lines


def short(source: Mapping[str, str] | None) -> str:
    """The source in one cell (``releases list``): the commit's first 10 hex digits, with
    ``+dirty`` for a dirty tree, and how many operator keys (``--source``) there are;
    ``-`` when nothing was recorded."""
    if not source:
        return "-"
    parts = []
    if "git_commit" in source:
        dirty = "+dirty" if source.get("git_dirty") == "true" else ""
        parts.append(f"{source['git_commit'][:10]}{dirty}")
    extra = sum(1 for key in source if not key.startswith(SOURCE_GIT_PREFIX))
    if extra:
        parts.append(f"{extra} key{'s' if extra > 1 else ''}")
    return " ".join(parts) or "-"


def unclean_reason(source: Mapping[str, str] | None) -> str | None:
    """Why a bundle with this ``source`` fails ``edgectl release --require-clean``
    (None: it passes): no Git record, a dirty work tree, or a model file Git does not
    know (untracked and not ignored: the commit does not pin it and nobody decided so)."""
    if not source or "git_commit" not in source:
        return (
            "it has no Git record (built outside a Git work tree, without git, or by an "
            "edgectl that did not record one), so nothing shows it was built from "
            "committed work"
        )
    commit = source["git_commit"]
    if source.get("git_dirty") != "false":
        return (
            f"it was built from a Git work tree with uncommitted changes (commit {commit}, "
            f"git_dirty {source.get('git_dirty', 'not recorded')})"
        )
    state = source.get("git_model_file")
    if state not in ("committed", "ignored"):
        return (
            f"its model file {source.get('git_path', '?')} was {state or 'of unknown state'} "
            f"in the work tree of commit {commit}: commit it, or list it in .gitignore if "
            "it is a build output tracked elsewhere (DVC, LFS, a model registry)"
        )
    return None
