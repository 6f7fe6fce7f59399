"""Build bundle archives by hand, including hostile ones, for unpacking tests."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

from agent.contracts.compression import compress_member


def manifest_for(
    members: dict[str, bytes], name: str = "m", version: str = "1.0.0"
) -> dict[str, Any]:
    return {
        "schema": "edgefleet.manifest/1",
        "name": name,
        "version": version,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
        "opset": 17,
        "min_ort_version": "1.17",
        "golden": {"cases": 1, "rtol": 1e-3, "atol": 1e-4},
        "members": {
            k: {"size": len(v), "sha256": hashlib.sha256(v).hexdigest()} for k, v in members.items()
        },
    }


def write_tar(path: Path, entries: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tar.addfile(entry)
            else:
                name, data = entry
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def good_entries(
    name: str = "m", version: str = "1.0.0"
) -> list[tarfile.TarInfo | tuple[str, bytes]]:
    members = {"model.onnx": b"model-bytes", "golden.npz": b"golden-bytes"}
    manifest = json.dumps(manifest_for(members, name, version)).encode()
    return [("manifest.json", manifest), *members.items()]


def compressed_manifest_for(
    members: dict[str, bytes],
    stored: dict[str, bytes],
    name: str = "m",
    version: str = "1.0.0",
) -> dict[str, Any]:
    """A schema /2 manifest: ``members`` as they unpack, ``stored`` as the tar holds them."""
    doc = manifest_for(members, name, version)
    doc["schema"] = "edgefleet.manifest/2"
    for member, entry in doc["members"].items():
        entry["encoding"] = "zstd"
        entry["stored_size"] = len(stored[member])
    return doc


def compressed_entries(
    members: dict[str, bytes] | None = None, name: str = "m", version: str = "1.0.0"
) -> list[tarfile.TarInfo | tuple[str, bytes]]:
    """A good schema /2 bundle: each member one zstd frame, named ``<member>.zst``."""
    members = members or {"model.onnx": b"model-bytes" * 50, "golden.npz": b"golden-bytes"}
    stored = {k: compress_member(v) for k, v in members.items()}
    manifest = json.dumps(compressed_manifest_for(members, stored, name, version)).encode()
    return [("manifest.json", manifest), *((k + ".zst", v) for k, v in stored.items())]
