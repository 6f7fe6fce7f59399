"""Golden vectors and build-time quality: pure numpy plus ONNX Runtime sessions.

Invariants:
- Golden inputs are generated from the model's input signature with a seeded generator
  (dynamic dimensions → 1), so the same model and seed give the same inputs.
- Every golden array is stacked on a new first axis: ``(cases, *tensor_shape)``; keys are
  ``input:<name>`` and ``output:<name>`` (``agent.contracts`` prefixes).
- ``npz_bytes`` is deterministic (sorted keys, fixed zip timestamps), unlike ``np.savez``.
- Golden inputs drawn from eval data (``inputs_from_samples``) are whole batches of the
  model (one sample, or the model's fixed batch), spread evenly over the data set.
- The tolerance is what the agent checks: ``|got - expected| <= atol + rtol * |expected|``.
  ``derive_tolerance`` makes it at least ``NOISE_FACTOR`` times the spread measured
  between legitimate ways of running the built model here (graph optimizations on/off,
  1 or 2 threads), and at least ``DRIFT_SHARE`` of the drift the build itself introduced
  against the original model, so it tolerates another CPU's rounding but not a runtime
  that computes a different model.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from agent.contracts import GOLDEN_INPUT_PREFIX, GOLDEN_OUTPUT_PREFIX, OIP_TO_NUMPY, ORT_TO_OIP
from controller.base.errors import BuildError

Array = npt.NDArray[Any]
RTOL: Final = 1e-3
ATOL_SCALE: Final = 1e-4
NOISE_FACTOR: Final = 10.0
DRIFT_SHARE: Final = 0.25


def concrete_shape(shape: Sequence[Any]) -> tuple[int, ...]:
    """An ORT shape with every dynamic dimension (a name, None or -1) set to 1."""
    return tuple(d if isinstance(d, int) and d > 0 else 1 for d in shape)


def numpy_dtype(ort_type: str, name: str) -> np.dtype[Any]:
    """The numpy dtype for an ONNX Runtime type string; BuildError when unsupported."""
    oip = ORT_TO_OIP.get(ort_type)
    if oip is None or oip == "BYTES":
        raise BuildError(f"tensor {name!r} has type {ort_type}; golden vectors support numbers")
    return np.dtype(OIP_TO_NUMPY[oip])


def make_inputs(
    signature: Sequence[tuple[str, str, Sequence[Any]]], cases: int, seed: int
) -> dict[str, Array]:
    """Seeded random inputs for ``signature`` [(name, ort type, shape)], one row per case."""
    rng = np.random.default_rng(seed)
    inputs: dict[str, Array] = {}
    for name, ort_type, shape in signature:
        dtype = numpy_dtype(ort_type, name)
        full = (cases, *concrete_shape(shape))
        if dtype.kind == "f":
            inputs[name] = rng.standard_normal(full).astype(dtype)
        elif dtype.kind == "b":
            inputs[name] = rng.integers(0, 2, size=full).astype(dtype)
        else:
            inputs[name] = rng.integers(0, 10, size=full).astype(dtype)
    return inputs


def run_cases(session: Any, inputs: Mapping[str, Array]) -> dict[str, Array]:
    """Run each case through an ORT session; outputs stacked the same way as inputs."""
    cases = len(next(iter(inputs.values())))
    names = [o.name for o in session.get_outputs()]
    rows: list[list[Array]] = []
    for i in range(cases):
        try:
            rows.append(session.run(names, {k: v[i] for k, v in inputs.items()}))
        except Exception as exc:  # ORT raises its own untyped errors
            raise BuildError(f"ONNX Runtime failed on golden case {i}: {exc}") from None
    return {name: np.stack([row[j] for row in rows]) for j, name in enumerate(names)}


def inputs_from_samples(inputs: Mapping[str, Array], batch: int, cases: int) -> dict[str, Array]:
    """``cases`` golden cases of ``batch`` rows each, spread evenly over ``inputs``.

    ``inputs`` hold samples along the first axis (a multiple of ``batch``); each case is
    stacked on a new first axis: ``(cases, batch, *rest)``. Fewer batches than ``cases``
    give fewer cases.
    """
    total = len(next(iter(inputs.values()))) // batch
    starts = np.unique(np.linspace(0, total - 1, num=min(cases, total)).round().astype(int))
    return {
        name: np.stack([array[s * batch : (s + 1) * batch] for s in starts])
        for name, array in inputs.items()
    }


def max_abs_diff(a: Mapping[str, Array], b: Mapping[str, Array]) -> float:
    """The largest elementwise difference between same-named float outputs (0 if none)."""
    diffs = [
        float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64))))
        for k in a
        if a[k].dtype.kind == "f" and a[k].size
    ]
    return max(diffs, default=0.0)


def derive_tolerance(
    outputs: Mapping[str, Array],
    variants: Sequence[Mapping[str, Array]],
    reference: Mapping[str, Array],
) -> tuple[float, float, dict[str, Any]]:
    """(rtol, atol, facts) for golden ``outputs`` of the built model.

    ``variants`` are the built model's outputs on the same inputs run other legitimate
    ways (noise); ``reference`` the original model's (drift). ``atol`` is the largest of
    ``ATOL_SCALE * max(1, peak)``, ``NOISE_FACTOR * noise`` and ``DRIFT_SHARE * drift``.
    """
    peak = max(
        (float(np.max(np.abs(v))) for v in outputs.values() if v.dtype.kind == "f" and v.size),
        default=0.0,
    )
    noise = max((max_abs_diff(outputs, v) for v in variants), default=0.0)
    drift = max_abs_diff(outputs, reference)
    floor = ATOL_SCALE * max(1.0, peak)
    atol = max(floor, NOISE_FACTOR * noise, DRIFT_SHARE * drift)
    facts = {
        "rule": f"atol = max({ATOL_SCALE:g}*max(1, peak), {NOISE_FACTOR:g}*noise, "
        f"{DRIFT_SHARE:g}*drift); rtol = {RTOL:g}",
        "peak_abs_output": peak,
        "noise_max_abs": noise,
        "drift_max_abs": drift,
    }
    return RTOL, float(f"{atol:.6g}"), facts


def npz_bytes(inputs: Mapping[str, Array], outputs: Mapping[str, Array]) -> bytes:
    """A deterministic ``.npz`` holding the golden inputs and outputs."""
    arrays = {f"{GOLDEN_INPUT_PREFIX}{k}": v for k, v in inputs.items()}
    arrays.update({f"{GOLDEN_OUTPUT_PREFIX}{k}": v for k, v in outputs.items()})
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())
    return out.getvalue()
