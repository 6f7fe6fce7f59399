"""The manifest's ``source`` key (issue 25 part 2): its rules, and older readers.

An agent that predates the key must read a manifest that has it: the key is new and
optional, so the schema string does not change and older readers ignore it. The older
reader here is ``agent/contracts/bundle.py`` exactly as it was before the key existed
(commit 5825f98), loaded from the repository's history.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from agent.base.errors import BundleError
from agent.contracts import parse_manifest
from agent.contracts.bundle import parse_source
from controller.build.builder import BuildOptions, build_bundle
from controller.build.bundle_file import read_bundle
from tests.helpers import make_linear_model

ROOT = Path(__file__).resolve().parents[3]
BEFORE_SOURCE = "5825f98"  # the last commit whose manifest had no `source`
SOURCE = {"svn_revision": "r1234", "training_run": "run-7"}  # --source entries


def old_bundle_contract() -> ModuleType:
    try:
        text = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{BEFORE_SOURCE}:agent/contracts/bundle.py"],
            capture_output=True, check=True, timeout=30,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"no Git history with commit {BEFORE_SOURCE} here (an exported tree)")
    spec = importlib.util.spec_from_loader("old_bundle_contract", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        exec(compile(text, "old agent/contracts/bundle.py", "exec"), module.__dict__)
    finally:
        del sys.modules[spec.name]
    assert not hasattr(module, "parse_source")
    return module


@pytest.mark.parametrize("bundle_format", [1, 2])
def test_an_older_agent_reads_a_manifest_with_source(tmp_path: Path, bundle_format: int) -> None:
    model = make_linear_model(tmp_path / "m.onnx", seed=1)
    options = BuildOptions(latency_runs=0, bundle_format=bundle_format, source=SOURCE)
    built = build_bundle(model, "m", "1.0.0", tmp_path / "m.bundle", options=options)
    raw = built.manifest.to_json_bytes()
    assert json.loads(raw)["source"] == SOURCE
    old = old_bundle_contract().parse_manifest(raw)
    assert (old.name, old.version, old.schema) == ("m", "1.0.0", built.manifest.schema)
    assert old.members == built.manifest.members
    assert dataclasses.replace(built.manifest, source=None).to_json_bytes() == old.to_json_bytes()
    assert read_bundle(built.path).manifest.source == SOURCE


def test_no_source_writes_no_key_and_the_key_round_trips(tmp_path: Path) -> None:
    model = make_linear_model(tmp_path / "m.onnx", seed=1)
    built = build_bundle(model, "m", "1.0.0", tmp_path / "m.bundle",
                         options=BuildOptions(latency_runs=0))  # fmt: skip
    manifest = dataclasses.replace(built.manifest, source=None)
    assert "source" not in json.loads(manifest.to_json_bytes())
    with_source = dataclasses.replace(manifest, source=SOURCE)
    assert parse_manifest(with_source.to_json_bytes()) == with_source


def test_parse_source_accepts_strings_under_ascii_keys() -> None:
    doc = {"git_remote": "git@host:org/r.git", "dataset.sha256": "ab" * 32, "note": "café ok"}
    assert parse_source(doc) == doc


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (["git_commit"], r"manifest.json source: expected an object of strings, got list"),
        ({"Git": "x"}, r"key 'Git' does not match"),
        ({"k" * 65: "x"}, r"does not match"),
        ({"run": 7}, r"source\['run'\]: expected a string, got int"),
        ({"run": None}, r"source\['run'\]: expected a string, got NoneType"),
        ({"run": {"id": "x"}}, r"expected a string, got dict"),
        ({"run": ""}, r"the value is empty"),
        ({"run": "a\x00b"}, r"the value holds control or unprintable characters"),
        ({"run": "x" * 1025}, r"the value is 1025 characters long, over 1024"),
        ({f"k{i}": "v" for i in range(65)}, r"65 keys, at most 64"),
    ],
)
def test_parse_source_refuses_naming_the_field(doc: Any, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        parse_source(doc)


def test_a_malformed_source_refuses_the_manifest(tmp_path: Path) -> None:
    model = make_linear_model(tmp_path / "m.onnx", seed=1)
    built = build_bundle(model, "m", "1.0.0", tmp_path / "m.bundle",
                         options=BuildOptions(latency_runs=0, source=SOURCE))  # fmt: skip
    doc = json.loads(built.manifest.to_json_bytes())
    doc["source"]["git_dirty"] = False  # a boolean where a string belongs
    with pytest.raises(BundleError, match=r"source\['git_dirty'\]: expected a string, got bool"):
        parse_manifest(json.dumps(doc).encode())
