"""``edgectl bundle build``: an ONNX model → a quantized, self-checking bundle file.

Steps: check the model; quantize MatMul/Gemm weights to int8 (dynamic quantization);
generate golden inputs and record the built model's outputs; measure the built model
against the original on the same inputs; write the manifest; pack the tar.

Invariants:
- The same model, name, version, seed, case count and ``created_at`` give the same bytes
  (``created_at`` defaults to ``$SOURCE_DATE_EPOCH`` when set, else the current time).
- The manifest is an ``agent.contracts.Manifest`` and round-trips ``parse_manifest``.
- Bad input raises UsageError (missing file, bad name/version, unwritable output) or
  BuildError (not ONNX, invalid graph, runtime failure); the output is written
  atomically, so a failed build leaves no partial file.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import onnx
import onnxruntime as ort

from agent.contracts import (
    BUNDLE_GOLDEN,
    BUNDLE_MODEL,
    ORT_TO_OIP,
    GoldenSpec,
    InvalidNameError,
    Manifest,
    TensorSpec,
    check_name,
    check_version,
)
from controller import golden
from controller.bundle_file import member_digest, pack_bundle
from controller.errors import BuildError, UsageError
from controller.fsio import atomic_write

logger = logging.getLogger(__name__)

QUANTIZED_OPS: Final = ("MatMul", "Gemm")
# The first ONNX Runtime release that implements each default-domain opset (conservative).
_MIN_ORT_FOR_OPSET: Final = {
    13: "1.7.0", 14: "1.8.0", 15: "1.9.0", 16: "1.11.0", 17: "1.12.0",
    18: "1.14.0", 19: "1.15.0", 20: "1.17.0", 21: "1.20.0",
}  # fmt: skip


@dataclass(frozen=True)
class BuildResult:
    """What ``build_bundle`` wrote."""

    path: Path
    manifest: Manifest
    sha256: str
    length: int


def build_bundle(
    model_path: Path,
    name: str,
    version: str,
    output: Path,
    golden_cases: int = 8,
    seed: int = 0,
    created_at: datetime | None = None,
) -> BuildResult:
    """Build a bundle from ``model_path`` and write it to ``output``.

    Raises UsageError or BuildError (see the module docstring).
    """
    try:
        check_name("model", name)
        check_version(version)
    except InvalidNameError as exc:
        raise UsageError(str(exc)) from None
    if golden_cases < 1:
        raise UsageError(f"--golden-cases must be at least 1, got {golden_cases}")
    if not model_path.is_file():
        raise UsageError(f"model {model_path} does not exist or is not a file")
    _check_writable(output)
    original = model_path.read_bytes()
    model = _load_checked(model_path, original)
    built, quant = _quantize(model, original)
    manifest, golden_npz = _manifest(
        original, built, quant, name, version, golden_cases, seed, created_at or _created_at()
    )
    data = pack_bundle(manifest.to_json_bytes(), built, golden_npz)
    try:
        atomic_write(output, data)
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc}") from None
    info = member_digest(data)
    logger.info("built %s %s into %s", name, version, output)
    return BuildResult(output, manifest, str(info["sha256"]), len(data))


def _created_at() -> datetime:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        try:
            return datetime.fromtimestamp(int(epoch), UTC)
        except ValueError:
            raise UsageError(f"SOURCE_DATE_EPOCH must be an integer, got {epoch!r}") from None
    return datetime.now(UTC).replace(microsecond=0)


def _check_writable(output: Path) -> None:
    parent = output.parent
    if output.is_dir():
        raise UsageError(f"output {output} is a directory; give a file name")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write {output}: {parent} is not a writable directory")


def _load_checked(path: Path, data: bytes) -> Any:
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise BuildError(f"{path} is not an ONNX model: {exc}") from None
    if not model.graph.node and not model.graph.output:
        raise BuildError(f"{path} is not an ONNX model: it has no graph")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BuildError(f"{path} is not a valid ONNX graph: {first}") from None
    return model


def _quantize(model: Any, original: bytes) -> tuple[bytes, dict[str, Any]]:
    """The built model's bytes and the manifest's ``build`` facts about quantization."""
    ops = sorted({n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS})
    if not ops:
        return original, {
            "quantization": "none",
            "quantization_note": "the model has no MatMul or Gemm; kept as is",
        }
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="edgectl-build-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        src.write_bytes(original)
        root = logging.getLogger()
        level = root.level
        # The quantizer logs advice ("consider pre-processing") on the root logger.
        root.setLevel(logging.ERROR)
        try:
            quantize_dynamic(
                src, dst, op_types_to_quantize=list(QUANTIZED_OPS), weight_type=QuantType.QInt8
            )
        except Exception as exc:  # the quantizer raises assorted errors
            raise BuildError(f"quantization failed: {exc}") from None
        finally:
            root.setLevel(level)
        built = dst.read_bytes()
    return built, {
        "quantization": "dynamic-matmul",
        "weight_type": "int8",
        "op_types": list(QUANTIZED_OPS),
        "quantized_ops_found": ops,
    }


def _session(data: bytes) -> Any:
    try:
        return ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own untyped errors
        raise BuildError(f"ONNX Runtime cannot load the model: {exc}") from None


def _specs(args: Any) -> tuple[TensorSpec, ...]:
    specs = []
    for a in args:
        if a.type not in ORT_TO_OIP:
            raise BuildError(f"tensor {a.name!r} has unsupported type {a.type}")
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in a.shape)
        specs.append(TensorSpec(a.name, ORT_TO_OIP[a.type], shape))
    return tuple(specs)


def _opset(model_bytes: bytes) -> int:
    model = onnx.load_from_string(model_bytes)
    return max(
        (int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), default=1
    )


def min_ort_version(opset: int) -> str:
    """The oldest ONNX Runtime expected to run this opset (the running one if unknown)."""
    if opset < min(_MIN_ORT_FOR_OPSET):
        return _MIN_ORT_FOR_OPSET[min(_MIN_ORT_FOR_OPSET)]
    return _MIN_ORT_FOR_OPSET.get(opset, str(ort.__version__).split("+")[0])


def _manifest(
    original: bytes,
    built: bytes,
    quant: dict[str, Any],
    name: str,
    version: str,
    cases: int,
    seed: int,
    created_at: datetime,
) -> tuple[Manifest, bytes]:
    session = _session(built)
    signature = [(i.name, i.type, i.shape) for i in session.get_inputs()]
    inputs = golden.make_inputs(signature, cases, seed)
    outputs = golden.run_cases(session, inputs)
    reference = golden.run_cases(_session(original), inputs)
    rtol, atol = golden.tolerance(outputs)
    golden_npz = golden.npz_bytes(inputs, outputs)
    opset = _opset(built)
    manifest = Manifest(
        name=name,
        version=version,
        inputs=_specs(session.get_inputs()),
        outputs=_specs(session.get_outputs()),
        opset=opset,
        min_ort_version=min_ort_version(opset),
        golden=GoldenSpec(cases, rtol, atol),
        members={BUNDLE_MODEL: member_digest(built), BUNDLE_GOLDEN: member_digest(golden_npz)},
        build={
            **quant,
            "golden_source": "generated",
            "golden_seed": seed,
            "golden_note": "random inputs from the input signature, dynamic dimensions set to 1",
            "built_with_onnxruntime": str(ort.__version__),
        },
        sizes={"original_bytes": len(original), "built_bytes": len(built)},
        quality=golden.compare(reference, outputs, cases),
        created_at=created_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    return manifest, golden_npz
