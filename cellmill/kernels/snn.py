"""Seurat's shared-nearest-neighbour graph from k-nearest-neighbour lists.

S = A A^T for the binary kNN matrix A (A[i, m] = 1 when m is among i's k neighbours), i.e.
S[i, j] = |nn(i) & nn(j)| for every pair sharing a neighbour; weight J = S / (k + (k - S)) (the
Jaccard index of the two k-sets, computed as Seurat's ComputeSNN does); entries with J < prune
are dropped. Rows are built one at a time through the reverse lists (who has m as neighbour),
never as a dense matrix. Neighbour index -1 means "no neighbour" and is skipped.
"""

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def reverse_lists(knn, n):
    """CSR of A^T: for every point m, the points i (ascending) that have m as a neighbour."""
    rows, k = knn.shape
    ptr = np.zeros(n + 1, dtype=np.int64)
    for i in range(rows):
        for p in range(k):
            m = knn[i, p]
            if m >= 0:
                ptr[m + 1] += 1
    for m in range(n):
        ptr[m + 1] += ptr[m]
    fill = ptr[:-1].copy()
    idx = np.empty(ptr[n], dtype=np.int64)
    for i in range(rows):
        for p in range(k):
            m = knn[i, p]
            if m >= 0:
                idx[fill[m]] = i
                fill[m] += 1
    return ptr, idx


@numba.njit(nogil=True, cache=True)
def _row(knn, ptr, idx, i, cnt, touched):
    """Count shared neighbours of row i with every other row; returns how many were touched."""
    nt = 0
    for p in range(knn.shape[1]):
        m = knn[i, p]
        if m < 0:
            continue
        for q in range(ptr[m], ptr[m + 1]):
            j = idx[q]
            if cnt[j] == 0:
                touched[nt] = j
                nt += 1
            cnt[j] += 1
    return nt


@numba.njit(nogil=True, cache=True)
def snn_rows(knn, ptr, idx, r0, r1, prune):
    """Rows r0..r1 of the pruned Jaccard SNN graph as CSR pieces (indptr from 0, indices
    sorted, float64 data). Two sweeps: count the kept entries, then fill them."""
    n, k = knn.shape
    kf = float(k)
    cnt = np.zeros(n, dtype=np.int32)
    touched = np.empty(n, dtype=np.int64)
    indptr = np.zeros(r1 - r0 + 1, dtype=np.int64)
    for i in range(r0, r1):
        nt = _row(knn, ptr, idx, i, cnt, touched)
        kept = 0
        for t in range(nt):
            s = float(cnt[touched[t]])
            if not (s / (kf + (kf - s)) < prune):
                kept += 1
            cnt[touched[t]] = 0
        indptr[i - r0 + 1] = indptr[i - r0] + kept
    indices = np.empty(indptr[r1 - r0], dtype=np.int64)
    data = np.empty(indptr[r1 - r0], dtype=np.float64)
    for i in range(r0, r1):
        nt = _row(knn, ptr, idx, i, cnt, touched)
        o = indptr[i - r0]
        for t in range(nt):
            j = touched[t]
            s = float(cnt[j])
            w = s / (kf + (kf - s))
            if not (w < prune):
                indices[o] = j
                data[o] = w
                o += 1
            cnt[j] = 0
        a, b = indptr[i - r0], indptr[i - r0 + 1]
        order = np.argsort(indices[a:b])
        indices[a:b] = indices[a:b][order]
        data[a:b] = data[a:b][order]
    return indptr, indices, data
