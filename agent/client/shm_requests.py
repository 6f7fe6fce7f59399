"""The shared-memory side of ``InferenceClient``: where a call's tensors go in a registered
region, and the requests the client remembers for such calls.

A call through shared memory copies each input into the region and sends a request that
names where the inputs are and where the outputs should go; the agent reads and writes
the region, the body carries only the JSON header. Per request signature (the region's
name and size, model, version, requested outputs, each input's name, dtype and shape,
and which inputs already lie in the region) the whole request is remembered, with where
each input is copied: a call then copies its inputs there and sends the same bytes. An
input that already lives in the region (``SharedMemoryRegion.ndarray``: an application
that produces its frames there) is not copied: the request names where it is, and copied
inputs and outputs go after the last such input. Such an array is remembered (weakly)
with where it lies: passing the same array object again, its address is not asked for
again. Outputs go into the region when the model's metadata predicts their size and they
fit, else they come back as binary data.

Invariants:
- A remembered request is only ever the bytes a fresh build would make for the same
  signature; requests with an ``id``, with BYTES tensors or non-native byte order are
  built afresh each call.
- A remembered place is used only for the very array object it was found for, still
  alive (so its memory has not moved: NumPy refuses ``array.data = ...``; with a NumPy
  that allows it nothing is remembered), with the same dtype and shape, and for the same
  region object of the same size; anything else asks ``SharedMemoryRegion.offset_of``.
- The caches are bounded (cleared when full); ``forget`` drops the remembered requests
  and a model's output metadata (the client calls it when the agent refuses a request:
  a new version may have other output shapes).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import numpy as np

from agent.client.http import request_head
from agent.client.requests import (
    ALIGN,
    SENT_AS_IS,
    RememberedShmRequest,
    Signature,
    binary_headers,
    bounded_put,
    bytes_of,
    json_header,
    model_path,
    predicted_bytes,
    shm_params,
    signature_of,
)
from agent.oip.shm import SharedMemoryRegion
from agent.oip.tensors import tensor_head, tensor_to_bytes

# An array found in a region: (array, region) weakly, the region's size, the array's
# dtype and shape then, and its offset in the region.
_Placed = tuple[
    "weakref.ref[np.ndarray]",
    "weakref.ref[SharedMemoryRegion]",
    int,
    np.dtype[Any],
    tuple[int, ...],
    int,
]


def _data_is_fixed() -> bool:
    """Whether an array's memory stays where it is for the array's life: NumPy refuses
    ``array.data = ...`` (older versions only warn, and move it)."""
    probe = np.zeros(1, np.uint8)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe.data = np.zeros(1, np.uint8).data  # type: ignore[misc]
    except AttributeError:
        return True
    return False


_FIXED_DATA: Final = _data_is_fixed()


class ShmRequests:
    """What an ``InferenceClient`` remembers of its calls through shared memory, and how it
    builds them. Not thread-safe: its client's.

    ``model_metadata`` fetches a model's metadata (the client's own method): the outputs'
    datatypes and shapes say which outputs fit in the region.
    """

    def __init__(self, model_metadata: Callable[[str], dict[str, Any]]) -> None:
        self._model_metadata = model_metadata
        self._outputs: dict[str, list[dict[str, Any]]] = {}  # output metadata, by model
        self._requests: dict[Signature, RememberedShmRequest] = {}
        self._placed: dict[int, _Placed] = {}  # id(array) → where it was found

    def request(
        self,
        model: str,
        version: str | None,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None,
        region: SharedMemoryRegion,
        request_id: str | None,
    ) -> tuple[bytes, RememberedShmRequest | None]:
        """Copy ``inputs`` into ``region`` (a registered one: it has a name) and return
        the request's bytes, with the remembered request they came from (None: built
        afresh). Raises InvalidRequestError when an input does not fit the region, and
        what ``model_metadata`` raises the first time a model is called."""
        signature, arrays = signature_of(
            (region.name, region.byte_size, model, version, outputs), inputs
        )
        places = self._places(region, arrays)
        signature += (places,)
        remembered = self._requests.get(signature) if request_id is None else None
        if remembered is None:
            data = self._shm_request(signature, inputs, arrays, places, outputs, region, request_id)
            return data, None
        for index, offset in remembered.copies:
            region.write(offset, bytes_of(arrays[index]))
        return remembered.data, remembered

    def forget(self, model: str) -> None:
        """Drop every remembered request and ``model``'s output metadata."""
        self._outputs.pop(model, None)
        self._requests.clear()

    def _places(
        self, region: SharedMemoryRegion, arrays: list[np.ndarray]
    ) -> tuple[int | None, ...]:
        """Where each array lies in ``region`` (``region.offset_of``; None for dtypes not
        sent as they are). An array found there is remembered, weakly, with its dtype
        and shape: while it lives its memory cannot move, so the same array object again
        lies at the same place, and its address need not be asked for again."""
        places: list[int | None] = []
        placed = self._placed
        for array in arrays:
            hit = placed.get(id(array))
            if (
                hit is not None
                and hit[0]() is array
                and hit[1]() is region
                and hit[2] == region.byte_size
                and hit[3] == array.dtype
                and hit[4] == array.shape
            ):
                places.append(hit[5])
                continue
            place = region.offset_of(array) if array.dtype in SENT_AS_IS else None
            if place is not None and _FIXED_DATA:
                entry = (
                    weakref.ref(array),
                    weakref.ref(region),
                    region.byte_size,
                    array.dtype,
                    array.shape,
                    place,
                )
                bounded_put(placed, id(array), entry)
            places.append(place)
        return tuple(places)

    def _shm_request(
        self,
        signature: Signature,
        inputs: Mapping[str, np.ndarray],
        arrays: list[np.ndarray],
        places: tuple[int | None, ...],
        outputs: Sequence[str] | None,
        region: SharedMemoryRegion,
        request_id: str | None,
    ) -> bytes:
        """Write the inputs into ``region`` (except those in ``places``, already there);
        return the request naming them and the outputs' places (remembered under
        ``signature`` when it cannot vary). Copied inputs and outputs go after the last
        input that lives in the region."""
        model, version = signature[2], signature[3]
        tensors: list[dict[str, Any]] = []
        copies: list[tuple[int, int]] = []
        offset = max(
            (p + a.nbytes for p, a in zip(places, arrays, strict=True) if p is not None),
            default=0,
        )
        offset += -offset % ALIGN
        for index, (name, array, place) in enumerate(zip(inputs, arrays, places, strict=True)):
            if place is not None:
                params = shm_params(region, place, array.nbytes)
                tensors.append(tensor_head(name, array, params))
                continue
            size = region.write(offset, tensor_to_bytes(array))
            tensors.append(tensor_head(name, array, shm_params(region, offset, size)))
            copies.append((index, offset))
            offset += size + (-size % ALIGN)
        batch = next((a.shape[0] for a in arrays if a.ndim), None)
        doc: dict[str, Any] = {
            "inputs": tensors,
            "outputs": self._shm_outputs(model, outputs, region, offset, batch),
        }
        if request_id is not None:
            doc["id"] = request_id
        header = json_header(doc, padded=False)
        path = model_path(model, version) + "/infer"
        data = request_head("POST", path, len(header), binary_headers(len(header))) + header
        if request_id is None and all(a.dtype in SENT_AS_IS for a in arrays):
            bounded_put(self._requests, signature, RememberedShmRequest(data, tuple(copies)))
        return data

    def _shm_outputs(
        self,
        model: str,
        outputs: Sequence[str] | None,
        region: SharedMemoryRegion,
        offset: int,
        batch: int | None,
    ) -> list[dict[str, Any]]:
        """The requested outputs: in ``region`` from ``offset`` on when the model's
        metadata predicts their size and they fit, else as binary data."""
        if model not in self._outputs:
            self._outputs[model] = self._model_metadata(model).get("outputs", [])
        requested: list[dict[str, Any]] = []
        for spec in self._outputs[model]:
            name = spec["name"]
            if outputs is not None and name not in outputs:
                continue
            predicted = predicted_bytes(spec, batch)
            if predicted is not None and offset + predicted <= region.byte_size:
                requested.append(
                    {"name": name, "parameters": shm_params(region, offset, predicted)}
                )
                offset += predicted + (-predicted % ALIGN)
            else:
                requested.append({"name": name, "parameters": {"binary_data": True}})
        return requested
