"""Exact k-nearest neighbours by blocked brute force (Euclidean), self-join.

`ref_t` holds the points dimension-major (d x n, C-contiguous) so the inner loop runs over
contiguous reference points and vectorises. A tile of queries is compared with a chunk of
references that stays in cache; every query keeps its k best as a sorted list ordered by
(squared distance, index). References are scanned in increasing index order and a candidate
enters only when strictly closer than the current k-th, so ties are broken by the smaller index
whatever the tiling. The query itself is always neighbour 0 (distance 0), as in Seurat.
Squared distances are sums of squared coordinate differences in float64 (no |a|^2 + |b|^2 - 2ab
cancellation), computed in the same order for (i, j) and (j, i), so d(i, j) == d(j, i) exactly.
"""

import numba
import numpy as np

TILE = 16  # queries per tile
CHUNK = 256  # references per chunk (d x CHUNK doubles stay in L1/L2)


@numba.njit(nogil=True, cache=True)
def _insert(bd, bi, k, d, j):
    """Insert (d, j) into the sorted top-k (bd, bi); caller checked d < bd[k - 1]."""
    p = k - 1
    while p > 0 and bd[p - 1] > d:
        bd[p] = bd[p - 1]
        bi[p] = bi[p - 1]
        p -= 1
    bd[p] = d
    bi[p] = j


@numba.njit(nogil=True, cache=True)
def _sq_dist(ref_t, me, c0, w, b):
    """b[j] = squared distance between point `me` and point c0 + j, j < w.

    Four dimensions per sweep keep the buffer traffic low; the order of the additions is fixed
    (and symmetric in the two points), so the value never depends on the tiling.
    """
    d = ref_t.shape[0]
    b[:] = 0.0
    dd = 0
    while dd + 4 <= d:
        r0 = ref_t[dd, c0:c0 + w]
        r1 = ref_t[dd + 1, c0:c0 + w]
        r2 = ref_t[dd + 2, c0:c0 + w]
        r3 = ref_t[dd + 3, c0:c0 + w]
        a0 = ref_t[dd, me]
        a1 = ref_t[dd + 1, me]
        a2 = ref_t[dd + 2, me]
        a3 = ref_t[dd + 3, me]
        for j in range(w):
            x0 = a0 - r0[j]
            x1 = a1 - r1[j]
            x2 = a2 - r2[j]
            x3 = a3 - r3[j]
            b[j] += (x0 * x0 + x1 * x1) + (x2 * x2 + x3 * x3)
        dd += 4
    while dd < d:
        r0 = ref_t[dd, c0:c0 + w]
        a0 = ref_t[dd, me]
        for j in range(w):
            x0 = a0 - r0[j]
            b[j] += x0 * x0
        dd += 1


@numba.njit(nogil=True, cache=True)
def knn_self(ref_t, q0, q1, k, out_idx, out_dist):
    """k nearest neighbours (incl. self first) of points q0..q1 among all n points of ref_t.

    out_idx (q1 - q0, k) int64, out_dist (q1 - q0, k) float64 Euclidean distances. When
    n < k the missing neighbours get index -1 and distance inf.
    """
    d, n = ref_t.shape
    buf = np.empty((TILE, CHUNK))
    bd = np.empty((TILE, k))
    bi = np.empty((TILE, k), dtype=np.int64)
    for t0 in range(q0, q1, TILE):
        nt = min(TILE, q1 - t0)
        for t in range(nt):
            bd[t, 0] = 0.0
            bi[t, 0] = t0 + t
            for p in range(1, k):
                bd[t, p] = np.inf
                bi[t, p] = -1
        for c0 in range(0, n, CHUNK):
            w = min(CHUNK, n - c0)
            for t in range(nt):
                _sq_dist(ref_t, t0 + t, c0, w, buf[t, :w])
            for t in range(nt):
                b = buf[t]
                me = t0 + t
                thr = bd[t, k - 1]
                for j in range(w):
                    if b[j] < thr:
                        if c0 + j != me:
                            _insert(bd[t], bi[t], k, b[j], c0 + j)
                            thr = bd[t, k - 1]
        for t in range(nt):
            r = t0 + t - q0
            for p in range(k):
                out_idx[r, p] = bi[t, p]
                out_dist[r, p] = np.sqrt(bd[t, p])
