"""Stage `statistics`: grouped moments of the log-normalised counts in one pass, and the study's
Welch t-tests of the target genes (tables/target_tests.csv; not written when the cells have no
study.condition column: no study, no target tests).

The grouped statistics are an xarray Dataset stored at uns/grouped_stats (read it with
`load_grouped_stats(store)`):
  dims       group, gene
  coords     one per grouping column (group,) as str (default cluster, condition, timepoint,
             sample: every combination observed among QC-passed cells), gene (gene,)
  n          (group,)       cells
  sum        (group, gene)  sum of y = log1p(x / n_counts * scale_factor)
  sum_sq     (group, gene)  sum of y^2 (= m2 + sum^2 / n)
  m2         (group, gene)  sum of (y - group mean)^2: use this for variances (exact to a few
                            ulps; sum_sq - sum^2 / n cancels)
  sum_expm1  (group, gene)  sum of expm1(y) (means on the CP10k scale, for fold changes)
  nnz        (group, gene)  cells with y > 0
  counts     (group, gene)  sum of the raw counts x (pseudobulk; statistics/pseudobulk.py sums
                            the groups of a sample x cluster)
Any contrast pools groups (statistics/welch.py: `contrast(ds, case={...}, control={...})`).

Determinism: each block returns moments per (granule of SLOT_CELLS = 4,096 cells, group) slot;
the slots are folded with Chan's formula (over the nonzeros; the zeros join at the end, see
kernels/grouped.py) strictly in (granule, group) order, so the result does not depend on block
size, worker count or scheduler. Blocks are whole granules, a few in flight (as many as a
quarter of the memory budget holds, at least one a worker and one being folded), folded as
they arrive (`ordered_stream`): memory is those blocks plus the accumulators of the open
groups. The store holds the cells sample by sample, so with `sample` among the grouping columns
a group's cells span a few blocks: its accumulators are finished and written to a scratch file
once the pass is past its last block (`_OpenGroups`), and the Dataset reads the planes from
those files as they are used. Memory is then the groups of a sample or two, whatever the number
of samples (with cells of every group in every block, it is all the groups, as before).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd

from cellmill.config import ConfigError
from cellmill.engine.schedulers import on_a_thread, ordered_stream
from cellmill.io.buffers import Recycled, ThreadBuffers
from cellmill.io.heap import prefaulted_zeros, trim_heap
from cellmill.io.store import GRANULE, Store
from cellmill.kernels import grouped as kern

log = logging.getLogger("cellmill")

GROUPED_STATS = "grouped_stats"
SCRATCH = "statistics"  # <store>.statistics-scratch-<pid>-*: the pass's finished groups
GROUP_CHUNK = 512  # groups a stored chunk (of 4,096 genes): at most 16 MB a chunk
WINDOW_PER_WORKER = 4
# cells of a slot's granule: the unit of the fold's order. The kernel's cost per nonzero
# falls as a slot gains rows (each slot ends with a scan of the genes and writes a partial per
# touched gene): at 196k cells ~6.6 ns a nonzero with 1,024, ~4.2 with 4,096
SLOT_CELLS = 4 * GRANULE
TARGET_COLUMNS = ["gene", "cluster", "timepoint", "contrast", "mean_case", "mean_control",
                  "n_case", "n_control", "t", "df", "p_value", "p_adj_bh", "alternative",
                  "reason", "p_value_pseudobulk", "n_samples_case", "n_samples_control",
                  "reason_pseudobulk"]


# ------------------------------------------------------------------------------- groups

def group_codes(obs: pd.DataFrame, columns: list[str], mask: np.ndarray | None = None):
    """Group code of every cell (-1: not in any group) and the groups' coordinates.

    Groups are the observed combinations of the columns' category codes among the masked
    cells, ordered by those codes (category order). A cell with a missing value is left out.
    """
    n = len(obs)
    keep = np.ones(n, dtype=bool) if mask is None else np.asarray(mask, dtype=bool).copy()
    codes, levels = [], []
    for col in columns:
        s = obs[col]
        if not isinstance(s.dtype, pd.CategoricalDtype):
            s = s.astype("category")
        c = s.cat.codes.to_numpy()  # int8/int16: a byte or two a cell
        keep &= c >= 0
        codes.append(c)
        levels.append(np.asarray(s.cat.categories).astype(str))
    out = np.full(n, -1, dtype=np.int64)
    if not columns:
        out[keep] = 0
        return out, pd.DataFrame(index=range(1 if keep.any() else 0))
    # each cell's codes as one mixed-radix integer: its order is the codes' lexicographic
    # order, and unique() of one int64 a cell needs a fraction of the memory of unique() on
    # rows (a million cells: ~160 MB of temporaries)
    radix = [max(1, len(lv)) for lv in levels]
    if math.prod(radix) >= 2**62:  # too many combinations for one int64
        stacked = np.stack([c[keep] for c in codes], axis=1)
        uniq, inverse = np.unique(stacked, axis=0, return_inverse=True)
    else:
        key = np.zeros(int(keep.sum()), dtype=np.int64)
        for c, r in zip(codes, radix, strict=True):
            key *= r
            key += c[keep]
        ukey, inverse = np.unique(key, return_inverse=True)
        del key
        uniq = np.empty((len(ukey), len(codes)), dtype=np.int64)
        for i in range(len(codes) - 1, -1, -1):
            uniq[:, i] = ukey % radix[i]
            ukey //= radix[i]
    out[keep] = inverse.ravel()
    coords = pd.DataFrame({col: levels[i][uniq[:, i]] for i, col in enumerate(columns)})
    return out, coords


# ------------------------------------------------------------------------------- the pass

def _groups(store: Store, columns: list[str], mask: np.ndarray | None):
    """(group code of every cell, -1 outside the mask; the groups' coordinates; n_counts)."""
    have = store.obs_columns()
    missing = [c for c in columns if c not in have]
    if missing:
        raise ConfigError(f"study.group_by: column(s) {', '.join(missing)} not in the cells' "
                          f"metadata (have: {', '.join(map(str, have))})")
    obs = pd.DataFrame({c: store.obs_column(c) for c in columns}, index=range(store.n_cells))
    codes, coords = group_codes(obs, list(columns), mask)
    del obs
    trim_heap(32 << 20)  # group_codes' temporaries (~160 MB at 1M cells), before the planes
    return codes, coords, np.asarray(store.obs_column("n_counts"), dtype=np.float64)


def _no_entries():
    return np.empty(0, dtype=np.int32), np.empty((0, kern.N_VALS), dtype=np.float64)


def _stats_task(store: Store, start: int, stop: int, codes: np.ndarray, n_counts: np.ndarray,
                scale: float, n_groups: int, granule: int, buffers: ThreadBuffers | None,
                results: Recycled | None = None):
    """One block: moments per (granule, group) slot, slots ordered by (granule, group). The
    counts are read into this thread's `buffers` (when given): the result holds none of
    them. Its entries are written into arrays taken from `results` (when given; the last
    item of the result: hand it back there once the result is used)."""
    m = store.read_rows(start, stop, buffers=buffers)
    rows = np.flatnonzero(codes >= 0)
    key = (rows // granule) * n_groups + codes[rows]
    slots, inverse = np.unique(key, return_inverse=True)
    slot_of_row = np.full(stop - start, -1, dtype=np.int64)
    slot_of_row[rows] = inverse.ravel()
    genes, vals = results.take(_no_entries) if results is not None else _no_entries()
    n, ptr, genes, vals, nt = kern.grouped_block_into(
        m.data, m.indices, m.indptr.astype(np.int64), slot_of_row, n_counts.astype(np.float64),
        float(scale), len(slots), m.shape[1], genes, vals)
    return slots % n_groups, n, ptr, genes[:nt], vals[:nt], (genes, vals)


def _warm_kernels(store: Store, scale: float, granule: int) -> None:
    """The pass's kernels run once on the store's first granule and thrown away: Numba loads
    them from its cache on first call (~0.2 s), here on a thread while the groups are made,
    instead of in the first block's task."""
    if store.n_cells == 0:
        return
    stop = min(GRANULE, store.n_cells)
    codes = np.zeros(stop, dtype=np.int64)
    n_counts = np.ones(stop)
    _, n, ptr, genes, vals, _ = _stats_task(store, 0, stop, codes, n_counts, scale, 1, granule,
                                         None)
    planes = [np.zeros((1, store.n_genes)) for _ in PLANES]
    acc_n = np.zeros(1)
    kern.fold_slots(acc_n, *planes, n, ptr, genes, vals, np.zeros(len(n), dtype=np.int64))
    kern.finish_m2(acc_n, planes[0], planes[2], planes[3], np.zeros(1, dtype=np.int64))


def group_spans(codes: np.ndarray, n_groups: int, block_cells: int):
    """Every group's first and last block (blocks of block_cells cells), and the most slots
    (granule x group) of any block. Groups are made from the cells, so each has a span."""
    cells = np.flatnonzero(codes >= 0)
    pairs = np.unique((cells // block_cells) * max(n_groups, 1) + codes[cells])
    block, group = pairs // max(n_groups, 1), pairs % max(n_groups, 1)
    first = np.full(n_groups, np.iinfo(np.int64).max, dtype=np.int64)
    last = np.full(n_groups, -1, dtype=np.int64)
    np.minimum.at(first, group, block)
    np.maximum.at(last, group, block)
    slots = int(np.bincount(block).max()) if len(block) else 1
    return first, last, slots


def open_rows(first: np.ndarray, last: np.ndarray, n_blocks: int) -> int:
    """The most groups open at once (a group is open from its first block to its last)."""
    if len(first) == 0:
        return 0
    delta = np.zeros(n_blocks + 1, dtype=np.int64)
    np.add.at(delta, first, 1)
    np.add.at(delta, last + 1, -1)
    return int(np.cumsum(delta).max())


def _plan_window(store: Store, slots: int, block_cells: int, workers: int,
                 memory_bytes: int) -> int:
    """Blocks in flight: one a worker (its counts in the worker's buffers: 8 bytes a value, up
    to 10 as the buffers grow by a quarter) plus as many slot partials (a gene and 5 float64 an
    entry, at most min(values, slots x genes) a block) as fit in a quarter of the memory budget;
    at least one more than the workers (one being folded), at most WINDOW_PER_WORKER a
    worker."""
    nnz_block = block_cells * store.nnz / max(store.n_cells, 1)
    per_result = 44 * min(nnz_block, slots * store.n_genes)
    left = memory_bytes / 4 - workers * 10 * nnz_block
    fits = int(left / max(per_result, 1.0))
    return max(workers + 1, min(WINDOW_PER_WORKER * workers, fits))


PLANES = ("sum", "sum_expm1", "nnz", "m2", "counts")  # the kernels' order


class _OpenGroups:
    """The accumulators of the groups whose cells the pass has not finished, a row each.
    Cells come sample by sample, so a group (of one sample) is open for a stretch of blocks:
    its row is taken at its first block, and after its last block its moments are finished
    and written to `out` (RowPlanes) and the row is reused. Memory: the most groups open at
    once (the groups of a sample or two), not all of them (clusters x samples)."""

    def __init__(self, first, last, n_blocks: int, n_genes: int, rows: int, out):
        self.out = out
        self.planes = [prefaulted_zeros((rows, n_genes)) for _ in PLANES]
        self.acc_n = np.zeros(rows, dtype=np.float64)
        self.n = np.zeros(len(first), dtype=np.float64)
        self.row_of = np.full(len(first), -1, dtype=np.int64)
        self.free = list(range(rows - 1, -1, -1))
        self.opens = np.argsort(first, kind="stable")
        self.open_at = np.searchsorted(first[self.opens], np.arange(n_blocks + 1))
        self.closes = np.argsort(last, kind="stable")
        self.close_at = np.searchsorted(last[self.closes], np.arange(n_blocks + 1))

    def fold(self, i: int, group_of_slot, n, ptr, genes, vals) -> None:
        """Fold block i's slots (in order), then write out the groups it finishes."""
        for g in self.opens[self.open_at[i]:self.open_at[i + 1]]:
            self.row_of[g] = self.free.pop()
        kern.fold_slots(self.acc_n, *self.planes, n, ptr, genes, vals,
                        self.row_of[group_of_slot])
        done = self.closes[self.close_at[i]:self.close_at[i + 1]]
        if len(done) == 0:
            return
        rows = self.row_of[done]
        s_y, _, s_nz, s_m2, _ = self.planes
        kern.finish_m2(self.acc_n, s_y, s_nz, s_m2, rows)
        self.n[done] = self.acc_n[rows]
        for g, r in zip(done, rows, strict=True):
            for name, plane in zip(PLANES, self.planes, strict=True):
                self.out.write_row(name, int(g), plane[r])
                plane[r] = 0.0
            self.acc_n[r] = 0.0
            self.free.append(int(r))


def grouped_statistics(store: Store, columns: list[str], scale_factor: float = 1e4,
                       mask: np.ndarray | None = None, memory_bytes: int = 2 * 10**9,
                       scheduler=None, progress: bool = False,
                       block_cells: int | None = None, granule: int = SLOT_CELLS,
                       timing: dict | None = None):
    """Grouped moments of y = log1p(x / n_counts * scale_factor) for every group of `columns`
    (among the `mask`ed cells; default all) and every gene, as an xarray Dataset whose planes
    are read from scratch files beside the store as they are used (removed with the
    Dataset): the pass holds only the groups it has not finished.

    `granule` (a multiple of the store's GRANULE) fixes the slots, and with them every bit
    of the result; blocks are whole granules (block_cells is rounded up to one). `timing`,
    when given, gets the seconds of the streaming pass itself (the blocks and the fold), the
    number of groups and the most open at once (rows of accumulators held)."""
    if granule <= 0 or granule % GRANULE:
        raise ValueError(f"granule {granule} is not a positive multiple of {GRANULE}")
    import time

    from cellmill.io.planes import RowPlanes, new_folder
    from cellmill.io.progress import bar

    warmed = on_a_thread(_warm_kernels, store, float(scale_factor), granule)
    codes, coords, n_counts = _groups(store, columns, mask)
    warmed()

    t0 = time.perf_counter()
    n_groups, n_genes = len(coords), store.n_genes
    workers = scheduler[1] if isinstance(scheduler, tuple) else 2
    block_cells = granule * max(1, -(-int(block_cells or granule) // granule))
    ranges = store.block_ranges(block_cells)
    first, last, slots = group_spans(codes, n_groups, block_cells)
    window = _plan_window(store, slots, block_cells, max(1, workers), memory_bytes)
    rows = open_rows(first, last, len(ranges))

    out = RowPlanes(new_folder(store.path, SCRATCH), PLANES, (n_groups, n_genes))
    acc = None  # made once the first blocks are under way (~50 ms off the pass's wall)
    pbar = bar(total=len(ranges), desc="grouped statistics", enabled=progress)
    # a worker thread's block arrays are reused (threads only: a cluster's workers would keep
    # theirs after the pass)
    local = isinstance(scheduler, tuple) or scheduler is None
    buffers = ThreadBuffers() if local else None
    results = Recycled() if local else None  # the entries' arrays, at most window + 1 sets
    args = ((store, a, b, codes[a:b], n_counts[a:b], scale_factor, n_groups, granule, buffers,
             results) for a, b in ranges)
    try:
        for i, part in enumerate(ordered_stream(_stats_task, args, scheduler, window)):
            if acc is None:
                acc = _OpenGroups(first, last, len(ranges), n_genes, rows, out)
            acc.fold(i, *part[:-1])
            if results is not None:
                results.give(part[-1])
            pbar.update(1)
    finally:
        pbar.close()
        out.close()
        if buffers is not None:
            buffers.clear()
            results.clear()
    n = acc.n if acc is not None else np.zeros(n_groups)
    del acc
    if timing is not None:
        timing.update(seconds=round(time.perf_counter() - t0, 3), groups=n_groups,
                      open_groups=rows)
    return _dataset(out, n, coords, store, columns, scale_factor, mask is not None)


def _dataset(out, n: np.ndarray, coords: pd.DataFrame, store: Store, columns, scale_factor,
             masked: bool):
    import xarray as xr

    genes = np.asarray(store.var().index).astype(str)
    dims = ("group", "gene")
    s_y, s_m2 = out.plane("sum"), out.plane("m2")
    data = {"n": (("group",), n.astype(np.int64)), "sum": (dims, _lazy(s_y)),
            "m2": (dims, _lazy(s_m2)), "sum_expm1": (dims, _lazy(out.plane("sum_expm1"))),
            "nnz": (dims, _lazy(out.plane("nnz", np.int64))),
            "counts": (dims, _lazy(out.plane("counts", np.int64))),
            "sum_sq": (dims, _lazy(_SumSq(n, s_y, s_m2)))}
    return xr.Dataset(
        data,
        coords={**{c: (("group",), coords[c].to_numpy().astype(str)) for c in coords.columns},
                "gene": (("gene",), genes)},
        attrs={"group_by": list(columns), "scale_factor": float(scale_factor),
               "value": "y = log1p(x / n_counts * scale_factor)",
               "cells": "QC-passed" if masked else "all"})


class _SumSq:
    """sum y^2 = m2 + sum^2 / n of the rows and columns asked for, computed when read. An
    array-like without .copy: dask's from_array copies whatever has one, and hashes it unless
    name=False."""

    ndim, dtype = 2, np.dtype(np.float64)

    def __init__(self, n: np.ndarray, s_y: np.ndarray, s_m2: np.ndarray):
        self.n, self.s_y, self.s_m2, self.shape = n, s_y, s_m2, s_y.shape

    def __getitem__(self, key):
        rows, cols = key
        return kern.sum_of_squares(self.n[rows], self.s_y[rows, cols], self.s_m2[rows, cols])


def _lazy(plane):
    """A (groups, genes) array-like as a dask array, read a chunk at a time when it is
    written or used, never held as a whole plane."""
    import dask.array as da

    chunks = (max(1, min(plane.shape[0], GROUP_CHUNK)), max(1, min(plane.shape[1], 4096)))
    return da.from_array(plane, chunks=chunks, name=False, meta=np.empty((0, 0), plane.dtype))


def write_grouped_stats(store: Store, ds) -> None:
    import dask

    chunk = (max(1, min(ds.sizes["group"], GROUP_CHUNK)), max(1, min(ds.sizes["gene"], 4096)))
    enc = {v: {"chunks": chunk} for v in ("sum", "sum_sq", "m2", "sum_expm1", "nnz", "counts")}
    # the planes are read from this process's scratch files: on its threads, never a cluster
    with dask.config.set(scheduler="threads"):
        store.write_dataset("uns", GROUPED_STATS, ds, encoding=enc)


def load_grouped_stats(store: Store):
    """The grouped statistics Dataset written by the statistics stage (lazy)."""
    ds = store.read_dataset("uns", GROUPED_STATS)
    ds.attrs["group_by"] = list(ds.attrs.get("group_by", []))
    return ds
