"""Every `edgectl` / `edge-agent` command shown in README.md and docs/*.md exists.

Commands are taken from fenced code blocks (a line that starts with the program, after an
optional ``$ ``, with ``\\`` continuations joined) and from inline code spans that start
with the program. Each is walked through the real argparse parsers
(``controller.cli.build_parser``, ``agent.cli._parser``): every subcommand must exist and
every ``--option`` must be one the (sub)command accepts. A renamed command or option
breaks this test until the docs follow.

CLI examples that are safe to run also run: a fenced ```sh block whose first line is
``# docs-test: run`` (text after it is a comment) is executed with ``bash -euo pipefail``
in a fresh temporary folder per document, the document's marked blocks in order (so a
later block may use what an earlier one made, e.g. ``./repo`` from ``edgectl init``).
Substitutions, so the examples can stay what an operator types:

- ``edgectl`` and ``edge-agent`` are the ones installed next to this Python (that
  ``bin/`` folder is put first on ``PATH``);
- ``model.onnx`` in the folder is a small linear ONNX model the test writes
  (``tests.helpers.make_linear_model``) before the first block runs;
- ``HOME`` is the temporary folder; ``SOURCE_DATE_EPOCH`` is unset.

Every block must exit 0. Mark only blocks that need no root, network, broker or device.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli import _parser as agent_parser
from controller.cli import build_parser as controller_parser
from controller.cli import route_release_verbs

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROGRAMS = {"edgectl": controller_parser, "edge-agent": agent_parser}
FENCE = re.compile(r"^```.*?$(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`((?:edgectl|edge-agent)(?: [^`]*)?)`")
OPTION = re.compile(r"--[a-z][a-z0-9-]*[a-z0-9](?![-*\w])")  # not a wildcard: --probation-*


def _commands(text: str) -> Iterator[str]:
    for block in FENCE.findall(text):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip().removeprefix("$ ").removeprefix("sudo ")
            if line.split(" ", 1)[0] in PROGRAMS:
                yield line.split(" #", 1)[0]
    yield from INLINE.findall(FENCE.sub("", text))


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _problems(command: str) -> list[str]:
    """What in ``command`` the CLI does not know (empty when it all exists)."""
    program, *words = command.split()
    if program == "edgectl":
        words = route_release_verbs(words)  # `release list` is `releases list`, as in main
    parser = PROGRAMS[program]()
    path = [program]
    for word in words:
        if word.startswith("-") or not re.fullmatch(r"[a-z][a-z-]*", word):
            break
        choices = _subcommands(parser)
        if not choices:
            break
        if word not in choices:
            return [f"{' '.join(path)} has no subcommand {word!r} (has: {', '.join(choices)})"]
        parser = choices[word]
        path.append(word)
    known = {s for a in parser._actions for s in a.option_strings}
    return [
        f"{' '.join(path)} has no option {option}"
        for option in OPTION.findall(" ".join(w for w in words if w.lstrip("[").startswith("--")))
        if option not in known
    ]


def _all_commands() -> list[tuple[str, str]]:
    return [
        (str(doc.relative_to(ROOT)), command)
        for doc in DOCS
        for command in _commands(doc.read_text())
    ]


def test_the_docs_show_commands_at_all() -> None:
    """The extraction finds the README's quick tour (a check that cannot pass vacuously)."""
    readme = [c for doc, c in _all_commands() if doc == "README.md"]
    assert any(c.startswith("edgectl bundle build") for c in readme), readme
    assert any(c.startswith("edge-agent run") for c in readme), readme


def test_the_check_catches_a_wrong_command() -> None:
    assert _problems("edgectl rollout launch x 1.0.0") != []
    assert _problems("edgectl release m.bundle --fleet lab --no-such-option") != []
    assert _problems("edgectl rollout start m 1.0.0 --fleet lab --repo r --canary a") == []


@pytest.mark.parametrize(("doc", "command"), _all_commands())
def test_every_command_in_the_docs_exists(doc: str, command: str) -> None:
    assert _problems(command) == [], f"{doc}: {command}"


def test_the_grafana_dashboard_queries_metrics_the_code_exports() -> None:
    import json

    dashboard = json.loads((ROOT / "packaging" / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    sources = {
        "edge_agent_": (ROOT / "agent" / "serving" / "metrics.py").read_text(),
        "edgefleet_": (ROOT / "controller" / "serve" / "metrics.py").read_text(),
    }
    names = set(re.findall(r"\b(edge_agent_[a-z_]+|edgefleet_[a-z_]+)", exprs))
    assert len(names) >= 10, names
    for name in names:
        prefix = "edge_agent_" if name.startswith("edge_agent_") else "edgefleet_"
        # prometheus_client adds _total to counters and _bucket to histograms.
        base = re.sub(r"_(total|bucket)$", "", name) if prefix == "edge_agent_" else name
        assert f'"{base}"' in sources[prefix], f"{name} is not exported (looked for {base!r})"


RUN_MARKER = "# docs-test: run"
SH_FENCE = re.compile(r"^```sh\n(.*?)^```", re.S | re.M)


def _runnable_blocks(text: str) -> list[str]:
    return [b for b in SH_FENCE.findall(text) if b.lstrip().startswith(RUN_MARKER)]


def _runnable_docs() -> list[Path]:
    return [doc for doc in DOCS if _runnable_blocks(doc.read_text())]


def test_the_docs_mark_runnable_examples() -> None:
    """The marker is used, on the commands the docs promise (cannot pass vacuously)."""
    shown = " ".join(b for doc in DOCS for b in _runnable_blocks(doc.read_text()))
    for command in (
        "edgectl init",
        "edgectl bundle build model.onnx",
        "edgectl release digits",
        "edgectl release list",
        "edgectl keys list",
        "edge-agent --help",
    ):
        assert command in shown, f"no `{RUN_MARKER}` block runs {command!r}"


@pytest.mark.parametrize("doc", _runnable_docs(), ids=lambda d: str(d.relative_to(ROOT)))
def test_runnable_examples_in_the_docs_run(doc: Path, tmp_path: Path) -> None:
    from tests.helpers import make_linear_model

    make_linear_model(tmp_path / "model.onnx", seed=0)
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["HOME"] = str(tmp_path)
    for block in _runnable_blocks(doc.read_text()):
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, (
            f"{doc.relative_to(ROOT)}: this block exited {result.returncode}\n{block}\n"
            f"--- stdout\n{result.stdout[-2000:]}\n--- stderr\n{result.stderr[-2000:]}"
        )
