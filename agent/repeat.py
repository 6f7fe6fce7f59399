"""Exact repeats of an infer request on one connection, answered without routing, parsing
or encoding again.

A client calling one model with the same shapes sends the same URL and the same JSON
header every time: the binary section, or the shared memory, carries what changes. Once
a connection has sent such a request twice in a row, the router keeps a ``Repeat`` of it
in the connection's memo (``Request.memo``; until then only the header bytes), and a
later request on that connection with the same URL, lengths and header bytes is answered
through it. Its inputs are read where the plan says (the body's binary section, or
shared memory), its outputs go where the first response's template put them, and that
template's header is the response's. Side by side on a 2-core VM
(``bench/server_overhead.py``), this took the server's own work for a repeated
tiny-model request from 35 to 20 µs warm, and saves about three times that cold, after
a model run has flushed the caches.

Invariants:
- A repeat is used only for the exact bytes it was made from (URL, Content-Length,
  Inference-Header-Content-Length, JSON header) and for the model object it was made
  for: after a hot swap, the request takes the full path.
- What can change between two identical requests is checked on every use, as the full
  path checks it: each shared-memory reference against its region as it is now
  (registered, in bounds, not truncated), and each output's dtype and shape against the
  template's (an output that differs is encoded by the full encoder).
- Only requests whose inputs are all fixed-size binary or shared-memory tensors, with no
  ``id``, whose response came from a template (no JSON or BYTES output), are kept. A
  repeat holds no reference to a request body or to shared memory, and only a weak one
  to its model: a replaced version's session is freed when its last request ends, as
  ``agent.runtime`` promises, not when an idle connection next calls.
- Admission, deadlines, errors, metrics and stats are the router's, as for any request.
"""

from __future__ import annotations

import weakref
from typing import Any, Final, NamedTuple

import numpy as np
import onnxruntime as ort

from agent.http_messages import Request, Response
from agent.oip import InferRequest
from agent.oip_response import ResponseTemplate, encode_infer_response, template_key
from agent.runtime import LoadedModel
from agent.shm import SharedMemoryRegistry
from agent.tensors import tensor_to_bytes

_BINARY: Final = b"application/octet-stream"
_MAX_PER_CONNECTION: Final = 8  # distinct infer URLs remembered per connection


class _Input(NamedTuple):
    """Where one input's values are: at ``offset`` of the body, or in shared-memory view
    number ``view`` (-1: in the body)."""

    name: str
    wire: np.dtype[Any]
    shape: tuple[int, ...]
    n_values: int
    offset: int  # in the body (the JSON header's length included)
    view: int


class _Output(NamedTuple):
    """What the template expects of one output, and where it goes: shared-memory view
    number ``view`` (-1: after the header, as binary data)."""

    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    view: int


def infer_response(parts: list[bytes | memoryview], header_length: int | None) -> Response:
    """The HTTP response of an encoded infer response body."""
    if header_length is None:
        return Response(200, parts)
    return Response(
        200,
        parts,
        content_type=_BINARY,
        extra=b"Inference-Header-Content-Length: %d\r\n" % header_length,
    )


class Repeat:
    """An answered infer request, kept to answer its exact repeats (see the module)."""

    __slots__ = (
        "body_length",
        "header",
        "header_length",
        "inputs",
        "model",
        "names",
        "outputs",
        "request",
        "response",
        "shm_refs",
        "template",
    )

    def __init__(
        self,
        model: LoadedModel,
        request: Request,
        header: bytes,
        inputs: tuple[_Input, ...],
        names: list[str],
        outputs: tuple[_Output, ...],
        shm_refs: tuple[tuple[str, int, int], ...],
        template: ResponseTemplate,
        parsed: InferRequest,
    ) -> None:
        self.model = weakref.ref(model)
        self.header_length = request.header_length
        self.body_length = len(request.body)
        self.header = header
        self.inputs = inputs
        self.names = names
        self.outputs = outputs
        self.shm_refs = shm_refs  # (region, offset, byte_size) of each shared-memory view
        self.template = template
        # What the full encoder needs: the plan and what it says, not the first inputs.
        self.request = InferRequest(
            {}, parsed.outputs, parsed.id, parsed.parameters, parsed.binary_output, parsed.plan
        )
        # Every output in shared memory: the response is the same object every time.
        self.response: Response | None = None
        if template.header_length is None and template.shm_refs is not None:
            self.response = Response(200, template.header)

    def matches(self, request: Request, model: LoadedModel) -> bool:
        """Whether ``request``, to be served by ``model``, is an exact repeat of this one."""
        body = request.body
        if (
            model is not self.model()
            or request.header_length != self.header_length
            or len(body) != self.body_length
        ):
            return False
        if type(body) is bytes:
            return body.startswith(self.header)
        return memoryview(body)[: len(self.header)].tobytes() == self.header  # memcmp

    def run(
        self,
        model: LoadedModel,
        body: bytes | bytearray | memoryview,
        shm: SharedMemoryRegistry | None,
        options: ort.RunOptions,
    ) -> Response:
        """Answer a repeat (``body``: its body) on ``model``, the one it ``matches``.
        Raises as the full path does."""
        views: list[memoryview] = []
        if self.shm_refs:
            assert shm is not None  # only made with shared memory available
            views = shm.views(self.shm_refs)  # every region checked as it is now
        inputs: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            if spec.view < 0:
                array = np.frombuffer(body, spec.wire, spec.n_values, spec.offset)
            else:
                array = np.frombuffer(views[spec.view], spec.wire)
            inputs[spec.name] = array.reshape(spec.shape)
        results = model.run(self.names, inputs, options)
        parts: list[bytes | memoryview] = [self.template.header]
        for expected, array in zip(self.outputs, results, strict=True):
            if array.dtype != expected.dtype or array.shape != expected.shape:
                outputs = dict(zip(self.names, results, strict=True))
                return infer_response(
                    *encode_infer_response(model.name, model.version, outputs, self.request, shm)
                )
            if expected.view < 0:
                parts.append(tensor_to_bytes(array))
            else:
                views[expected.view][:] = tensor_to_bytes(array)
        if self.response is not None:
            return self.response
        return infer_response(parts, self.template.header_length)


def remember(
    request: Request,
    model: LoadedModel,
    parsed: InferRequest,
    outputs: dict[str, np.ndarray],
) -> None:
    """Keep a ``Repeat`` of an answered request in its connection's memo when it can be
    one (see the module's invariants) and the connection's previous request to its URL
    had the same header: a client that changes its request every time (another batch
    size per call) pays only for noting the header, not for building repeats it never
    uses."""
    plan = parsed.plan
    if plan is None or not plan.is_reusable or plan.id is not None or not plan.responses:
        return
    header_length = len(request.body) if request.header_length is None else request.header_length
    header = bytes(memoryview(request.body)[:header_length])
    memo = request.memo
    previous = memo.get(request.url)
    seen = previous.header if isinstance(previous, Repeat) else previous
    if len(memo) >= _MAX_PER_CONNECTION and previous is None:
        memo.clear()
    memo[request.url] = header
    if seen != header:
        return
    repeat = _repeat_of(request, model, parsed, outputs, header)
    if repeat is not None:
        memo[request.url] = repeat


def _repeat_of(
    request: Request,
    model: LoadedModel,
    parsed: InferRequest,
    outputs: dict[str, np.ndarray],
    header: bytes,
) -> Repeat | None:
    """The ``Repeat`` of an answered request whose plan keeps response templates; None
    when one of its inputs is BOOL or BYTES, or its response has no template."""
    plan = parsed.plan
    assert plan is not None and plan.responses is not None
    template = plan.responses.get(template_key(model.name, model.version, outputs))
    if template is None:
        return None
    shm_refs: list[tuple[str, int, int]] = []
    inputs: list[_Input] = []
    for p in plan.inputs:
        if p.wire is None:  # BOOL or BYTES: their bytes are checked per request
            return None
        view = -1
        if p.shm is not None:
            view = len(shm_refs)
            shm_refs.append((p.shm.region, p.shm.offset, p.shm.byte_size))
        inputs.append(_Input(p.name, p.wire, p.shape, p.n_values, len(header) + p.offset, view))
    expected: list[_Output] = []
    refs = template.shm_refs or (None,) * len(outputs)
    for array, ref in zip(outputs.values(), refs, strict=True):
        view = -1
        if ref is not None:
            view = len(shm_refs)
            shm_refs.append((ref.region, ref.offset, array.nbytes))
        expected.append(_Output(array.dtype, array.shape, view))
    return Repeat(
        model,
        request,
        header,
        tuple(inputs),
        list(outputs),
        tuple(expected),
        tuple(shm_refs),
        template,
        parsed,
    )
