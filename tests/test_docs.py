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

The operator's path of docs/operations.md runs too (issue 20, "Proof"): blocks marked
``# docs-test: operator STEP`` add a device, write the broker's config and start a real
mosquitto with it, start ``edgectl serve``, start a rollout with a canary, enroll the
device into a temporary ``--config-dir``, run the agent from there and ask it, show the
views, revoke the device. ``test_the_operator_path_of_the_docs_runs`` walks them in
``OPERATOR_STEPS`` order on 127.0.0.1 (the comment above ``OPERATOR_MARKER`` says how) and
checks, at each point, the items of issue 20 that point shows (``ITEM_CHECKS``).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
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
        "edgefleet_": (ROOT / "controller" / "serve" / "metrics.py").read_text()
        + (ROOT / "controller" / "rollout" / "metrics.py").read_text(),
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


# The operator's path through docs/operations.md, run for real (issue 20, "Proof").
#
# A block marked ``# docs-test: operator STEP`` is one step of the path. The test runs
# the document's ``# docs-test: run`` blocks first (init, build, release), then the steps
# in the order below, all in one temporary folder (also ``HOME``), on 127.0.0.1:
#
# - the example names and ports become this machine's (``OperatorWalk.substitutions``;
#   each must be used, so a doc that drops one fails here instead of running something
#   else);
# - a command that runs until stopped (``mosquitto``, ``edgectl serve``, ``edge-agent
#   run``) is started in the background, as an operator starts it in another terminal
#   or under systemd, and the next line runs once it is ready; the test stops them all
#   at the end, also on failure;
# - ``chown``/``chgrp`` lines are skipped: they hand files to the system users the
#   packages create (``mosquitto``, ``edgectl``), which this machine may not have;
# - between steps the test does what an operator waits for or is told in a comment
#   (``reload-broker``: the SIGHUP after a revocation) and checks each item of issue 20
#   that this point of the path shows (``ITEM_CHECKS``; ``ITEM_PENDING`` holds the items
#   whose behaviour is not on this branch yet, with what their check is to assert).
OPERATOR_MARKER = "# docs-test: operator"
OPERATOR_DOC = ROOT / "docs" / "operations.md"
OPERATOR_STEPS = (
    "device-add",
    "broker",
    "serve",
    "rollout",
    "enroll",
    "run",
    "views",
    "revoke",
    "reload-broker",
)
TEST_ACTIONS = {"reload-broker"}  # steps the test does itself, as the doc tells the operator
SKIPPED_COMMANDS = ("chown ", "chgrp ")
WALK_MODEL, WALK_DEVICE, WALK_FLEET = "digits", "cam-0042", "north"


def _operator_blocks(text: str) -> dict[str, str]:
    """Step name -> the block marked ``# docs-test: operator STEP``."""
    blocks: dict[str, str] = {}
    for block in SH_FENCE.findall(text):
        first = block.lstrip().split("\n", 1)[0]
        if first.startswith(OPERATOR_MARKER):
            step = first.removeprefix(OPERATOR_MARKER).split()[0]
            assert step not in blocks, f"two blocks are step {step!r}"
            blocks[step] = block
    return blocks


def _logical_lines(block: str) -> list[str]:
    return [line for line in re.sub(r"\\\n\s*", " ", block).splitlines() if line.strip()]


class OperatorWalk:
    """The folder, the environment, the processes and what each step printed."""

    def __init__(self, home: Path) -> None:
        from tests.helpers import free_port

        self.home = home
        self.broker_port = free_port()
        self.http_port = free_port()
        self.env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env['PATH']}"
        self.env["HOME"] = str(home)
        # The agent's heartbeat every second instead of 10 (the environment overrides
        # agent.toml, docs/configuration.md), so the rollout's stage sees it at once.
        self.env["EDGE_AGENT_TELEMETRY_HEARTBEAT_INTERVAL_S"] = "1"
        # Reconnect within 2 s, not 30: a takeover (item 7) waits reconnect_max_s.
        self.env["EDGE_AGENT_MQTT_RECONNECT_MAX_S"] = "2"
        self.stdout: dict[str, str] = {}
        self.processes: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        self.used: dict[str, int] = {}
        self.skipped: list[str] = []

    def substitutions(self) -> dict[str, str]:
        """Example values in the docs -> this machine's (regular expressions)."""
        return {
            r"https://updates\.example\.net/": f"http://127.0.0.1:{self.http_port}/",
            r"0\.0\.0\.0:8080": f"127.0.0.1:{self.http_port}",
            r"broker\.example\.net": "localhost",
            r"\b8883\b": str(self.broker_port),
            r"\b192\.0\.2\.10\b": "127.0.0.1",
            r"/etc/mosquitto/edgefleet": str(self.home / "mosquitto"),
            r"--wait 10m": "--wait 2s",  # an operator watches a stage for minutes
        }

    def substitute(self, block: str) -> str:
        for pattern, value in self.substitutions().items():
            block, count = re.subn(pattern, value, block)
            self.used[pattern] = self.used.get(pattern, 0) + count
        return block

    def sh(self, step: str, script: str) -> None:
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=self.home,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, (
            f"step {step}: exited {result.returncode}\n{script}\n"
            f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
        )
        self.stdout[step] = self.stdout.get(step, "") + result.stdout

    def cli(
        self, *words: str | Path, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """One command run as the operator would (not from the docs: a check's mistake)."""
        return subprocess.run(
            [str(w) for w in words],
            cwd=self.home,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=60,
        )

    def run_block(self, step: str, block: str) -> None:
        segment: list[str] = []
        for line in _logical_lines(self.substitute(block)):
            command = line.strip()
            if command.startswith(SKIPPED_COMMANDS):
                self.skipped.append(command)
            elif command.startswith(("mosquitto ", "edgectl serve ", "edge-agent run ")):
                if segment:
                    self.sh(step, "\n".join(segment))
                    segment = []
                self.start(command)
            else:
                segment.append(line)
        if segment:
            self.sh(step, "\n".join(segment))

    def start(self, command: str) -> None:
        """Start a command that runs until stopped; return once it is ready."""
        import shlex

        from tests.e2e_support import wait_until
        from tests.helpers import wait_for_port
        from tests.test_broker_acl import _start_mosquitto

        words = shlex.split(command, comments=True)
        name = words[0] if words[0] == "mosquitto" else f"{words[0]} {words[1]}"
        log = self.home / "logs" / f"{words[0]}.log"
        log.parent.mkdir(exist_ok=True)
        if name == "mosquitto":
            conf = self.home / words[words.index("-c") + 1]
            process = _start_mosquitto(conf, log)
            self.processes[name] = (process, log)
            wait_for_port(self.broker_port)
            return
        with open(log, "wb") as out:
            process = subprocess.Popen(
                ["bash", "-c", f"exec {command}"],
                cwd=self.home,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.processes[name] = (process, log)

        if name == "edgectl serve":
            what, timeout_s = "to listen", 30.0

            def ready() -> object:
                return "listening on" in log.read_text()

        else:  # edge-agent run: ready once it serves what its fleet's rollout names
            from agent.client import InferenceClient
            from agent.device.config import load_config
            from tests.e2e_support import served_version

            config = Path(words[words.index("--config") + 1].replace("~", str(self.home), 1))
            socket_path = load_config(config).inference.socket_path
            what, timeout_s = f"to serve {WALK_MODEL}", 40.0

            def ready() -> object:
                with InferenceClient(socket_path, timeout_s=5) as client:
                    return served_version(client, WALK_MODEL)

        wait_until(lambda: process.poll() is not None or ready(), timeout_s, f"{name} {what}")
        if process.poll() is not None:
            raise AssertionError(f"{name} exited {process.returncode}:\n{log.read_text()[-3000:]}")

    def stop(self, name: str) -> str:
        """Stop a started command (SIGTERM, as systemd does); its log."""
        from tests.helpers import stop_process

        process, log = self.processes.pop(name)
        stop_process(process)
        return log.read_text(errors="replace")

    def stop_all(self) -> None:
        for name in reversed(list(self.processes)):
            self.stop(name)


# Checks: (the step after which it runs, the issue 20 item it proves or None for the path
# itself, the check).
WalkCheck = Callable[[OperatorWalk], None]
ITEM_CHECKS: list[tuple[str, int | None, WalkCheck]] = []


def _check(after: str, item: int | None) -> Callable[[WalkCheck], WalkCheck]:
    def register(check: WalkCheck) -> WalkCheck:
        ITEM_CHECKS.append((after, item, check))
        return check

    return register


# Items whose behaviour is being built elsewhere: what their check asserts once merged.
ITEM_PENDING = {}


@_check("broker", 9)
def _broker_listens_on_the_bind_address_only(walk: OperatorWalk) -> None:
    conf = (walk.home / "mosquitto" / "mosquitto.conf").read_text()
    assert f"listener {walk.broker_port} 127.0.0.1\n" in conf, conf
    block = _operator_blocks(OPERATOR_DOC.read_text())["broker"]
    assert "--bind" in block and "--port" in block, block
    for line in block.splitlines():
        if line.startswith("chgrp mosquitto"):
            assert line.endswith("/broker.key"), f"the broker's group gets more: {line}"
    assert (walk.home / "mosquitto" / "controller.key").stat().st_mode & 0o077 == 0


@_check("rollout", 1)
def _rollout_start_prints_the_full_gate_set(walk: OperatorWalk) -> None:
    first = walk.stdout["rollout"].splitlines()[0]
    for gate in ("error_rate<", "p99_ratio<", "failed_installs<", "min_devices=1"):
        assert gate in first, first


@_check("run", None)
def _the_agent_answered(walk: OperatorWalk) -> None:
    import json

    answers = [line for line in walk.stdout["run"].splitlines() if line.startswith("{")]
    assert set(json.loads(answers[-1])) == {"y"}, walk.stdout["run"]


@_check("run", 8)
def _the_enrolled_agent_runs_from_its_config_dir(walk: OperatorWalk) -> None:
    folder = walk.home / "edge-agent"
    assert (folder / "infer.sock").is_socket()
    assert any((folder / "state" / "models").iterdir()), "no model in the chosen state dir"


@_check("run", 13)
def _infer_on_a_wrong_socket_names_it(walk: OperatorWalk) -> None:
    wrong = walk.home / "no-agent.sock"
    out = walk.cli("edge-agent", "infer", "--socket", wrong, WALK_MODEL, "--input", "request.json")
    assert out.returncode != 0
    assert str(wrong) in out.stderr and "--socket" in out.stderr, out.stderr


@_check("run", 4)
def _config_mistakes_name_the_file_and_the_key(walk: OperatorWalk) -> None:
    config = walk.home / "edge-agent" / "agent.toml"
    typo = walk.home / "typo" / "agent.toml"
    typo.parent.mkdir()
    typo.write_text(re.sub(r"(?m)^port = \d+$", "port = 188830", config.read_text()))
    out = walk.cli("edge-agent", "run", "--config", typo)
    assert out.returncode == 2 and str(typo) in out.stderr, out.stderr
    assert "mqtt.port" in out.stderr and "188830" in out.stderr, out.stderr
    out = walk.cli("edge-agent", "run", "--config", config, env={"EDGE_AGENT_MQTT_PROT": "1"})
    assert out.returncode == 2, out.stderr
    assert "EDGE_AGENT_MQTT_PROT" in out.stderr and "EDGE_AGENT_MQTT_PORT" in out.stderr
    toml = walk.home / "controller.toml"
    outside = walk.home / "typo" / "controller.toml"
    text = toml.read_text()
    outside.write_text("mqtt_tls = true\n" + text.replace("mqtt_tls = true\n", ""))
    out = walk.cli("edgectl", "fleet", "status", "--repo", "repo", "--config", outside)
    assert out.returncode == 2 and str(outside) in out.stderr, out.stderr
    assert "mqtt_tls" in out.stderr and "[serve]" in out.stderr, out.stderr


@_check("run", 10)
def _serve_runs_the_rollout_to_its_end(walk: OperatorWalk) -> None:
    """No `rollout promote` on the path: `edgectl serve`'s job passes both stages."""
    import json

    from tests.e2e_support import wait_until

    assert not any(
        "rollout promote" in b for b in _operator_blocks(OPERATOR_DOC.read_text()).values()
    )

    def state() -> object:
        out = walk.cli(
            "edgectl", "rollout", "status", "--repo", "repo", "--fleet", WALK_FLEET, "--json"
        )
        return json.loads(out.stdout)[0]["state"] == "completed"

    wait_until(state, 40, "edgectl serve to complete the rollout")


@_check("views", None)
def _the_views_show_the_device_and_the_release(walk: OperatorWalk) -> None:
    shown = walk.stdout["views"]
    assert "completed" in shown.lower(), shown
    for text in (WALK_DEVICE, WALK_FLEET, "online", "1.0.0"):
        assert text in shown, f"{text!r} not in\n{shown}"


@_check("device-add", 12)
def _a_build_shows_its_progress_on_stderr(walk: OperatorWalk) -> None:
    """Item 12: the build the docs show, again: plain progress lines per phase and per
    candidate on stderr (not a terminal), none of ONNX Runtime's chatter, and with
    --json nothing but the JSON document."""
    import json

    build = ("edgectl", "bundle", "build", "model.onnx", "--name", WALK_MODEL, "--version")
    out = walk.cli(*build, "9.0.0", "-o", "progress.bundle")
    assert out.returncode == 0, out.stderr
    for phase in ("checking the model", "quantizing candidate 1/2", "quantizing candidate 2/2",
                  "evaluating", "writing the bundle"):  # fmt: skip
        assert f"bundle build: {phase}" in out.stderr, out.stderr
    assert "bundle build:" not in out.stdout
    for chatter in ("Collecting tensor data", "Number of tensors"):
        assert chatter not in out.stdout + out.stderr
    out = walk.cli(*build, "9.0.1", "-o", "progress-json.bundle", "--json")
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert json.loads(out.stdout)["recipe"] == "none"


@_check("views", 6)
def _an_unknown_fleet_names_the_known_ones(walk: OperatorWalk) -> None:
    out = walk.cli("edgectl", "fleet", "status", "--repo", "repo", "--fleet", "nort")
    assert out.returncode == 1 and "nort" in out.stderr and WALK_FLEET in out.stderr, out.stderr


@_check("views", 11)
def _no_small_wrongs_in_the_views(walk: OperatorWalk) -> None:
    """Item 11: the default build says it is the default; on this tiny model it keeps the
    original (dynamic-matmul would make it bigger) and says so; `releases list` shows
    agreement as a percentage; `device show` says "enrolled" once. (Library chatter at
    WARNING and a clean stop: the end of the walk.)"""
    built = "".join(v for k, v in walk.stdout.items() if k.startswith("run:"))
    assert "digits 1.0.0" in built and "asked for with --quantize" not in built, built
    assert "the default (no --quantize given) kept the original model" in built, built
    assert "dynamic-matmul made it bigger" in built, built
    listed = walk.cli("edgectl", "releases", "list", "--repo", "repo").stdout
    (row,) = (line for line in listed.splitlines() if line.startswith(WALK_MODEL))
    assert "100.00%" in row, listed
    assert "enrolled, enrolled" not in walk.stdout["views"]


@_check("views", 5)
def _a_waiting_device_says_why(walk: OperatorWalk) -> None:
    """Item 5: the device has just installed 1.0.0 and is on its probation (60 s by
    default) when the operator starts the next version: `rollout status` and `fleet
    status` say the device waits for that probation, not just "0 reporting"."""
    from tests.e2e_support import wait_until
    from tests.helpers import make_linear_model

    make_linear_model(walk.home / "model-1.1.0.onnx", seed=7)
    for words in (
        ("bundle", "build", "model-1.1.0.onnx", "--name", WALK_MODEL, "--version", "1.1.0",
         "-o", "digits-1.1.0.bundle"),
        ("rollout", "start", WALK_MODEL, "1.1.0", "--fleet", WALK_FLEET, "--repo", "repo",
         "--bundle", "digits-1.1.0.bundle", "--stages", "100", "--gate", "min_devices=1"),
    ):  # fmt: skip
        out = walk.cli("edgectl", *words)
        assert out.returncode == 0, out.stderr

    def says_why() -> str | None:
        out = walk.cli("edgectl", "rollout", "status", "--repo", "repo", "--fleet", WALK_FLEET)
        return out.stdout if f"{WALK_DEVICE} waits: probation for 1.1.0" in out.stdout else None

    status = wait_until(says_why, 40, "rollout status to say why the device waits")
    assert "waits until probation of 1.0.0 ends" in status, status
    fleet = walk.cli("edgectl", "fleet", "status", "--repo", "repo", "--fleet", WALK_FLEET)
    assert f"{WALK_FLEET}/{WALK_DEVICE} {WALK_MODEL}: probation for 1.1.0" in fleet.stdout, fleet


def _start_a_copy(walk: OperatorWalk, name: str, extra_env: dict[str, str]) -> Path:
    """The enrolled config folder copied (its state and socket left behind, as when
    agent.toml and the certificate are copied to another machine), and `edge-agent run`
    started on it in the background; the copy's agent.toml."""
    import shutil

    copy = walk.home / name
    shutil.copytree(
        walk.home / "edge-agent", copy, ignore=shutil.ignore_patterns("state", "infer.sock")
    )
    log = walk.home / "logs" / f"{name}.log"
    config = copy / "agent.toml"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            ["edge-agent", "run", "--config", str(config)],
            cwd=walk.home,
            env={**walk.env, **extra_env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    walk.processes[name] = (process, log)
    return config


def _agent_status(walk: OperatorWalk, config: Path) -> dict[str, object] | None:
    import json

    out = walk.cli("edge-agent", "status", "--config", config, "--json")
    return json.loads(out.stdout) if out.returncode == 0 else None


@_check("run", 3)
def _the_agent_shows_its_broker_connection(walk: OperatorWalk) -> None:
    """Item 3, the good case: `edge-agent status` says the agent is connected and where."""
    shown = walk.stdout["run"]
    assert f"broker localhost:{walk.broker_port}" in shown, shown
    assert "connected since" in shown and "NOT connected" not in shown, shown


@_check("views", 7)
def _a_copied_config_is_told_plainly(walk: OperatorWalk) -> None:
    """Item 7: a second agent on a copy of ~/edge-agent (same identity, its own state)
    fights the first for the client id: the agents say so at ERROR and count it in their
    status, and `edgectl fleet status` flags the device once their event streams cross."""
    from tests.e2e_support import wait_until

    config = _start_a_copy(walk, "edge-agent-copy", {})
    logs = [walk.processes["edge-agent run"][1], walk.processes["edge-agent-copy"][1]]
    try:

        def told() -> bool:
            return any(
                "ERROR" in line and "its session over" in line
                for log in logs
                for line in log.read_text(errors="replace").splitlines()
            )

        wait_until(told, 90, "an agent to say another client takes its session over")

        def counted() -> bool:
            statuses = [_agent_status(walk, c) for c in (walk.home / "edge-agent" / "agent.toml",
                                                         config)]  # fmt: skip
            return any(s and (s.get("broker") or {}).get("takeovers") for s in statuses)

        wait_until(counted, 30, "an agent's status to count the takeover")

        def flagged() -> bool:
            table = walk.cli("edgectl", "fleet", "status", "--repo", "repo").stdout
            return "[identity conflict?]" in table

        wait_until(flagged, 120, "fleet status to flag the device's identity conflict")
    finally:
        walk.stop("edge-agent-copy")


@_check("revoke", 2)
def _serve_drops_what_a_revoked_device_sends(walk: OperatorWalk) -> None:
    """Before the broker reloads, the device is still connected: `serve` refuses it."""
    import urllib.request

    from tests.e2e_support import wait_until

    def refused() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{walk.http_port}/metrics") as page:
            text = page.read().decode()
        match = re.search(r'edgefleet_ingest_refused_total\{reason="revoked"\} (\S+)', text)
        return match is not None and float(match.group(1)) > 0

    wait_until(refused, 20, "serve to refuse the revoked device's heartbeats")


@_check("reload-broker", 2)
def _after_the_reload_the_broker_refuses_the_live_connection(walk: OperatorWalk) -> None:
    """The broker's half of a revocation (docs/operations.md, "Broker identity": what a
    revocation does, and when): after the SIGHUP its ACL refuses what the still-connected
    device publishes, and the controller stops hearing from it."""
    import json

    from tests.e2e_support import wait_until

    log = walk.processes["mosquitto"][1]
    denied = f"Denied PUBLISH from edge-agent-{WALK_DEVICE} "

    def refused() -> bool:
        text = log.read_text(errors="replace")
        return "Reloading config." in text and denied in text.rsplit("Reloading config.", 1)[1]

    wait_until(refused, 20, "mosquitto to refuse the revoked device's publishes")

    def gone() -> bool:
        out = walk.cli("edgectl", "fleet", "status", "--repo", "repo", "--json")
        (device,) = (d for d in json.loads(out.stdout) if d["device"] == WALK_DEVICE)
        return device["health"] != "online"

    wait_until(gone, 30, "the revoked device to stop reaching the controller")
    # `fleet status` marks the device revoked, in its table and in its JSON.
    table = walk.cli("edgectl", "fleet", "status", "--repo", "repo").stdout
    line = next(row for row in table.splitlines() if row.startswith(f"{WALK_FLEET} "))
    assert WALK_DEVICE in line and "[revoked]" in line and "1 revoked" in table, table
    out = walk.cli("edgectl", "fleet", "status", "--repo", "repo", "--json")
    (device,) = (d for d in json.loads(out.stdout) if d["device"] == WALK_DEVICE)
    assert device["revoked"] is True, device


@_check("reload-broker", 3)
def _a_refused_connection_is_logged_with_its_cause(walk: OperatorWalk) -> None:
    """Item 3: after the revocation, an agent that connects with the revoked device's
    certificate is refused: its log names the cause (once, not per attempt) and
    `edge-agent status` shows it."""
    from tests.e2e_support import wait_until

    config = _start_a_copy(walk, "edge-agent-revoked", {})
    try:

        def refused() -> dict[str, object] | None:
            status = _agent_status(walk, config)
            broker = status.get("broker") if status else None
            return broker if isinstance(broker, dict) and broker.get("failed_attempts") else None

        broker = wait_until(refused, 60, "the revoked copy's status to show a failed attempt")
        wait_until(
            lambda: (
                (_agent_status(walk, config) or {}).get("broker", {}).get("failed_attempts", 0) >= 3
            ),
            60,
            "three failed attempts",
        )
        assert broker["connected"] is False, broker
        shown = walk.cli("edge-agent", "status", "--config", config).stdout
        assert "NOT connected" in shown and "last failed attempt" in shown, shown
    finally:
        log = walk.stop("edge-agent-revoked")
    causes = [line for line in log.splitlines() if "cannot connect to the broker" in line]
    assert causes and "WARNING" in causes[0], log[-3000:]
    # Rate-limited: the cause once, then at most one "still cannot connect" line a minute
    # (a loaded machine can take over a minute to see three attempts: one repeat is fair).
    assert "still cannot connect" not in causes[0], causes
    assert all("still cannot connect" in line for line in causes[1:]), causes
    said_at = [datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f") for line in causes]
    assert all(b - a >= timedelta(seconds=59) for a, b in itertools.pairwise(said_at)), causes
    assert f"localhost:{walk.broker_port}" in causes[0], causes[0]


def _reload_broker(walk: OperatorWalk) -> None:
    import signal

    os.kill(walk.processes["mosquitto"][0].pid, signal.SIGHUP)


def test_every_item_of_issue_20_has_a_check_or_a_pending_hook() -> None:
    checked = {item for _, item, _ in ITEM_CHECKS if item is not None}
    assert checked | set(ITEM_PENDING) == set(range(1, 14)), sorted(checked | set(ITEM_PENDING))
    assert not checked & set(ITEM_PENDING), "an item is both checked and pending"
    assert {after for after, _, _ in ITEM_CHECKS} <= set(OPERATOR_STEPS)


def test_the_docs_mark_the_operator_path() -> None:
    blocks = _operator_blocks(OPERATOR_DOC.read_text())
    assert set(blocks) == set(OPERATOR_STEPS) - TEST_ACTIONS, sorted(blocks)
    for doc in DOCS:
        if doc != OPERATOR_DOC:
            assert not _operator_blocks(doc.read_text()), (
                f"{doc}: operator steps are in {OPERATOR_DOC}"
            )


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_the_operator_path_of_the_docs_runs(tmp_path: Path) -> None:
    from tests.helpers import make_linear_model

    text = OPERATOR_DOC.read_text()
    blocks = _operator_blocks(text)
    make_linear_model(tmp_path / "model.onnx", seed=0)
    (tmp_path / "request.json").write_text('{"x": [[0.1, 0.2, 0.3, 0.4]]}')
    walk = OperatorWalk(tmp_path)
    try:
        for number, block in enumerate(_runnable_blocks(text)):
            walk.run_block(f"run:{number}", block)
        for step in OPERATOR_STEPS:
            if step == "reload-broker":
                _reload_broker(walk)
            else:
                walk.run_block(step, blocks[step])
            for after, _, check in ITEM_CHECKS:
                if after == step:
                    check(walk)
        assert all(walk.used.values()), f"substitutions no block used: {walk.used}"
        assert walk.skipped and all(c.startswith(SKIPPED_COMMANDS) for c in walk.skipped)
        walk.stop("edge-agent run")
        serve_log = walk.stop("edgectl serve")
        # Item 11: a clean stop is no lost connection; library chatter stays out.
        assert "lost the broker" not in serve_log, serve_log[-3000:]
        assert "apscheduler" not in serve_log.lower(), serve_log[-3000:]
    finally:
        walk.stop_all()
