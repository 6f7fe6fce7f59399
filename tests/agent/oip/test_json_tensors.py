"""JSON tensors without Python lists (issue 21, item 1): a large body's flat numeric
``data`` is read from its text straight into a numpy buffer, and numeric outputs are
written straight from their arrays. Neither may change a result: every request below
gives, through the fast path, exactly the array, or exactly the error, that the plain
path (the standard library's ``json.loads``, then ``tensor_from_json`` on the list) gives;
every output reads back to the same values as the standard library's encoding."""

from __future__ import annotations

import json
import math
import mmap
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.base.errors import InvalidRequestError
from agent.contracts import OIP_TO_NUMPY, GoldenSpec, Manifest, TensorSpec
from agent.oip import request as request_module
from agent.oip import tensors as tensors_module
from agent.oip.request import SPLIT_MIN_BYTES, parse_infer_request
from agent.oip.response import build_infer_request, build_infer_response, parse_infer_response
from agent.oip.tensors import load_json, tensor_from_json_text, tensor_to_json
from tests.agent._model_dir import ALL_DATATYPES, sample_tensor

NUMERIC = [d for d in ALL_DATATYPES if d not in ("BOOL", "BYTES")]


def _manifest(*inputs: TensorSpec) -> Manifest:
    return Manifest(
        name="m",
        version="1.0.0",
        inputs=inputs,
        outputs=(TensorSpec("y", "FP32", (-1,)),),
        opset=17,
        min_ort_version="1.17.0",
        golden=GoldenSpec(cases=1, rtol=1e-4, atol=1e-5),
        members={},
    )


def _body(tensors: Sequence[str], extra: str = "") -> bytes:
    """A whole-JSON request of these input texts, padded with spaces (still the same
    JSON) to a size that takes the fast path."""
    text = '{"id":"r-1"' + extra + ',"inputs":[' + ",".join(tensors) + "]}"
    return text.encode() + b" " * max(0, SPLIT_MIN_BYTES - len(text))


def _tensor(datatype: str, shape: list[int], data: str, name: str = "t", more: str = "") -> str:
    head = f'{{"name":"{name}","datatype":"{datatype}","shape":{json.dumps(shape)}{more}'
    return f'{head},"data":{data}}}'


def _outcome(body: bytes, manifest: Manifest) -> Any:
    """The arrays (dtype, shape, bytes) a body gives, or the error message."""
    try:
        parsed = parse_infer_request(body, manifest)
    except InvalidRequestError as exc:
        return str(exc)
    return {
        k: (v.dtype, v.shape, v.tolist() if v.dtype == object else v.tobytes())
        for k, v in parsed.inputs.items()
    }


def _plain_outcome(body: bytes, manifest: Manifest) -> Any:
    """What the plain path gives: the whole body through the standard library's meaning."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(request_module, "SPLIT_MIN_BYTES", 2**62)
        return _outcome(body, manifest)


def _takes_fast_path(body: bytes, manifest: Manifest) -> bool:
    return request_module._parse_split(body, manifest, None) is not None


# (datatype, shape, data text, taken by the fast path)
CASES: list[tuple[str, list[int], str, bool]] = [
    ("FP32", [1, 4], "[1,2,3,4]", True),  # integers for FP32
    ("FP32", [1, 4], "[-1.5e-3, 2E+5 ,\n-0, 0.0]", True),  # signs, exponents, whitespace
    ("FP32", [2, 2], "[0.1,-0.0,3.4028235e38,1e-45]", True),
    ("FP32", [1, 4], "[1e39,-1e39,1,2]", True),  # beyond FP32: inf, as numpy casts it
    ("FP16", [1, 4], "[0.1,70000,-2.5,1e-8]", True),
    ("FP64", [1, 4], "[1e308,-1e-308,5e-324,0.30000000000000004]", True),
    ("FP64", [1, 2], "[9007199254740993,1.5]", True),  # an integer past 2**53 among floats
    ("INT8", [1, 4], "[-128,127,0,-0]", True),
    ("INT64", [1, 2], "[9223372036854775807,-9223372036854775808]", True),
    ("UINT8", [1, 4], "[0,255,1,2]", True),
    ("UINT64", [1, 2], "[9223372036854775807,0]", True),
    ("UINT16", [1, 4], "[0,65535,1,2]", True),
    ("FP32", [0, 4], "[]", False),  # no values
    ("UINT64", [1, 2], "[18446744073709551615,0]", False),  # beyond int64: plain
    ("FP32", [1, 2], "[1180591620717411303424,1.5]", False),  # beyond 64 bits: refused
    ("FP32", [1, 2], "[1180591620717411303424,1]", False),
    ("INT64", [1, 2], "[18446744073709551616,1]", False),
    ("FP32", [1, 4], "[NaN,Infinity,-Infinity,1]", False),  # the standard library takes them
    ("FP32", [1, 2], "[1e400,1]", False),  # inf, as the standard library reads it
    ("FP32", [1, 4], "[1,true,3,4]", False),
    ("INT8", [1, 4], "[1,300,0,0]", False),
    ("UINT8", [1, 4], "[-1,0,1,2]", False),
    ("INT32", [1, 4], "[1.5,2,3,4]", False),
    ("INT32", [1, 4], "[1.0,2,3,4]", False),
    ("INT32", [1, 4], "[1e2,2,3,4]", False),
    ("FP32", [1, 4], "[1,2,3]", False),
    ("FP32", [1, 4], "[1,2,3,4,5]", False),
    ("FP32", [1, 4], "[]", False),
    ("FP32", [1, 4], "[1,null,3,4]", False),
    ("FP32", [1, 4], "[[1,2],[3,4]]", False),  # nested: the plain path
    ("FP32", [1, 4], "[[1,2],[3]]", False),
    ("FP32", [1, 4], "[1,[2],3,4]", False),
    ("FP32", [1, 4], '[1,"2",3,4]', False),
    ("FP32", [1, 4], "[1,{},3,4]", False),
    ("FP32", [1, 4], "[1,,2,3]", False),  # not JSON: the standard library's message
    ("FP32", [1, 4], "[1 2 3 4]", False),
    ("FP32", [1, 4], "[1,2,3,4,]", False),
    ("FP32", [1, 4], "[01,2,3,4]", False),
    ("FP32", [1, 4], "[+1,2,3,4]", False),
    ("FP32", [1, 4], "[.5,1,2,3]", False),
    ("FP32", [1, 4], "[1.,2,3,4]", False),
    ("FP32", [1, 4], "[0x10,1,2,3]", False),
    ("FP32", [1, 4], "[1,2,3,4", False),
    ("FP32", [1, 4], "1", False),
    ("BOOL", [1, 4], "[true,false,true,false]", False),
    ("BOOL", [1, 4], "[1,0,1,0]", False),
    ("BYTES", [1, 2], '["a]b","[c"]', False),
    ("BYTES", [1, 2], '["x","y"]', False),
]


@pytest.mark.parametrize(("datatype", "shape", "data", "fast"), CASES)
def test_the_fast_path_gives_what_the_plain_path_gives(
    datatype: str, shape: list[int], data: str, fast: bool
) -> None:
    manifest = _manifest(TensorSpec("t", datatype, (-1,) * len(shape)))
    body = _body([_tensor(datatype, shape, data)])
    assert len(body) >= SPLIT_MIN_BYTES
    got = _outcome(body, manifest)
    assert got == _plain_outcome(body, manifest)
    assert _takes_fast_path(body, manifest) is fast
    if fast:  # and it is the array json.loads + numpy make of the same list
        want = np.asarray(json.loads(data)).astype(OIP_TO_NUMPY[datatype]).reshape(shape)
        assert got == {"t": (want.dtype, want.shape, want.tobytes())}


@pytest.mark.parametrize(
    ("datatype", "data", "extra", "expected"),
    [
        ("FP32", "[1,2,3]", "", "input 't': shape [1, 4] needs 4 values, got 3"),
        ("INT8", "[1,300,0,0]", "", "INT8 holds -128..127, got values in 0..300"),
        ("INT32", "[1.5,2,3,4]", "", "expects integers, got floats"),
        ("FP32", "[1,null,3,4]", "", "expects numbers"),
        ("FP32", "[[1,2],[3]]", "", "regularly nested"),
        ("FP32", "[1180591620717411303424,1,2,3]", "", "got mixed values"),
        ("FP32", "[1,,2,3]", "", "not valid JSON"),
        ("FP32", "[1,2,3,4]", ',"id":5', "'id' expected a string, got a number"),
        ("FP32", "[1,2,3,4]", ',"outputs":[{"name":"q"}]', "unknown output 'q'"),
    ],
)
def test_refusals_of_large_bodies_keep_their_messages(
    datatype: str, data: str, extra: str, expected: str
) -> None:
    manifest = _manifest(TensorSpec("t", datatype, (-1, 4)))
    body = _body([_tensor(datatype, [1, 4], data)], extra)
    message = _outcome(body, manifest)
    assert isinstance(message, str) and expected in message, message
    assert message == _plain_outcome(body, manifest)
    wrong_type = _body([_tensor("FP64", [1, 4], "[1,2,3,4]")])
    assert _outcome(wrong_type, _manifest(TensorSpec("t", "FP32", (-1, 4)))) == (
        "input 't': datatype expected FP32, got FP64"
    )


def test_a_data_key_that_is_not_an_inputs_data_takes_the_plain_path() -> None:
    """A ``"data"`` list in parameters, twice in one input, in a string, or behind an
    escaped quote: the placeholders do not all land on inputs' data, so the plain path
    reads the body, and the result is its."""
    manifest = _manifest(TensorSpec("t", "FP32", (-1, 4)))
    bodies = [
        _body([_tensor("FP32", [1, 4], "[1,2,3,4]", more=',"parameters":{"data":[9,9]}')]),
        _body([_tensor("FP32", [1, 4], '[1,2,3,4],"data":[5,6,7,8]')]),
        _body([_tensor("FP32", [1, 4], "[1,2,3,4]")], ',"parameters":{"x\\"data":[7]}'),
        _body([_tensor("FP32", [1, 4], "[1,2,3,4]")], ',"note":"\\"data\\": [8]"'),
        _body([_tensor("FP32", [1, 4], "[1,2,3,4]")], ',"data":[3]'),
    ]
    for body in bodies:
        got = _outcome(body, manifest)
        assert got == _plain_outcome(body, manifest), body[:200]
        assert not isinstance(got, str), got
    assert _outcome(bodies[1], manifest)["t"][2] == np.float32([5, 6, 7, 8]).tobytes()
    for body in bodies[:3] + bodies[4:]:  # a match inside a string is no match at all
        assert not _takes_fast_path(body, manifest)
    assert _takes_fast_path(bodies[3], manifest)


def test_several_inputs_mix_fast_and_plain_data() -> None:
    manifest = _manifest(
        TensorSpec("a", "FP32", (-1, 3)),
        TensorSpec("b", "BOOL", (-1, 2)),
        TensorSpec("c", "INT64", (-1, 2)),
        TensorSpec("d", "FP32", (-1, 2)),
    )
    body = _body(
        [
            _tensor("FP32", [1, 3], "[0.5,-2,3e3]", name="a"),
            _tensor("BOOL", [1, 2], "[true,false]", name="b"),
            _tensor("INT64", [1, 2], "[-7,8]", name="c"),
            _tensor("FP32", [1, 2], "[[1],[2]]", name="d"),
        ]
    )
    got = _outcome(body, manifest)
    assert got == _plain_outcome(body, manifest)
    assert list(got) == ["a", "b", "c", "d"]
    parsed = parse_infer_request(body, manifest)
    assert parsed.inputs["c"].tolist() == [[-7, 8]] and parsed.inputs["b"].dtype == np.bool_


def test_a_large_flat_tensor_is_read_exactly() -> None:
    """The CNN's input as a client sends it: 150,528 float32 values, flat."""
    x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    manifest = _manifest(TensorSpec("x", "FP32", (-1, 3, 224, 224)))
    body = build_infer_request({"x": x})
    assert _takes_fast_path(body, manifest)
    parsed = parse_infer_request(body, manifest)
    assert parsed.inputs["x"].dtype == np.float32
    np.testing.assert_array_equal(parsed.inputs["x"], x)
    wrong = body.replace(b'"shape":[1,3,224,224]', b'"shape":[1,3,224,223]')
    message = _outcome(wrong, _manifest(TensorSpec("x", "FP32", (-1, 3, 224, -1))))
    assert message == "input 'x': shape [1, 3, 224, 223] needs 149856 values, got 150528"


_numbers = st.one_of(
    st.integers(-(2**64), 2**64),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(NUMERIC),
    st.lists(_numbers, min_size=1, max_size=12),
    st.integers(0, 1),
)
def test_any_flat_list_of_numbers_gives_what_the_plain_path_gives(
    datatype: str, values: list[Any], off_by: int
) -> None:
    manifest = _manifest(TensorSpec("t", datatype, (-1,)))
    shape = [len(values) + off_by]  # sometimes a wrong count
    body = _body([_tensor(datatype, shape, json.dumps(values))])
    assert _outcome(body, manifest) == _plain_outcome(body, manifest)


def test_small_bodies_take_the_plain_path_and_text_alone_never_decides() -> None:
    manifest = _manifest(TensorSpec("t", "FP32", (-1, 2)))
    small = b'{"inputs":[{"name":"t","datatype":"FP32","shape":[1,2],"data":[1,2]}]}'
    assert parse_infer_request(small, manifest).inputs["t"].tolist() == [[1.0, 2.0]]
    assert tensor_from_json_text("FP32", [2], b"[1,2]") is not None
    assert tensor_from_json_text("FP32", [3], b"[1,2]") is None  # the count decides later
    assert tensor_from_json_text("BOOL", [2], b"[true,false]") is None
    assert tensor_from_json_text("INT8", [2], b"[1,2.0]") is None


# ---------------------------------------------------------------------------- load_json


@pytest.mark.parametrize(
    "text",
    [
        b'{"a":[1,-0,-0.0,1e5,1E-400,0.1],"b":"\\u00e9\\u0000","a":2}',
        b"[18446744073709551615,18446744073709551616,-9223372036854775809]",
        b"[NaN,Infinity,-Infinity,1e400]",
        b'["\\ud800"]',
        b"\xef\xbb\xbf[1]",
        b"[" * 1100 + b"]" * 1100,
        b"[1] x",
        b'["\xff"]',
        b"{not json",
        b"",
    ],
)
def test_load_json_means_what_the_standard_library_means(
    text: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tensors_module, "SMALL_JSON_BYTES", 0)  # simdjson reads these too

    def outcome(load: Any) -> Any:
        try:
            return ("value", repr(load(text)))
        except (ValueError, RecursionError) as exc:
            return ("error", type(exc), str(exc))

    assert outcome(load_json) == outcome(json.loads)


# ---------------------------------------------------------------------------- outputs


def _old_encoding(array: np.ndarray) -> list[Any]:
    """The data of an output as the agent wrote it before: tolist() and json.dumps."""
    return json.loads(json.dumps(array.ravel().tolist()))  # type: ignore[no-any-return]


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_outputs_of_every_datatype_read_back_as_before(datatype: str) -> None:
    array = sample_tensor(datatype)
    [output] = json.loads(build_infer_response("m", "1.0.0", {"o": array}, "id"))["outputs"]
    assert output["datatype"] == datatype and output["shape"] == list(array.shape)
    if datatype == "BYTES":
        assert output["data"] == [
            v.decode() if isinstance(v, bytes) else v for v in array.ravel().tolist()
        ]
        return
    dtype = OIP_TO_NUMPY[datatype]
    got = np.asarray(output["data"], dtype).reshape(array.shape)
    np.testing.assert_array_equal(got, array)
    np.testing.assert_array_equal(got.ravel(), np.asarray(_old_encoding(array), dtype))


def test_numeric_outputs_are_written_from_the_array_not_a_list() -> None:
    """Regression (issue 21, item 1): ``tolist()`` was the slow part of large outputs."""
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert isinstance(tensor_to_json("o", array)["data"], np.ndarray)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_floats_read_back_bit_for_bit(dtype: type[np.floating[Any]]) -> None:
    bits = {np.float16: np.uint16, np.float32: np.uint32, np.float64: np.uint64}[dtype]
    rng = np.random.default_rng(21)
    count = 65536 if dtype is np.float16 else 200_000
    if dtype is np.float16:
        raw = np.arange(65536, dtype=np.uint16)
    else:
        raw = rng.integers(0, np.iinfo(bits).max, count, dtype=bits, endpoint=True)
    values = raw.view(dtype)
    values = values[np.isfinite(values)]
    body = build_infer_response("m", "1.0.0", {"o": values})
    got = np.asarray(json.loads(body)["outputs"][0]["data"], dtype)
    assert got.tobytes() == values.tobytes()  # -0.0, subnormals and all


def test_outputs_not_finite_are_written_as_the_standard_library_writes_them() -> None:
    array = np.array([np.nan, np.inf, -np.inf, 1.5], np.float32)
    body = build_infer_response("m", "1.0.0", {"o": array})
    assert b"[NaN,Infinity,-Infinity,1.5]" in body
    got = parse_infer_response(body)["o"]
    np.testing.assert_array_equal(got, array)


def test_odd_layouts_and_ids_are_written_as_before() -> None:
    base = np.arange(24, dtype=np.float64).reshape(4, 6)
    arrays = {
        "strided": base[:, ::2],
        "fortran": np.asfortranarray(base),
        "big_endian": base.astype(">f4"),
        "empty": np.zeros((2, 0), np.int16),
        "scalar": np.array(7, np.uint8),
        "bools": np.array([[True, False]]),
    }
    for request_id in ("plain", "\ud800 lone surrogate", "é"):
        body = build_infer_response("m", "1.0.0", arrays, request_id)
        doc = json.loads(body)
        assert doc["id"] == request_id
        for output in doc["outputs"]:
            array = arrays[output["name"]]
            assert output["shape"] == list(array.shape)
            assert output["data"] == _old_encoding(array)


def test_the_client_round_trips_through_both_codecs() -> None:
    x = np.random.default_rng(3).normal(size=(2, 5000)).astype(np.float32)
    manifest = _manifest(TensorSpec("x", "FP32", (-1, 5000)))
    body = build_infer_request({"x": x})
    assert len(body) > SPLIT_MIN_BYTES and _takes_fast_path(body, manifest)
    parsed = parse_infer_request(body, manifest).inputs["x"]
    np.testing.assert_array_equal(parsed, x)
    response = build_infer_response("m", "1.0.0", {"y": parsed})
    np.testing.assert_array_equal(parse_infer_response(response)["y"], x)
    assert math.prod(parsed.shape) == 10000


def test_a_body_of_data_keys_is_cut_at_most_once_per_input() -> None:
    """A body made of ``"data"`` lists (50,000 of them under one input) would make the
    fast path loop per list: past the model's count of inputs it gives up at once, and
    the plain path answers (duplicate keys: the last one counts, as in ``json.loads``)."""
    manifest = _manifest(TensorSpec("t", "FP32", (-1,)))
    many = _body([_tensor("FP32", [1], "[1]," + '"data":[2],' * 50_000 + '"data":[3]')])
    assert request_module._split_data(many, 1) is None
    assert _outcome(many, manifest) == {
        "t": (np.dtype(np.float32), (1,), np.float32([3]).tobytes())
    }
    two = _body([_tensor("FP32", [1], "[1]", more=',"parameters":{"data":[2]}')])
    assert request_module._split_data(two, 1) is None
    assert request_module._split_data(two, 2) is not None
    assert _outcome(two, manifest) == _plain_outcome(two, manifest)


def _race(work: Callable[[int], None], threads: int = 8) -> None:
    """``work(i)`` for i in range(``threads``), all at once on threads that switch between
    nearly any two bytecodes; the first exception any of them raised is re-raised."""
    failures: list[BaseException] = []

    def run(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:
            failures.append(exc)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join(60)
    finally:
        sys.setswitchinterval(interval)
    assert not failures, failures[0]


def test_threads_parsing_at_once_each_get_their_own_answer() -> None:
    """Concurrent calls share the parser safely: each takes it in turn and gets its own
    document's values."""
    manifest = _manifest(TensorSpec("t", "FP32", (-1,)))
    bodies = [_body([_tensor("FP32", [3], f"[{i},{i}.5,-{i}e1]")]) for i in range(8)]

    def parse(i: int) -> None:
        for _ in range(300):
            got = parse_infer_request(bodies[i], manifest).inputs["t"]
            assert got.tolist() == [i, i + 0.5, -10 * i], got
            assert load_json(b'{"i":%d}' % i) == {"i": i}

    _race(parse)


def test_a_body_in_a_receive_buffer_is_read_in_place_and_gives_the_same_arrays() -> None:
    """The server hands a large body as a view of its receive buffer (an mmap, or a
    bytearray): the fast path reads the buffer it covers whole in place, and a view of
    part of one (a kept buffer larger than the body), copied; the arrays are the same."""
    x = np.random.default_rng(9).normal(size=(1, 3000)).astype(np.float32)
    manifest = _manifest(TensorSpec("x", "FP32", (-1, 3000)))
    body = build_infer_request({"x": x})
    whole_map = mmap.mmap(-1, len(body))
    whole_map[:] = body
    bigger_map = mmap.mmap(-1, len(body) + 100)
    bigger_map[: len(body)] = body
    padded = bytearray(b"  " + body)
    views = {
        "bytes": body,
        "bytearray view": memoryview(bytearray(body)),
        "mmap view, whole": memoryview(whole_map),
        "mmap view, a prefix": memoryview(bigger_map)[: len(body)],
        "view at an offset": memoryview(padded)[2:],
        "view of a view": memoryview(memoryview(bytearray(body))),
    }
    assert request_module._findable(memoryview(views["mmap view, whole"])) is whole_map
    assert isinstance(request_module._findable(memoryview(padded)[2:]), bytes)
    for label, source in views.items():
        got = parse_infer_request(source, manifest).inputs["x"]
        np.testing.assert_array_equal(got, x, err_msg=label)
    for view in views.values():
        if isinstance(view, memoryview):
            view.release()
    whole_map.close()
    bigger_map.close()


def test_threads_reading_data_text_at_once_all_take_the_fast_path() -> None:
    """The parser is handed on only once nothing of its document is alive: a thread
    that took it while another's document still referred to it was refused by simdjson
    and fell back to the plain path (~10x the CPU), which under 4 concurrent CNN
    requests took a third of them."""
    texts = [b"[%d.5,%d,-%de1,0.25]" % (i, i, i) for i in range(8)]
    misses: list[int] = []

    def read(i: int) -> None:
        for _ in range(300):
            got = tensor_from_json_text("FP32", [2, 2], texts[i])
            if got is None:
                misses.append(i)
                continue
            assert got.tolist() == [[i + 0.5, i], [-10 * i, 0.25]], got

    _race(read)
    assert not misses, f"{len(misses)} of 2400 reads fell back to the plain path"
