"""agent.oip.request's plan cache cannot change a result: a request parsed from a cached plan, and
a response encoded from a cached header, equal what the full path gives, and every check
that depends on a request's own bytes still runs on every request."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import struct
import threading
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.base.errors import InvalidRequestError
from agent.contracts import GoldenSpec, Manifest, TensorSpec
from agent.oip.documents import InferRequest, SharedMemory
from agent.oip.request import PlanCache, parse_infer_request
from agent.oip.response import encode_infer_response
from agent.oip.shm import SharedMemoryRegion, SharedMemoryRegistry
from agent.oip.tensors import tensor_head, tensor_to_bytes
from tests.agent._model_dir import ALL_DATATYPES, sample_tensor


def _manifest(
    inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], version: str = "1.0.0"
) -> Manifest:
    return Manifest(
        name="m",
        version=version,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        opset=17,
        min_ort_version="1.17.0",
        golden=GoldenSpec(cases=1, rtol=1e-4, atol=1e-5),
        members={},
    )


LINEAR = _manifest([TensorSpec("x", "FP32", (-1, 4))], [TensorSpec("y", "FP32", (-1, 3))])
FLAGS = _manifest([TensorSpec("flags", "BOOL", (-1, 3))], [TensorSpec("out", "BOOL", (-1, 3))])
X = np.array([[0.5, -1.0, 2.0, 0.0]], np.float32)
OWNER = os.getuid()  # the peer that registers the test's regions


def _binary_body(
    inputs: dict[str, np.ndarray], extra: dict[str, Any] | None = None
) -> tuple[bytes, bytes]:
    """(JSON header, binary section) of a binary-extension request, as the client sends."""
    payloads = [bytes(tensor_to_bytes(a)) for a in inputs.values()]
    doc: dict[str, Any] = {
        "inputs": [
            tensor_head(name, a, {"binary_data_size": len(p)})
            for (name, a), p in zip(inputs.items(), payloads, strict=True)
        ],
        "parameters": {"binary_data_output": True},
        **(extra or {}),
    }
    header = json.dumps(doc, separators=(",", ":")).encode()
    return header + b" " * (-len(header) % 64), b"".join(payloads)


def _parse(
    header: bytes,
    binary: bytes,
    manifest: Manifest,
    plans: PlanCache | None,
    shm: SharedMemory | None = None,
) -> InferRequest:
    return parse_infer_request(
        header + binary, manifest, header_length=len(header), shm=shm, plans=plans
    )


def _refusal(call: Any) -> str:
    with pytest.raises(InvalidRequestError) as caught:
        call()
    return str(caught.value)


def test_a_repeated_header_reuses_its_plan_and_gives_equal_arrays() -> None:
    plans = PlanCache()
    header, binary = _binary_body({"x": X})
    first = _parse(header, binary, LINEAR, plans)
    second = _parse(header, (X * 2).tobytes(), LINEAR, plans)
    assert len(plans) == 1 and second.plan is first.plan
    np.testing.assert_array_equal(first.inputs["x"], X)
    np.testing.assert_array_equal(second.inputs["x"], X * 2)  # this request's own bytes
    uncached = _parse(header, binary, LINEAR, None)
    assert uncached.plan is not first.plan
    for got in (first, uncached):
        assert got.inputs["x"].dtype == np.float32 and got.inputs["x"].shape == (1, 4)
        assert (got.outputs, got.id, got.binary_output) == (None, None, True)
        assert got.parameters == {"binary_data_output": True}


@pytest.mark.parametrize("change", [-1, +1, -16, +64])
def test_a_cached_header_with_a_short_or_long_binary_section_is_refused(change: int) -> None:
    plans = PlanCache()
    header, binary = _binary_body({"x": X})
    _parse(header, binary, LINEAR, plans)  # the plan is cached now
    wrong = binary[:change] if change < 0 else binary + bytes(change)
    cached = _refusal(lambda: _parse(header, wrong, LINEAR, plans))
    assert cached == _refusal(lambda: _parse(header, wrong, LINEAR, None))
    assert ("runs past the end" if change < 0 else f"the body carries {len(wrong)}") in cached
    assert len(plans) == 1


def test_a_cached_header_with_an_invalid_bool_byte_is_refused() -> None:
    plans = PlanCache()
    flags = np.array([[True, False, True]])
    header, binary = _binary_body({"flags": flags})
    assert _parse(header, binary, FLAGS, plans).inputs["flags"].tolist() == flags.tolist()
    bad = b"\x01\x02\x00"
    cached = _refusal(lambda: _parse(header, bad, FLAGS, plans))
    assert cached == "input 'flags': BOOL bytes must be 0 or 1"
    assert cached == _refusal(lambda: _parse(header, bad, FLAGS, None))


def test_a_cached_header_with_broken_bytes_elements_is_refused() -> None:
    text = _manifest([TensorSpec("t", "BYTES", (-1,))], [TensorSpec("o", "BYTES", (-1,))])
    plans = PlanCache()
    header = json.dumps(
        {"inputs": [{"name": "t", "datatype": "BYTES", "shape": [1], "parameters": {}}]}
    ).encode()
    header = header.replace(b'"parameters": {}', b'"parameters": {"binary_data_size": 6}')
    good = struct.pack("<I", 2) + b"ok"
    assert _parse(header, good, text, plans).inputs["t"].tolist() == ["ok"]
    for bad in (struct.pack("<I", 9) + b"ok", struct.pack("<I", 2) + b"\xff\xfe"):
        cached = _refusal(lambda bad=bad: _parse(header, bad, text, plans))
        assert cached == _refusal(lambda bad=bad: _parse(header, bad, text, None))


def test_two_versions_with_the_same_header_each_get_their_own_plan() -> None:
    plans = PlanCache()
    wider = _manifest(
        [TensorSpec("x", "FP32", (-1, 5))], [TensorSpec("y", "FP32", (-1, 3))], version="2.0.0"
    )
    same = dataclasses.replace(LINEAR, version="1.0.1")  # equal signature, another version
    header, binary = _binary_body({"x": X})
    v1 = _parse(header, binary, LINEAR, plans)
    assert "shape expected [-1, 5], got [1, 4]" in _refusal(
        lambda: _parse(header, binary, wider, plans)
    )
    v1b = _parse(header, binary, same, plans)
    assert v1.plan is not None and v1b.plan is not None
    assert v1.plan.manifest is LINEAR and v1b.plan.manifest is same
    assert v1b.plan is not v1.plan and len(plans) == 2
    assert _parse(header, binary, LINEAR, plans).plan is v1.plan


def test_a_plan_made_with_shared_memory_is_not_used_without_it() -> None:
    plans = PlanCache()
    registry = SharedMemoryRegistry()
    shm = registry.scope(OWNER)
    with _region(registry) as region:
        header = _shm_header(region, X)
        assert _parse(header, b"", LINEAR, plans, shm).inputs["x"].tolist() == X.tolist()
        refused = _refusal(lambda: _parse(header, b"", LINEAR, plans, None))
        assert refused == "input 'x': shared memory is not available on this listener"


def test_shared_memory_is_checked_on_every_request_of_a_cached_plan() -> None:
    plans = PlanCache()
    registry = SharedMemoryRegistry()
    shm = registry.scope(OWNER)
    with _region(registry) as region:
        header = _shm_header(region, X)
        np.testing.assert_array_equal(_parse(header, b"", LINEAR, plans, shm).inputs["x"], X)
        region.write(0, tensor_to_bytes(X * 3))  # new values, same header: read afresh
        np.testing.assert_array_equal(_parse(header, b"", LINEAR, plans, shm).inputs["x"], X * 3)
        os.truncate(region.path, 8)  # shrunk behind the agent's back
        assert "was truncated" in _refusal(lambda: _parse(header, b"", LINEAR, plans, shm))
        registry.unregister("r0", OWNER)
        assert "is not registered" in _refusal(lambda: _parse(header, b"", LINEAR, plans, shm))


def test_an_id_carrying_request_echoes_its_own_id() -> None:
    plans = PlanCache()
    y = {"y": np.array([[0.1, 0.2, 0.7]], np.float32)}
    seen = []
    for request_id in ["a", "b", "a", 'quote"and\\slash', "a"]:
        header, binary = _binary_body({"x": X}, {"id": request_id})
        parsed = _parse(header, binary, LINEAR, plans)
        parts, length = encode_infer_response("m", "1.0.0", y, parsed)
        assert length is not None
        doc = json.loads(bytes(parts[0]))
        assert doc["id"] == request_id
        seen.append(parsed.plan)
    # A header with an id is one request's: never cached, so numbered requests cannot
    # push other clients' plans out.
    assert len(plans) == 0 and len({id(plan) for plan in seen}) == len(seen)
    no_id = _parse(*_binary_body({"x": X}), LINEAR, plans)
    assert len(plans) == 1
    parts, _ = encode_infer_response("m", "1.0.0", y, no_id)
    assert "id" not in json.loads(bytes(parts[0]))
    # A request rebuilt with another id is never answered from its plan's header.
    other = dataclasses.replace(no_id, id="changed")
    parts, _ = encode_infer_response("m", "1.0.0", y, other)
    assert json.loads(bytes(parts[0]))["id"] == "changed"


def test_a_cached_response_header_follows_the_outputs_shapes_and_values() -> None:
    plans = PlanCache()
    header, binary = _binary_body({"x": np.zeros((2, 4), np.float32)})
    parsed = _parse(header, binary, LINEAR, plans)
    for rows in (2, 2, 1, 2):
        y = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
        got = encode_infer_response("m", "1.0.0", {"y": y}, parsed)
        want = encode_infer_response("m", "1.0.0", {"y": y}, dataclasses.replace(parsed, plan=None))
        assert [bytes(p) for p in got[0]] == [bytes(p) for p in want[0]] and got[1] == want[1]
    assert parsed.plan is not None and parsed.plan.responses is not None
    assert len(parsed.plan.responses) == 2
    v2 = encode_infer_response("m", "2.0.0", {"y": y}, parsed)
    assert json.loads(bytes(v2[0][0]))["model_version"] == "2.0.0"


def test_a_cached_shared_memory_response_writes_and_checks_every_time() -> None:
    plans = PlanCache()
    registry = SharedMemoryRegistry()
    shm = registry.scope(OWNER)
    with _region(registry) as region:
        header = _shm_header(region, X, output_bytes=12)
        parsed = _parse(header, b"", LINEAR, plans, shm)
        for value in (1.0, 2.0):
            y = np.full((1, 3), value, np.float32)
            parts, length = encode_infer_response("m", "1.0.0", {"y": y}, parsed, shm)
            assert length is None and len(parts) == 1
            assert region.array(64, np.dtype(np.float32), (1, 3)).tolist() == y.tolist()
        too_big = np.zeros((2, 3), np.float32)  # 24 bytes for a 12-byte slot
        message = _refusal(lambda: encode_infer_response("m", "1.0.0", {"y": too_big}, parsed, shm))
        assert "needs 24 bytes, shared_memory_byte_size is 12" in message
        registry.unregister("r0", OWNER)
        assert "is not registered" in _refusal(
            lambda: encode_infer_response("m", "1.0.0", {"y": X[:, :3]}, parsed, shm)
        )


def test_json_data_is_never_cached_and_big_headers_skip_the_cache() -> None:
    plans = PlanCache(max_header_bytes=256)
    body = json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    ).encode()
    first = parse_infer_request(body, LINEAR, plans=plans)
    assert len(plans) == 0
    first.inputs["x"][0, 0] = 99.0  # a caller's change never shows in the next request
    assert parse_infer_request(body, LINEAR, plans=plans).inputs["x"].tolist() == [[1, 2, 3, 4]]
    header, binary = _binary_body({"x": X}, {"parameters": {"pad": "z" * 300}})
    _parse(header, binary, LINEAR, plans)
    assert len(plans) == 0


def test_the_cache_stays_within_its_bound() -> None:
    plans = PlanCache(max_plans=3)
    for rows in range(1, 8):
        _parse(*_binary_body({"x": np.zeros((rows, 4), np.float32)}), LINEAR, plans)
    assert len(plans) == 3
    newest = _binary_body({"x": np.zeros((7, 4), np.float32)})[0]
    oldest = _binary_body({"x": np.zeros((1, 4), np.float32)})[0]
    assert plans.get(LINEAR, False, newest) is not None
    assert plans.get(LINEAR, False, oldest) is None


_ECHO = _manifest(
    [TensorSpec(f"in_{dt.lower()}", dt, (-1, 3)) for dt in ALL_DATATYPES],
    [TensorSpec(f"out_{dt.lower()}", dt, (-1, 3)) for dt in ALL_DATATYPES],
)


@settings(max_examples=60, deadline=None)
@given(
    names=st.lists(st.sampled_from(ALL_DATATYPES), min_size=1, max_size=4, unique=True),
    rows=st.integers(min_value=0, max_value=3),
    request_id=st.none() | st.text(max_size=5),
    flip=st.integers(min_value=0, max_value=255),
)
def test_cached_and_uncached_parses_agree_for_every_datatype(
    names: list[str], rows: int, request_id: str | None, flip: int
) -> None:
    manifest = dataclasses.replace(
        _ECHO, inputs=tuple(t for t in _ECHO.inputs if t.datatype in names)
    )
    inputs = {f"in_{dt.lower()}": sample_tensor(dt, rows) for dt in names}
    header, binary = _binary_body(inputs, {} if request_id is None else {"id": request_id})
    plans = PlanCache()
    variants = [binary, binary[:-1], binary + b"\x00"]
    if binary:
        at = flip % len(binary)
        variants.append(binary[:at] + bytes([flip]) + binary[at + 1 :])
    for body in variants:
        outcomes = []
        for cache in (plans, plans, None):  # a miss that fills, a hit, no cache
            try:
                got = _parse(header, body, manifest, cache)
            except InvalidRequestError as exc:
                outcomes.append(("refused", str(exc)))
            else:
                outcomes.append(("parsed", _summary(got)))
        assert outcomes[0] == outcomes[1] == outcomes[2]


def _summary(request: InferRequest) -> Any:
    # Numbers compared by their bytes: a flipped byte may make a NaN, never equal to itself.
    return (
        {
            n: (a.dtype.str, a.shape, a.tolist() if a.dtype == object else a.tobytes())
            for n, a in request.inputs.items()
        },
        request.outputs,
        request.id,
        request.parameters,
        request.binary_output,
    )


@contextlib.contextmanager
def _region(registry: SharedMemoryRegistry) -> Iterator[SharedMemoryRegion]:
    """A real shared-memory object registered in ``registry`` as ``r0``."""
    region = SharedMemoryRegion(f"/ef-plan-{uuid.uuid4().hex[:12]}", 4096)
    try:
        registry.register("r0", {"key": region.key, "byte_size": 4096}, peer_uid=OWNER)
        yield region
    finally:
        registry.close()
        region.close()


def _shm_header(region: SharedMemoryRegion, x: np.ndarray, output_bytes: int = 0) -> bytes:
    size = region.write(0, tensor_to_bytes(x))
    doc: dict[str, Any] = {
        "inputs": [
            tensor_head(
                "x",
                x,
                {
                    "shared_memory_region": "r0",
                    "shared_memory_offset": 0,
                    "shared_memory_byte_size": size,
                },
            )
        ]
    }
    if output_bytes:
        doc["outputs"] = [
            {
                "name": "y",
                "parameters": {
                    "shared_memory_region": "r0",
                    "shared_memory_offset": 64,
                    "shared_memory_byte_size": output_bytes,
                },
            }
        ]
    return json.dumps(doc).encode()


def test_threads_sharing_a_small_cache_each_get_their_own_request() -> None:
    plans = PlanCache(max_plans=4)  # far fewer plans than headers: constant eviction
    failures: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for i in range(300):
                rows = 1 + (seed + i) % 9
                x = np.full((rows, 4), seed * 1000 + i, np.float32)
                header, binary = _binary_body({"x": x}, {"id": f"{seed}-{rows}"})
                got = _parse(header, binary, LINEAR, plans)
                assert got.id == f"{seed}-{rows}"
                np.testing.assert_array_equal(got.inputs["x"], x)
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == [] and len(plans) <= 4


def test_an_input_named_data_is_cached_like_any_other() -> None:
    named = _manifest([TensorSpec("data", "FP32", (-1, 4))], [TensorSpec("y", "FP32", (-1, 3))])
    plans = PlanCache()
    header, binary = _binary_body({"data": X})
    first = _parse(header, binary, named, plans)
    assert len(plans) == 1 and _parse(header, binary, named, plans).plan is first.plan
