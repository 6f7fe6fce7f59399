"""The Triton extensions that tools use, read-only: a model's configuration, per-version
statistics, and the model repository's index (load and unload are refused).

Triton's own tools (``tritonclient``, ``perf_analyzer``, model-analyzer, dashboards that
read statistics) ask a server for these beside the OIP core; here are the documents in
Triton's JSON shapes, built from what the agent knows: the live version's manifest, the
figures ``agent.runtime.stats`` accumulates per version, and the versions the device
holds (a ``RepositoryIndex`` the composition root passes in, since what the device holds
besides its live versions is the update subsystem's to say).

Invariants:
- Pure: documents are made from values, nothing here does I/O or keeps state.
- Nothing is invented: every duration is one the server measured (``Phases``), a count
  is of requests the server answered, and a field the agent has no figure for is zero
  or empty (``cache_hit``/``cache_miss``: the agent has no response cache).
- ``max_batch_size`` is 0: the agent runs each request as it comes (no batcher), so its
  ``dims`` are the whole shape, the first axis included (-1: any size), and each
  answered request is one inference and one execution, of batch size 1 in
  ``batch_stats`` (as Triton counts a model without batching).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Final, NamedTuple

from agent.contracts import Manifest, TensorSpec
from agent.oip.documents import PLATFORM
from agent.runtime.stats import Execution

EXTENSIONS: Final = ("model_configuration", "statistics", "model_repository")
BACKEND: Final = "onnxruntime"
# Triton's model states (its model repository extension).
READY: Final = "READY"
UNAVAILABLE: Final = "UNAVAILABLE"
LOADING: Final = "LOADING"

LOAD_REFUSED: Final = (
    "this device loads and unloads model versions only as its fleet's rollouts say, "
    "not on request: change what it runs with `edgectl rollout` on the controller"
)


class IndexEntry(NamedTuple):
    """One version the device holds: Triton's state for it, and why."""

    name: str
    version: str
    state: str
    reason: str


# What the device holds now: every model and version, in any order.
RepositoryIndex = Callable[[], Iterable[IndexEntry]]


def triton_datatype(datatype: str) -> str:
    """Triton's name (``TYPE_FP32``) of an OIP datatype (``FP32``); BYTES is TYPE_STRING."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def model_config(manifest: Manifest) -> dict[str, Any]:
    """Triton's model configuration of the version ``manifest`` describes."""

    def tensor(spec: TensorSpec, direction: str) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": spec.name,
            "data_type": triton_datatype(spec.datatype),
            "dims": list(spec.shape),
            "is_shape_tensor": False,
        }
        if direction == "input":
            doc.update(format="FORMAT_NONE", allow_ragged_batch=False, optional=False)
        else:
            doc["label_filename"] = ""
        return doc

    return {
        "name": manifest.name,
        "platform": PLATFORM,
        "backend": BACKEND,
        "runtime": "",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": 0,
        "input": [tensor(t, "input") for t in manifest.inputs],
        "output": [tensor(t, "output") for t in manifest.outputs],
        "batch_input": [],
        "batch_output": [],
        "default_model_filename": "model.onnx",
        "parameters": {},
        "model_warmup": [],
    }


def _duration(count: int, ns: int) -> dict[str, int]:
    return {"count": count, "ns": ns}


def model_stat(name: str, version: str, e: Execution) -> dict[str, Any]:
    """Triton's ``$model_stat`` of one version from its figures."""
    input_ = _duration(e.timed, e.input_ns)
    infer = _duration(e.timed, e.infer_ns)
    output = _duration(e.timed, e.output_ns)
    batches = []
    if e.timed:
        batches.append(
            {"batch_size": 1, "compute_input": input_, "compute_infer": infer,
             "compute_output": output}
        )  # fmt: skip
    return {
        "name": name,
        "version": version,
        "last_inference": e.last_inference_ms,
        "inference_count": e.success,
        "execution_count": e.success,
        "inference_stats": {
            "success": _duration(e.success, e.success_ns),
            "fail": _duration(e.fail, e.fail_ns),
            "queue": _duration(e.timed, e.queue_ns),
            "compute_input": input_,
            "compute_infer": infer,
            "compute_output": output,
            "cache_hit": _duration(0, 0),
            "cache_miss": _duration(0, 0),
        },
        "response_stats": {},
        "batch_stats": batches,
        "memory_usage": [],
    }


def statistics(stats: Iterable[tuple[str, str, Execution]]) -> dict[str, Any]:
    """Triton's ``$stats_model_response`` of (model, version, figures)."""
    return {"model_stats": [model_stat(n, v, e) for n, v, e in stats]}


def repository_index(entries: Iterable[IndexEntry], ready_only: bool) -> list[dict[str, str]]:
    """Triton's repository index, sorted by model then version; ``ready_only``: only the
    versions that serve."""
    return [
        e._asdict()
        for e in sorted(entries)
        if not ready_only or e.state == READY
    ]  # fmt: skip
