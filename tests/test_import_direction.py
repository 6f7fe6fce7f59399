"""The folders are the architecture, and imports run one way (issue #17, STYLE.md 11).

- The agent never imports the controller.
- Every module of ``agent/`` and ``controller/`` sits in a subsystem folder, except the
  composition roots and entry points listed in ``ROOTS``.
- A subsystem imports only the subsystems ``MAY_IMPORT`` gives it (its own modules always).
  Every import counts: at module level, inside a function, under ``TYPE_CHECKING``.
- No import cycle between modules.

``MAY_IMPORT`` is the one place the allowed arrows are written; docs/architecture.md draws
the same map. A new arrow is a design decision: add it here, and say why in the commit.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = ("agent", "controller")

_AGENT_FLOOR = {"agent.contracts", "agent.base"}
_CONTROLLER_FLOOR = {"controller.base", "agent.contracts", "agent.base"}

# subsystem -> the subsystems it may import (beside itself and the top package's __version__)
MAY_IMPORT: dict[str, set[str]] = {
    "agent.base": set(),
    "agent.contracts": {"agent.base"},
    "agent.device": _AGENT_FLOOR,
    "agent.runtime": _AGENT_FLOOR,
    "agent.oip": _AGENT_FLOOR,
    "agent.client": {"agent.oip"} | _AGENT_FLOOR,
    "agent.serving": {"agent.runtime", "agent.oip", "agent.device"} | _AGENT_FLOOR,
    "agent.update": {"agent.runtime", "agent.device"} | _AGENT_FLOOR,
    "agent.telemetry": {"agent.update", "agent.runtime", "agent.device"} | _AGENT_FLOOR,
    # One atomic write for both programs (agent.base imports nothing, so no cycle).
    "controller.base": {"agent.base"},
    "controller.build": _CONTROLLER_FLOOR,
    "controller.identity": _CONTROLLER_FLOOR,
    "controller.fleet": _CONTROLLER_FLOOR,
    "controller.repository": {
        "controller.build",
        "controller.fleet",
        "controller.identity",
    }
    | _CONTROLLER_FLOOR,
    "controller.rollout": {"controller.repository", "controller.fleet"} | _CONTROLLER_FLOOR,
    "controller.serve": {
        "controller.repository",
        "controller.fleet",
        "controller.identity",
    }
    | _CONTROLLER_FLOOR,
    "controller.gateway": _CONTROLLER_FLOOR,
    "controller.app": {
        "controller.serve",
        "controller.rollout",
        "controller.repository",
        "controller.fleet",
        "controller.identity",
    }
    | _CONTROLLER_FLOOR,
    "controller.commands": {
        "controller.app",
        "controller.serve",
        "controller.rollout",
        "controller.repository",
        "controller.fleet",
        "controller.identity",
        "controller.build",
        "controller.gateway",
    }
    | _CONTROLLER_FLOOR,
    "controller.cli": {"controller.commands"} | _CONTROLLER_FLOOR,
}

# Composition roots and entry points: they wire the subsystems together, so they may
# import anything of their own program (the demo drives real agents, so the agent's too).
ROOTS: dict[str, set[str]] = {
    "agent.app": {"agent"},
    "agent.cli": {"agent"},
    "controller.demo": {"controller", "agent"},
}


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for prog in PROGRAMS for p in sorted((ROOT / prog).rglob("*.py"))}


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The module ``name`` refers to: itself, or the longest prefix that is a module."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def _imports(module: str) -> Iterator[tuple[int, str]]:
    """(line, module of ours) for every import in ``module``, wherever it stands."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [_resolve(alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
            targets = submodules or [_resolve(base)]  # `from pkg import mod` or `from mod import x`
        else:
            continue
        yield from ((node.lineno, t) for t in targets if t is not None and t != module)


def _edges() -> dict[str, set[str]]:
    return {m: {target for _, target in _imports(m)} for m in MODULES}


def _subsystem(module: str) -> str:
    """``agent.update.journal`` -> ``agent.update``; a root or a top package is itself."""
    for root in ROOTS:
        if module == root or module.startswith(root + "."):
            return root
    parts = module.split(".")
    if len(parts) == 1:
        return module
    head = ".".join(parts[:2])
    return head if (ROOT / Path(*parts[:2]) / "__init__.py").exists() else module


def test_no_agent_module_names_the_controller() -> None:
    offenders = []
    for path in sorted((ROOT / "agent").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [
                f"{path.relative_to(ROOT)}:{node.lineno} imports {n}"
                for n in names
                if n == "controller" or n.startswith("controller.")
            ]
    assert offenders == []


def test_importing_every_agent_module_loads_no_controller_module() -> None:
    modules = sorted(m for m in MODULES if m.split(".")[0] == "agent")
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m == 'controller' or m.startswith('controller.'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""


def test_every_module_sits_in_a_subsystem_folder_or_is_a_root() -> None:
    loose = sorted(
        m
        for m in MODULES
        if m not in PROGRAMS and _subsystem(m) == m and m not in ROOTS and m not in MAY_IMPORT
    )
    assert loose == [], "modules outside a subsystem folder (move them, or name a root)"


def test_every_subsystem_is_mapped_and_its_package_says_what_it_owns() -> None:
    folders = {
        f"{prog}.{p.name}"
        for prog in PROGRAMS
        for p in (ROOT / prog).iterdir()
        if (p / "__init__.py").exists()
    }
    unmapped = sorted(folders - set(MAY_IMPORT) - set(ROOTS))
    assert unmapped == [], "a new subsystem needs its arrows in MAY_IMPORT"
    silent = sorted(f for f in folders if not ast.get_docstring(ast.parse(MODULES[f].read_text())))
    assert silent == [], "each package's __init__.py docstring says what it owns and imports"


def _offenders(imports: Iterable[tuple[str, int, str]]) -> list[str]:
    """The imports (module, line, target) that break ``MAY_IMPORT`` or ``ROOTS``."""
    offenders = []
    for module, line, target in imports:
        mine, theirs = _subsystem(module), _subsystem(target)
        if theirs == mine or target in PROGRAMS:
            continue  # its own modules; the top package (the version)
        if mine in ROOTS:
            allowed = theirs.split(".")[0] in ROOTS[mine]
        else:
            allowed = theirs in MAY_IMPORT.get(mine, set())
        if not allowed:
            offenders.append(f"{module}:{line}: {mine} -> {theirs}")
    return offenders


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles in ``edges`` (Tarjan's strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return cycles


def test_subsystems_import_only_downward() -> None:
    imports = ((m, line, target) for m in MODULES for line, target in _imports(m))
    assert _offenders(imports) == []


def test_no_import_cycle() -> None:
    assert _cycles(_edges()) == []


def test_the_checks_see_what_they_must_refuse() -> None:
    """The rules are not vacuous: each kind of violation, made up here, is caught."""
    assert _offenders([("agent.serving.routes", 1, "agent.update.journal")]) == [
        "agent.serving.routes:1: agent.serving -> agent.update"
    ]
    assert _offenders([("agent.contracts.bundle", 2, "agent.device.config")]) != []
    assert _offenders([("controller.fleet.store", 3, "controller.repository.repo")]) != []
    assert _offenders([("controller.build.builder", 4, "agent.runtime.models")]) != []
    assert _offenders([("agent.cli", 5, "controller.cli")]) != []
    assert _offenders([("controller.demo", 6, "agent.client")]) == []  # a root
    assert _offenders([("agent.serving.server", 7, "agent")]) == []  # __version__
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    edges = _edges()
    assert "agent.contracts.names" in edges["agent.contracts.bundle"]
    assert {"controller.commands.bundle", "controller.commands.fleet"} <= edges["controller.cli"]
