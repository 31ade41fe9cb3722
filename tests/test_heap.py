"""glibc heap accounting (io/heap.py): the free bytes it reports follow real frees."""

from __future__ import annotations

import numpy as np
import pytest

from cellmill.io.heap import free_heap_bytes, trim_heap


def test_free_heap_bytes_sees_freed_small_blocks():
    before = free_heap_bytes()
    if before is None:
        pytest.skip("not glibc >= 2.33")
    # 20,000 arrays of 8 KB: below the mmap threshold, so they live in the heap
    blocks = [np.ones(1024) for _ in range(20_000)]
    held = free_heap_bytes()
    del blocks
    freed = free_heap_bytes()
    assert freed - held >= 0.9 * 20_000 * 8192  # what was freed is counted as free
    trim_heap(0)  # hands the pages back; the heap stays usable
    again = [np.ones(1024) for _ in range(1000)]
    assert all(a.sum() == 1024 for a in again)


def test_prefaulted_zeros_are_writable_zeros():
    import numpy as np

    from cellmill.io.heap import prefaulted_zeros

    for shape, dtype in (((3, 5), np.float64), ((7,), np.int32), ((0, 4), np.float64)):
        a = prefaulted_zeros(shape, dtype)
        assert a.shape == shape and a.dtype == dtype and a.flags.writeable
        assert a.flags.c_contiguous and not a.any()
        a[...] = 1
        assert a.sum() == np.prod(shape)
    v = prefaulted_zeros((4, 2)).view(np.int64)  # the statistics planes are viewed in place
    v[:] = 3
    assert (v == 3).all()
