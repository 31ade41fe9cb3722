"""Stage `neighbors` (Seurat's FindNeighbors): k nearest neighbours (self included, first) of
the QC-passed cells on PCs 1..n_pcs (stages/shared/knn.py: exact search, or, with
neighbors.method = "auto" above EXACT_UP_TO cells, NN-descent with its recall@k checked
against exact search on a sample of cells; what ran goes into the stage's record), then
Seurat's pruned Jaccard SNN graph (kernels/snn.py). Stored: obsm/knn_index (absolute cell
indices, -1 rows for QC-failed cells), obsm/knn_distance (Euclidean, NaN rows), obsp/snn (all
cells; rows of failed cells empty).

Memory on the exact path: nothing O(cells x k). The search index is on disk, read a block at
a time (knn_index_from_blocks); the lists go to scratch as they come, by block of cells for
the obsm arrays and as tree positions in tree order for the graph; the graph's rows are built
in tree order, a block of rows per task, from those lists and the reverse lists their
neighbours have, copied out of a file mapped from disk a slab at a time (_snn_block), spilled
by block of cells and written in cell order. The NN-descent path holds its lists in memory.
"""

from __future__ import annotations

import logging
import shutil

import numpy as np
import scipy.sparse as sp

from cellmill.engine.cells import passed_pcs, write_all_cells
from cellmill.engine.registry import Context, stage
from cellmill.engine.schedulers import in_waves
from cellmill.io.heap import release_heap
from cellmill.io.scratch import Buckets, scratch_dir
from cellmill.stages.shared import knn as shared_knn
from cellmill.stages.shared.knn import (
    approximate_knn,
    index_dtype,
    knn_chunks,
    knn_index_from_blocks,
    knn_method,
)

log = logging.getLogger("cellmill")
# ------------------------------------------------------------------ SNN graph


def _snn_counts(knn, ptr, idx, r0, r1, prune):
    from cellmill.kernels.snn import snn_row_counts

    return snn_row_counts(knn, ptr, idx, r0, r1, prune)


def _snn_fill(knn, ptr, idx, r0, r1, prune, counts, col):
    from cellmill.kernels.snn import snn_fill_rows

    return snn_fill_rows(knn, ptr, idx, r0, r1, prune, counts, col)


def _snn_inputs(knn: np.ndarray, cells: np.ndarray | None, n_cells: int | None):
    """(Dask-shared knn, reverse-list pointers and indices), n, the output size and the column
    of each of the n points."""
    import dask

    from cellmill.kernels.snn import reverse_lists

    knn = np.ascontiguousarray(knn)
    if knn.dtype not in (np.int32, np.int64):
        knn = knn.astype(np.int64)
    n = knn.shape[0]
    n_out = n if cells is None else int(n_cells)
    if n_out >= 2**31:
        raise ValueError("SNN graph: more than 2^31 cells")
    col = np.arange(n, dtype=np.int32) if cells is None else np.asarray(cells, dtype=np.int32)
    ptr, idx = reverse_lists(knn, n)
    shared = [dask.delayed(a, pure=True) for a in (knn, ptr, idx)]
    return shared, n, n_out, dask.delayed(col, pure=True)


def _snn_indptr(counts: np.ndarray, cells: np.ndarray | None, n_out: int) -> np.ndarray:
    """The graph's indptr among the n_out cells from the entries per row of the n points."""
    indptr = np.zeros(n_out + 1, dtype=np.int64)
    if cells is None:
        np.cumsum(counts, out=indptr[1:])
    else:
        indptr[np.asarray(cells) + 1] = counts
        np.cumsum(indptr, out=indptr)
    return indptr


def _snn_plan(knn: np.ndarray, prune: float, scheduler, chunk: int, progress: bool,
              cells: np.ndarray | None, n_cells: int | None):
    """The SNN graph's shape, indptr (first sweep: kept entries per row) and the fill tasks of
    the second sweep, one per `chunk` rows, whose results come in row order."""
    import dask

    from cellmill.engine.schedulers import compute

    shared, n, n_out, d_col = _snn_inputs(knn, cells, n_cells)
    starts = range(0, n, chunk)
    counts = compute([dask.delayed(_snn_counts, pure=True)(*shared, a, min(a + chunk, n),
                                                           float(prune)) for a in starts],
                     scheduler=scheduler, desc="snn count", progress=progress)
    counts = np.concatenate(counts) if counts else np.empty(0, np.int64)
    indptr = _snn_indptr(counts, cells, n_out)
    tasks = [dask.delayed(_snn_fill, pure=True)(*shared, a, min(a + chunk, n), float(prune),
                                                counts[a:a + chunk], d_col)
             for a in starts]
    return n_out, indptr, tasks


def snn_graph(knn: np.ndarray, prune: float = 1.0 / 15.0, scheduler=None, chunk: int = 4096,
              progress: bool = False, cells: np.ndarray | None = None,
              n_cells: int | None = None) -> sp.csr_matrix:
    """Seurat's SNN graph (n x n CSR, float64, int32 indices, diagonal 1) from n x k neighbour
    lists (indices into the same n points).

    With `cells` (ascending indices of the n points among n_cells) the graph is returned as
    n_cells x n_cells, the other rows empty, without building the n x n one first. The rows are
    counted first, then filled straight into the final arrays (no second copy of the graph).
    """
    n_out, indptr, tasks = _snn_plan(knn, prune, scheduler, chunk, progress, cells, n_cells)
    indices = np.empty(indptr[-1], dtype=np.int32)
    data = np.empty(indptr[-1])
    pos = 0
    for p_idx, p_data in in_waves(tasks, scheduler, "snn", progress):
        indices[pos:pos + len(p_idx)] = p_idx
        data[pos:pos + len(p_idx)] = p_data
        pos += len(p_idx)
    return sp.csr_matrix((data, indices, indptr), shape=(n_out, n_out))


def _snn_rows(knn, ptr, idx, r0, r1, prune, col):
    from cellmill.kernels.snn import snn_rows

    return snn_rows(knn, ptr, idx, r0, r1, prune, col)


def write_snn_graph(store, slot: str, name: str, knn: np.ndarray, prune: float = 1.0 / 15.0,
                    scheduler=None, chunk: int = 4096, progress: bool = False,
                    cells: np.ndarray | None = None, n_cells: int | None = None) -> int:
    """snn_graph written into the store as it is made (rows in order, a wave of row blocks
    at a time): the graph, O(cells x k) entries, is never whole in memory. One sweep over the
    rows (the writer needs the row lengths only at the end). Returns its nnz."""
    import dask

    shared, n, n_out, d_col = _snn_inputs(knn, cells, n_cells)
    tasks = [dask.delayed(_snn_rows, pure=True)(*shared, a, min(a + chunk, n), float(prune),
                                                d_col)
             for a in range(0, n, chunk)]
    out = store.sparse_writer(slot, name, (n_out, n_out))
    counts = np.zeros(n, dtype=np.int64)
    pos = 0
    for p_counts, p_idx, p_data in in_waves(tasks, scheduler, "snn", progress):
        counts[pos:pos + len(p_counts)] = p_counts
        pos += len(p_counts)
        out.append(p_idx, p_data)
    indptr = _snn_indptr(counts, cells, n_out)
    out.commit(indptr)
    return int(indptr[-1])


SPILL_BLOCK = 65536  # cells a block of knn_distance is written in (write_all_cells' default)
SPILL_FILES = 256  # at most this many blocks (two open files each): larger blocks past 16M cells


def _spill_block(n_cells: int) -> int:
    return max(SPILL_BLOCK, -(-n_cells // SPILL_FILES))


class _SpilledRows:
    """The lists of the passed cells (indices and distances), spilled to scratch as the
    search returns them (in tree order) and read back one output block of cells at a time, in
    order, by write_all_cells (`field(name)`): the n x k arrays (240 MB at 1M cells, k = 20)
    are never whole in memory, and not beside the search."""

    def __init__(self, root, cells: np.ndarray, k: int, block: int, idx_dtype):
        self.cells, self.k, self.block = cells, k, block
        n_out = int(cells[-1]) // block + 1 if len(cells) else 0
        self.dtypes = {"idx": np.dtype(idx_dtype), "dist": np.dtype(np.float64)}
        self.buckets = Buckets(root, "lists", n_out, {"row": (np.int64, 1),
                                                      "idx": (idx_dtype, k),
                                                      "dist": (np.float64, k)})
        self.rows_left = {}  # bucket -> its rows, kept until its other field is read

    def append(self, rows: np.ndarray, idx: np.ndarray, dist: np.ndarray) -> None:
        self.buckets.append(self.cells[rows] // self.block, row=rows, idx=idx, dist=dist)

    def field(self, name: str):
        return _SpilledField(self, name)

    def read(self, sl: slice, name: str) -> np.ndarray:
        """Rows sl of `name` (the passed cells of output block sl's cells: one bucket)."""
        dtype = self.dtypes[name]
        if sl.stop <= sl.start:
            return np.empty((0, self.k), dtype=dtype)
        b = int(self.cells[sl.start]) // self.block
        if b in self.rows_left:  # the bucket's second field: its rows are not kept after it
            rows = self.rows_left.pop(b)
        else:
            rows = self.rows_left[b] = self.buckets.read(b, ["row"])["row"]
        part = self.buckets.read(b, [name])[name]
        out = np.empty((sl.stop - sl.start, self.k), dtype=dtype)
        out[rows - sl.start] = part
        return out


class _SpilledField:
    """One of _SpilledRows' arrays, as write_all_cells reads it (shape, dtype, row slices)."""

    def __init__(self, rows: _SpilledRows, name: str):
        self.rows, self.name = rows, name
        self.shape, self.dtype = (len(rows.cells), rows.k), rows.dtypes[name]

    def __getitem__(self, sl: slice) -> np.ndarray:
        return self.rows.read(sl, self.name)


def _search_to_disk(index, k: int, cells: np.ndarray, root, ctx, block: int):
    """Exact search with nothing O(cells x k) in memory: the lists go to scratch, spilled by
    output block of cells (for knn_index / knn_distance) and, as tree positions, in tree
    order to root/knn.pos (for the SNN graph). Returns the spilled rows."""
    from cellmill.io.scratch import write_raw

    n = len(index.perm)
    pos_of = np.empty(n, dtype=np.int32)
    pos_of[index.perm] = np.arange(n, dtype=np.int32)
    spilled = _SpilledRows(root, cells, k, block, index_dtype(n))
    at = 0  # the chunks come in tree order, one after the other
    for rows, p_idx, p_dist in knn_chunks(index, k, scheduler=ctx.scheduler(),
                                          progress=ctx.progress):
        spilled.append(rows, p_idx, p_dist)
        pos = np.where(p_idx >= 0, pos_of[np.maximum(p_idx, 0)], -1).astype(np.int32)
        write_raw(root / "knn.pos", pos, at)
        at += pos.nbytes
    spilled.buckets.close()
    return spilled


SNN_ROWS = 16384  # tree positions per block while the reverse lists are built
SNN_OUT = 8192  # cells per block of the graph's spilled rows (more past 2M cells: <= 256 files)
SNN_SLAB = 1 << 20  # bytes of the mapped reverse lists a task reads before handing them back


def _reverse_lists_on_disk(root, n: int, k: int, col: np.ndarray) -> np.ndarray:
    """The reverse lists of root/knn.pos (for every tree position m, the cells col[i] of the
    positions i whose lists hold m), written to root/knn.rev; returns their pointers (n + 1;
    int32 where they fit)."""
    from cellmill.io.scratch import read_raw, write_raw

    def blocks():
        for a in range(0, n, SNN_ROWS):
            e = min(a + SNN_ROWS, n)
            yield a, e, read_raw(root / "knn.pos", np.int32, (e - a) * k, 4 * k * a)

    ptr = np.zeros(n + 1, dtype=np.int64)
    for _a, _e, lists in blocks():
        ptr[1:] += np.bincount(lists[lists >= 0], minlength=n)
    np.cumsum(ptr, out=ptr)
    pairs = Buckets(root, "rev", -(-n // SNN_ROWS), {"m": (np.int32, 1), "c": (np.int32, 1)})
    for a, e, lists in blocks():
        c = np.repeat(col[a:e], k)
        keep = lists >= 0
        pairs.append(lists[keep] // SNN_ROWS, m=lists[keep], c=c[keep])
    pairs.close()
    for b in range(pairs.n):
        part = pairs.read(b)
        order = np.argsort(part["m"])  # (a list's order does not matter: its rows are sorted)
        write_raw(root / "knn.rev", part["c"][order], 4 * int(ptr[b * SNN_ROWS]))
    return ptr.astype(np.int32) if ptr[-1] < 2**31 else ptr


def _snn_block(lists, ptr: np.ndarray, rev, r0: int, r1: int, prune: float, col: np.ndarray,
               n_out: int, per: int):
    """Rows r0..r1 (tree positions) of the SNN graph from the mapped lists and reverse lists
    (io/scratch.Mapped), as (row, column, weight) entries grouped by block of `per` cells
    (io/scratch.group_rows). The reverse lists the rows need are copied out a slab of the
    file at a time, each slab's pages handed back once copied, so a task holds its rows'
    lists, not the pages they lie on (a row's neighbours are spread over its cluster in tree
    order, and the file may be mapped 2 MB at a time)."""
    from cellmill.io.scratch import group_rows
    from cellmill.kernels.snn import gather_lists, snn_rows_local

    k, size = lists.shape[1], rev.dtype.itemsize
    block = np.array(lists.array[r0:r1])
    lists.release(r0 * k * 4, r1 * k * 4)
    ms, inv = np.unique(block, return_inverse=True)
    local = inv.reshape(block.shape).astype(np.int32)
    if len(ms) and ms[0] < 0:  # no neighbour
        ms, local = ms[1:], local - 1
    start = ptr[ms].astype(np.int64)
    lptr = np.zeros(len(ms) + 1, dtype=np.int64)
    np.cumsum(ptr[ms + 1] - start, out=lptr[1:])
    lrev = np.empty(int(lptr[-1]), dtype=rev.dtype)
    slab = start * size // SNN_SLAB
    cuts = [0, *(np.flatnonzero(np.diff(slab)) + 1).tolist(), len(ms)]
    for s0, s1 in zip(cuts[:-1], cuts[1:], strict=True):
        if s1 > s0:
            gather_lists(ptr, rev.array, ms[s0:s1], lptr[s0:], lrev)
            rev.release(int(start[s0]) * size, int(ptr[ms[s1 - 1] + 1]) * size)
    # one count per cell, its pages touched where the rows' columns are
    counts, idx, val = snn_rows_local(local, lptr, lrev, float(prune),
                                      np.zeros(n_out, dtype=np.int32))
    row = np.repeat(col[r0:r1], counts)
    return group_rows(row // per, -(-n_out // per), row=row, col=idx, val=val)


def write_snn_from_disk(store, root, n: int, k: int, col: np.ndarray, prune: float,
                        scheduler=None, progress: bool = False, chunk: int = 2048) -> int:
    """write_snn_graph for the lists _search_to_disk left in root/knn.pos (col: the cell of
    each tree position), the graph's rows built in tree order from the lists and reverse
    lists mapped from disk (_snn_block), spilled by block of cells and written in cell order:
    the same graph, bit for bit. Returns its nnz."""
    import uuid

    import dask

    from cellmill.io.scratch import Mapped

    n_out = store.n_cells
    if n_out >= 2**31:
        raise ValueError("SNN graph: more than 2^31 cells")
    if n == 0:
        return write_snn_graph(store, "obsp", "snn", np.empty((0, k), np.int32), prune,
                               cells=np.empty(0, np.int64), n_cells=n_out)
    ptr = _reverse_lists_on_disk(root, n, k, col)
    lists = Mapped(root / "knn.pos", np.int32, (n, k))
    rev = Mapped(root / "knn.rev", np.int32, (int(ptr[-1]),))
    tag = uuid.uuid4().hex  # named, not hashed: hashing reads every page of a mapping
    shared = [dask.delayed(a, name=f"snn-{what}-{tag}") for what, a in
              (("lists", lists), ("ptr", ptr), ("rev", rev))]
    d_col = dask.delayed(col, name=f"snn-col-{tag}")
    per = max(SNN_OUT, -(-n_out // 256))
    tasks = [dask.delayed(_snn_block, pure=True)(*shared, a, min(a + chunk, n), float(prune),
                                                 d_col, n_out, per) for a in range(0, n, chunk)]
    out = Buckets(root, "snn", -(-n_out // per), {"row": (np.int32, 1), "col": (np.int32, 1),
                                                   "val": (np.float64, 1)})
    for cuts, arrays in in_waves(tasks, scheduler, "snn", progress, per_worker=shared_knn.WAVE):
        out.append_grouped(cuts, arrays)
    out.close()
    del tasks, shared, d_col, lists, rev, ptr
    writer = store.sparse_writer("obsp", "snn", (n_out, n_out))
    indptr = np.zeros(n_out + 1, dtype=np.int64)
    for b in range(out.n):
        part = out.read(b)
        order = np.argsort(part["row"], kind="stable")  # a row's entries stay by column
        writer.append(part["col"][order], part["val"][order])
        r0 = b * per
        indptr[r0 + 1:min(r0 + per, n_out) + 1] = np.bincount(part["row"] - r0,
                                                              minlength=min(per, n_out - r0))
    np.cumsum(indptr, out=indptr)
    writer.commit(indptr)
    return int(indptr[-1])


def _neighbors_params(cfg):
    n = cfg.neighbors
    return {"n_pcs": n.n_pcs, "k": n.k, "prune": n.prune, "method": n.method}


@stage("neighbors", after=("pca",), params=_neighbors_params)
def run_neighbors(ctx: Context) -> dict:
    from cellmill.engine.cells import obsm_row_blocks, qc_passed

    cfg, store = ctx.cfg.neighbors, ctx.store
    cells = np.flatnonzero(qc_passed(store))
    n_pcs = min(cfg.n_pcs, store.root["obsm"]["X_pca"].shape[1])
    k = min(cfg.k, len(cells))
    info = {"setting": cfg.method, "exact_up_to": shared_knn.EXACT_UP_TO, "cells": int(len(cells))}
    exact = knn_method(cfg.method, len(cells)) == "exact"
    root = scratch_dir(store.path, "neighbors")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    try:
        if not exact:  # the PCs read where needed: no copy held while NN-descent runs
            idx, dist, done = approximate_knn(lambda: passed_pcs(store, n_pcs)[1], k,
                                              scheduler=ctx.scheduler(), progress=ctx.progress)
            info.update(done)
        else:  # the index made from the PCs a block at a time (through a scratch file)
            index = knn_index_from_blocks(obsm_row_blocks(store, "X_pca", cells, n_pcs),
                                          len(cells), root / "index")
            info["method"] = "exact"
        block = _spill_block(store.n_cells)
        if exact:
            spilled = _search_to_disk(index, k, cells, root, ctx, block)
            col = cells[index.perm].astype(np.int32)  # tree position -> cell
            del index
            shutil.rmtree(root / "index")  # the points' files (180 MB at 1M cells)
            release_heap()
            write_all_cells(store, "obsm", "knn_distance", spilled.field("dist"), cells,
                            np.nan, block=block)
            write_all_cells(store, "obsm", "knn_index", spilled.field("idx"), cells, -1,
                            lookup=cells.astype(np.int64), block=block)
            del spilled, cells
            nnz = write_snn_from_disk(store, root, len(col), k, col, cfg.prune,
                                      scheduler=ctx.scheduler(), progress=ctx.progress)
        else:
            # one full-size array at a time: each is written and freed before the next
            release_heap()
            write_all_cells(store, "obsm", "knn_distance", dist, cells, np.nan, block=block)
            del dist
            write_all_cells(store, "obsm", "knn_index", idx, cells, -1,
                            lookup=cells.astype(np.int64))
            nnz = write_snn_graph(store, "obsp", "snn", idx, cfg.prune,
                                  scheduler=ctx.scheduler(), progress=ctx.progress,
                                  cells=cells, n_cells=store.n_cells)
            del idx
    finally:
        shutil.rmtree(root, ignore_errors=True)
    log.info("neighbors: %s k=%d on %d PCs, %d cells; SNN %d entries", info["method"], k,
             n_pcs, info["cells"], nnz)
    release_heap()
    return {"knn": info}
