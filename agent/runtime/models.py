"""Models in memory: load an unpacked bundle into ONNX Runtime, check it, make it live.

This module owns the ONNX Runtime sessions of the agent and the registry that says which
version of each model serves requests.

Invariants:
- A ``LoadedModel`` is immutable. Its session's signature matches its manifest's (names,
  datatypes, ranks, fixed dimensions); ``load_model`` refuses any other.
- ``ModelRegistry`` maps a model name to exactly one live ``LoadedModel``. Making a
  version live is one reference swap under a lock; readers never take the lock.
- A request takes its reference to a ``LoadedModel`` once, at its start, and finishes on
  it. The registry keeps no other reference to a replaced model, so the old session is
  freed when the last in-flight request drops it: zero failed requests across a swap.
- Sessions are created with glibc's mmap threshold fixed (``agent.runtime.memory``): a replaced
  session's memory goes back to the kernel when its last request drops it, so RSS stays
  bounded across swaps.
- ``LoadedModel.infer`` checks every input's presence and shape itself, whoever calls it
  (cheap: rules computed once per model), then calls ONNX Runtime's binding directly. A
  run cancelled through its ``RunOptions`` raises ``RunTerminatedError``, never a plain
  ``InferenceError``.
- Nothing here touches the network; blocking calls (``load_model``, ``check_golden``,
  ``warm_up``, ``LoadedModel.infer``) are meant to run in a worker thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np
import onnxruntime as ort

from agent.base.errors import (
    GoldenMismatchError,
    InferenceError,
    InvalidRequestError,
    ModelError,
)
from agent.contracts import (
    BUNDLE_GOLDEN,
    BUNDLE_MODEL,
    GOLDEN_INPUT_PREFIX,
    GOLDEN_OUTPUT_PREFIX,
    OIP_TO_NUMPY,
    ORT_TO_OIP,
    Manifest,
    TensorSpec,
)
from agent.runtime.memory import configure_allocator

logger = logging.getLogger(__name__)

_BIND_REFUSED: set[tuple[str, str]] = set()  # versions whose binding was refused (logged)

_CPU_PROVIDERS = ["CPUExecutionProvider"]


class RunTerminatedError(InferenceError):
    """A run was cancelled at its deadline through its ``RunOptions.terminate`` flag.

    The model did not fail on the input: the caller that set the flag decides how to
    answer and count it.
    """


@dataclass(frozen=True)
class LoadedModel:
    """One version of a model, loaded in its own ONNX Runtime session and ready to run.

    ``infer`` is thread-safe (ONNX Runtime sessions allow concurrent ``run`` calls).
    """

    name: str
    version: str
    manifest: Manifest
    directory: Path
    session: ort.InferenceSession = field(repr=False, compare=False)

    @cached_property
    def input_specs(self) -> Mapping[str, TensorSpec]:
        """The manifest's inputs by name, in manifest order."""
        return MappingProxyType({t.name: t for t in self.manifest.inputs})

    @cached_property
    def output_specs(self) -> Mapping[str, TensorSpec]:
        """The manifest's outputs by name, in manifest order."""
        return MappingProxyType({t.name: t for t in self.manifest.outputs})

    @cached_property
    def _output_names(self) -> list[str]:
        """Every output, in manifest order: what a run without ``output_names`` returns."""
        return [t.name for t in self.manifest.outputs]

    @cached_property
    def _binding(self) -> Any:
        """ONNX Runtime's C++ session binding, for a real ``InferenceSession`` (None for
        anything else, such as a test double)."""
        binding = getattr(self.session, "_sess", None)
        if type(self.session) is ort.InferenceSession and callable(getattr(binding, "run", None)):
            return binding
        return None

    @cached_property
    def _run(self) -> Callable[[list[str], dict[str, Any], ort.RunOptions | None], list[Any]]:
        """ONNX Runtime's run for this session.

        For a real ``InferenceSession``, its C++ binding's: the Python wrapper re-checks
        the feed on every call (missing inputs, OrtValue ownership, WebGPU graph
        capture), ~2 µs measured, a fifth of a tiny model's run. ``_check_inputs`` makes
        the check that matters for CPU sessions fed numpy arrays (every input present:
        a loaded model has no optional inputs, since ``load_model`` maps each to an OIP
        datatype); the binding itself refuses unknown names, dtypes and shapes.
        """
        if self._binding is not None:
            return self._binding.run  # type: ignore[no-any-return]
        return self.session.run  # type: ignore[no-any-return]

    @cached_property
    def _shape_rules(self) -> tuple[tuple[str, int, tuple[tuple[int, int], ...]], ...]:
        """Per input: its name, its rank and its fixed dimensions as (axis, size)."""
        return tuple(
            (t.name, len(t.shape), tuple((axis, d) for axis, d in enumerate(t.shape) if d >= 0))
            for t in self.manifest.inputs
        )

    def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        output_names: Sequence[str] | None = None,
        *,
        run_options: ort.RunOptions | None = None,
    ) -> dict[str, np.ndarray]:
        """Run the model once; return the requested outputs (all of them by default).

        ``inputs`` should already match the signature (``agent.oip.request`` checks requests);
        every input's presence and shape are checked again here, cheaply, for callers
        that do not go through it. No or empty ``output_names``: every output, in manifest
        order. ``run_options`` is passed to ONNX Runtime: setting its ``terminate`` flag
        from another thread cancels the run.

        Raises InvalidRequestError for an unknown output name, a missing input, a shape
        that does not fit or inputs ONNX Runtime refuses before running;
        RunTerminatedError when the run was cancelled through ``run_options``;
        InferenceError when the run itself fails. An INVALID_ARGUMENT
        from a kernel (an index out of range, a reshape that does not fit) is the model
        failing on an input its signature accepts: an InferenceError, which counts
        against the version on probation, not a client error.
        """
        names = self._output_names if not output_names else self._known(output_names)
        self._check_inputs(inputs)
        return dict(zip(names, self.run(names, inputs, run_options), strict=True))

    def run(
        self,
        names: list[str],
        inputs: Mapping[str, np.ndarray],
        run_options: ort.RunOptions | None = None,
    ) -> list[np.ndarray]:
        """The outputs ``names`` (known to the model) of one run on ``inputs``, which the
        caller has checked against the signature (``infer`` does, as does a request plan).
        Raises as ``infer``."""
        try:
            results = self._run(
                names, inputs if type(inputs) is dict else dict(inputs), run_options
            )
        except Exception as exc:  # ORT's own: InvalidArgument, Fail, RuntimeException, ...
            raise run_error(self.name, self.version, exc, run_options) from None
        # Every output is a tensor (load_model refuses other types), so ONNX Runtime gives
        # numpy arrays: no conversion.
        return results

    def bind(self, key: int, inputs: Sequence[Bound], outputs: Sequence[Bound]) -> BoundRun | None:
        """Runs reading each input from, and writing each output to, memory at a fixed
        address (ONNX Runtime's I/O binding), kept under ``key`` until ``unbind``: the
        model owns its bindings (each holds its session), so whoever asked for one keeps
        only the key, and a replaced version's session is freed with it. None when the
        session cannot bind (not a plain ``InferenceSession``) or ONNX Runtime refuses
        the binding (logged once per model): the caller then runs unbound, as before
        binding existed. See ``BoundRun`` for what the caller guarantees."""
        if self._binding is None:
            return None
        try:
            bound = BoundRun(self, inputs, outputs)
        except Exception as exc:  # its Python API, or a private attribute it moved
            if (self.name, self.version) not in _BIND_REFUSED:
                _BIND_REFUSED.add((self.name, self.version))
                logger.warning("%s %s: runs stay unbound (%r)", self.name, self.version, exc)
            return None
        self.bound_runs[key] = bound
        return bound

    def unbind(self, key: int) -> None:
        """Drop the binding kept under ``key`` (none: nothing to do)."""
        self.bound_runs.pop(key, None)

    @cached_property
    def bound_runs(self) -> dict[int, BoundRun]:
        """The bindings ``bind`` made, by key."""
        return {}

    def _known(self, output_names: Sequence[str]) -> list[str]:
        """``output_names`` as a list; InvalidRequestError naming one the model lacks."""
        specs = self.output_specs
        for name in output_names:
            if name not in specs:
                raise InvalidRequestError(
                    f"unknown output {name!r}: model {self.name!r} has outputs {list(specs)}"
                )
        return list(output_names)

    def _check_inputs(self, inputs: Mapping[str, np.ndarray]) -> None:
        """InvalidRequestError when an input is missing or its shape does not fit the
        manifest's."""
        for name, rank, fixed in self._shape_rules:
            given = inputs.get(name)
            if given is None:
                raise InvalidRequestError(
                    f"model {self.name!r} {self.version} rejected the input: input {name!r} "
                    f"is missing (given {list(inputs)})"
                )
            shape = given.shape
            fits = len(shape) == rank
            for axis, size in fixed if fits else ():
                if shape[axis] != size:
                    fits = False
                    break
            if not fits:
                raise InvalidRequestError(
                    f"input {name!r}: expected shape {list(self.input_specs[name].shape)} "
                    f"(-1: any), got {list(shape)}"
                )


def run_error(
    name: str, version: str, exc: Exception, run_options: ort.RunOptions | None
) -> InferenceError:
    """What a failed run of ``name`` ``version`` raises: a ``ValueError`` is the binding
    refusing the inputs, a run whose ``terminate`` flag is set was cancelled at its
    deadline, anything else is the model failing."""
    if isinstance(exc, ValueError):
        return InvalidRequestError(f"model {name!r} {version} rejected the input: {exc}")
    if run_options is not None and run_options.terminate:
        return RunTerminatedError(
            f"model {name!r} {version}: the run was cancelled at its deadline ({exc})"
        )
    return InferenceError(f"model {name!r} {version} failed to run: {exc}")


class Bound(NamedTuple):
    """One tensor of a ``BoundRun``: its name, dtype and shape, and the address of its
    first byte."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    address: int


class BoundRun:
    """Runs of one model that read every input from, and write every output to, memory
    at fixed addresses (ONNX Runtime's I/O binding): no numpy array is made or converted
    on either side of the run. After a model run has flushed the caches, that
    conversion is the costliest Python of a request: ~60-90 µs measured on a 2-core VM
    for the CNN of ``bench/infer_overhead.py``, against the plain run.

    The caller guarantees that the memory at every address is there, readable (inputs)
    and writable (outputs), for the whole of each ``run`` (holding a buffer export of
    it), that outputs overlap no input, and that inputs and outputs have the bound
    dtypes and shapes (a request plan checked them). An output whose shape differs from
    the bound one on some run (a data-dependent shape) fails that run: the caller then
    runs the request without a binding.
    """

    __slots__ = ("_binding", "_label", "_run")

    def __init__(self, model: LoadedModel, inputs: Sequence[Bound], outputs: Sequence[Bound]):
        binding = ort.IOBinding(model.session)
        for tensor in inputs:
            binding.bind_input(
                tensor.name, "cpu", 0, tensor.dtype.type, list(tensor.shape), tensor.address
            )
        for tensor in outputs:
            binding.bind_output(
                tensor.name, "cpu", 0, tensor.dtype.type, list(tensor.shape), tensor.address
            )
        # The C++ objects: the Python wrapper's run re-checks WebGPU graph capture.
        self._binding = binding._iobinding
        self._run = model._binding.run_with_iobinding
        self._label = (model.name, model.version)  # not the model: it owns this

    def run(self, run_options: ort.RunOptions | None) -> None:
        """One run: inputs read and outputs written where they were bound. Raises as
        ``LoadedModel.run``."""
        try:
            self._run(self._binding, run_options)
        except Exception as exc:
            raise run_error(*self._label, exc, run_options) from None


# ---------------------------------------------------------------------------- loading


def _session_options(intra_op_threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def _version_tuple(value: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in value.split("+", 1)[0].split("-", 1)[0].split("."):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts)


def _dims_differ(expected: tuple[int, ...], got: Any) -> bool:
    """True when the session's shape cannot be the manifest's.

    ONNX Runtime reports a dynamic dimension as a string or None; the manifest writes -1.
    A fixed dimension on one side and a dynamic one on the other is accepted: the stricter
    side decides at request time, and both reject what does not fit.
    """
    if got is None:  # no shape information at all (possible for outputs)
        return False
    if len(got) != len(expected):
        return True
    for want, have in zip(expected, got, strict=True):
        if want >= 0 and isinstance(have, int) and have >= 0 and want != have:
            return True
    return False


def _check_signature(kind: str, specs: Sequence[TensorSpec], args: Sequence[Any]) -> None:
    by_name = {arg.name: arg for arg in args}
    expected = [t.name for t in specs]
    if set(expected) != set(by_name):
        raise ModelError(
            f"the model's {kind} differ from the manifest: manifest has {expected}, "
            f"model.onnx has {list(by_name)}"
        )
    for spec in specs:
        arg = by_name[spec.name]
        datatype = ORT_TO_OIP.get(arg.type, arg.type)
        if datatype != spec.datatype:
            raise ModelError(
                f"{kind[:-1]} {spec.name!r}: manifest says datatype {spec.datatype}, "
                f"model.onnx has {datatype}"
            )
        shape = arg.shape
        if _dims_differ(spec.shape, shape):
            shown = [d if isinstance(d, int) else -1 for d in shape]
            raise ModelError(
                f"{kind[:-1]} {spec.name!r}: manifest says shape {list(spec.shape)}, "
                f"model.onnx has {shown}"
            )


def load_model(directory: Path, manifest: Manifest, *, intra_op_threads: int = 1) -> LoadedModel:
    """Load the unpacked bundle in ``directory`` into a new ONNX Runtime session.

    The directory holds ``model.onnx`` and ``golden.npz`` (and ``manifest.json``, already
    parsed into ``manifest``). Raises ModelError when a file is missing, the model needs a
    newer ONNX Runtime, ONNX Runtime refuses the model, or the session's inputs and
    outputs differ from the manifest's signature.
    """
    if intra_op_threads < 0:
        raise ModelError(f"intra_op_threads expected >= 0, got {intra_op_threads}")
    configure_allocator()  # once per process; before the first session allocates
    directory = Path(directory)
    for member in (BUNDLE_MODEL, BUNDLE_GOLDEN):
        if not (directory / member).is_file():
            raise ModelError(f"{manifest.name} {manifest.version}: {directory / member} is missing")
    have = _version_tuple(ort.__version__)
    need = _version_tuple(manifest.min_ort_version)
    if have < need:
        raise ModelError(
            f"{manifest.name} {manifest.version} needs ONNX Runtime >= "
            f"{manifest.min_ort_version}, this agent has {ort.__version__}"
        )
    try:
        session = ort.InferenceSession(
            str(directory / BUNDLE_MODEL),
            sess_options=_session_options(intra_op_threads),
            providers=_CPU_PROVIDERS,
        )
    except Exception as exc:  # ORT raises its own pybind types, or RuntimeError
        raise ModelError(
            f"{manifest.name} {manifest.version}: ONNX Runtime refused model.onnx: {exc}"
        ) from None
    try:
        _check_signature("inputs", manifest.inputs, session.get_inputs())
        _check_signature("outputs", manifest.outputs, session.get_outputs())
    except ModelError as exc:
        raise ModelError(f"{manifest.name} {manifest.version}: {exc}") from None
    logger.info("loaded %s %s from %s", manifest.name, manifest.version, directory)
    return LoadedModel(
        name=manifest.name,
        version=manifest.version,
        manifest=manifest,
        directory=directory,
        session=session,
    )


# ---------------------------------------------------------------------------- golden vectors


@dataclass(frozen=True)
class _GoldenCase:
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]


def _case_tensor(array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """One case's tensor; a case stored without the leading batch axis gets one back."""
    if array.ndim == len(spec.shape) - 1:
        return array[np.newaxis, ...]
    return array


def _read_golden(model: LoadedModel) -> list[_GoldenCase]:
    """The golden cases of golden.npz; raise ModelError when the file is malformed."""
    where = f"{model.name} {model.version}: {BUNDLE_GOLDEN}"
    try:
        with np.load(model.directory / BUNDLE_GOLDEN, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as exc:
        raise ModelError(f"{where} cannot be read: {exc}") from None
    wanted = [GOLDEN_INPUT_PREFIX + t.name for t in model.manifest.inputs] + [
        GOLDEN_OUTPUT_PREFIX + t.name for t in model.manifest.outputs
    ]
    missing = [key for key in wanted if key not in arrays]
    if missing:
        raise ModelError(f"{where} is missing arrays {missing} (has {sorted(arrays)})")
    counts = {key: arrays[key].shape[0] if arrays[key].ndim else -1 for key in wanted}
    expected = model.manifest.golden.cases
    wrong = {key: n for key, n in counts.items() if n != expected}
    if wrong:
        raise ModelError(f"{where}: manifest says {expected} cases, arrays hold {wrong}")
    if expected < 1:
        raise ModelError(f"{where}: a bundle must carry at least one golden case")
    cases = []
    for i in range(expected):
        cases.append(
            _GoldenCase(
                inputs={
                    t.name: _case_tensor(arrays[GOLDEN_INPUT_PREFIX + t.name][i], t)
                    for t in model.manifest.inputs
                },
                outputs={
                    t.name: arrays[GOLDEN_OUTPUT_PREFIX + t.name][i] for t in model.manifest.outputs
                },
            )
        )
    return cases


def _max_abs_diff(got: np.ndarray, want: np.ndarray) -> float:
    if got.dtype.kind in "fc" or want.dtype.kind in "fc":
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        both_nan = np.isnan(got.astype(np.float64)) & np.isnan(want.astype(np.float64))
        diff = np.where(both_nan, 0.0, diff)
        return float(np.nanmax(np.where(np.isnan(diff), np.inf, diff))) if diff.size else 0.0
    if got.dtype.kind in "iub" and want.dtype.kind in "iub":
        if not got.size:
            return 0.0
        return float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
    return 0.0 if np.array_equal(got, want) else float("inf")


def _matches(got: np.ndarray, want: np.ndarray, rtol: float, atol: float) -> bool:
    if got.shape != want.shape:
        return False
    if got.dtype.kind in "fc" or want.dtype.kind in "fc":
        return bool(np.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True))
    return bool(np.array_equal(got, want))


def check_golden(model: LoadedModel) -> None:
    """Run every golden case of ``golden.npz``; return only if all outputs match.

    An output matches when ``|got - expected| <= atol + rtol * |expected|`` elementwise
    (exact equality for integer, boolean and string outputs). A case stored without the
    leading batch axis of a batch-first input is run as a batch of one.

    Raises GoldenMismatchError naming the output, the case, the max abs diff and the
    tolerance; ModelError when golden.npz is missing or malformed or a case fails to run.
    """
    rtol, atol = model.manifest.golden.rtol, model.manifest.golden.atol
    for index, case in enumerate(_read_golden(model)):
        try:
            got = model.infer(case.inputs)
        except InferenceError as exc:
            raise ModelError(
                f"{model.name} {model.version}: golden case {index} failed to run: {exc}"
            ) from None
        for name, want in case.outputs.items():
            have = got[name]
            if have.shape != want.shape and have.shape == (1, *want.shape):
                have = have[0]
            if _matches(have, want, rtol, atol):
                continue
            if have.shape != want.shape:
                detail = f"shape expected {list(want.shape)}, got {list(have.shape)}"
            else:
                detail = f"max abs diff {_max_abs_diff(have, want):.6g}"
            raise GoldenMismatchError(
                f"{model.name} {model.version}: output {name!r} case {index}: {detail} "
                f"exceeds the tolerance (rtol={rtol:g}, atol={atol:g})"
            )
    logger.info(
        "%s %s passed %d golden cases", model.name, model.version, model.manifest.golden.cases
    )


def _synthetic_inputs(model: LoadedModel) -> dict[str, np.ndarray]:
    inputs: dict[str, np.ndarray] = {}
    for spec in model.manifest.inputs:
        shape = tuple(1 if d < 0 else d for d in spec.shape)
        if spec.datatype == "BYTES":
            inputs[spec.name] = np.full(shape, "", dtype=object)
        else:
            inputs[spec.name] = np.zeros(shape, dtype=OIP_TO_NUMPY[spec.datatype])
    return inputs


def warm_up(model: LoadedModel, rounds: int = 3) -> None:
    """Run the model ``rounds`` times so the first user request pays no first-run cost.

    Uses the first golden case when golden.npz is readable, zeros otherwise.
    Raises ModelError when a run fails.
    """
    try:
        inputs = _read_golden(model)[0].inputs
    except ModelError:
        inputs = _synthetic_inputs(model)
    for _ in range(rounds):
        try:
            model.infer(inputs)
        except InferenceError as exc:
            raise ModelError(f"{model.name} {model.version}: warm-up failed: {exc}") from None


# ---------------------------------------------------------------------------- registry


class ModelRegistry:
    """The live version of each model. Thread-safe.

    Writers replace the whole mapping under a lock (copy on write); readers take one
    reference to the current mapping and never block. Only ``activate`` and ``remove``
    change what serves.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: Mapping[str, LoadedModel] = MappingProxyType({})

    def get(self, name: str) -> LoadedModel | None:
        """The live version of ``name``, or None. Hold the result for the whole request."""
        return self._models.get(name)

    def activate(self, model: LoadedModel) -> LoadedModel | None:
        """Make ``model`` the live version of its name; return the one it replaced."""
        with self._lock:
            models = dict(self._models)
            previous = models.get(model.name)
            models[model.name] = model
            self._models = MappingProxyType(models)
        logger.info(
            "activated %s %s (was %s)",
            model.name,
            model.version,
            previous.version if previous else "nothing",
        )
        return previous

    def remove(self, name: str) -> LoadedModel | None:
        """Stop serving ``name``; return the version that was live, or None."""
        with self._lock:
            models = dict(self._models)
            previous = models.pop(name, None)
            self._models = MappingProxyType(models)
        if previous is not None:
            logger.info("removed %s %s", name, previous.version)
        return previous

    def snapshot(self) -> dict[str, LoadedModel]:
        """A copy of the live mapping, name → model."""
        return dict(self._models)

    def __len__(self) -> int:
        return len(self._models)
