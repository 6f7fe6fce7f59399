"""A device installs bundles of both formats through its real update path (TUF, the
HTTP mirror, unpack, golden vectors): format 1 (uncompressed, what builds before issue
22 wrote and ``--format 1`` still writes) and format 2 (zstd members), in either order."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.contracts import parse_manifest
from controller.build.builder import BuildOptions, build_bundle
from controller.repository.repo import Repository
from tests.helpers import make_linear_model
from tests.security.conftest import MODEL, Device, release


@pytest.fixture(scope="module")
def format_1_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("format-1")
    old = BuildOptions(bundle_format=1, latency_runs=0)
    return {
        version: build_bundle(
            make_linear_model(out / f"{version}.onnx", seed=seed), MODEL, version,
            out / f"{version}.bundle", 4, options=old,
        ).path
        for seed, version in ((2, "2.0.0"), (4, "4.0.0"))
    }  # fmt: skip


def test_a_device_moves_between_format_1_and_format_2_bundles(
    repo: Repository,
    device: Device,
    bundles: dict[str, Path],
    format_1_bundles: dict[str, Path],
) -> None:
    """The device serves 1.0.0 (format 2); 2.0.0 in format 1 installs, then 3.0.0 in
    format 2, then 4.0.0 in format 1 again. Each unpacks to the same three files."""
    for version, bundle in (
        ("2.0.0", format_1_bundles["2.0.0"]),
        ("3.0.0", bundles["3.0.0"]),
        ("4.0.0", format_1_bundles["4.0.0"]),
    ):
        release(repo, bundle)
        assert device.check().installed == {MODEL: version}
        assert device.serving() == version
        folder = device.config.state_dir / "models" / MODEL / version
        assert sorted(p.name for p in folder.iterdir()) == [
            "golden.npz",
            "manifest.json",
            "model.onnx",
        ]
        schema = parse_manifest((folder / "manifest.json").read_bytes()).schema
        assert schema == ("edgefleet.manifest/2" if version == "3.0.0" else "edgefleet.manifest/1")
