"""The gene-major (CSC) copy of the counts, built out of core.

`layers/counts_gene_major` is an anndata CSC group (shape [n_cells, n_genes], data and indices
int32, indptr int64) holding every cell. The number of nonzeros of each gene is known before
reading any counts (var `n_cells`, computed at ingest), so the whole indptr is known up front.
Genes are cut into consecutive slabs whose nonzeros fit the memory budget; for each slab the cell
blocks are streamed once and scattered into the slab's buffer (cells arrive in increasing order,
so every column comes out sorted), and the slab is written to its indptr range. Everything is
written under a temporary name and swapped into place when complete.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from cellmill.io.store import (
    CHUNK_NNZ,
    GENE_MAJOR,
    Store,
    _empty_dict_group,
    _swap_dir,
    codec,
)

BYTES_PER_NNZ = 8  # int32 value + int32 cell index in the slab buffers


@numba.njit(nogil=True, cache=True)
def _scatter(data, indices, indptr, row0, g0, g1, cursor, out_data, out_idx):
    """Append the entries of genes g0:g1 of a CSR block (cells row0, row0 + 1, ...) to their
    columns: cursor[g - g0] is the next free position of gene g in the slab buffers."""
    for r in range(len(indptr) - 1):
        cell = row0 + r
        for k in range(indptr[r], indptr[r + 1]):
            g = indices[k]
            if g0 <= g < g1:
                p = cursor[g - g0]
                out_data[p] = data[k]
                out_idx[p] = cell
                cursor[g - g0] = p + 1


def gene_nnz(store: Store) -> np.ndarray:
    """Nonzeros per gene over all cells: var `n_cells` from ingest, checked against X's nnz."""
    var = store.var()
    if "n_cells" in var:
        counts = var["n_cells"].to_numpy().astype(np.int64)
        if counts.sum() == store.nnz and (counts >= 0).all():
            return counts
    # not recorded (or inconsistent): count them with one pass
    counts = np.zeros(store.n_genes, dtype=np.int64)
    for _, _, m in store.iter_blocks():
        counts += np.bincount(m.indices, minlength=store.n_genes)
    return counts


def plan_slabs(indptr: np.ndarray, max_nnz: int) -> list[tuple[int, int]]:
    """Consecutive gene ranges whose nonzeros fit max_nnz (a larger single gene gets its own)."""
    n_genes = len(indptr) - 1
    slabs, g0 = [], 0
    while g0 < n_genes:
        limit = indptr[g0] + max(max_nnz, 1)
        g1 = int(np.searchsorted(indptr, limit, side="right")) - 1
        g1 = min(max(g1, g0 + 1), n_genes)
        slabs.append((g0, g1))
        g0 = g1
    return slabs


def build_gene_major(store: Store, memory_bytes: int, progress: bool = False,
                     workers: int = 2) -> None:
    """Write layers/counts_gene_major (CSC copy of X, all cells) with memory bounded by
    memory_bytes: slab buffers take 40% of it, decoded blocks in flight and the rest of the
    process the remainder. X is decoded once per slab."""
    from cellmill.io.progress import bar

    n_cells, n_genes = store.shape
    per_gene = gene_nnz(store)
    indptr = np.zeros(n_genes + 1, dtype=np.int64)
    np.cumsum(per_gene, out=indptr[1:])
    nnz = int(indptr[-1])
    # slab buffers take 40% of the budget; blocks in flight (workers + 1 decoded blocks, each
    # ~16 bytes per nonzero with zarr's buffers) and the process itself the rest
    slabs = plan_slabs(indptr, int(memory_bytes * 0.4 // BYTES_PER_NNZ))

    layers = _empty_dict_group(store.root, "layers")
    tmp_name = GENE_MAJOR + ".__new__"
    shutil.rmtree(store.path / "layers" / tmp_name, ignore_errors=True)
    grp = layers.create_group(tmp_name)
    grp.attrs.update({"encoding-type": "csc_matrix", "encoding-version": "0.1.0",
                      "shape": [n_cells, n_genes]})
    chunk = (max(1, min(CHUNK_NNZ, nnz)),)
    out_data = grp.create_array("data", shape=(nnz,), dtype=np.int32, chunks=chunk,
                                compressors=codec())
    out_idx = grp.create_array("indices", shape=(nnz,), dtype=np.int32, chunks=chunk,
                               compressors=codec())
    ip = grp.create_array("indptr", shape=(n_genes + 1,), dtype=np.int64,
                          chunks=(min(n_genes + 1, 1 << 20),), compressors=codec())
    ip[:] = indptr

    x_indptr = store.indptr
    ranges = store.block_ranges()
    pbar = bar(total=len(slabs) * len(ranges), desc="gene-major copy", enabled=progress)
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for g0, g1 in slabs:
                a, b = int(indptr[g0]), int(indptr[g1])
                buf_data = np.empty(b - a, dtype=np.int32)
                buf_idx = np.empty(b - a, dtype=np.int32)
                cursor = indptr[g0:g1] - a
                # decode blocks ahead in threads (bounded window), scatter them in cell order
                window = max(1, workers) + 1
                futures = {}
                for i in range(min(window, len(ranges))):
                    futures[i] = pool.submit(store.read_rows, *ranges[i], None, x_indptr)
                for i, (start, _) in enumerate(ranges):
                    m = futures.pop(i).result()
                    nxt = i + window
                    if nxt < len(ranges):
                        futures[nxt] = pool.submit(store.read_rows, *ranges[nxt], None,
                                                   x_indptr)
                    _scatter(m.data, m.indices, m.indptr, start, g0, g1, cursor,
                             buf_data, buf_idx)
                    pbar.update(1)
                if not np.array_equal(cursor, indptr[g0 + 1:g1 + 1] - a):
                    raise RuntimeError(f"{store.path}: var n_cells disagrees with X "
                                       f"for genes {g0}:{g1}")
                if b > a:
                    out_data[a:b] = buf_data
                    out_idx[a:b] = buf_idx
                del buf_data, buf_idx
    except BaseException:
        shutil.rmtree(store.path / "layers" / tmp_name, ignore_errors=True)
        raise
    finally:
        pbar.close()
    _swap_dir(store.path / "layers" / tmp_name, store.path / "layers" / GENE_MAJOR)
    store._root = None
