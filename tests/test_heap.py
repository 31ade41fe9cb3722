"""glibc heap accounting (io/heap.py): the free bytes it reports follow real frees."""

from __future__ import annotations

import numpy as np
import pytest

from cellmill.io.heap import free_heap_bytes

_FREED_CHECK = """
import ctypes, json, numpy as np
from cellmill.io.heap import free_heap_bytes, trim_heap
libc = ctypes.CDLL("libc.so.6")
# fixed thresholds: glibc would otherwise hand a large freed top of the heap back at once,
# or move its thresholds with what earlier code freed
libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: 8 KB arrays live in the heap
blocks = [np.ones(1024) for _ in range(20_000)]
held = free_heap_bytes()
del blocks
freed = free_heap_bytes()
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
before = rss()
trim_heap(0)
trimmed = before - rss()
again = [np.ones(1024) for _ in range(1000)]
print(json.dumps([held, freed, trimmed, all(a.sum() == 1024 for a in again)]))
"""


def test_free_heap_bytes_sees_freed_small_blocks():
    """In a fresh process (the test session's heap state is not the test's): 20,000 freed
    8 KB arrays are counted as free; a trim hands their pages back; the heap stays usable."""
    import json
    import subprocess
    import sys

    if free_heap_bytes() is None:
        pytest.skip("not glibc >= 2.33")
    out = subprocess.run([sys.executable, "-c", _FREED_CHECK], capture_output=True, text=True,
                         check=True)
    held, freed, trimmed, usable = json.loads(out.stdout.strip().splitlines()[-1])
    assert freed - held >= 0.9 * 20_000 * 8192  # what was freed is counted as free
    assert trimmed >= 0.5 * 20_000 * 8192  # the trim handed most of it back (RSS fell)
    assert usable


def test_prefaulted_zeros_are_writable_zeros():

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
