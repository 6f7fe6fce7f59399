"""Upgrading the agent keeps what it serves (issue #18, defect 10), with real processes.

- A state folder an older agent left (its install record in an older schema, as that
  agent wrote it) is served by the new agent at once, the same version from the same
  files, without a reinstall, and its record is migrated.
- A journal written by a newer agent makes `edge-agent run` exit 2, naming the file and
  both schemas, before it writes or serves anything.

The .deb upgrade itself (the previous release's package, then this one) belongs in the
systemd-nspawn system test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.client import InferenceClient
from agent.contracts import ProbationPolicy, ShadowPolicy
from agent.update.journal import JOURNAL_SCHEMA, JOURNAL_SCHEMA_1, Phase, parse_record
from controller.build.builder import build_bundle
from controller.repository.release import release_bundle
from controller.repository.repo import init_repository
from tests.agent.update._old_records import V1_WRITTEN_BY_3C52CD2
from tests.e2e_support import (
    bundle_output,
    served_version,
    start_agent,
    start_serve,
    wait_until,
    write_agent_config,
)
from tests.helpers import Broker, free_port, make_linear_model

FLEET = "lab"
MODEL = "linear"
X = np.array([[0.5, -1.0, 2.0, 0.25]], dtype=np.float32)
QUICK = ProbationPolicy(duration_s=0.5, min_requests=0)
NO_SHADOW = ShadowPolicy(enabled=False)  # (tests/test_shadow_e2e.py judges shadows)
# ``<model>/active.json`` as the agent before the journal wrote it (e3fac1e:
# ``json.dumps({"version": ..., "previous": ...})``), for a first install.
ACTIVE_JSON_FIRST_INSTALL = b'{"version": "1.0.0", "previous": null}'


@pytest.mark.slow
def test_an_agent_serves_what_an_agent_before_the_journal_recorded_without_reinstalling(
    tmp_path: Path, broker: Broker
) -> None:
    repo = tmp_path / "repo"
    init_repository(repo)
    bundle = build_bundle(make_linear_model(tmp_path / "m.onnx", seed=3), MODEL, "1.0.0",
                          tmp_path / "1.0.0.bundle").path  # fmt: skip
    release_bundle(bundle, FLEET, repo, probation=QUICK, shadow=NO_SHADOW)
    serve, url = start_serve(repo, broker.address, tmp_path / "serve.log")
    device = tmp_path / "device"
    config = write_agent_config(device, device="dev-1", fleet=FLEET, broker=broker.address,
                                repo_url=url, root=repo / "metadata" / "root.json")  # fmt: skip
    models = device / "state" / "models" / MODEL
    client = InferenceClient(device / "infer.sock")
    agent = start_agent(config, log_name="agent-old.log")
    try:
        # The device installs 1.0.0 for real; then it is stopped and its state made what
        # the older agent would have left: the unpacked version and its active.json.
        wait_until(
            lambda: (
                (models / "journal.json").exists()
                and parse_record((models / "journal.json").read_bytes()).phase is Phase.COMMITTED
            ),
            60,
            "1.0.0 committed",
        )
        agent.stop()
        (models / "journal.json").unlink()
        (models / "active.json").write_bytes(ACTIVE_JSON_FIRST_INSTALL)
        # A reinstall replaces the whole folder (inode numbers may be reused: a file it
        # would not have is the proof).
        marker = models / "1.0.0" / "unpacked-by-the-old-agent"
        marker.touch()

        agent = start_agent(config, log_name="agent-new.log")
        wait_until(lambda: served_version(client, MODEL), 60, "the upgraded agent to serve")
        # The version served first is the one on disk, from the very files the old agent
        # unpacked, not a reinstall.
        assert served_version(client, MODEL) == "1.0.0"
        assert marker.exists()
        np.testing.assert_allclose(
            client.infer(MODEL, {"x": X})["y"], bundle_output(bundle, X), rtol=1e-6
        )
        record = parse_record((models / "journal.json").read_bytes())
        assert (record.phase, record.version) == (Phase.COMMITTED, "1.0.0")
        assert json.loads((models / "journal.json").read_bytes())["schema"] == JOURNAL_SCHEMA_1
        assert not (models / "active.json").exists()
        assert "migrated active.json" in agent.text()
        assert "installing" not in agent.text(), agent.text()
    finally:
        agent.stop()
        serve.stop()


def test_a_journal_of_a_newer_agent_stops_edge_agent_run_naming_file_and_schemas(
    tmp_path: Path,
) -> None:
    repo = tmp_path / "repo"
    init_repository(repo)
    device = tmp_path / "device"
    port = free_port()  # nothing listens there: the agent must stop before it dials
    config = write_agent_config(device, device="dev-1", fleet=FLEET,
                                broker=f"127.0.0.1:{port}", repo_url=f"http://127.0.0.1:{port}/",
                                root=repo / "metadata" / "root.json")  # fmt: skip
    journal = device / "state" / "models" / MODEL / "journal.json"
    journal.parent.mkdir(parents=True)
    doc = json.loads(V1_WRITTEN_BY_3C52CD2["committed"])
    doc.update(schema="edgefleet.journal/3", served_from="slot-b")
    raw = json.dumps(doc).encode()
    journal.write_bytes(raw)
    (journal.parent / "1.0.0").mkdir()

    agent = start_agent(config)
    try:
        wait_until(
            lambda: agent.process.poll() is not None or (device / "infer.sock").exists(),
            60,
            "edge-agent run to stop (or, wrongly, to serve)",
        )
        assert agent.process.poll() == 2, agent.text()
    finally:
        agent.stop()
    log = agent.text()
    assert f"edge-agent: error: {journal} was written by a newer edge-agent" in log, log
    assert "'edgefleet.journal/3'" in log and f"'{JOURNAL_SCHEMA}'" in log, log
    assert "Traceback" not in log, log
    assert journal.read_bytes() == raw  # neither forgotten nor overwritten
    assert not (device / "infer.sock").exists()
