"""Stage `neighbors` (Seurat's FindNeighbors): k nearest neighbours (self included, first) of
the QC-passed cells on PCs 1..n_pcs (stages/shared/knn.py: exact search, or, with
neighbors.method = "auto" above EXACT_UP_TO cells, NN-descent with its recall@k checked
against exact search on a sample of cells; what ran goes into the stage's record), then
Seurat's pruned Jaccard SNN graph (kernels/snn.py). Stored: obsm/knn_index (absolute cell
indices, -1 rows for QC-failed cells), obsm/knn_distance (Euclidean, NaN rows), obsp/snn (all
cells; rows of failed cells empty).

Memory: the O(cells x k) arrays, not copies of them: PCs read chunk by chunk (only the passed
rows and the used columns) into the search index (float32 while its tree is built, the float64
points parked in a scratch file meanwhile), int32 neighbour indices, results of parallel tasks
copied wave by wave into preallocated arrays, the SNN graph filled straight into its all-cells
CSR, full-size outputs made and written one at a time, freed heap trimmed between steps.
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
    """The distance lists of the passed cells, spilled to scratch as the search returns them
    (in tree order) and read back one output block of cells at a time, in order, by
    write_all_cells: the n x k float64 array (160 MB at 1M cells, k = 20) is never whole in
    memory, and not beside the search index."""

    def __init__(self, root, cells: np.ndarray, k: int, block: int):
        self.cells, self.shape, self.dtype = cells, (len(cells), k), np.dtype(np.float64)
        self.block = block
        n_out = int(cells[-1]) // block + 1 if len(cells) else 0
        self.buckets = Buckets(root, "dist", n_out, {"row": (np.int64, 1), "dist": (np.float64, k)})

    def append(self, rows: np.ndarray, dist: np.ndarray) -> None:
        self.buckets.append(self.cells[rows] // self.block, row=rows, dist=dist)

    def __getitem__(self, sl: slice) -> np.ndarray:
        """Rows sl (the passed cells of output block sl's cells: one bucket)."""
        if sl.stop <= sl.start:
            return np.empty((0, self.shape[1]))
        part = self.buckets.read(int(self.cells[sl.start]) // self.block)
        out = np.empty((sl.stop - sl.start, self.shape[1]))
        out[part["row"] - sl.start] = part["dist"]
        return out


def _search_spilled(index, k: int, cells: np.ndarray, root, ctx, block: int):
    """Exact search: (indices in memory, the SNN graph needs them; distances spilled)."""
    n = len(index.perm)
    idx = np.empty((n, k), dtype=index_dtype(n))
    dist = _SpilledRows(root, cells, k, block)
    for rows, p_idx, p_dist in knn_chunks(index, k, scheduler=ctx.scheduler(),
                                          progress=ctx.progress):
        idx[rows] = p_idx
        dist.append(rows, p_dist)
    dist.buckets.close()
    return idx, dist


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
            idx, dist = _search_spilled(index, k, cells, root, ctx, block)
            del index
        # one full-size array at a time: each is written and freed before the next is made
        release_heap()
        write_all_cells(store, "obsm", "knn_distance", dist, cells, np.nan, block=block)
        del dist
    finally:
        shutil.rmtree(root, ignore_errors=True)
    write_all_cells(store, "obsm", "knn_index", idx, cells, -1,
                    lookup=cells.astype(np.int64))
    nnz = write_snn_graph(store, "obsp", "snn", idx, cfg.prune, scheduler=ctx.scheduler(),
                          progress=ctx.progress, cells=cells, n_cells=store.n_cells)
    log.info("neighbors: %s k=%d on %d PCs, %d cells; SNN %d entries", info["method"], k,
             n_pcs, len(cells), nnz)
    del idx
    release_heap()
    return {"knn": info}
