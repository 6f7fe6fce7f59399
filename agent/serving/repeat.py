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

A repeat whose tensors lie in memory that stays put for the request (shared memory, a
body read into a buffer) runs through ONNX Runtime's I/O binding (``BoundRun``): the
model reads its inputs where they lie and writes its outputs into shared memory or into
the repeat's own buffers, which the response sends. No numpy array is made on either
side of the run, which saved 60-90 µs a request cold for the CNN of
``bench/infer_overhead.py``. The binding is the model's, kept under the repeat's key,
and made again when the addresses change (a region registered again is mapped
elsewhere, a body buffer reallocated).

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
  ``agent.runtime.registry`` promises, not when an idle connection next calls.
- A binding is only run with every address it was made for checked on this request,
  and with a view of every region held for the run (an unregistered region stays mapped
  until the run ends). It is not made for outputs overlapping an input, for tensors not
  aligned to their dtype (a client that does not pad its JSON header) or for a body that
  is ``bytes``; a bound run that fails other than at its deadline (an output of a new
  shape, the model failing) is run again unbound, which answers it as the full path
  would, and its repeat stops binding.
- Admission, deadlines, errors, metrics and stats are the router's, as for any request.
"""

from __future__ import annotations

import ctypes
import itertools
import weakref
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import numpy as np

from agent.base.errors import InferenceError
from agent.oip.documents import InferRequest, ResponseTemplate
from agent.oip.response import encode_infer_response, template_key
from agent.oip.shm import OwnedRegions
from agent.oip.tensors import tensor_to_bytes
from agent.runtime.models import Bound, BoundRun, LoadedModel, RunTerminatedError
from agent.runtime.stats import Phases
from agent.serving.http_messages import Request, Response, after_response

if TYPE_CHECKING:
    import onnxruntime as ort

_BINARY: Final = b"application/octet-stream"
_MAX_PER_CONNECTION: Final = 8  # distinct infer URLs remembered per connection
_KEYS: Final = itertools.count()  # of the bindings repeats keep on their models


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
        "addresses",
        "bindable",
        "body_length",
        "bound_response",
        "buffers",
        "header",
        "header_length",
        "in_body",
        "inputs",
        "key",
        "model",
        "names",
        "options",
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
        # Runs go through ONNX Runtime's I/O binding (``_run_bound``): the model keeps it
        # under ``key``, made for ``addresses`` (of the shared-memory views, then of the
        # body when an input is in it).
        self.bindable = all(0 not in i.shape for i in inputs) and all(
            0 not in o.shape for o in outputs
        )
        self.in_body = any(spec.view < 0 for spec in inputs)
        self.key = next(_KEYS)
        # The RunOptions of this repeat's runs, while they end in time (routes._infer).
        import onnxruntime as ort  # imported already: a model loaded

        self.options = ort.RunOptions()
        self.addresses: list[int] | None = None
        self.buffers: list[np.ndarray] = []  # the binary outputs of bound runs
        self.bound_response: Response | None = None

    def __del__(self) -> None:
        model = self.model()
        if model is not None:
            model.unbind(self.key)

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
        shm: OwnedRegions | None,
        options: ort.RunOptions,
        phases: Phases,
        request: Request | None = None,
    ) -> Response:
        """Answer a repeat (``body``: its body) on ``model``, the one it ``matches``,
        noting where its time goes in ``phases`` (a bound run has no outputs to encode:
        the model wrote them where the response sends them from). Raises as the full
        path does. With ``request``, the model's drift sketch counts the run once the
        response is written (``after_response``; else at once)."""
        started = perf_counter_ns()
        views: list[memoryview] = []  # held to the end: they keep the regions mapped
        addresses: list[int] | None = [] if self.bindable else None
        if self.shm_refs:
            assert shm is not None  # only made with shared memory available
            views = shm.views(self.shm_refs, addresses)  # every region checked as it is now
        if addresses is not None and self.in_body:
            addresses.append(_address_of(body))
        bound_ns = 0  # a bound run that failed, to be run again unbound
        if addresses is not None and (not addresses or addresses[-1] >= 0):
            checked_at = perf_counter_ns()
            response = self._run_bound(model, addresses, options)
            ran_at = perf_counter_ns()
            if response is not None:
                if model.drift is not None:
                    self._observe_bound(model, body, views, request)
                phases.input_ns = checked_at - started
                phases.infer_ns = ran_at - checked_at
                phases.output_ns = 0  # the model wrote them where the response is
                return response
            bound_ns = ran_at - checked_at
        inputs: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            if spec.view < 0:
                array = np.frombuffer(body, spec.wire, spec.n_values, spec.offset)
            else:
                array = np.frombuffer(views[spec.view], spec.wire)
            inputs[spec.name] = array.reshape(spec.shape)
        read_at = perf_counter_ns()
        results = model.run(self.names, inputs, options)
        ran_at = perf_counter_ns()
        drift = model.drift
        if drift is not None:
            outputs_ = dict(zip(self.names, results, strict=True))
            if request is None:
                drift.observe(inputs, outputs_)
            else:
                after_response(request, lambda: drift.observe(inputs, outputs_))
        phases.input_ns = read_at - started - bound_ns
        phases.infer_ns = ran_at - read_at + bound_ns
        parts: list[bytes | memoryview] = [self.template.header]
        for expected, array in zip(self.outputs, results, strict=True):
            if array.dtype != expected.dtype or array.shape != expected.shape:
                outputs = dict(zip(self.names, results, strict=True))
                response = infer_response(
                    *encode_infer_response(model.name, model.version, outputs, self.request, shm)
                )
                phases.output_ns = perf_counter_ns() - ran_at
                return response
            if expected.view < 0:
                parts.append(tensor_to_bytes(array))
            else:
                views[expected.view][:] = tensor_to_bytes(array)
        phases.output_ns = perf_counter_ns() - ran_at
        if self.response is not None:
            return self.response
        return infer_response(parts, self.template.header_length)

    def _observe_bound(
        self,
        model: LoadedModel,
        body: bytes | bytearray | memoryview,
        views: list[memoryview],
        request: Request | None,
    ) -> None:
        """Count a bound run in the model's drift sketch, once the response is written
        (with ``request``): its inputs where they lie, its outputs where the run wrote
        them (views, no copies; the connection reads no other request before, so the
        body and this repeat's buffers are as the run left them)."""
        drift = model.drift
        assert drift is not None
        if request is not None:
            after_response(request, lambda: self._observe_bound(model, body, views, None))
            return
        inputs = {
            spec.name: (
                np.frombuffer(body, spec.wire, spec.n_values, spec.offset)
                if spec.view < 0
                else np.frombuffer(views[spec.view], spec.wire)
            ).reshape(spec.shape)
            for spec in self.inputs
        }
        outputs: dict[str, np.ndarray] = {}
        buffers = iter(self.buffers)
        for name, spec in zip(self.names, self.outputs, strict=True):
            if spec.view < 0:
                outputs[name] = next(buffers)
            else:
                outputs[name] = np.frombuffer(views[spec.view], spec.dtype).reshape(spec.shape)
        drift.observe(inputs, outputs)

    def _run_bound(
        self, model: LoadedModel, addresses: list[int], options: ort.RunOptions
    ) -> Response | None:
        """Run through the model's binding for these ``addresses`` (made when there is
        none yet, or the regions moved): ONNX Runtime reads the inputs where they are and
        writes the outputs where the response says, with no numpy array on either side.
        None when the request must run unbound: the binding cannot be made, or the run
        failed other than at its deadline (an output of another shape than the
        template's, or the model failing, which the unbound run then reports). Either
        way this repeat stops binding."""
        bound = model.bound_runs.get(self.key) if addresses == self.addresses else None
        if bound is None:
            bound = self._bind(model, addresses)
            if bound is None:
                self.bindable = False
                return None
        try:
            bound.run(options)
        except RunTerminatedError:
            raise
        except InferenceError:
            self.bindable = False
            model.unbind(self.key)
            return None
        return self.bound_response

    def _bind(self, model: LoadedModel, addresses: list[int]) -> BoundRun | None:
        """Bind the inputs and outputs at ``addresses`` (binary outputs: to buffers of
        this repeat, which its response sends); None when an output would overlap an
        input or the model cannot bind."""
        inputs = [
            Bound(
                spec.name,
                spec.wire,
                spec.shape,
                addresses[spec.view] if spec.view >= 0 else addresses[-1] + spec.offset,
            )
            for spec in self.inputs
        ]
        outputs: list[Bound] = []
        buffers: list[np.ndarray] = []
        for name, spec in zip(self.names, self.outputs, strict=True):
            if spec.view >= 0:
                address = addresses[spec.view]
            else:
                buffers.append(np.empty(spec.shape, spec.dtype))
                address = buffers[-1].ctypes.data
            outputs.append(Bound(name, spec.dtype, spec.shape, address))
        if _overlap(inputs, outputs) or any(  # misaligned: a client that does not pad
            t.address % t.dtype.itemsize for t in (*inputs, *outputs)
        ):
            return None
        bound = model.bind(self.key, inputs, outputs)
        if bound is None:
            return None
        self.addresses = addresses
        self.buffers = buffers
        self.bound_response = self.response
        if self.bound_response is None:
            parts: list[bytes | memoryview] = [self.template.header]
            parts += [b.data.cast("B") for b in buffers]
            self.bound_response = infer_response(parts, self.template.header_length)
        return bound


def _address_of(body: bytes | bytearray | memoryview) -> int:
    """Where a body's bytes are, for a writable one (a large body is read into a buffer);
    -1 for another (a small body is ``bytes``)."""
    try:
        anchor = ctypes.c_char.from_buffer(body)
    except TypeError:
        return -1
    return ctypes.addressof(anchor)


def _overlap(inputs: list[Bound], outputs: list[Bound]) -> bool:
    """Whether an output's bytes overlap an input's (or another output's)."""
    spans = sorted(
        (t.address, t.address + t.dtype.itemsize * int(np.prod(t.shape)))
        for t in (*inputs, *outputs)
    )
    return any(end > start for (_, end), (start, _) in itertools.pairwise(spans))


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
