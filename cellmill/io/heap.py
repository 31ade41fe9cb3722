"""Hand freed heap memory back to the operating system; large zeroed arrays faulted in at once."""

from __future__ import annotations

import ctypes
import gc
import mmap

import numpy as np


def release_heap() -> None:
    """Return freed heap to the OS (glibc keeps it otherwise): between the big steps of a stage,
    so the next step starts from a lower RSS, and at the end of a stage, so the next stage of the
    same `cellmill run` process does."""
    gc.collect()
    _malloc_trim()


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def free_heap_bytes() -> int | None:
    """Bytes glibc holds freed in its heaps (all arenas), or None where it cannot say (not
    glibc, or older than 2.33)."""
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return int(fn().fordblks)


def trim_heap(min_free: int) -> None:
    """malloc_trim only when at least `min_free` bytes lie freed in the heap: a trim hands
    pages back, and on a virtual machine each page touched again costs a fault (~5 us), so
    trimming after every small step costs more time than it saves memory."""
    free = free_heap_bytes()
    if free is None or free >= min_free:
        _malloc_trim()


def prefaulted_zeros(shape, dtype=np.float64) -> np.ndarray:
    """np.zeros whose pages the kernel maps and zeroes at once (an anonymous mmap with
    MAP_POPULATE, Linux), freed with the array. np.zeros leaves each 4 KB page to fault on first
    write (a few us each on a VM), and np.empty + fill gets huge pages that the kernel may
    first have to compact: 285 MB took 0.1 s this way against 0.15-0.66 s either other way on
    the development VM. Elsewhere: np.zeros."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    populate = getattr(mmap, "MAP_POPULATE", None)
    if populate is None or n == 0:
        return np.zeros(shape, dtype=dtype)
    m = mmap.mmap(-1, n * dtype.itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
    return np.frombuffer(m, dtype=dtype).reshape(shape)
