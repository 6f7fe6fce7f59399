"""Golden vectors and build-time quality: pure numpy plus ONNX Runtime sessions.

Invariants:
- Golden inputs are generated from the model's input signature with a seeded generator
  (dynamic dimensions → 1), so the same model and seed give the same inputs.
- Every golden array is stacked on a new first axis: ``(cases, *tensor_shape)``; keys are
  ``input:<name>`` and ``output:<name>`` (``agent.contracts`` prefixes).
- ``npz_bytes`` is deterministic (sorted keys, fixed zip timestamps), unlike ``np.savez``.
- ``tolerance`` is what the agent checks: ``|got - expected| <= atol + rtol * |expected|``.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from agent.contracts import GOLDEN_INPUT_PREFIX, GOLDEN_OUTPUT_PREFIX, OIP_TO_NUMPY, ORT_TO_OIP
from controller.errors import BuildError

Array = npt.NDArray[Any]
RTOL: Final = 1e-3
ATOL_SCALE: Final = 1e-4


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


def tolerance(outputs: Mapping[str, Array]) -> tuple[float, float]:
    """(rtol, atol) derived from the outputs' magnitude."""
    peak = max((float(np.max(np.abs(v))) for v in outputs.values() if v.size), default=0.0)
    return RTOL, ATOL_SCALE * max(1.0, peak)


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


def compare(
    reference: Mapping[str, Array], built: Mapping[str, Array], cases: int
) -> dict[str, Any]:
    """Quality of ``built`` against ``reference`` outputs on the same golden inputs.

    Per output: cosine similarity and max abs difference over all values, and top-1
    agreement when each case's output is [N, C] (a classifier's scores).
    """
    result: dict[str, Any] = {}
    for name, ref in reference.items():
        got = built[name]
        a = ref.astype(np.float64).ravel()
        b = got.astype(np.float64).ravel()
        norm = float(np.linalg.norm(a) * np.linalg.norm(b))
        entry: dict[str, Any] = {
            "cosine": round(float(a @ b) / norm, 6) if norm else 1.0,
            "max_abs_diff": float(np.max(np.abs(a - b))) if a.size else 0.0,
        }
        if ref.ndim == 3 and ref.shape[-1] > 1:  # (cases, N, C)
            agree = np.argmax(ref, axis=-1) == np.argmax(got, axis=-1)
            entry["top1_agreement"] = round(float(np.mean(agree)), 6)
        result[name] = entry
    return {"reference": "original model", "cases": cases, "outputs": result}
