"""The cadence of the periodic loops (``agent.device.cadence``): the rule is pure (the
clock is a number); ``run_every`` runs on a real event loop, whose clock is monotonic."""

from __future__ import annotations

import asyncio
import logging
import math

import pytest

from agent.device.cadence import Cadence, run_every


def test_passes_are_due_on_a_grid_and_missed_ones_are_skipped() -> None:
    cadence = Cadence(10.0)
    assert cadence.next_due(100.0, now=103.0) == 110.0  # the pass ended in time
    assert cadence.next_due(100.0, now=99.0) == 110.0  # it began early (jitter)
    assert cadence.next_due(100.0, now=110.0) == 120.0  # ended on the next grid point
    assert cadence.next_due(100.0, now=135.0) == 140.0  # overran three: no burst after


def test_jitter_moves_a_pass_within_its_bound_and_never_into_the_past() -> None:
    cadence = Cadence(300.0, jitter_s=30.0)
    assert cadence.wait_s(1000.0, now=700.0, jitter=-12.5) == 287.5
    assert cadence.wait_s(1000.0, now=700.0, jitter=99.0) == 330.0  # clamped to +30
    assert cadence.wait_s(1000.0, now=990.0, jitter=-30.0) == 0.0  # due already
    assert cadence.draw_jitter(lambda low, high: high) == 30.0
    assert Cadence(1.0).draw_jitter(lambda low, high: 1 / 0) == 0.0  # no jitter, no draw
    assert cadence.longest_gap_s == 360.0


@pytest.mark.parametrize(
    ("interval_s", "jitter_s", "field"),
    [(0.0, 0.0, "interval_s"), (math.nan, 0.0, "interval_s"), (1.0, -1.0, "jitter_s")],
)
def test_a_cadence_out_of_range_is_refused_naming_the_field(
    interval_s: float, jitter_s: float, field: str
) -> None:
    with pytest.raises(ValueError, match=f"a cadence's {field} expected"):
        Cadence(interval_s, jitter_s)


def test_run_every_keeps_going_through_a_pass_that_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    passes: list[int] = []

    async def work() -> None:
        passes.append(len(passes))
        if len(passes) == 2:
            raise RuntimeError("a bug in one pass")

    async def main() -> None:
        task = asyncio.create_task(run_every(Cadence(0.001), work, "a test pass"))
        for _ in range(2000):  # bounded: at most 2000 turns of the loop
            if len(passes) >= 5:
                break
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.ERROR, logger="agent.device.cadence"):
        asyncio.run(main())
    assert passes[:5] == [0, 1, 2, 3, 4]
    (record,) = caplog.records
    assert record.getMessage() == "a test pass failed; the next pass runs on schedule"
    assert record.exc_info is not None and "a bug in one pass" in str(record.exc_info[1])


def test_run_every_runs_one_pass_at_a_time() -> None:
    running = 0
    most = 0
    count = 0

    async def slow() -> None:
        nonlocal running, most, count
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.01)  # ten intervals long
        running -= 1
        count += 1

    async def main() -> None:
        task = asyncio.create_task(run_every(Cadence(0.001), slow, "a slow pass"))
        for _ in range(2000):
            if count >= 3:
                break
            await asyncio.sleep(0.005)
        task.cancel()

    asyncio.run(main())
    assert count >= 3 and most == 1
