"""Magnitude pruning of weight initializers by the shrink rule ``W ← W − α·sign(W)``.

Each weight tensor (a float initializer of rank ≥ 2 used as the weight of Conv,
ConvTranspose, Gemm or MatMul) is shrunk toward zero by its own ``α``, and every value
that reaches or crosses zero is dropped (set to 0). ``α`` is the ``sparsity``-quantile
of the tensor's ``|W|``, so the share of dropped values is the requested sparsity (more
when values tie). Repeating the rule with steps ``α₁ + α₂ + … = α`` gives the same result
(soft thresholding composes), so one step is applied.

Pruning alone keeps the ONNX file the same size (weights stay dense); it pays off when a
later step or the transport compresses zeros, and it costs accuracy: the quality gate
measures the pruned model against the original like any other candidate.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
import onnx
from onnx import numpy_helper

from controller.base.errors import BuildError, UsageError

WEIGHT_OPS: Final = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


def check_sparsity(sparsity: float) -> float:
    """``sparsity`` if it is in (0, 1); UsageError otherwise."""
    if not 0.0 < sparsity < 1.0:
        raise UsageError(f"--prune expected a sparsity between 0 and 1 (e.g. 0.5), got {sparsity}")
    return sparsity


def shrink(weights: np.ndarray[Any, Any], alpha: float) -> np.ndarray[Any, Any]:
    """One step of ``W ← W − α·sign(W)``, values that reach or cross zero set to 0."""
    shrunk = weights - alpha * np.sign(weights)
    crossed = np.sign(shrunk) != np.sign(weights)
    return np.where(crossed, 0, shrunk).astype(weights.dtype)


def weight_names(model: Any) -> list[str]:
    """Names of the float initializers that are weights of Conv/Gemm/MatMul nodes."""
    inits = {i.name: i for i in model.graph.initializer}
    names: list[str] = []
    for node in model.graph.node:
        index = WEIGHT_OPS.get(node.op_type)
        if index is None or node.domain not in ("", "ai.onnx") or len(node.input) <= index:
            continue
        init = inits.get(node.input[index])
        if (
            init is not None
            and init.data_type == onnx.TensorProto.FLOAT
            and len(init.dims) >= 2
            and init.name not in names
        ):
            names.append(init.name)
    return names


def prune(model: Any, sparsity: float) -> tuple[Any, dict[str, Any]]:
    """A copy of ``model`` with its weights pruned to ``sparsity``, and the facts.

    Raises UsageError for a sparsity outside (0, 1), BuildError when the model has no
    weight tensor to prune.
    """
    check_sparsity(sparsity)
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    names = set(weight_names(pruned))
    if not names:
        raise BuildError(
            "--prune found no weights to prune (float initializers of Conv, Gemm or MatMul)"
        )
    zeros = total = 0
    per_tensor: dict[str, float] = {}
    for init in pruned.graph.initializer:
        if init.name not in names:
            continue
        weights = numpy_helper.to_array(init)
        alpha = float(np.quantile(np.abs(weights), sparsity, method="inverted_cdf"))
        new = shrink(weights, alpha)
        init.CopyFrom(numpy_helper.from_array(new, init.name))
        n_zero = int(np.count_nonzero(new == 0))
        zeros += n_zero
        total += new.size
        per_tensor[init.name] = round(n_zero / new.size, 4)
    facts = {
        "rule": "W <- W - alpha*sign(W), values crossing zero dropped; alpha per tensor",
        "sparsity_requested": sparsity,
        "sparsity_reached": round(zeros / total, 4),
        "pruned_tensors": len(per_tensor),
        "pruned_weights": total,
        # A list, not a mapping: tensor names are not guaranteed ASCII (manifest keys must be).
        "per_tensor_sparsity": [[k, v] for k, v in sorted(per_tensor.items())],
    }
    return pruned, facts
