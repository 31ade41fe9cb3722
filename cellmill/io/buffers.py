"""Scratch arrays reused by the tasks of one pass, one set per thread.

A block's counts past glibc's mmap threshold (32 MB) come back as fresh pages on every read:
at 4,096 cells of ~2,200 values that is 70 MB of page faults and zeroing a block. A worker
thread that keeps its arrays pays that once. Only a task's own thread touches its arrays, and
a task must be done with them (its result copied out) before it returns.
"""

from __future__ import annotations

import threading

import numpy as np

from cellmill.io.heap import prefaulted_zeros


class ThreadBuffers:
    """prefault=False: new arrays are plain zeros, whose pages the OS provides when first
    touched (for arrays a task touches only a little of)."""

    def __init__(self, prefault: bool = True):
        self.prefault = prefault
        self._lock = threading.Lock()
        self._arrays: dict[tuple[int, str], np.ndarray] = {}

    def get(self, name: str, n: int, dtype) -> np.ndarray:
        """An array of at least n elements of dtype for this thread (contents undefined)."""
        key = (threading.get_ident(), name)
        a = self._arrays.get(key)
        if a is None or a.dtype != np.dtype(dtype) or len(a) < n:
            size = max(n, 0 if a is None else len(a) + len(a) // 4)
            # prefaulted: no page faults (nor THP compaction) later
            a = prefaulted_zeros(size, dtype) if self.prefault else np.zeros(size, dtype)
            with self._lock:
                self._arrays[key] = a
        return a[:n]

    def nbytes(self) -> int:
        with self._lock:
            return sum(a.nbytes for a in self._arrays.values())

    def clear(self) -> None:
        with self._lock:
            self._arrays.clear()


class Recycled:
    """Sets of arrays a task's result is made of, handed back once the result is used and
    taken by a later task (of any thread). Only as many exist as results are in use at once,
    and their pages are mapped once, not on every task."""

    def __init__(self):
        self._lock = threading.Lock()
        self._free: list = []

    def take(self, empty):
        """A set handed back earlier, or `empty()` when none is free."""
        with self._lock:
            if self._free:
                return self._free.pop()
        return empty()

    def give(self, arrays) -> None:
        with self._lock:
            self._free.append(arrays)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
