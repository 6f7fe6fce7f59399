"""What ``edge-agent`` imports before it serves (issue 21, part 4: the agent's footprint).

The ``run`` path imports what serving the restored models needs, nothing more: python-tuf's
client, httpx, the fetchers and TLS come with the first update check (after the socket
listens), ONNX Runtime and numpy with the first model loaded, the infer path (request
parsing, response encoding, repeats, orjson, simdjson) with the first infer request, and
the inference client and the controller never. The other commands (``enroll``,
``request``, ``infer``, ``completion``) do not pay for numpy or asyncio's serving stack
either. Each check runs a new interpreter
and reads its ``sys.modules``; bench/agent_footprint.py measures what these cost.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Never imported before the agent serves what it restored (the run path).
NOT_AT_START = (
    "onnx",  # the agent needs ONNX Runtime only, never the onnx package
    "onnxruntime",  # with the first model loaded
    "numpy",  # with the first model loaded: an agent without one never imports it
    "orjson",  # JSON tensors: the first infer request (agent.oip.tensors)
    "simdjson",
    "agent.oip.request",  # the infer path: the first infer request for a served model
    "agent.oip.response",
    "agent.oip.tensors",
    "agent.serving.repeat",
    "agent.runtime.loading",  # the first model loaded
    "httpx",  # the HTTP fetcher: the first update check
    "rich",  # pulled in by httpx where installed
    "tuf.ngclient",  # python-tuf's client: the first update check
    "cryptography",  # TLS identity: a broker over TLS, or enroll/request
    "agent.update.fetcher",
    "agent.update.mqtt_fetcher",
    "agent.update.tuf_client",
    "agent.device.tls_identity",
    "agent.device.enroll",
    "agent.client",
    "controller",
)


def _modules(tmp_path: Path, code: str) -> set[str]:
    """The top-level and dotted names in ``sys.modules`` after ``code`` runs in a new
    interpreter on this tree (only this tree's ``agent`` on the path first)."""
    script = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return [n for n in names if n in modules or any(m.startswith(n + ".") for m in modules)]


def test_the_run_path_imports_nothing_it_does_not_need_to_serve(tmp_path: Path) -> None:
    modules = _modules(tmp_path, "import agent.cli, agent.app")
    assert _loaded(modules, NOT_AT_START) == []


def test_an_agent_built_from_its_config_has_imported_no_update_client_yet(
    tmp_path: Path,
) -> None:
    """Building the app (``AgentApp``, as ``edge-agent run`` does before it restores)
    makes no fetcher and no session: those come with the first check and model."""
    (tmp_path / "root.json").write_text("{}")
    config = tmp_path / "agent.toml"
    config.write_text(
        'device_id = "dev-1"\nfleet = "f"\n'
        f'state_dir = "{tmp_path / "state"}"\ntrusted_root = "{tmp_path / "root.json"}"\n'
        '[mqtt]\nhost = "127.0.0.1"\nport = 1\n'
        '[repository]\nurl = "http://127.0.0.1:1"\n'
        f'[inference]\nsocket_path = "{tmp_path / "infer.sock"}"\n'
    )
    code = (
        "from agent.app import AgentApp\n"
        "from pathlib import Path\nfrom agent.device.config import load_config\n"
        f"app = AgentApp(load_config(Path({str(config)!r})))\n"
        "app.outbox.close()\n"
    )
    modules = _modules(tmp_path, code)
    assert "agent.app" in modules
    assert _loaded(modules, NOT_AT_START) == []


def test_the_other_commands_import_neither_numpy_nor_the_agent_runtime(tmp_path: Path) -> None:
    modules = _modules(tmp_path, "import agent.cli")
    assert _loaded(modules, ("agent.app", "agent.runtime", "agent.serving")) == []
    assert _loaded(modules, NOT_AT_START) == []


# What an idle agent without a model imports after it started: the update check, its
# fetchers, telemetry, the serving stack's routes. None of it may bring numpy in.
IDLE_LATER = (
    "agent.update.updater",
    "agent.update.tuf_client",
    "agent.update.fetcher",
    "agent.update.mqtt_fetcher",
    "agent.update.lifecycle",
    "agent.update.unpack",
    "agent.telemetry.reporter",
    "agent.telemetry.mqtt",
    "agent.serving.server",
    "agent.serving.routes",
    "agent.serving.triton",
    "agent.oip.shm",
    "agent.runtime.stats",
)


def test_an_idle_agent_without_a_model_never_imports_numpy(tmp_path: Path) -> None:
    """numpy (~12 MiB resident) comes with the first model loaded and nothing else: the
    modules an idle agent uses after start (its update checks, heartbeats, the routes that
    answer 404 for a model it does not have) import neither numpy nor the infer path."""
    modules = _modules(tmp_path, "import " + ", ".join(("agent.cli", "agent.app", *IDLE_LATER)))
    assert _loaded(modules, ("numpy", "onnxruntime", "orjson", "simdjson")) == []
    assert _loaded(modules, ("agent.oip.request", "agent.runtime.loading")) == []
