"""Samples decoded in worker processes for ingest, handed back in sample order.

h5py holds one global lock, so threads cannot read HDF5 files side by side: the samples are
decoded (HDF5 read and gzip inflation, checks, feature selection, canonical CSR) in a pool of
worker processes, while the parent only writes (``cellmill.io.ingest``). The work is cut into
*parts*: a 10x v3 sample is cut into the cell ranges the sequential reader would read as slices
(``tenx.plan_ranges``, from the column pointers only), grouped into parts of at most
``PART_NNZ`` nonzeros; any other sample (v2, Matrix Market, .h5ad, a file the plan cannot read)
is one part (those readers hold a whole sample anyway: up to `workers` + 1 in memory). A part's
worker reads and checks the sample's header itself (barcodes and genes travel with the first
part only), so a corrupt file fails in the worker with the sequential reader's own InputError,
which the parent re-raises when it reaches that part in order.

A worker hands a part's counts back through a raw file in a scratch folder beside the store
(``Spilled``; the parent reads it and deletes it), not through the pool's pipe: pickling and
unpickling ~34 MB a part cost both processes more CPU than decoding it (196k cells, one
decoder: 43 -> 30 s, 56 -> 40 CPU s).

Memory: at most `workers` parts are decoding or decoded and waiting, plus the part being
written. A decoded part costs 8 bytes per nonzero (int32 counts and gene indices); with
``PART_NNZ`` = 4M that is ~34 MB a part instead of a whole sample's: a 30k-cell sample at
~2,000 genes a cell is 60M nonzeros, ~480 MB decoded, and 12 B/nnz more while the HDF5 read
and checks run. The store is the same
as a sequential ingest's, byte for byte, for any worker count: the parent writes the same
slices in the same order.

The pool is `io/spawn.py`'s (spawned processes that exit with their parent). Each worker
imports the readers once (~0.5 s of CPU).
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellmill.io.spawn import spawn_pool, submit

# Nonzeros per part (a part holds whole slices of ``tenx.SLICE_NNZ``; one slice may exceed it).
PART_NNZ = 4 << 20
# At most this many decoding processes: decoding is about half of a sequential ingest's CPU
# time and the writing half stays in one process, so 1-3 workers keep the writer busy; each
# worker peaks at ~200 MB (imports and one part's buffers), so more would only cost memory.
MAX_WORKERS = 4


@dataclass
class Part:
    """One part of a sample as decoded: `header` (barcodes, var, source) on the first part of a
    sample only; `slices` the CSR matrices of its cells in order; `n_parts` of the sample."""

    sample: int
    index: int
    n_parts: int
    header: tuple | None
    slices: list


@dataclass
class Task:
    sample: int
    index: int
    n_parts: int
    path: str
    feature_types: tuple[str, ...] | None
    ranges: list[tuple[int, int]] | None  # None: the whole sample
    spill: str | None = None  # a folder: the part's counts come back through a file there


@dataclass
class Spilled:
    """A part's slices in a raw file: per slice its shape and its data, indices and indptr
    (dtype, length), each array starting at a multiple of 8 bytes."""

    path: str
    layout: list

    @classmethod
    def write(cls, slices: list, path: Path) -> Spilled:
        layout = []
        with open(path, "wb") as f:
            for m in slices:
                arrays = (m.data, m.indices, m.indptr)
                layout.append((m.shape, [(a.dtype.str, len(a)) for a in arrays]))
                for a in arrays:
                    a = np.ascontiguousarray(a)
                    a.tofile(f)
                    f.write(bytes(-a.nbytes % 8))
        return cls(os.fspath(path), layout)

    def load(self) -> list:
        """The slices (views of one array read from the file), the file removed."""
        import scipy.sparse as sp

        raw = np.fromfile(self.path, dtype=np.uint8)
        os.unlink(self.path)
        slices, at = [], 0
        for shape, arrays in self.layout:
            parts = []
            for dtype, count in arrays:
                nbytes = np.dtype(dtype).itemsize * count
                parts.append(raw[at:at + nbytes].view(dtype))
                at += nbytes + (-nbytes % 8)
            slices.append(sp.csr_matrix(tuple(parts), shape=shape, copy=False))
        return slices


def decode(task: Task) -> Part:
    """Read one part (in a worker, or in the parent for one worker)."""
    from cellmill.io.readers import open_sample
    from cellmill.io.sample import sample_kind
    from cellmill.io.tenx import open_10x_h5

    path = Path(task.path)
    if task.ranges is not None and sample_kind(path, None) == "10x":
        ctx = open_10x_h5(path, feature_types=task.feature_types, ranges=task.ranges,
                          names=task.index == 0)  # the first part's header is the sample's
    else:
        ctx = open_sample(path, feature_types=task.feature_types)
    with ctx as stream:
        header = (stream.barcodes, stream.var, stream.source) if task.index == 0 else None
        slices = list(stream.slices)
    if task.spill is not None:  # through a file: pickling ~34 MB through the pipe and
        # unpickling it cost more CPU than decoding it (both ends, 196k cells: ~20 s)
        slices = Spilled.write(slices, Path(task.spill) / f"{task.sample}-{task.index}.part")
    return Part(task.sample, task.index, task.n_parts, header, slices)


def tasks(paths: list[Path], feature_types, part_nnz: int | None = None,
          spill: Path | None = None) -> Iterator[Task]:
    """The parts of the samples in order; each sample is planned when its turn comes (here,
    so the slicing is this process's ``tenx.SLICE_NNZ``). With `spill` (an existing folder)
    a worker hands a part's counts back through a file there."""
    from cellmill.io import tenx

    part_nnz = PART_NNZ if part_nnz is None else part_nnz
    for i, path in enumerate(paths):
        ranges = tenx.plan_ranges(path, tenx.SLICE_NNZ)
        groups = _group(ranges, part_nnz) if ranges else [None]
        for k, g in enumerate(groups):
            yield Task(i, k, len(groups), os.fspath(path), feature_types, g,
                       None if spill is None else os.fspath(spill))


def _group(ranges: list[tuple[int, int, int]], part_nnz: int) -> list[list]:
    """Consecutive ranges (c0, c1, nnz) into parts of at most `part_nnz` nonzeros (at least
    one range each)."""
    groups, cur, nnz = [], [], 0
    for c0, c1, n in ranges:
        if cur and nnz + n > part_nnz:
            groups.append(cur)
            cur, nnz = [], 0
        cur.append((c0, c1))
        nnz += n
    groups.append(cur)
    return groups


def decoded(task_iter: Iterator[Task], workers: int) -> Iterator[Part]:
    """The parts in task order, decoded by `workers` processes (at most ``MAX_WORKERS``):
    while the caller holds a part, at most `workers` further parts are submitted (no worker,
    or a single part: in this process, one part at a time). An error of a part is raised when
    its turn comes; the pool is shut down on exit, early or not."""
    workers = min(workers, MAX_WORKERS)
    first = list(itertools.islice(task_iter, 2))
    task_iter = itertools.chain(first, task_iter)
    if workers < 1 or len(first) < 2:  # one part: no pool to start
        for t in task_iter:
            yield decode(t)
        return
    pool = spawn_pool(workers)
    pending: deque = deque()
    try:
        for t in task_iter:
            pending.append(submit(pool, decode, t))
            if len(pending) >= workers:
                break
        while pending:
            part = pending.popleft().result()
            if isinstance(part.slices, Spilled):
                part.slices = part.slices.load()
            t = next(task_iter, None)
            if t is not None:
                pending.append(submit(pool, decode, t))
            yield part
            del part  # the writer is done with it: free before the next one arrives
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


