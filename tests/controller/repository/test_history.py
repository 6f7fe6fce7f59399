"""Release history on a real repository holding several releases of two models.

lin 1.0.0 -> 1.1.0 released to fleet ``lab`` (so lab names 1.1.0, previous 1.0.0);
cls 1.0.0 released to fleet ``field``; lin 2.0.0 (6 in / 2 out features: a signature
change) and cls 1.1.0 published without a fleet.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.contracts import (
    Heartbeat,
    ModelFigures,
    SystemFigures,
    bundle_target_path,
    resolve_release,
)
from controller.base.errors import UsageError
from controller.build.builder import BuildOptions, build_bundle
from controller.cli import main as cli_main
from controller.cli import route_release_verbs
from controller.fleet.records import IngestBatch
from controller.fleet.store import TelemetryStore
from controller.fleet.stores import open_store
from controller.repository.history import (
    RetireRefusedError,
    diff_releases,
    find_release,
    is_going_back,
    load_releases,
    prune_retired,
    read_retired,
    retire_release,
)
from controller.repository.release import current_desired_state, publish_bundle, release_bundle
from controller.repository.repo import Repository, init_repository
from controller.rollout.gates import parse_gates
from controller.rollout.service import RolloutService, start_rollout
from controller.rollout.stages import RolloutState
from controller.rollout.view import render_rollout, rollout_json
from tests.controller.conftest import edgectl_cmd
from tests.helpers import make_linear_model

T0 = datetime(2030, 1, 1, tzinfo=UTC)
LIN, CLS = "lin", "cls"
BUILDS = (
    # key, model, version, seed, in, out
    ("lin-1.0.0", LIN, "1.0.0", 1, 4, 3),
    ("lin-1.1.0", LIN, "1.1.0", 2, 4, 3),
    ("lin-2.0.0", LIN, "2.0.0", 3, 6, 2),
    ("cls-1.0.0", CLS, "1.0.0", 4, 8, 5),
    ("cls-1.1.0", CLS, "1.1.0", 5, 8, 5),
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("bundles")
    found = {}
    # Quantized as asked: these models are so small that the default keeps them as they are,
    # and the views are tested on a quantized build's facts.
    quantized = BuildOptions(quantize="dynamic-matmul")
    for key, model, version, seed, n_in, n_out in BUILDS:
        onnx = make_linear_model(out / f"{key}.onnx", seed, n_in, n_out)
        bundle = out / f"{key}.bundle"
        found[key] = build_bundle(onnx, model, version, bundle, 4, options=quantized).path
    return found


@pytest.fixture
def history_repo(tmp_path: Path, built: dict[str, Path]) -> Path:
    repo_dir = tmp_path / "repo"
    init_repository(repo_dir, now=T0)
    release_bundle(built["lin-1.0.0"], "lab", repo_dir, now=T0)
    release_bundle(built["lin-1.1.0"], "lab", repo_dir, now=T0)
    release_bundle(built["cls-1.0.0"], "field", repo_dir, now=T0)
    publish_bundle(built["lin-2.0.0"], repo_dir, now=T0)
    publish_bundle(built["cls-1.1.0"], repo_dir, now=T0)
    return repo_dir


def _edgectl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(edgectl_cmd(*args), capture_output=True, text=True, timeout=60)


def _report(
    store: TelemetryStore,
    fleet: str,
    model: str,
    versions: dict[str, str],
    at: float = T0.timestamp() + 1,
) -> None:
    batch = IngestBatch()
    for i, (device, version) in enumerate(sorted(versions.items())):
        beat = Heartbeat(
            device=device,
            fleet=fleet,
            at="",
            seq=i + 1,
            interval_s=10.0,
            agent_version="t",
            uptime_s=1.0,
            system=SystemFigures(),
            models={model: ModelFigures(version, "committed", 100, 0, 0, None, None, 0.01)},
        )
        batch.heartbeats.append((beat, at))
    store.write(batch)


# ---------------------------------------------------------------------------- list


def test_list_shows_every_release_with_its_fleets(history_repo: Path) -> None:
    releases = load_releases(history_repo)
    assert [(r.model, r.version) for r in releases] == [
        (CLS, "1.0.0"),
        (CLS, "1.1.0"),
        (LIN, "1.0.0"),
        (LIN, "1.1.0"),
        (LIN, "2.0.0"),
    ]
    by = {(r.model, r.version): r for r in releases}
    assert [(f.fleet, f.role) for f in by[LIN, "1.1.0"].fleets] == [("lab", "desired")]
    assert [(f.fleet, f.role) for f in by[LIN, "1.0.0"].fleets] == [("lab", "previous")]
    assert [(f.fleet, f.role) for f in by[CLS, "1.0.0"].fleets] == [("field", "desired")]
    assert by[LIN, "2.0.0"].fleets == () and by[CLS, "1.1.0"].fleets == ()
    lin = by[LIN, "1.0.0"]
    assert lin.recipe == "dynamic-matmul" and lin.quality["top1_agreement"] is not None
    assert lin.length > 0 and lin.manifest.created_at and lin.devices is None
    assert [r.version for r in load_releases(history_repo, CLS)] == ["1.0.0", "1.1.0"]


def test_list_counts_devices_from_the_store_and_says_when_it_has_none(
    history_repo: Path,
) -> None:
    out = _edgectl("release", "list", "--repo", history_repo)
    assert out.returncode == 0, out.stderr
    assert "lab(prev)" in out.stdout and "dynamic-matmul" in out.stdout
    # agreement as the build table prints it (a share in %), never a bare 1
    at = out.stdout.splitlines()[0].index("AGREE")
    cells = [line[at:].split()[0] for line in out.stdout.splitlines()[1:] if LIN in line]
    assert cells and all(c.endswith("%") for c in cells), out.stdout
    assert "devices: unknown (no telemetry store at" in out.stdout

    store = open_store(str(history_repo / "telemetry.sqlite"))
    try:
        _report(store, "lab", LIN, {"dev-a": "1.1.0", "dev-b": "1.1.0", "dev-c": "1.0.0"})
    finally:
        store.close()
    out = _edgectl("release", "list", LIN, "--repo", history_repo, "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["store"] == "ok"
    devices = {r["version"]: r["devices"] for r in doc["releases"]}
    assert devices == {"1.0.0": 1, "1.1.0": 2, "2.0.0": 0}
    first = doc["releases"][0]
    assert first["recipe"] == "dynamic-matmul" and first["bundle_bytes"] > 0
    assert first["fleets"] == [{"fleet": "lab", "role": "previous", "percent": 0.0}]


def test_unknown_model_or_version_is_a_usage_error(history_repo: Path) -> None:
    with pytest.raises(UsageError, match=r"no release of model 'nope'.*models: cls, lin"):
        load_releases(history_repo, "nope")
    with pytest.raises(UsageError, match=r"no release lin 9\.9\.9; .*1\.0\.0, 1\.1\.0, 2\.0\.0"):
        find_release(history_repo, LIN, "9.9.9")
    with pytest.raises(UsageError, match="invalid version"):
        find_release(history_repo, LIN, "latest")
    out = _edgectl("release", "show", LIN, "9.9.9", "--repo", history_repo)
    assert out.returncode == 2 and "released versions: 1.0.0, 1.1.0, 2.0.0" in out.stderr


# ---------------------------------------------------------------------------- show


def test_show_renders_the_manifest_and_the_deployment(history_repo: Path) -> None:
    out = _edgectl("release", "show", LIN, "1.1.0", "--repo", history_repo)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for expected in (
        "lin 1.1.0",
        "x:FP32[-1, 4]",
        "y:FP32[-1, 3]",
        "opset 17",
        "recipe dynamic-matmul",
        "candidates the build tried:",
        "golden vectors: 4 cases",
        "rule: atol =",
        "fleet lab: desired at 100%",
        "devices reporting it: unknown",
    ):
        assert expected in text, expected
    doc = json.loads(
        _edgectl("release", "show", LIN, "1.0.0", "--repo", history_repo, "--json").stdout
    )
    assert doc["manifest"]["version"] == "1.0.0"
    assert doc["fleets"][0]["role"] == "previous"


# ---------------------------------------------------------------------------- diff


def test_diff_of_same_signature_lists_changes_without_warning(history_repo: Path) -> None:
    d = diff_releases(history_repo, LIN, "1.0.0", "1.1.0")
    assert not d.signature_changed and d.warnings == ()
    fields = {c.field for c in d.changes}
    assert "inputs" not in fields and "outputs" not in fields
    assert "quality.max_abs_diff" in fields  # other weights, other drift


def test_diff_warns_on_a_signature_change(history_repo: Path) -> None:
    d = diff_releases(history_repo, LIN, "1.1.0", "2.0.0")
    assert d.signature_changed
    changes = {c.field: (c.before, c.after) for c in d.changes}
    assert changes["inputs"] == (["x:FP32[-1, 4]"], ["x:FP32[-1, 6]"])
    assert changes["outputs"] == (["y:FP32[-1, 3]"], ["y:FP32[-1, 2]"])
    out = _edgectl("release", "diff", LIN, "1.1.0", "2.0.0", "--repo", history_repo)
    assert out.returncode == 0, out.stderr
    assert "edgectl: warning: the input/output signature of lin differs" in out.stderr
    assert "clients on the device" in out.stderr
    assert "inputs: ['x:FP32[-1, 4]'] -> ['x:FP32[-1, 6]']" in out.stdout
    bad = _edgectl("release", "diff", LIN, "1.1.0", "3.0.0", "--repo", history_repo)
    assert bad.returncode == 2 and "no release lin 3.0.0" in bad.stderr


# ---------------------------------------------------------------------------- retire


def test_retire_is_refused_while_a_fleet_names_it_then_allowed(
    history_repo: Path, built: dict[str, Path]
) -> None:
    repo = Repository.open(history_repo)
    before = repo.versions()
    with pytest.raises(RetireRefusedError, match=r"lab \(previous, the version an abort"):
        retire_release(history_repo, LIN, "1.0.0", now=T0)
    out = _edgectl("release", "retire", LIN, "1.1.0", "--repo", history_repo)
    assert out.returncode == 2
    assert "still named by fleet(s) lab (desired at 100%)" in out.stderr
    assert "edgectl rollout start lin VERSION" in out.stderr
    assert Repository.open(history_repo).versions() == before  # nothing signed

    # lab moves on to 2.0.0 (previous 1.1.0): nothing names 1.0.0 any more.
    release_bundle(built["lin-2.0.0"], "lab", history_repo, now=T0)
    target = bundle_target_path(LIN, "1.0.0")
    stored = repo.target_file_path(target, repo.load("targets").signed.targets[target])
    result = retire_release(history_repo, LIN, "1.0.0", now=T0)
    repo = Repository.open(history_repo)
    assert target not in repo.load("targets").signed.targets
    assert result.targets_version == repo.versions()["targets"]
    assert stored.exists()  # kept for the grace period
    assert [r.version for r in load_releases(history_repo, LIN)] == ["1.1.0", "2.0.0"]
    with pytest.raises(UsageError, match="is not published"):
        start_rollout(
            history_repo,
            fleet="lab",
            model=LIN,
            version="1.0.0",
            stages=(100,),
            wait_s=1,
            deadline_s=10,
            gates=parse_gates("error_rate<0.01"),
        )
    with pytest.raises(UsageError, match=r"no release lin 1\.0\.0"):
        retire_release(history_repo, LIN, "1.0.0", now=T0)

    assert prune_retired(history_repo, now=T0 + timedelta(days=6)) == []
    assert stored.exists()
    # The deltas to and from 1.0.0 retired with it (published by the later releases).
    assert prune_retired(history_repo, now=T0 + timedelta(days=7)) == [
        target,
        "bundles/lin/1.1.0.from-1.0.0.delta",
        "bundles/lin/2.0.0.from-1.0.0.delta",
    ]
    assert not stored.exists() and read_retired(history_repo) == {}


def test_a_retired_release_published_again_is_not_pruned(
    history_repo: Path, built: dict[str, Path]
) -> None:
    retire_release(history_repo, CLS, "1.1.0", now=T0)
    publish_bundle(built["cls-1.1.0"], history_repo, now=T0)  # same bytes, same file
    assert prune_retired(history_repo, now=T0 + timedelta(days=30)) == []
    release = find_release(history_repo, CLS, "1.1.0")
    repo = Repository.open(history_repo)
    target = repo.load("targets").signed.targets[release.target_path]
    assert repo.target_file_path(release.target_path, target).exists()


# ---------------------------------------------------------------------------- going back


def test_going_back_is_a_rollout_through_the_same_gates(
    history_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """lab runs lin 1.1.0; the operator goes back to 1.0.0 with a staged rollout."""
    devices = [f"dev-{i:02d}" for i in range(20)]
    store = open_store(str(tmp_path / "telemetry.sqlite"))
    try:
        now = T0.timestamp()
        r = start_rollout(
            history_repo,
            fleet="lab",
            model=LIN,
            version="1.0.0",
            stages=(10, 100),
            wait_s=60.0,
            deadline_s=300.0,
            gates=parse_gates("error_rate<0.01,failed_installs<0.2,min_devices=2"),
            canaries=("dev-00", "dev-01"),
            now=now,
        )
        assert (r.version, r.previous) == ("1.0.0", "1.1.0")
        assert is_going_back(r.version, r.previous) and not is_going_back("2.0.0", "1.1.0")
        store_path = str(tmp_path / "telemetry.sqlite")
        assert (
            cli_main(["fleet", "status", "--repo", str(history_repo), "--store", store_path]) == 0
        )
        assert f"rollout lab/{LIN}: 1.1.0 -> 1.0.0 (going back)" in capsys.readouterr().out
        service = RolloutService(history_repo, store)
        for expected_state in (RolloutState.RUNNING, RolloutState.COMPLETED):
            desired = current_desired_state(Repository.open(history_repo), "lab")
            assert desired is not None
            entry = desired.models[LIN]
            versions = {}
            for d in devices:
                resolved = resolve_release(entry, d)
                versions[d] = resolved[0] if resolved else "1.1.0"
            assert versions["dev-00"] == "1.0.0"  # canaries go back first
            _report(store, "lab", LIN, versions, at=now + 10)
            now += 61
            (r,) = service.tick(now)
            assert r.state is expected_state
        assert r.percent == 100.0
        shown = render_rollout(r, now)
        assert "1.1.0 -> 1.0.0" in shown and "(going back to an older release)" in shown
        assert rollout_json(r)["going_back"] is True
        releases = {x.version: x for x in load_releases(history_repo, LIN)}
        assert [(f.fleet, f.role) for f in releases["1.0.0"].fleets] == [("lab", "desired")]
        assert [(f.fleet, f.role) for f in releases["1.1.0"].fleets] == [("lab", "previous")]
    finally:
        store.close()


# ---------------------------------------------------------------------------- cli


def test_release_verbs_route_and_bundle_files_do_not() -> None:
    assert route_release_verbs(["release", "list", "--repo", "r"]) == [
        "releases",
        "list",
        "--repo",
        "r",
    ]
    assert route_release_verbs(["-v", "release", "diff", "m", "1.0.0", "2.0.0"])[1] == "releases"
    plain = ["release", "m.bundle", "--fleet", "lab", "--repo", "r"]
    assert route_release_verbs(plain) == plain
    assert route_release_verbs(["release", "./list", "--fleet", "x"])[0] == "release"
    assert route_release_verbs(["rollout", "status", "list"])[0] == "rollout"


def test_release_of_a_bundle_file_still_works(
    history_repo: Path, built: dict[str, Path], tmp_path: Path
) -> None:
    bundle = shutil.copy(built["cls-1.1.0"], tmp_path / "cls.bundle")
    out = _edgectl("release", bundle, "--fleet", "field", "--repo", history_repo)
    assert out.returncode == 0, out.stderr
    assert "fleet field: desired version 1.1.0" in out.stdout


class _Interrupted(BaseException):
    """The process stopping right after a durable step."""


def test_an_interrupted_retirement_never_orphans_its_bundle_file(
    history_repo: Path, tmp_path: Path
) -> None:
    """Stopped after any of its durable steps (issue 19, section 2), ``retire`` leaves the
    bundle file named by the targets or by retired.json, so `releases prune` removes it;
    retiring it again either completes or says it is retired."""
    from agent.base.fsutil import set_step_hook

    target = bundle_target_path(CLS, "1.1.0")
    steps: list[Path] = []
    reference = tmp_path / "reference"
    shutil.copytree(history_repo, reference)
    set_step_hook(steps.append)
    try:
        retire_release(reference, CLS, "1.1.0", now=T0)
    finally:
        set_step_hook(None)
    assert steps[0].name == "retired.json"  # the intent, before the targets
    for n in range(1, len(steps) + 1):
        repo_dir = tmp_path / f"interrupted-{n}"
        shutil.copytree(history_repo, repo_dir)
        stored = Repository.open(repo_dir).target_file_path(
            target, Repository.open(repo_dir).load("targets").signed.targets[target]
        )
        count = 0

        def hook(path: Path, n: int = n) -> None:
            nonlocal count
            count += 1
            if count == n:
                raise _Interrupted(path)

        set_step_hook(hook)
        try:
            with pytest.raises(_Interrupted):
                retire_release(repo_dir, CLS, "1.1.0", now=T0)
        finally:
            set_step_hook(None)
        live = Repository.open(repo_dir).load("targets").signed.targets
        assert target in live or target in read_retired(repo_dir), f"orphaned after step {n}"
        try:
            retire_release(repo_dir, CLS, "1.1.0", now=T0)
        except UsageError as exc:
            assert "it was retired at 2030-01-01T00:00:00Z" in str(exc)
        assert target not in Repository.open(repo_dir).load("targets").signed.targets
        pruned = prune_retired(repo_dir, now=T0 + timedelta(days=7))
        assert pruned[0] == target and all(p.endswith(".delta") for p in pruned[1:])
        assert not stored.exists() and read_retired(repo_dir) == {}
