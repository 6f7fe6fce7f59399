"""The demo's model: a small real classifier on scikit-learn's 8x8 digits, trained here
and written as ONNX (``pixels`` float32 [N, 64] -> ``probabilities`` [N, 10]).

Invariants: the data split and training are seeded, so a given (hidden, seed) gives the
same weights on every run; ``write_onnx`` writes a model ``onnx.checker`` accepts, and its
``fails_on_real_digits`` variant differs only in failing on real digits (the demo's bad
release), not on the standard-normal inputs the build draws golden vectors from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class Digits:
    """scikit-learn's 8x8 digits (pixels 0-16), split into train, calibration and eval."""

    def __init__(self) -> None:
        from sklearn.datasets import load_digits  # type: ignore[import-untyped]

        x, y = load_digits(return_X_y=True)
        order = np.random.default_rng(0).permutation(len(y))
        x, y = x[order].astype(np.float32), y[order].astype(np.int64)
        self.train_x, self.train_y = x[:1200], y[:1200]
        self.calib_x, self.calib_y = x[1200:1328], y[1200:1328]
        self.eval_x, self.eval_y = x[1328:], y[1328:]

    def write_npz(self, folder: Path) -> tuple[Path, Path]:
        calib, evaluation = folder / "calibration.npz", folder / "eval.npz"
        np.savez(calib, pixels=self.calib_x)
        np.savez(evaluation, pixels=self.eval_x[:256], labels=self.eval_y[:256])
        return calib, evaluation


def train_mlp(
    digits: Digits, hidden: int, seed: int, *, retrain_on_more: bool = False
) -> list[np.ndarray]:
    """Weights [w1, b1, w2, b2] of a one-hidden-layer MLP trained on the digits.

    ``retrain_on_more`` trains that same model further on the training and calibration
    digits (warm start): the next release of a model, which agrees with the last on
    ~99% of the eval digits. (Two models trained apart agree on only ~95%: too close to
    a 90% shadow gate over 20 requests for a demo that must not fail by chance.)
    """
    from sklearn.neural_network import MLPClassifier  # type: ignore[import-untyped]

    clf = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=300, random_state=seed)
    clf.fit(digits.train_x, digits.train_y)
    if retrain_on_more:
        clf.set_params(warm_start=True, max_iter=100)
        clf.fit(
            np.concatenate([digits.train_x, digits.calib_x]),
            np.concatenate([digits.train_y, digits.calib_y]),
        )
    return [
        clf.coefs_[0].astype(np.float32),
        clf.intercepts_[0].astype(np.float32),
        clf.coefs_[1].astype(np.float32),
        clf.intercepts_[1].astype(np.float32),
    ]


def write_onnx(path: Path, weights: list[np.ndarray], *, fails_on_real_digits: bool) -> Path:
    """pixels float32 [N, 64] -> probabilities [N, 10].

    ``fails_on_real_digits`` adds a lookup indexed by ``floor(max |pixel|)`` in a table of
    8 zeros: in range for the standard-normal inputs the build draws golden vectors from,
    out of range (an ONNX Runtime error) for real digits, whose brightest pixel is 16.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    names = ("w1", "b1", "w2", "b2")
    inits = [numpy_helper.from_array(a, n) for a, n in zip(weights, names, strict=True)]
    nodes = [
        helper.make_node("MatMul", ["pixels", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["l0"]),
        helper.make_node("Add", ["l0", "b2"], ["logits"]),
    ]
    if fails_on_real_digits:
        inits += [
            numpy_helper.from_array(np.zeros((8,), dtype=np.float32), "table"),
            numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), "column"),
        ]
        nodes += [
            helper.make_node("Abs", ["pixels"], ["magnitude"]),
            helper.make_node("ReduceMax", ["magnitude"], ["brightest"], axes=[1], keepdims=0),
            helper.make_node("Floor", ["brightest"], ["floored"]),
            helper.make_node("Cast", ["floored"], ["index"], to=TensorProto.INT64),
            helper.make_node("Gather", ["table", "index"], ["looked_up"]),
            helper.make_node("Reshape", ["looked_up", "column"], ["offset"]),
            helper.make_node("Add", ["logits", "offset"], ["logits_"]),
        ]
    nodes.append(
        helper.make_node(
            "Softmax", ["logits_" if fails_on_real_digits else "logits"], ["probabilities"]
        )
    )
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
