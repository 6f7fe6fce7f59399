"""Infer inputs from files: what ``edge-agent infer MODEL --input FILE`` sends.

``load_input_file`` reads ``.npy``, ``.npz`` or ``.json`` and casts each array to the
model's datatype, refusing values that cannot take it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from agent.base.errors import InvalidRequestError
from agent.contracts import OIP_TO_NUMPY


def load_input_file(path: Path, metadata: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Read infer inputs from a file, cast to the datatypes of ``metadata`` (OIP model
    metadata, as ``InferenceClient.model_metadata`` returns it).

    - ``.npy``: the model's single input (an error if the model has several);
    - ``.npz``: arrays named after the inputs;
    - ``.json``: an OIP request body (``{"inputs": [...]}``) or ``{"<input>": nested list}``.

    Raises InvalidRequestError for an unknown extension, an unreadable file, missing or
    unknown input names, or values that cannot take the input's datatype (floats for an
    integer input, say).
    """
    path = Path(path)
    specs = {t["name"]: t for t in metadata.get("inputs", [])}
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            if len(specs) != 1:
                raise InvalidRequestError(
                    f"{path}: a .npy file gives one input, but the model has inputs "
                    f"{list(specs)}; use .npz or .json with one array per input"
                )
            raw: dict[str, Any] = {next(iter(specs)): np.load(path, allow_pickle=False)}
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                raw = {key: npz[key] for key in npz.files}
        elif suffix == ".json":
            raw = _read_json_inputs(path)
        else:
            raise InvalidRequestError(
                f"{path}: unknown input file type {suffix or '(none)'!r}; use .npy, .npz or .json"
            )
    except (OSError, ValueError) as exc:
        raise InvalidRequestError(f"cannot read input file {path}: {exc}") from None
    missing = [name for name in specs if name not in raw]
    unknown = [name for name in raw if name not in specs]
    if missing or unknown:
        raise InvalidRequestError(
            f"{path}: the model's inputs are {list(specs)}; missing {missing}, unknown {unknown}"
        )
    return {name: _cast(path, name, raw[name], specs[name]["datatype"]) for name in specs}


def _read_json_inputs(path: Path) -> dict[str, Any]:
    doc = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(doc, dict):
        raise InvalidRequestError(f"{path}: expected a JSON object")
    if "inputs" in doc and isinstance(doc["inputs"], list):
        raw: dict[str, Any] = {}
        for index, tensor in enumerate(doc["inputs"]):
            if not isinstance(tensor, dict) or "name" not in tensor or "data" not in tensor:
                raise InvalidRequestError(f"{path}: inputs[{index}] needs 'name' and 'data'")
            array = np.asarray(tensor["data"])
            if "shape" in tensor:
                array = array.reshape(tensor["shape"])
            raw[str(tensor["name"])] = array
        return raw
    return {str(name): np.asarray(value) for name, value in doc.items()}


def _cast(path: Path, name: str, value: Any, datatype: str) -> np.ndarray:
    array = np.asarray(value)
    if datatype == "BYTES":
        if array.dtype.kind not in "USO":
            raise InvalidRequestError(f"{path}: input {name!r} expects strings, got {array.dtype}")
        return array.astype(object)
    target = np.dtype(OIP_TO_NUMPY[datatype])
    if not np.can_cast(array.dtype, target, casting="same_kind"):
        raise InvalidRequestError(
            f"{path}: input {name!r} expects {datatype}, got {array.dtype} values"
        )
    return array.astype(target)
