"""``rollup_rows`` (controller/fleet/rollup.py) against a plain reference: each table's
rows summed with one dict per table, keyed as the table is, then sorted. The hot path
keeps a version's sums together to build fewer keys; the rows must not change."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from controller.fleet.rollup import ModelFigures, bucket_of, counted_p99, latency_bin, rollup_rows


def reference(
    beats: list[tuple[str, str, float, list[ModelFigures]]],
) -> dict[str, list[tuple[Any, ...]]]:
    figures: dict[tuple[Any, ...], list[int]] = {}
    latency: dict[tuple[Any, ...], int] = {}
    devices: dict[tuple[Any, ...], list[Any]] = {}
    for fleet, device, received, models in beats:
        bucket = bucket_of(received)
        for name, version, _state, requests, errors, client_errors, p99 in models:
            if version is None:
                continue
            key = (fleet, name, version, bucket)
            sums = figures.setdefault(key, [0, 0, 0, 0])
            for i, value in enumerate((1, requests, errors, client_errors)):
                sums[i] += value
            counted = counted_p99(requests, client_errors, p99)
            if counted is not None:
                at = (*key, latency_bin(counted))
                latency[at] = latency.get(at, 0) + 1
            mine = devices.setdefault((*key, device), [0, 0, 0, 0.0, 0])
            mine[0] += requests
            mine[1] += errors
            mine[2] += client_errors
            if counted is not None:
                mine[3] += counted
                mine[4] += 1
    return {
        "figures": [(*k, *v) for k, v in sorted(figures.items())],
        "latency": [(*k, n) for k, n in sorted(latency.items())],
        "devices": [(*k, *v) for k, v in sorted(devices.items())],
    }


_MODEL = st.tuples(
    st.sampled_from(["detector", "ranker"]),
    st.sampled_from(["1.0.0", "2.0.0", None]),
    st.just("committed"),
    st.integers(0, 50),
    st.integers(0, 5),
    st.integers(0, 5),
    st.one_of(st.none(), st.sampled_from([0.0, 1e-9, 0.004, 0.012, 0.5, 3.0])),
)
_BEAT = st.tuples(
    st.sampled_from(["f1", "f2"]),
    st.sampled_from(["d1", "d2", "d3", "d4"]),
    st.floats(0, 400, allow_nan=False),
    st.lists(_MODEL, max_size=3),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_BEAT, max_size=40))
def test_rollup_rows_are_the_plain_sums(
    beats: list[tuple[str, str, float, list[ModelFigures]]],
) -> None:
    assert rollup_rows(beats) == reference(beats)


def test_a_device_with_two_heartbeats_in_a_bucket_is_one_row() -> None:
    model: ModelFigures = ("detector", "2.0.0", "committed", 10, 1, 2, 0.01)
    rows = rollup_rows([("f", "d", 60.0, [model]), ("f", "d", 119.0, [model])])
    assert rows["devices"] == [("f", "detector", "2.0.0", 60.0, "d", 20, 2, 4, 0.02, 2)]
    assert rows["figures"] == [("f", "detector", "2.0.0", 60.0, 2, 20, 2, 4)]
