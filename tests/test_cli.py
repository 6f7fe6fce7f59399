"""The command-line surface of both programs: examples in every --help, exit codes, and
shell completion generated from the argparse parsers (run through a real bash)."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import agent.cli
import controller.cli
import controller.commands.repo
from agent.base.completion import completion_script
from agent.cli import _parser as agent_parser
from controller.cli import build_parser as controller_parser
from tests.test_docs import _problems

ROOT = Path(__file__).resolve().parent.parent
PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "edgectl": controller_parser,
    "edge-agent": agent_parser,
}


def _walk(
    parser: argparse.ArgumentParser, path: str
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _walk(child, f"{path} {name}")


def _all_parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    return [pair for prog, make in PARSERS.items() for pair in _walk(make(), prog)]


def _examples(epilog: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", epilog)
    found = []
    for line in joined.splitlines():
        line = re.sub(r"^\s*(examples?:)?\s*", "", line).split(" #", 1)[0]
        for part in line.split("&&"):
            part = part.strip()
            if part.split(" ", 1)[0] in PARSERS:
                found.append(part)
    return found


@pytest.mark.parametrize(("path", "parser"), _all_parsers(), ids=lambda x: str(x))
def test_every_command_has_a_working_example(path: str, parser: argparse.ArgumentParser) -> None:
    examples = _examples(parser.epilog or "")
    assert examples, f"{path} --help shows no example"
    for example in examples:
        assert _problems(example) == [], f"{path}: {example}"


def test_the_example_check_can_fail() -> None:
    assert _examples("example:\n  edgectl rollout launch x") == ["edgectl rollout launch x"]
    assert _problems("edgectl rollout launch x") != []
    assert _examples("no example here") == []


def test_usage_errors_exit_2() -> None:
    for prog, main in (("edgectl", controller.cli.main), ("edge-agent", agent.cli.main)):
        with pytest.raises(SystemExit) as exc:
            main(["no-such-command"])
        assert exc.value.code == 2, prog


def test_usage_and_config_errors_exit_2_other_failures_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert controller.cli.main(["releases", "prune", "--repo", "r", "--grace-days", "-1"]) == 2
    assert agent.cli.main(["run", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "edge-agent: config error:" in capsys.readouterr().err
    # Not a repository (RepositoryError), an unreadable archive (AgentError): failures.
    assert controller.cli.main(["keys", "list", "--repo", str(tmp_path)]) == 1
    assert "edgectl: error: " in capsys.readouterr().err
    assert agent.cli.main(["enroll", str(tmp_path / "missing.tar")]) == 1
    assert "edge-agent: error: " in capsys.readouterr().err


def test_interrupted_exits_130(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(controller.commands.repo, "_cmd_init", interrupted)
    monkeypatch.setattr(agent.cli, "_cmd_enroll", interrupted)
    assert controller.cli.main(["init", "x"]) == 130
    assert agent.cli.main(["enroll", "x.tar"]) == 130


def test_docs_cli_md_lists_every_exit_code_and_command() -> None:
    text = (ROOT / "docs" / "cli.md").read_text()
    for code in ("0", "1", "2", "3", "130"):
        assert re.search(rf"^\| {code} \|", text, re.M), f"exit code {code} not in the table"
    for prog, make in PARSERS.items():
        top = next(a for a in make()._actions if isinstance(a, argparse._SubParsersAction))
        for name in top.choices:
            assert f"`{prog} {name}" in text, f"docs/cli.md does not mention {prog} {name}"


def _complete(script: Path, func: str, words: list[str]) -> list[str]:
    """What bash offers after ``words`` (the last one is being typed)."""
    quoted = " ".join(f"'{w}'" for w in words)
    code = (
        f"source {script}; COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; "
        f'{func}; printf "%s\\n" "${{COMPREPLY[@]}}"'
    )
    out = subprocess.run(["bash", "-c", code], capture_output=True, text=True, check=True)
    return [w for w in out.stdout.splitlines() if w]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion_is_valid_and_completes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert controller.cli.main(["completion", "bash"]) == 0
    script = tmp_path / "edgectl.bash"
    script.write_text(capsys.readouterr().out)
    subprocess.run(["bash", "-n", str(script)], check=True)

    assert _complete(script, "_edgectl", ["edgectl", "ro"]) == ["rollout"]
    assert set(_complete(script, "_edgectl", ["edgectl", ""])) >= {
        "init",
        "bundle",
        "release",
        "releases",
        "rollout",
        "keys",
        "fleet",
        "completion",
    }
    assert _complete(script, "_edgectl", ["edgectl", "-v", "rollout", "st"]) == [
        "start",
        "status",
    ]
    assert "--canary" in _complete(script, "_edgectl", ["edgectl", "rollout", "start", "--c"])
    # Option values do not derail the walk down the command tree.
    words = ["edgectl", "fleet", "status", "--repo", "./repo", "--js"]
    assert _complete(script, "_edgectl", words) == ["--json"]
    assert "timestamp" in _complete(script, "_edgectl", ["edgectl", "keys", "rotate", "t"])
    assert _complete(script, "_edgectl", ["edgectl", "completion", "z"]) == ["zsh"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_agent_completion(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert agent.cli.main(["completion", "bash"]) == 0
    script = tmp_path / "edge-agent.bash"
    script.write_text(capsys.readouterr().out)
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert _complete(script, "_edge_agent", ["edge-agent", "in"]) == ["infer"]
    assert _complete(script, "_edge_agent", ["edge-agent", "infer", "--so"]) == ["--socket"]


def test_zsh_completion_loads_through_bashcompinit(tmp_path: Path) -> None:
    script = completion_script(controller_parser(), "zsh")
    assert script.startswith("autoload -U +X bashcompinit && bashcompinit\n")
    assert "complete -o filenames -F _edgectl edgectl" in script
    if shutil.which("zsh"):
        path = tmp_path / "edgectl.zsh"
        path.write_text(script)
        subprocess.run(["zsh", "-n", str(path)], check=True)
    with pytest.raises(ValueError, match="fish"):
        completion_script(controller_parser(), "fish")


def _json_out(capsys: pytest.CaptureFixture[str], argv: list[str]) -> object:
    code = controller.cli.main(argv)
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)  # the whole of stdout is one JSON document


def test_data_commands_print_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """bundle build, release, keys list, device add and rollout start: real runs, --json."""
    from tests.helpers import make_linear_model

    repo = str(tmp_path / "repo")
    assert controller.cli.main(["init", repo]) == 0
    capsys.readouterr()
    model = make_linear_model(tmp_path / "m.onnx", seed=1)
    bundles = []
    for version in ("1.0.0", "1.1.0"):
        bundle = tmp_path / f"m-{version}.bundle"
        built = _json_out(
            capsys,
            [
                "bundle",
                "build",
                str(model),
                "--name",
                "m",
                "--version",
                version,
                "-o",
                str(bundle),
                "--latency-runs",
                "0",
                "--json",
            ],
        )
        assert isinstance(built, dict)
        assert (built["name"], built["version"], built["path"]) == ("m", version, str(bundle))
        assert built["length"] == bundle.stat().st_size and len(built["sha256"]) == 64
        bundles.append(bundle)

    released = _json_out(
        capsys, ["release", str(bundles[0]), "--fleet", "lab", "--repo", repo, "--json"]
    )
    assert isinstance(released, dict)
    assert (released["version"], released["fleet_changed"]) == ("1.0.0", True)

    rollout = _json_out(
        capsys,
        [
            "rollout",
            "start",
            "m",
            "1.1.0",
            "--fleet",
            "lab",
            "--repo",
            repo,
            "--bundle",
            str(bundles[1]),
            "--json",
        ],
    )
    assert isinstance(rollout, dict) and rollout["version"] == "1.1.0"

    keys = _json_out(capsys, ["keys", "list", "--repo", repo, "--json"])
    assert isinstance(keys, list)
    assert {k["role"] for k in keys} >= {"root", "targets", "snapshot", "timestamp"}
    assert all(key["here"] for row in keys for key in row["keys"])

    archive = tmp_path / "cam-7.tar"
    added = _json_out(
        capsys,
        [
            "device",
            "add",
            "cam-7",
            "--fleet",
            "lab",
            "--repo",
            repo,
            "-o",
            str(archive),
            "--repository-url",
            "https://u.example/",
            "--broker",
            "mq.example:8883",
            "--json",
        ],
    )
    assert isinstance(added, dict)
    assert (added["device_id"], added["fleet"], added["archive"]) == ("cam-7", "lab", str(archive))
    assert int(added["serial"]) > 0
