"""k nearest neighbours, shared by the neighbors and umap stages: exact blocked brute force with
bounding-box pruning (kernels/knn.py) over chunks of query cells, run where passes run, or
pynndescent; recall against exact search."""

from __future__ import annotations

import logging

import numpy as np

from cellmill.engine.schedulers import in_waves

log = logging.getLogger("cellmill")

NN_SEED = 42  # pynndescent's random state

# ------------------------------------------------------------------ nearest neighbours


def index_dtype(n: int):
    """int32 indices when they fit (half the memory of int64)."""
    return np.int32 if n < 2**31 else np.int64


def _knn_chunk(ref_t, orig, lo, hi, leaf, q0, q1, k):
    from cellmill.kernels.knn import knn_self

    idx = np.empty((q1 - q0, k), dtype=index_dtype(ref_t.shape[1]))
    dist = np.empty((q1 - q0, k))
    knn_self(ref_t, orig, lo, hi, leaf, q0, q1, k, idx, dist)
    return idx, dist


def exact_knn(points: np.ndarray, k: int, scheduler=None, chunk: int | None = None,
              progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of every row of `points` among all rows (self first).

    Ties are broken by the smaller index; the result does not depend on `chunk` or the
    scheduler. Returns (indices, int32 when n < 2^31 else int64; Euclidean distances float64),
    n x k.
    """
    return knn_search(knn_index(points), k, scheduler, chunk, progress)


def knn_index(points: np.ndarray):
    """The search structure of exact_knn: (tree permutation, points in tree order dimension-
    major, leaf boxes). It holds its own copy, so the caller may free `points` before the
    search (the neighbors stage does: one copy of the PCs instead of two)."""
    from cellmill.kernels.knn import LEAF, block_boxes, tree_order

    x = np.asarray(points, dtype=np.float64)
    perm = tree_order(x, LEAF)
    ref_t = np.empty((x.shape[1], x.shape[0]))
    # points in tree order, dimension-major; mode="clip" (perm is in range anyway) because
    # numpy buffers `out` in a temporary of the same size under the default mode="raise"
    np.take(x.T, perm, axis=1, out=ref_t, mode="clip")
    lo, hi = block_boxes(ref_t, LEAF)
    return perm, ref_t, lo, hi


def knn_chunks(index, k: int, scheduler=None, chunk: int | None = None,
               progress: bool = False, desc: str = "knn"):
    """The search of exact_knn on a knn_index, chunk by chunk as the tasks finish:
    (rows, indices, Euclidean distances) for the points `rows` (tree order, not ascending)."""
    import dask

    from cellmill.engine.schedulers import n_workers
    from cellmill.kernels.knn import LEAF

    perm, ref_t, lo, hi = index
    n = ref_t.shape[1]
    if n == 0:
        return
    if chunk is None:
        chunk = min(8192, max(256, -(-n // (8 * n_workers(scheduler)))))
    shared = [dask.delayed(a, pure=True) for a in (ref_t, perm, lo, hi)]
    starts = range(0, n, chunk)
    tasks = [dask.delayed(_knn_chunk, pure=True)(*shared, LEAF, a, min(a + chunk, n), k)
             for a in starts]
    for a, (p_idx, p_dist) in zip(starts, in_waves(tasks, scheduler, desc, progress),
                                  strict=True):
        yield perm[a:a + len(p_idx)], p_idx, p_dist


def knn_search(index, k: int, scheduler=None, chunk: int | None = None,
               progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """exact_knn on a knn_index."""
    n = index[1].shape[1]
    idx = np.empty((n, k), dtype=index_dtype(n))
    dist = np.empty((n, k))
    for rows, p_idx, p_dist in knn_chunks(index, k, scheduler, chunk, progress):
        idx[rows] = p_idx
        dist[rows] = p_dist
    return idx, dist


def self_first(idx: np.ndarray, dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Make every row start with the point itself at distance 0 (as Seurat's lists do)."""
    idx, dist = idx.copy(), dist.copy()
    rows = np.arange(idx.shape[0])
    for i in np.flatnonzero(idx[:, 0] != rows):
        row = list(idx[i])
        drow = list(dist[i])
        if i in row:
            p = row.index(i)
            del row[p], drow[p]
        else:
            row.pop()
            drow.pop()
        idx[i] = [i] + row
        dist[i] = [0.0] + drow
    return idx, dist


def nndescent_knn(points: np.ndarray, k: int, seed: int = NN_SEED,
                  workers: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Approximate k nearest neighbours by pynndescent (self first)."""
    from pynndescent import NNDescent

    index = NNDescent(np.asarray(points, dtype=np.float32), n_neighbors=k, metric="euclidean",
                      random_state=seed, n_jobs=workers, low_memory=True, verbose=False)
    idx, dist = index.neighbor_graph
    return self_first(idx.astype(np.int64), dist.astype(np.float64))


def recall(approx: np.ndarray, exact: np.ndarray) -> float:
    """Fraction of the exact neighbours (per row, as sets) that the approximate lists hold."""
    hit = 0
    for a, e in zip(approx, exact, strict=True):
        hit += len(np.intersect1d(a, e, assume_unique=True))
    return hit / exact.size

