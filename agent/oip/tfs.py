"""TensorFlow Serving's REST dialect: its documents (model status, model metadata) and
the mapping between the agent's semver versions and TensorFlow Serving's integer
versions. Pure, and free of numpy (the router imports it before any model is served);
predict requests and responses are ``agent.oip.tfs_predict``'s.

Versions: a release version ``M.m.p`` (minor and patch below 1000, no pre-release or
build part) is the integer ``M*1_000_000 + m*1_000 + p`` (``1.2.0`` → 1002000, ``0.0.123``
→ 123), which orders as semver does; any other version has no integer and is named by
its semver text, in URLs and documents (``tfs_version``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

from agent.contracts import Manifest, TensorSpec

SIGNATURE: Final = "serving_default"
PREDICT_METHOD: Final = "tensorflow/serving/predict"
# TensorFlow's DataType names of the OIP datatypes.
TF_DTYPES: Final[Mapping[str, str]] = {
    "BOOL": "DT_BOOL",
    "UINT8": "DT_UINT8",
    "UINT16": "DT_UINT16",
    "UINT32": "DT_UINT32",
    "UINT64": "DT_UINT64",
    "INT8": "DT_INT8",
    "INT16": "DT_INT16",
    "INT32": "DT_INT32",
    "INT64": "DT_INT64",
    "FP16": "DT_HALF",
    "FP32": "DT_FLOAT",
    "FP64": "DT_DOUBLE",
    "BYTES": "DT_STRING",
}
# Model version states (ModelVersionStatus.State).
AVAILABLE: Final = "AVAILABLE"
LOADING: Final = "LOADING"
END: Final = "END"

_RELEASE: Final = re.compile(r"(0|[1-9][0-9]{0,11})\.(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})")


# ---------------------------------------------------------------------------- versions


def tfs_version(version: str) -> int | None:
    """TensorFlow Serving's integer for a semver ``version``: ``M*1e6 + m*1e3 + p`` for a
    release ``M.m.p`` with minor and patch below 1000 (``1.2.0`` → 1002000, ``0.0.123``
    → 123); None for any other (a pre-release, build metadata, a part over 999)."""
    found = _RELEASE.fullmatch(version)
    if found is None:
        return None
    major, minor, patch = (int(g) for g in found.groups())
    return major * 1_000_000 + minor * 1_000 + patch


def version_text(version: str) -> str:
    """How a version is written in TensorFlow Serving's documents: its integer (as
    proto3 JSON writes an int64: a string), or its semver text when it has none."""
    number = tfs_version(version)
    return version if number is None else str(number)


def names_version(requested: str, version: str) -> bool:
    """Whether the URL's ``/versions/<requested>`` names ``version``: its integer, or its
    semver text."""
    if requested == version:
        return True
    number = tfs_version(version)
    return number is not None and requested.isdigit() and int(requested) == number


# ---------------------------------------------------------------------------- documents


def model_status(versions: Iterable[tuple[str, str, str]]) -> dict[str, Any]:
    """GetModelStatusResponse of ``(version, state, message)`` triples, in order."""
    return {
        "model_version_status": [
            {
                "version": version_text(version),
                "state": state,
                "status": {"error_code": "OK", "error_message": message},
            }
            for version, state, message in versions
        ]
    }


def _tensor_info(spec: TensorSpec) -> dict[str, Any]:
    return {
        "dtype": TF_DTYPES[spec.datatype],
        "tensor_shape": {
            "dim": [{"size": str(d), "name": ""} for d in spec.shape],
            "unknown_rank": False,
        },
        "name": spec.name,
    }


def model_metadata(manifest: Manifest) -> dict[str, Any]:
    """GetModelMetadataResponse of the version ``manifest`` describes: its one signature,
    ``serving_default``, from the manifest's inputs and outputs (-1: a dynamic axis)."""
    return {
        "model_spec": {
            "name": manifest.name,
            "signature_name": "",
            "version": version_text(manifest.version),
        },
        "metadata": {
            "signature_def": {
                "signature_def": {
                    SIGNATURE: {
                        "inputs": {t.name: _tensor_info(t) for t in manifest.inputs},
                        "outputs": {t.name: _tensor_info(t) for t in manifest.outputs},
                        "method_name": PREDICT_METHOD,
                    }
                }
            }
        },
    }
