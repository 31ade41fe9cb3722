"""Streaming passes: a kernel per block under Dask, reduced in a fixed order.

A pass function gets one block (start, stop, CSR counts of the selected cells, the absolute
indices of those cells) and returns a result. Results come back in block order whatever the
scheduler. For sums, kernels return partials per GRANULE of cells (absolute cell index), and
`ordered_sum` folds them granule by granule, so float64 results are bit-identical for any
block size (a multiple of GRANULE), worker count or scheduler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from cellmill.io.store import GRANULE, Store


def block_cells_for_budget(store: Store, memory_bytes: int, bytes_per_nnz: int = 40,
                           workers: int = 2) -> int:
    """Cells per pass block so that `workers` blocks in flight fit well inside the budget."""
    per_cell = max(1.0, store.nnz / max(store.n_cells, 1)) * bytes_per_nnz
    cells = int(memory_bytes / 4 / max(workers, 1) / per_cell)
    return max(GRANULE, min(64 * GRANULE, (cells // GRANULE) * GRANULE))


def _run_block(store: Store, start: int, stop: int, mask, genes, func, args):
    m = store.read_rows(start, stop, genes)
    if mask is None:
        cells = np.arange(start, stop, dtype=np.int64)
    else:
        rows = np.flatnonzero(mask[start:stop])
        if len(rows) < stop - start:  # a row copy only when some cells are left out
            m = m[rows]
        cells = rows.astype(np.int64) + start
    return func(start, stop, m, cells, *args)


def map_blocks(store: Store, func: Callable[..., Any], *args, mask: np.ndarray | None = None,
               genes: np.ndarray | None = None, block_cells: int | None = None,
               scheduler=None, desc: str = "pass", progress: bool = True,
               ranges: list[tuple[int, int]] | None = None) -> list[Any]:
    """Apply func(start, stop, csr, cells, *args) to every block; results in block order.
    `ranges`: only these (start, stop) blocks, e.g. a window of `store.block_ranges(...)`."""
    import dask

    from cellmill.engine.schedulers import compute

    if ranges is None:
        ranges = store.block_ranges(block_cells)
    tasks = [dask.delayed(_run_block, pure=False)(store, a, b, mask, genes, func, args)
             for a, b in ranges]
    return compute(tasks, scheduler=scheduler, desc=desc, progress=progress)


def stream_blocks(store: Store, func: Callable[..., Any], *args, mask: np.ndarray | None = None,
                  cell_arrays: tuple = (), block_cells: int | None = None, scheduler=None,
                  per_worker: int = 4, desc: str = "pass", progress: bool = False):
    """Yield ((start, stop), func(start, stop, csr, cells, *cell_args, *args)) block by block in
    order, with `per_worker` blocks a worker computed or in flight (a worker that finishes
    takes the next block: no wave waits for its slowest block). `cell_arrays`: per-cell arrays
    each task gets only its block's slice of (a cluster is not sent the whole array each time).
    Args may be read by later blocks while the caller folds earlier results into them."""
    from cellmill.engine.schedulers import n_workers, ordered_stream
    from cellmill.io.progress import bar

    ranges = store.block_ranges(block_cells)
    tasks = ((store, a, b, mask, None, func, (*(c[a:b] for c in cell_arrays), *args))
             for a, b in ranges)
    pbar = bar(total=len(ranges), desc=desc, enabled=progress)
    try:
        window = max(2, per_worker * n_workers(scheduler))
        for rng, res in zip(ranges, ordered_stream(_run_block, tasks, scheduler, window),
                            strict=True):
            pbar.update(1)
            yield rng, res
    finally:
        pbar.close()


def ordered_sum(partials: list[np.ndarray]) -> np.ndarray:
    """Fold per-granule partials (each block: n_granules x ...) strictly in granule order."""
    acc = None
    for block in partials:
        for row in block:
            if acc is None:
                acc = np.array(row, dtype=np.float64, copy=True)
            else:
                acc += row
    return acc


def granules(start: int, stop: int) -> int:
    """Number of granules a block [start, stop) spans (blocks start on a granule boundary)."""
    if start % GRANULE:
        raise ValueError(f"block start {start} is not a multiple of {GRANULE}")
    return (stop - start + GRANULE - 1) // GRANULE
