"""The inference server's endpoints: routing a ``Request`` to its handler, and where an
infer request runs.

Endpoints: health, server and model metadata, infer (JSON, binary tensor and system
shared-memory extensions), shared-memory registration, and ``/metrics``.

Where a request runs: parsing, ONNX Runtime and encoding run in a bounded thread pool,
so a slow model never stalls health checks; but the hop to a thread and back costs
~100-200 µs on a small device, more than a tiny model's whole run. So the router times
every run per model version and runs a version *inline* on the event loop once its
recent runs (parse + run + encode, an EWMA over at least ``_INLINE_SAMPLES``) take at
most ``inline_max_run_s`` and the request body is small. One run slower than four times
the bound sends the version back to the pool at once: the loop stalls at most one
such run.

Invariants:
- An infer request takes its reference to the live ``LoadedModel`` once, when it is
  dispatched, and finishes on it; a hot swap never fails a request.
- Bad input never gets a 5xx: ``InvalidRequestError`` → 400, a peer that may not use
  shared memory → 403, ``ModelNotFoundError`` → 404, a wrong method → 405,
  ``NotReadyError``, a full queue or a passed deadline → 503 with Retry-After.
  ``_error_response`` is the one place that maps the agent's errors to a status. Only an
  unexpected exception gives 500, with its traceback logged.
- At most ``max_concurrency`` requests run in the pool and at most ``max_queue`` wait
  for it; a request still waiting at its deadline never runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Final

from agent.errors import (
    InferenceError,
    InvalidRequestError,
    ModelNotFoundError,
    NotReadyError,
)
from agent.http11 import RETRY_AFTER, Request, Response
from agent.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from agent.metrics import InferenceMetrics
from agent.oip import encode_infer_response, model_metadata, parse_infer_request
from agent.runtime import LoadedModel, ModelRegistry
from agent.shm import SharedMemoryDenied, SharedMemoryRegistry
from agent.stats import Outcome, RequestStats

logger = logging.getLogger(__name__)

_BINARY: Final = b"application/octet-stream"
_INLINE_SAMPLES: Final = 8
_INLINE_MAX_BODY: Final = 64 * 1024
_LIVE_BODY: Final = b'{"live":true}'
_READY_BODY: Final = b'{"ready":true}'
_NOT_READY_BODY: Final = b'{"ready":false}'


class _DeadlineExceeded(NotReadyError):
    """The request waited past its deadline for a slot; it did not run."""


class _Overloaded(NotReadyError):
    """Every slot is busy and the queue is full."""


class _Forbidden(InvalidRequestError):
    """The peer may not do this."""


class _MethodNotAllowed(InvalidRequestError):
    def __init__(self, method: str, allowed: str) -> None:
        super().__init__(f"method {method} not allowed here; use {allowed}")
        self.allowed = allowed


class RunTimes:
    """Recent run times of one model version (an EWMA), to decide where it runs."""

    __slots__ = ("ewma_s", "samples", "version")

    def __init__(self, version: str) -> None:
        self.version = version
        self.samples = 0
        self.ewma_s = 0.0

    def add(self, seconds: float, slow_s: float) -> None:
        if self.samples == 0 or seconds > slow_s:
            self.ewma_s = seconds  # one slow run demotes at once
        else:
            self.ewma_s = 0.8 * self.ewma_s + 0.2 * seconds
        self.samples += 1


class Router:
    """Answers the requests of every connection of one ``InferenceServer``.

    ``dispatch`` returns a ``Response`` at once, or an awaitable of one when the request
    runs in the pool. The server calls ``start`` with the pool when it starts listening
    and ``stop`` when it begins to stop (from then on, ready and infer answer 503); it
    owns the pool and shuts it down. The limits are fixed at construction.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        server_metadata: bytes,
        shm: SharedMemoryRegistry | None,
        metrics: InferenceMetrics,
        stats: RequestStats | None,
        is_ready: Callable[[], bool],
        max_concurrency: int,
        max_queue: int,
        request_deadline_s: float,
        inline_max_run_s: float,
    ) -> None:
        self._registry = registry
        self._shm = shm
        self._metrics = metrics
        self._stats = stats
        self._max_concurrency = max_concurrency
        self._max_queue = max_queue
        self._request_deadline_s = request_deadline_s
        self._inline_max_run_s = inline_max_run_s
        self.admitted = 0  # requests running in the pool or waiting for it
        self._server_metadata = server_metadata
        self._is_ready = is_ready
        self._run_times: dict[str, RunTimes] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False

    def start(self, executor: ThreadPoolExecutor) -> None:
        """Serve on the running loop; infer requests that do not run inline use ``executor``."""
        self._loop = asyncio.get_running_loop()
        self._executor = executor
        self._stopping = False

    def stop(self) -> None:
        """Refuse infer requests and report not ready from now on."""
        self._stopping = True

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    # -- routing

    def dispatch(self, request: Request) -> Response | Awaitable[Response]:
        try:
            return self._route(request)
        except InferenceError as exc:
            return _error_response(exc)
        except Exception:
            logger.exception("unexpected error serving %r %r", request.method, request.url)
            return Response.error(500, "internal error (see the agent's log)")

    def _route(self, request: Request) -> Response | Awaitable[Response]:
        path = request.url.split(b"?", 1)[0].decode("latin-1")
        if len(path) > 1 and path.endswith("/"):
            path = path[:-1]
        if path == "/metrics":
            _require(request.method, b"GET")
            return Response(200, self._metrics.render(), content_type=METRICS_CONTENT_TYPE.encode())
        parts = path.split("/")
        if len(parts) < 2 or parts[0] or parts[1] != "v2":
            raise ModelNotFoundError(f"no such endpoint: {path}")
        rest = parts[2:]
        method = request.method
        if not rest:
            _require(method, b"GET")
            return Response(200, self._server_metadata)
        if rest[0] == "health" and len(rest) == 2 and rest[1] in ("live", "ready"):
            _require(method, b"GET")
            if rest[1] == "live":
                return Response(200, _LIVE_BODY)
            if not self._stopping and self._is_ready():
                return Response(200, _READY_BODY)
            return Response(503, _NOT_READY_BODY)
        if rest[0] == "models" and len(rest) >= 2:
            return self._route_model(request, rest[1], rest[2:])
        if rest[0] == "systemsharedmemory" and self._shm is not None:
            return self._route_shm(request, rest[1:])
        raise ModelNotFoundError(f"no such endpoint: {path}")

    def _route_model(
        self, request: Request, name: str, rest: list[str]
    ) -> Response | Awaitable[Response]:
        version: str | None = None
        if len(rest) >= 2 and rest[0] == "versions":
            version, rest = rest[1], rest[2:]
        if len(rest) > 1 or (rest and rest[0] not in ("ready", "infer")):
            raise ModelNotFoundError(
                f"no such endpoint: /{'/'.join(['v2', 'models', name, *rest])}"
            )
        action = rest[0] if rest else "metadata"
        _require(request.method, b"POST" if action == "infer" else b"GET")
        model = self._resolve(name, version)  # the one reference this request uses
        if action == "metadata":
            return Response(200, json.dumps(model_metadata(model.manifest)).encode())
        if action == "ready":
            return Response(200, json.dumps({"name": model.name, "ready": True}).encode())
        return self._infer(model, request)

    def _resolve(self, name: str, version: str | None) -> LoadedModel:
        model = self._registry.get(name)
        if model is None:
            served = sorted(self._registry.snapshot())
            raise ModelNotFoundError(f"unknown model {name!r} (serving: {served})")
        if version is not None and version != model.version:
            raise ModelNotFoundError(
                f"model {name!r} version {version!r} is not served (serving {model.version})"
            )
        return model

    def _route_shm(self, request: Request, rest: list[str]) -> Response:
        """``[/region/<name>]/status`` (GET), ``/region/<name>/register`` (POST),
        ``[/region/<name>]/unregister`` (POST)."""
        shm = self._shm
        assert shm is not None
        name: str | None = None
        if len(rest) == 3 and rest[0] == "region":
            name, rest = rest[1], rest[2:]
        if len(rest) != 1 or rest[0] not in ("status", "register", "unregister"):
            raise ModelNotFoundError(f"no such endpoint: /v2/systemsharedmemory/{'/'.join(rest)}")
        action = rest[0]
        _require(request.method, b"GET" if action == "status" else b"POST")
        if action == "status":
            return Response(200, json.dumps(shm.status(name)).encode())
        if request.peer_uid is None:
            raise _Forbidden("shared memory is only available on the Unix socket")
        if action == "register":
            if name is None:
                raise ModelNotFoundError(
                    "register needs a region: /v2/systemsharedmemory/region/<name>/register"
                )
            try:
                doc = json.loads(request.body)
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
                raise InvalidRequestError(f"register body is not valid JSON: {exc}") from None
            shm.register(name, doc, request.peer_uid)
        else:
            shm.unregister(name)
        return Response(200, b"{}")

    # -- infer

    def _infer(self, model: LoadedModel, request: Request) -> Response | Awaitable[Response]:
        if self._stopping or not self._is_ready():
            self._metrics.record_error(model.name, model.version, "not_ready")
            raise NotReadyError("the agent is not ready to serve (starting, stopping or draining)")
        if self.runs_inline(model, len(request.body)):
            try:
                response, cost = _execute(model, request, self._shm, None)
            except Exception as exc:
                return self._failed(model, request, exc)
            self._timed(model, cost)
            return self._succeeded(model, request, response)
        if self.admitted >= self._max_concurrency + self._max_queue:
            self._metrics.record_error(model.name, model.version, "overloaded")
            raise _Overloaded(
                f"overloaded: {self._max_concurrency} requests running and {self._max_queue} "
                f"waiting; retry later"
            )
        return self._run_in_pool(model, request)

    def runs_inline(self, model: LoadedModel, body_bytes: int) -> bool:
        """Whether an infer request of ``body_bytes`` for ``model`` runs on the loop."""
        if self._inline_max_run_s <= 0 or body_bytes > _INLINE_MAX_BODY:
            return False
        times = self._run_times.get(model.name)
        return (
            times is not None
            and times.version == model.version
            and times.samples >= _INLINE_SAMPLES
            and times.ewma_s <= self._inline_max_run_s
        )

    def _timed(self, model: LoadedModel, cost_s: float) -> None:
        times = self._run_times.get(model.name)
        if times is None or times.version != model.version:
            times = self._run_times[model.name] = RunTimes(model.version)
        times.add(cost_s, 4 * self._inline_max_run_s)

    async def _run_in_pool(self, model: LoadedModel, request: Request) -> Response:
        loop = self._loop
        assert self._executor is not None and loop is not None
        self.admitted += 1
        self._update_gauges()
        # time.monotonic is the loop's clock too (asyncio's default).
        deadline = request.received + self._request_deadline_s
        future = loop.run_in_executor(self._executor, _execute, model, request, self._shm, deadline)
        waiter = loop.create_future()

        def wake(_: object = None) -> None:
            if not waiter.done():
                waiter.set_result(None)

        future.add_done_callback(self._released)
        future.add_done_callback(wake)
        timer = loop.call_at(deadline, wake)
        try:
            await waiter
        finally:
            timer.cancel()
        if not future.done():  # still running or waiting: answer now, the slot frees later
            self._metrics.record_error(model.name, model.version, "deadline")
            return _error_response(
                _DeadlineExceeded(
                    f"no answer within the request deadline of {self._request_deadline_s:g} s"
                )
            )
        try:
            response, cost = future.result()
        except RuntimeError as exc:  # the executor was shut down by stop()
            if self._stopping:
                return _error_response(NotReadyError(f"the agent is stopping: {exc}"))
            return self._failed(model, request, exc)
        except Exception as exc:
            return self._failed(model, request, exc)
        self._timed(model, cost)
        return self._succeeded(model, request, response)

    def _released(self, _future: object) -> None:
        self.admitted -= 1
        self._update_gauges()

    def _update_gauges(self) -> None:
        self._metrics.in_flight.set(min(self.admitted, self._max_concurrency))
        self._metrics.queue_depth.set(max(self.admitted - self._max_concurrency, 0))

    def _succeeded(self, model: LoadedModel, request: Request, response: Response) -> Response:
        latency = self._now() - request.received
        self._metrics.record_request(model.name, model.version, latency)
        if self._stats is not None:
            self._stats.record(model.name, model.version, latency, Outcome.OK)
        return response

    def _failed(self, model: LoadedModel, request: Request, exc: BaseException) -> Response:
        latency = self._now() - request.received
        if isinstance(exc, _DeadlineExceeded):
            self._metrics.record_error(model.name, model.version, "deadline")
            return _error_response(exc)
        if isinstance(exc, InvalidRequestError):
            outcome, kind = Outcome.CLIENT_ERROR, "client_error"
            response = _error_response(exc)
        elif isinstance(exc, InferenceError):
            outcome, kind = Outcome.ERROR, "model_error"
            response = _error_response(exc)
        else:
            logger.error("unexpected error running %s %s", model.name, model.version, exc_info=exc)
            outcome, kind = Outcome.ERROR, "model_error"
            response = Response.error(500, "internal error (see the agent's log)")
        self._metrics.record_request(model.name, model.version, None)
        self._metrics.record_error(model.name, model.version, kind)
        if self._stats is not None:
            self._stats.record(model.name, model.version, latency, outcome)
        return response


def _execute(
    model: LoadedModel,
    request: Request,
    shm: SharedMemoryRegistry | None,
    deadline: float | None,
) -> tuple[Response, float]:
    """Parse, run and encode one infer request; return the response and its cost (s).

    Runs in a worker thread, or inline on the loop for fast models. Raises
    _DeadlineExceeded when the request waited past ``deadline`` (monotonic time).
    """
    started = time.perf_counter()
    if deadline is not None and time.monotonic() > deadline:
        raise _DeadlineExceeded("the request waited past its deadline for a free slot")
    shared = shm if request.peer_uid is not None else None
    parsed = parse_infer_request(
        request.body, model.manifest, header_length=request.header_length, shm=shared
    )
    outputs = model.infer(parsed.inputs, parsed.output_names)
    parts, header_length = encode_infer_response(model.name, model.version, outputs, parsed, shared)
    if header_length is None:
        response = Response(200, parts)
    else:
        response = Response(
            200,
            parts,
            content_type=_BINARY,
            extra=b"Inference-Header-Content-Length: %d\r\n" % header_length,
        )
    return response, time.perf_counter() - started


def _require(method: bytes, allowed: bytes) -> None:
    if method != allowed:
        raise _MethodNotAllowed(method.decode("latin-1"), allowed.decode("latin-1"))


def _error_response(exc: InferenceError) -> Response:
    """Map an error to its HTTP status: the only place that chooses a status code for
    the agent's errors (the transport chooses its own for unparseable bytes)."""
    if isinstance(exc, _MethodNotAllowed):
        return Response.error(405, str(exc), extra=f"Allow: {exc.allowed}\r\n".encode())
    if isinstance(exc, _Forbidden | SharedMemoryDenied):
        return Response.error(403, str(exc))
    if isinstance(exc, InvalidRequestError):
        return Response.error(400, str(exc))
    if isinstance(exc, ModelNotFoundError):
        return Response.error(404, str(exc))
    if isinstance(exc, NotReadyError):
        return Response.error(503, str(exc), extra=RETRY_AFTER)
    logger.error("inference failed: %s", exc)
    return Response.error(500, str(exc))
