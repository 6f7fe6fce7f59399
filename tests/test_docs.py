"""Every `edgectl` / `edge-agent` command shown in README.md and docs/*.md exists.

Commands are taken from fenced code blocks (a line that starts with the program, after an
optional ``$ ``, with ``\\`` continuations joined) and from inline code spans that start
with the program. Each is walked through the real argparse parsers
(``controller.cli.build_parser``, ``agent.cli._parser``): every subcommand must exist and
every ``--option`` must be one the (sub)command accepts. A renamed command or option
breaks this test until the docs follow.
"""

from __future__ import annotations

import argparse
import re
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
        "edge_agent_": (ROOT / "agent" / "metrics.py").read_text(),
        "edgefleet_": (ROOT / "controller" / "fleet.py").read_text(),
    }
    names = set(re.findall(r"\b(edge_agent_[a-z_]+|edgefleet_[a-z_]+)", exprs))
    assert len(names) >= 10, names
    for name in names:
        prefix = "edge_agent_" if name.startswith("edge_agent_") else "edgefleet_"
        # prometheus_client adds _total to counters and _bucket to histograms.
        base = re.sub(r"_(total|bucket)$", "", name) if prefix == "edge_agent_" else name
        assert f'"{base}"' in sources[prefix], f"{name} is not exported (looked for {base!r})"
