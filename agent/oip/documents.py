"""The values of an Open Inference Protocol v2 exchange, as the agent passes them around: no
checks, no I/O.

It owns the protocol's constants (platform, extensions, the header that gives a binary
body's JSON length); the checked infer request (``InferRequest``: its inputs as arrays,
the outputs asked for (``OutputRequest``) and where each travels, ``ShmRef`` for shared
memory); the request plan it was built from (``RequestPlan``, one ``InputPlan`` per input)
and the response headers kept for it (``ResponseTemplate``); the ``SharedMemory`` access
both ends are given; and the small documents that are not infer requests or responses
(model metadata, the error body).

``agent.oip.request`` makes requests and plans, ``agent.oip.response`` makes responses
from them; both import this module, which imports neither.

Invariants:
- Every value here is immutable once made, except a plan's ``responses`` dict, which only
  ``agent.oip.response`` fills (a few templates at most, one per output signature).
- A ``RequestPlan`` holds only what its header's bytes say, checked against its manifest;
  an ``InferRequest`` shares its plan's ``outputs`` and ``parameters``: read-only.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Protocol

from agent.contracts import Manifest

if TYPE_CHECKING:  # numpy comes with the first model (an idle agent without one skips it)
    import numpy as np

PLATFORM: Final = "onnxruntime_onnx"
EXTENSIONS: Final = ("binary_tensor_data", "system_shared_memory")
HEADER_LENGTH: Final = "Inference-Header-Content-Length"


class SharedMemory(Protocol):
    """Access to registered shared-memory regions (``agent.oip.shm`` implements it)."""

    def view(self, region: str, offset: int, byte_size: int) -> memoryview:
        """``byte_size`` bytes at ``offset`` in ``region``; InvalidRequestError if out of it."""
        ...


@dataclass(frozen=True)
class ShmRef:
    """Where a tensor lives in a registered shared-memory region."""

    region: str
    offset: int
    byte_size: int


@dataclass(frozen=True)
class OutputRequest:
    """One requested output and how it should travel back."""

    name: str
    binary: bool
    shm: ShmRef | None = None


@dataclass(frozen=True)
class InferRequest:
    """A checked infer request.

    ``outputs`` is None when the client asked for every output; ``binary_output`` is the
    request-wide default (``parameters.binary_data_output``). ``plan`` is the checked
    header it was built from; it, ``outputs`` and ``parameters`` are shared with every
    request of the same header: read-only.
    """

    inputs: dict[str, np.ndarray]
    outputs: list[OutputRequest] | None
    id: str | None
    parameters: Mapping[str, Any]
    binary_output: bool = False
    plan: RequestPlan | None = field(default=None, repr=False, compare=False)

    @property
    def output_names(self) -> list[str] | None:
        return None if self.outputs is None else [o.name for o in self.outputs]


# ---------------------------------------------------------------------------- plans


class InputPlan(NamedTuple):
    """One input whose JSON is checked: where its values come from, per request.

    ``size`` >= 0: ``size`` bytes at ``offset`` of the binary section; else ``shm``
    names them; else they are the JSON ``data``. ``wire`` is the dtype a fixed-size
    binary or shared-memory tensor is read as (None: BOOL, BYTES or JSON data), and
    ``n_values`` its number of values; such a tensor's size was checked against its
    shape when the plan was made. (A named tuple: immutable and cheap to build, which
    JSON requests do every time.)
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    offset: int = 0
    size: int = -1
    shm: ShmRef | None = None
    wire: np.dtype[Any] | None = None
    n_values: int = 0
    data: Any = None


class RequestPlan(NamedTuple):
    """What one infer request header says, checked against one manifest's signature.

    Everything that depends only on the header's bytes is decided here, once; a request
    with the same header bytes reuses it and only checks what depends on its own bytes:
    the binary section's length, BOOL and BYTES values, shared memory (which can be
    unregistered or truncated between requests). ``responses`` caches response headers
    built for this plan (see ``agent.oip.response.encode_infer_response``): each reusable
    plan has its own dict; None when no header could be reused (an input carries JSON
    data, or an output travels as JSON). (A named tuple: immutable and cheap to build,
    which JSON requests do every time.)
    """

    manifest: Manifest
    inputs: tuple[InputPlan, ...]
    binary_size: int
    outputs: list[OutputRequest] | None
    id: str | None
    parameters: Mapping[str, Any]
    binary_output: bool
    responses: dict[tuple[Any, ...], ResponseTemplate] | None
    is_reusable: bool  # no input carries JSON data: the plan holds where values are, not them


class PlanCache:
    """Request plans by (manifest identity, shared memory available, header bytes).

    Thread-safe: lookups take no lock; inserts do. Bounded: when full, the oldest plan
    goes (first in, first out; a plan still in use comes back on its next miss). A plan
    holds its manifest, so a manifest's ``id`` cannot be reused while a plan keyed by it
    lives, and a lookup also checks identity: another version never uses this one's plan.
    """

    def __init__(self, max_plans: int = 256, max_header_bytes: int = 4096) -> None:
        self.max_plans = max_plans
        self.max_header_bytes = max_header_bytes
        self._lock = threading.Lock()
        self._plans: dict[tuple[int, bool, bytes], RequestPlan] = {}

    def get(self, manifest: Manifest, shm_available: bool, header: bytes) -> RequestPlan | None:
        plan = self._plans.get((id(manifest), shm_available, header))
        return plan if plan is not None and plan.manifest is manifest else None

    def put(self, shm_available: bool, header: bytes, plan: RequestPlan) -> None:
        key = (id(plan.manifest), shm_available, header)
        with self._lock:
            while len(self._plans) >= self.max_plans:
                del self._plans[next(iter(self._plans))]
            self._plans[key] = plan

    def __len__(self) -> int:
        return len(self._plans)


# ---------------------------------------------------------------------------- responses


@dataclass(frozen=True, slots=True)
class ResponseTemplate:
    """A response header built once for a plan and a signature of outputs (names, dtypes
    and shapes, in order): per output its shared-memory reference, or None when its bytes
    follow the header; None for all when every output's bytes follow."""

    header: bytes
    shm_refs: tuple[ShmRef | None, ...] | None
    header_length: int | None  # what encode_infer_response returns with the parts


# ---------------------------------------------------------------------------- metadata


def model_metadata(manifest: Manifest) -> dict[str, Any]:
    """The OIP model metadata document of the version ``manifest`` describes."""
    return {
        "name": manifest.name,
        "versions": [manifest.version],
        "platform": PLATFORM,
        "inputs": [t.to_json() for t in manifest.inputs],
        "outputs": [t.to_json() for t in manifest.outputs],
    }


def error_body(message: str) -> bytes:
    """The JSON body of an error response: ``{"error": message}``."""
    return json.dumps({"error": message}).encode()
