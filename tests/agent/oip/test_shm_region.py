"""The client's shared-memory region: arrays that live in it, and finding them again."""

from __future__ import annotations

import os

import numpy as np
import pytest

from agent.base.errors import InvalidRequestError
from agent.oip.shm import SharedMemoryRegion


def test_ndarray_lives_in_the_region_and_offset_of_finds_it() -> None:
    with SharedMemoryRegion(f"ef-test-{os.getpid()}", 4096) as region:
        frame = region.ndarray(128, np.float32, (2, 3))
        frame[:] = np.arange(6, dtype=np.float32).reshape(2, 3)
        # The bytes are the region's: a copy read back from it sees what was written.
        np.testing.assert_array_equal(region.array(128, np.dtype(np.float32), (2, 3)), frame)
        assert region.offset_of(frame) == 128
        assert region.offset_of(frame[1]) == 128 + 12  # a contiguous row of it
        assert region.offset_of(frame.T) is None  # not C-contiguous
        assert region.offset_of(np.zeros((2, 3), np.float32)) is None  # elsewhere
        with pytest.raises(InvalidRequestError, match="do not fit"):
            region.ndarray(4090, np.float32, (4,))
        with pytest.raises(InvalidRequestError, match="not aligned"):
            region.ndarray(2, np.float32, (4,))
        del frame


def test_close_while_an_array_is_alive_keeps_the_mapping_for_it() -> None:
    region = SharedMemoryRegion(f"ef-test-{os.getpid()}-b", 4096)
    frame = region.ndarray(0, np.uint8, (16,))
    region.close()  # unlinked at once; the mapping goes with the array
    assert not region.path.exists()
    frame[:] = 7  # still valid memory
    assert int(frame.sum()) == 7 * 16
