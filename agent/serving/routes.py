"""The inference server's endpoints: routing a ``Request`` to its handler, and running an
infer request within the server's limits. An exact repeat of an infer request on one
connection (same URL and JSON header) is answered through ``agent.serving.repeat``, within the
same limits, with the same errors, metrics and stats.

Endpoints: health, server and model metadata, infer (JSON, binary tensor and system
shared-memory extensions), shared-memory registration, Triton's model configuration,
statistics and (read-only) model repository extensions (``agent.serving.triton``), and
``/metrics``. Beside OIP's ``/v2/health/live`` and ``/v2/health/ready`` (unchanged),
``/v2/health/agent`` answers the agent's own status (its broker connection), which the
server gets as a callable: serving does not import telemetry. TensorFlow Serving's REST
API (``/v1/models/...``: status, metadata, ``:predict``; ``:classify`` and ``:regress``
answer 501) is a second dialect at the edge only: a predict request is translated into
the input arrays an OIP request gives (``agent.oip.tfs_predict``) and runs through
``_infer`` like any other, within the same limits, errors, metrics and stats.

Every request is answered on the thread of its connection (``agent.serving.http11``): parsing,
ONNX Runtime and encoding run there, with no hop to another thread. ``Admission`` bounds
how many run at once and how many wait; ``RunWatch`` cancels a run past its deadline.

Invariants:
- An infer request takes its reference to the live ``LoadedModel`` once, when it is
  dispatched, and finishes on it; a hot swap never fails a request.
- Bad input never gets a 5xx: ``InvalidRequestError`` → 400, a peer that may not use
  shared memory → 403, ``ModelNotFoundError`` → 404, a wrong method → 405, JSON larger
  than may be parsed → 413, ``NotReadyError``, a full queue or a passed deadline → 503
  with Retry-After.
  ``_error_response`` is the one place that maps the agent's errors to a status. Only an
  unexpected exception gives 500, with its traceback logged.
- At most ``max_concurrency`` requests run and at most ``max_queue`` wait; a request
  still waiting at its deadline never runs, and one still running at its deadline is
  cancelled (ONNX Runtime's terminate flag) and answered 503: its result, even if it
  arrives, is never sent after the deadline.
- Every infer request that reaches a version is counted in its statistics once: a
  success with where its time went (``Phases``, measured here and in the repeat), or a
  failure, whatever refused it.
- JSON is parsed only within bounds, since parsing takes ~12 times its bytes in memory:
  an infer request's JSON part (the whole body, or its ``Inference-Header-Content-Length``)
  up to ``max_json_bytes``, parsed within admission (so at most ``max_concurrency`` at
  once); a register body up to ``_MAX_REGISTER_BYTES``.
- Shared memory is per peer (its uid): a request reaches only the regions its own uid
  registered (``SharedMemoryRegistry.scope``); none over TCP.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any, Final

from agent.base.errors import (
    InferenceError,
    InvalidRequestError,
    ModelNotFoundError,
    NotReadyError,
)
from agent.contracts import version_key
from agent.oip import tfs as tfs_docs
from agent.oip.documents import PlanCache, model_metadata
from agent.oip.shm import OwnedRegions, SharedMemoryDenied, SharedMemoryRegistry
from agent.runtime.models import LoadedModel
from agent.runtime.registry import ModelRegistry
from agent.runtime.stats import Outcome, Phases, RequestStats
from agent.serving.admission import Admission, DeadlineExceeded, Overloaded, RunWatch
from agent.serving.http_messages import RETRY_AFTER, Request, Response, after_response
from agent.serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from agent.serving.metrics import InferenceMetrics
from agent.serving.triton import (
    LOAD_REFUSED,
    LOADING,
    READY,
    IndexEntry,
    RepositoryIndex,
    model_config,
    repository_index,
    statistics,
)

if TYPE_CHECKING:
    import onnxruntime as ort

    from agent.oip.request import parse_infer_request
    from agent.oip.response import encode_infer_response
    from agent.oip.tfs_predict import encode_predict, parse_predict
    from agent.runtime.shadow import ShadowRunner
    from agent.serving.repeat import Repeat, infer_response, remember

# Set by ``import_infer_path`` with the first infer request, and the names above with it.
_INFER_PATH = False

logger = logging.getLogger(__name__)

_MAX_INFER_URLS: Final = 256
_MAX_REGISTER_BYTES: Final = 4096  # {"key", "offset", "byte_size"} and some room
_LIVE_BODY: Final = b'{"live":true}'
_READY_BODY: Final = b'{"ready":true}'
_NOT_READY_BODY: Final = b'{"ready":false}'
# Triton endpoints the agent does not have, and what to use instead.
_NOT_HERE: Final = {
    "logging": "the agent logs to the journal (journalctl -u edge-agent), with no "
    "Triton logging extension",
    "trace": "the agent has no Triton trace extension; its metrics are at /metrics",
    "cudasharedmemory": "the agent runs on the CPU and has no CUDA shared memory; use "
    "system shared memory (/v2/systemsharedmemory) on its Unix socket",
}


class _Forbidden(InvalidRequestError):
    """The peer may not do this."""


class _TooLarge(InvalidRequestError):
    """A part of the request is larger than the server parses."""


class _NotImplemented(InvalidRequestError):
    """An endpoint of a dialect the agent knows but does not serve (501)."""


class _MethodNotAllowed(InvalidRequestError):
    def __init__(self, method: str, allowed: str) -> None:
        super().__init__(f"method {method} not allowed here; use {allowed}")
        self.allowed = allowed


class Router:
    """Answers the requests of every connection of one ``InferenceServer``, each on the
    connection's own thread (``dispatch`` is thread-safe).

    The server calls ``start`` when it starts listening and ``stop`` when it begins to
    stop (from then on, ready and infer answer 503 and waiters give up). The limits are
    fixed at construction.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        server_metadata: bytes,
        shm: SharedMemoryRegistry | None,
        metrics: InferenceMetrics,
        stats: RequestStats,
        repository: RepositoryIndex,
        is_ready: Callable[[], bool],
        agent_status: Callable[[], Mapping[str, Any]] | None = None,
        max_concurrency: int,
        max_queue: int,
        request_deadline_s: float,
        max_json_bytes: int,
    ) -> None:
        self._registry = registry
        self._max_json_bytes = max_json_bytes
        self._shm = shm
        self._metrics = metrics
        self._stats = stats
        self._repository = repository
        self._request_deadline_s = request_deadline_s
        self._server_metadata = server_metadata
        self._is_ready = is_ready
        self._agent_status = agent_status
        self._plans = PlanCache()  # checked request headers, reused by repeat requests
        # Infer URLs (exact bytes) that routed to a served model: (name, version, whether
        # TensorFlow Serving's dialect), so a repeated URL skips parsing its path.
        self._infer_urls: dict[bytes, tuple[str, str | None, bool]] = {}
        self.admission = Admission(max_concurrency, max_queue)
        # Read when /metrics is rendered, not written per request (two locks saved each).
        admission = self.admission
        metrics.in_flight.set_function(lambda: admission.running)
        metrics.queue_depth.set_function(lambda: admission.waiting)
        self._watch = RunWatch(period_s=min(max(request_deadline_s / 20, 0.01), 0.25))
        self._stopping = False

    def start(self) -> None:
        """Start cutting runs at their deadline."""
        self._stopping = False
        self._watch.start()

    def stop(self) -> None:
        """Refuse infer requests and report not ready from now on; wake every waiter."""
        self._stopping = True
        self.admission.stop()

    def close(self) -> None:
        """Stop the deadline watch (after the connections are closed)."""
        self._watch.stop()

    # -- routing

    def dispatch(self, request: Request) -> Response:
        try:
            if request.method == b"POST":
                known = self._infer_urls.get(request.url)
                if known is not None:  # an infer URL seen before: skip parsing the path
                    name, version, tfs = known
                    if tfs:
                        return self._infer(self._resolve_tfs(name, version), request, tfs=True)
                    model = self._resolve(name, version)
                    repeat = request.memo.get(request.url)
                    if (
                        _INFER_PATH
                        and isinstance(repeat, Repeat)
                        and repeat.matches(request, model)
                    ):
                        return self._infer(model, request, repeat)
                    return self._infer(model, request)
            return self._route(request)
        except InferenceError as exc:
            return _error_response(exc)
        except Exception:
            logger.exception("unexpected error serving %r %r", request.method, request.url)
            return Response.error(500, "internal error (see the agent's log)")

    def _route(self, request: Request) -> Response:
        path = request.url.split(b"?", 1)[0].decode("latin-1")
        if len(path) > 1 and path.endswith("/"):
            path = path[:-1]
        if path == "/metrics":
            _require(request.method, b"GET")
            return Response(200, self._metrics.render(), content_type=METRICS_CONTENT_TYPE.encode())
        parts = path.split("/")
        if len(parts) >= 3 and not parts[0] and parts[1] == "v1":
            return self._route_tfs(request, path, parts[2:])
        if len(parts) < 2 or parts[0] or parts[1] != "v2":
            raise ModelNotFoundError(f"no such endpoint: {path}")
        rest = parts[2:]
        method = request.method
        if not rest:
            _require(method, b"GET")
            return Response(200, self._server_metadata)
        if rest[0] == "health" and len(rest) == 2 and rest[1] in ("live", "ready", "agent"):
            _require(method, b"GET")
            if rest[1] == "live":
                return Response(200, _LIVE_BODY)
            ready = not self._stopping and self._is_ready()
            if rest[1] == "agent":
                return self._agent_health(ready)
            if ready:
                return Response(200, _READY_BODY)
            return Response(503, _NOT_READY_BODY)
        if rest == ["models", "stats"]:
            _require(method, b"GET")
            return self._statistics(None, None)
        if rest[0] == "models" and len(rest) >= 2:
            return self._route_model(request, rest[1], rest[2:])
        if rest[0] == "systemsharedmemory" and self._shm is not None:
            return self._route_shm(request, rest[1:])
        if rest[0] == "repository":
            return self._route_repository(request, rest[1:])
        if rest[0] in _NOT_HERE:
            raise ModelNotFoundError(f"no such endpoint: {path}: {_NOT_HERE[rest[0]]}")
        raise ModelNotFoundError(f"no such endpoint: {path}")

    def _agent_health(self, ready: bool) -> Response:
        """``GET /v2/health/agent``: 200 whenever the agent answers (``live`` and ``ready``
        as OIP's endpoints say them), with the status the agent provides (the broker
        connection); ``edge-agent status`` prints it."""
        doc: dict[str, Any] = {"live": True, "ready": ready}
        if self._agent_status is not None:
            doc.update(self._agent_status())
        return Response(200, json.dumps(doc).encode())

    def _route_model(self, request: Request, name: str, rest: list[str]) -> Response:
        version: str | None = None
        if len(rest) >= 2 and rest[0] == "versions":
            version, rest = rest[1], rest[2:]
        if len(rest) > 1 or (rest and rest[0] not in ("ready", "infer", "config", "stats")):
            path = f"/{'/'.join(['v2', 'models', name, *rest])}"
            why = f": {_NOT_HERE[rest[0]]}" if rest[0] in _NOT_HERE else ""
            raise ModelNotFoundError(f"no such endpoint: {path}{why}")
        action = rest[0] if rest else "metadata"
        _require(request.method, b"POST" if action == "infer" else b"GET")
        if action == "stats":
            return self._statistics(name, version)
        model = self._resolve(name, version)  # the one reference this request uses
        if action == "infer":
            self._remember_url(request.url, name, version, tfs=False)
        if action == "metadata":
            return Response(200, json.dumps(model_metadata(model.manifest)).encode())
        if action == "ready":
            return Response(200, json.dumps({"name": model.name, "ready": True}).encode())
        if action == "config":
            return Response(200, json.dumps(model_config(model.manifest)).encode())
        return self._infer(model, request)

    def _remember_url(self, url: bytes, name: str, version: str | None, *, tfs: bool) -> None:
        if len(self._infer_urls) >= _MAX_INFER_URLS:
            self._infer_urls.clear()
        self._infer_urls[url] = (name, version, tfs)

    # -- TensorFlow Serving's REST dialect

    def _route_tfs(self, request: Request, path: str, rest: list[str]) -> Response:
        """``/v1/models/<name>[/versions/<v>]`` (GET: status), ``.../metadata`` (GET),
        ``...:predict`` (POST), ``...:classify`` and ``...:regress`` (POST: 501)."""
        verb: str | None = None
        if rest and ":" in rest[-1]:
            last, verb = rest[-1].split(":", 1)
            rest = [*rest[:-1], last]
        if len(rest) < 2 or rest[0] != "models" or not rest[1]:
            raise ModelNotFoundError(
                f"no such endpoint: {path} (TensorFlow Serving's REST API is under "
                "/v1/models/<name>)"
            )
        name, tail = rest[1], rest[2:]
        version: str | None = None
        if len(tail) >= 2 and tail[0] == "versions":
            version, tail = tail[1], tail[2:]
        elif len(tail) >= 2 and tail[0] == "labels":
            raise ModelNotFoundError(
                f"version labels are not supported ({path}): a device serves one version of "
                "each model; leave the version out, or name it with /versions/<v>"
            )
        if verb is not None:
            if tail or verb not in ("predict", "classify", "regress"):
                raise ModelNotFoundError(f"no such endpoint: {path}")
            _require(request.method, b"POST")
            if verb != "predict":
                raise _NotImplemented(
                    f":{verb} is not served: models here have one signature, "
                    f"{tfs_docs.SIGNATURE!r}, run by :predict (docs/inference-api.md, "
                    "TensorFlow Serving's REST API)"
                )
            model = self._resolve_tfs(name, version)
            self._remember_url(request.url, name, version, tfs=True)
            return self._infer(model, request, tfs=True)
        if tail == ["metadata"]:
            _require(request.method, b"GET")
            model = self._resolve_tfs(name, version)
            return Response(200, json.dumps(tfs_docs.model_metadata(model.manifest)).encode())
        if tail:
            raise ModelNotFoundError(f"no such endpoint: {path}")
        _require(request.method, b"GET")
        return self._tfs_status(name, version)

    def _resolve_tfs(self, name: str, version: str | None) -> LoadedModel:
        """The live version of ``name`` (the one named when ``version`` is given), as
        TensorFlow Serving says it is not found."""
        model = self._registry.get(name)
        if model is not None and (
            version is None or tfs_docs.names_version(version, model.version)
        ):
            return model
        asked = f"Latest({name})" if version is None else f"Specific({name}, {version})"
        if model is None:
            why = f"this device serves {sorted(self._registry.snapshot())}"
        else:
            why = (
                f"this device serves {name} {model.version} "
                f"(version {tfs_docs.version_text(model.version)})"
            )
        raise ModelNotFoundError(f"Servable not found for request: {asked}; {why}")

    def _tfs_status(self, name: str, version: str | None) -> Response:
        """GetModelStatus: every version of ``name`` the device holds (or the one named),
        AVAILABLE when live, LOADING, END when held but not served (with the reason)."""
        held = [e for e in self._repository() if e.name == name]
        if not held:
            live = self._registry.get(name)
            if live is not None:
                held = [IndexEntry(name, live.version, READY, "")]
        if not held:
            raise ModelNotFoundError(
                f"Could not find any versions of model {name}; this device serves "
                f"{sorted(self._registry.snapshot())}"
            )
        if version is not None:
            chosen = [e for e in held if tfs_docs.names_version(version, e.version)]
            if not chosen:
                known = [tfs_docs.version_text(e.version) for e in held]
                raise ModelNotFoundError(
                    f"Could not find version {version} of model {name}; it has {known}"
                )
            held = chosen
        held.sort(key=lambda e: version_key(e.version), reverse=True)
        states = {READY: tfs_docs.AVAILABLE, LOADING: tfs_docs.LOADING}
        doc = tfs_docs.model_status(
            (e.version, states.get(e.state, tfs_docs.END), "" if e.state == READY else e.reason)
            for e in held
        )
        return Response(200, json.dumps(doc).encode())

    def _statistics(self, name: str | None, version: str | None) -> Response:
        """Triton's statistics of every version with figures or live (of model ``name``,
        of version ``version``); 404 when the model or version has neither."""
        keys = set(self._stats.versions())
        keys.update((n, m.version) for n, m in self._registry.snapshot().items())
        chosen = sorted(
            (n, v) for n, v in keys if name in (None, n) and version in (None, v)
        )  # fmt: skip
        if name is not None and not chosen:
            served = self._registry.get(name)
            if served is None and not any(n == name for n, _ in keys):
                served_all = sorted(self._registry.snapshot())
                raise ModelNotFoundError(f"unknown model {name!r} (serving: {served_all})")
            raise ModelNotFoundError(
                f"model {name!r} has no version {version!r} on this device"
                + (f" (serving {served.version})" if served is not None else "")
            )
        doc = statistics((n, v, self._stats.execution(n, v)) for n, v in chosen)
        return Response(200, json.dumps(doc).encode())

    def _route_repository(self, request: Request, rest: list[str]) -> Response:
        """``/index`` (POST, optional body ``{"ready": bool}``) and
        ``/models/<name>/load`` or ``unload`` (POST: refused, 403)."""
        if rest == ["index"]:
            _require(request.method, b"POST")
            if len(request.body) > _MAX_REGISTER_BYTES:
                raise _TooLarge(
                    f"repository index body of {len(request.body)} bytes, expected at most "
                    f'{_MAX_REGISTER_BYTES}: {{"ready": true}} or nothing'
                )
            ready_only = _ready_filter(bytes(request.body))
            doc = repository_index(self._repository(), ready_only)
            return Response(200, json.dumps(doc).encode())
        if len(rest) == 3 and rest[0] == "models" and rest[2] in ("load", "unload"):
            _require(request.method, b"POST")
            raise _Forbidden(f"cannot {rest[2]} {rest[1]!r}: {LOAD_REFUSED}")
        raise ModelNotFoundError(f"no such endpoint: /v2/repository/{'/'.join(rest)}")

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
        owner = request.peer_uid
        if owner is None:
            raise _Forbidden("shared memory is only available on the Unix socket")
        if action == "status":
            return Response(200, json.dumps(shm.status(name, owner)).encode())
        if action == "register":
            if name is None:
                raise ModelNotFoundError(
                    "register needs a region: /v2/systemsharedmemory/region/<name>/register"
                )
            if len(request.body) > _MAX_REGISTER_BYTES:
                raise _TooLarge(
                    f"register body of {len(request.body)} bytes, expected at most "
                    f"{_MAX_REGISTER_BYTES}: {{key, offset, byte_size}}"
                )
            try:
                doc = json.loads(bytes(request.body))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
                raise InvalidRequestError(f"register body is not valid JSON: {exc}") from None
            shm.register(name, doc, owner)
        else:
            shm.unregister(name, owner)
        return Response(200, b"{}")

    # -- infer

    def _infer(
        self,
        model: LoadedModel,
        request: Request,
        repeat: Repeat | None = None,
        *,
        tfs: bool = False,
    ) -> Response:
        """Run an infer request within the limits: the full path, or through ``repeat``
        when it is an exact repeat of an earlier request on its connection. ``tfs``: a
        TensorFlow Serving predict request (its body all JSON), run by the same path."""
        if self._stopping or not self._is_ready():
            self._metrics.record_error(model.name, model.version, "not_ready")
            self._refused(model, request)
            raise NotReadyError("the agent is not ready to serve (starting, stopping or draining)")
        header_length = None if tfs else request.header_length
        json_length = len(request.body) if header_length is None else header_length
        if json_length > self._max_json_bytes:
            self._refused(model, request)
            raise _TooLarge(
                f"the request's JSON is {json_length} bytes, at most {self._max_json_bytes} "
                "are parsed ([inference] max_json_bytes): send large tensors as binary data "
                "(Inference-Header-Content-Length) or in shared memory"
            )
        deadline = request.received + self._request_deadline_s
        phases = Phases()
        waited = perf_counter_ns()
        try:
            self.admission.enter(deadline)
        except NotReadyError as exc:
            if isinstance(exc, Overloaded | DeadlineExceeded):
                kind = "overloaded" if isinstance(exc, Overloaded) else "deadline"
                self._metrics.record_error(model.name, model.version, kind)
            self._refused(model, request)
            raise
        phases.queue_ns = perf_counter_ns() - waited
        # A candidate in shadow for this model (agent.runtime.shadow) gets a copy of this
        # request when it claims it: the full path then runs, which has the inputs and
        # outputs as arrays. The client's answer never waits for the candidate.
        tap = self._registry.shadow(model.name)
        if tap is not None:
            if tap.claim(model.version):
                repeat = None
            else:
                tap = None
        try:
            # A repeat's options are reused while its runs end in time (see RunWatch).
            key, options = self._watch.begin(deadline, None if repeat is None else repeat.options)
            try:
                shared = self._shared(request)
                if repeat is not None:
                    response = repeat.run(
                        model, request.body, shared, options, phases, request=request
                    )
                elif tfs:
                    response = _execute_tfs(model, request, options, phases, tap)
                else:
                    response = _execute(model, request, shared, self._plans, options, phases, tap)
            except Exception as exc:
                if repeat is not None:
                    import onnxruntime as ort

                    repeat.options = ort.RunOptions()
                if self._watch.end(key, options):
                    return self._expired(model, request)
                return self._failed(model, request, exc)
            if self._watch.end(key, options) or time.monotonic() > deadline:
                if repeat is not None:
                    import onnxruntime as ort

                    repeat.options = ort.RunOptions()
                return self._expired(model, request)
            return self._succeeded(model, request, response, phases)
        finally:
            self.admission.leave()
            if tap is not None:
                tap.release()  # a claim the run did not submit (nothing once it did)

    def _refused(self, model: LoadedModel, request: Request) -> None:
        """An infer request for ``model`` refused before it ran: a failure in Triton's
        statistics."""
        self._stats.record_refused(model.name, model.version, time.monotonic() - request.received)

    def _shared(self, request: Request) -> OwnedRegions | None:
        """The regions of the request's peer (its uid); TCP peers have none."""
        if self._shm is None or request.peer_uid is None:
            return None
        return self._shm.scope(request.peer_uid)

    def _expired(self, model: LoadedModel, request: Request) -> Response:
        """A run that outlived the deadline: 503, and an error of the version (a request
        that only waited past it is not the version's fault and is not recorded here)."""
        self._metrics.record_error(model.name, model.version, "deadline")
        latency = time.monotonic() - request.received
        self._stats.record(model.name, model.version, latency, Outcome.ERROR)
        return _error_response(
            DeadlineExceeded(
                f"no answer within the request deadline of {self._request_deadline_s:g} s"
            )
        )

    def _succeeded(
        self, model: LoadedModel, request: Request, response: Response, phases: Phases
    ) -> Response:
        latency = time.monotonic() - request.received
        self._metrics.record_request(model.name, model.version, latency)
        self._stats.record(model.name, model.version, latency, Outcome.OK, phases)
        return response

    def _failed(self, model: LoadedModel, request: Request, exc: BaseException) -> Response:
        latency = time.monotonic() - request.received
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
        self._stats.record(model.name, model.version, latency, outcome)
        return response


def _execute(
    model: LoadedModel,
    request: Request,
    shm: OwnedRegions | None,
    plans: PlanCache,
    options: ort.RunOptions | None,
    phases: Phases,
    tap: ShadowRunner | None = None,
) -> Response:
    """Parse, run and encode one infer request (``options``: the run's, to cancel it;
    ``phases``: where its time goes); keep it as a ``Repeat`` in its connection's memo
    when it can be one. ``tap``: a shadow runner that claimed this request, handed a
    copy of its inputs and outputs after the run (or released when the run fails)."""
    if not _INFER_PATH:
        import_infer_path()
    started = perf_counter_ns()
    parsed = parse_infer_request(
        request.body,
        model.manifest,
        header_length=request.header_length,
        shm=shm,
        plans=plans,
    )
    parsed_at = perf_counter_ns()
    cpu = time.thread_time() if tap is not None else 0.0
    outputs = model.infer(parsed.inputs, parsed.output_names, run_options=options)
    ran_at = perf_counter_ns()
    if tap is not None:  # copies them: the caller releases the claim if this is not reached
        tap.submit(parsed.inputs, outputs, (ran_at - parsed_at) / 1e9, time.thread_time() - cpu)
    drift = model.drift
    if drift is not None:  # what it serves, against its bundle's reference: counted
        inputs = parsed.inputs  # once the answer is written (off the client's path)
        after_response(request, lambda: drift.observe(inputs, outputs))
    response = infer_response(
        *encode_infer_response(model.name, model.version, outputs, parsed, shm)
    )
    phases.input_ns = parsed_at - started
    phases.infer_ns = ran_at - parsed_at
    phases.output_ns = perf_counter_ns() - ran_at
    remember(request, model, parsed, outputs)
    return response


def _execute_tfs(
    model: LoadedModel,
    request: Request,
    options: ort.RunOptions | None,
    phases: Phases,
    tap: ShadowRunner | None,
) -> Response:
    """``_execute`` for a TensorFlow Serving predict request: its body translated into
    the input arrays an OIP request gives, run, its outputs written as TensorFlow Serving
    writes them. The shadow copy and the drift count are ``_execute``'s."""
    if not _INFER_PATH:
        import_infer_path()
    started = perf_counter_ns()
    parsed = parse_predict(request.body, model.manifest)
    parsed_at = perf_counter_ns()
    cpu = time.thread_time() if tap is not None else 0.0
    outputs = model.infer(parsed.inputs, run_options=options)
    ran_at = perf_counter_ns()
    if tap is not None:
        tap.submit(parsed.inputs, outputs, (ran_at - parsed_at) / 1e9, time.thread_time() - cpu)
    drift = model.drift
    if drift is not None:
        inputs = parsed.inputs
        after_response(request, lambda: drift.observe(inputs, outputs))
    response = Response(200, encode_predict(outputs, parsed.row))
    phases.input_ns = parsed_at - started
    phases.infer_ns = ran_at - parsed_at
    phases.output_ns = perf_counter_ns() - ran_at
    return response


def import_infer_path() -> None:
    """Import what parses, encodes and repeats infer requests, with the first infer request
    for a served model (numpy with them, which the model's load has already brought in):
    an agent that serves no model never imports numpy (tests/agent/test_startup_imports.py).
    The agent calls it once it has restored a model, before it listens, so the first
    request does not wait for these imports (~30 ms). Idempotent; a race only imports
    twice what ``sys.modules`` already holds."""
    global _INFER_PATH, Repeat, encode_infer_response, infer_response
    global parse_infer_request, remember, parse_predict, encode_predict
    from agent.oip.request import parse_infer_request
    from agent.oip.response import encode_infer_response
    from agent.oip.tfs_predict import encode_predict, parse_predict
    from agent.serving.repeat import Repeat, infer_response, remember

    _INFER_PATH = True


def _ready_filter(body: bytes) -> bool:
    """The ``ready`` of a repository index request's body (none, empty or absent: False).
    Raises InvalidRequestError for a body that is not a JSON object or whose ``ready`` is
    not a boolean."""
    if not body.strip():
        return False
    try:
        doc: Any = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidRequestError(f"repository index body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidRequestError(
            f'repository index body: expected an object such as {{"ready": true}}, got {doc!r}'
        )
    ready = doc.get("ready", False)
    if not isinstance(ready, bool):
        raise InvalidRequestError(
            f"repository index body: expected ready to be true or false, got {ready!r}"
        )
    return ready


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
    if isinstance(exc, _TooLarge):
        return Response.error(413, str(exc))
    if isinstance(exc, _NotImplemented):
        return Response.error(501, str(exc))
    if isinstance(exc, InvalidRequestError):
        return Response.error(400, str(exc))
    if isinstance(exc, ModelNotFoundError):
        return Response.error(404, str(exc))
    if isinstance(exc, NotReadyError):
        return Response.error(503, str(exc), extra=RETRY_AFTER)
    logger.error("inference failed: %s", exc)
    return Response.error(500, str(exc))
