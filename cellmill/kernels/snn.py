"""Seurat's shared-nearest-neighbour graph from k-nearest-neighbour lists.

S = A A^T for the binary kNN matrix A (A[i, m] = 1 when m is among i's k neighbours), i.e.
S[i, j] = |nn(i) & nn(j)| for every pair sharing a neighbour; weight J = S / (k + (k - S)) (the
Jaccard index of the two k-sets, computed as Seurat's ComputeSNN does); entries with J < prune
are dropped. Rows are built one at a time through the reverse lists (who has m as neighbour),
never as a dense matrix, in two sweeps (count, then fill), so the caller can allocate the whole
graph once and copy the rows in. Neighbour index -1 means "no neighbour" and is skipped.
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
    idx = np.empty(ptr[n], dtype=knn.dtype)  # int32 lists give int32 reverse lists
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
def _weight(s, kf):
    """Jaccard index of two k-sets sharing s points (Seurat's ComputeSNN arithmetic)."""
    return s / (kf + (kf - s))


@numba.njit(nogil=True, cache=True)
def _emit(cnt, touched, nt, kf, prune, col, indices, data, a):
    """Write the kept entries of the row just counted (touched[:nt], cnt) at indices/data[a:],
    sorted by column (col[j]; j itself when col is empty), and clear cnt; returns the end of
    the row."""
    o = a
    for t in range(nt):
        j = touched[t]
        w = _weight(float(cnt[j]), kf)
        if not (w < prune):
            indices[o] = col[j] if col.shape[0] else j
            data[o] = w
            o += 1
        cnt[j] = 0
    order = np.argsort(indices[a:o])
    indices[a:o] = indices[a:o][order]
    data[a:o] = data[a:o][order]
    return o


@numba.njit(nogil=True, cache=True)
def snn_row_counts(knn, ptr, idx, r0, r1, prune):
    """Number of kept SNN entries in each of the rows r0..r1 (the first of two sweeps: the
    caller sizes the whole graph before filling it)."""
    n, k = knn.shape
    kf = float(k)
    cnt = np.zeros(n, dtype=np.int32)
    touched = np.empty(n, dtype=np.int32)  # (callers refuse n >= 2^31)
    counts = np.zeros(r1 - r0, dtype=np.int64)
    for i in range(r0, r1):
        nt = _row(knn, ptr, idx, i, cnt, touched)
        kept = 0
        for t in range(nt):
            if not (_weight(float(cnt[touched[t]]), kf) < prune):
                kept += 1
            cnt[touched[t]] = 0
        counts[i - r0] = kept
    return counts


@numba.njit(nogil=True, cache=True)
def snn_fill_rows(knn, ptr, idx, r0, r1, prune, counts, col):
    """Rows r0..r1 of the pruned Jaccard SNN graph, `counts` (snn_row_counts) entries each:
    column indices col[j] (int32, ascending: `col` is increasing) and float64 weights, the
    rows one after the other."""
    n, k = knn.shape
    kf = float(k)
    cnt = np.zeros(n, dtype=np.int32)
    touched = np.empty(n, dtype=np.int32)  # (callers refuse n >= 2^31)
    indices = np.empty(counts.sum(), dtype=np.int32)
    data = np.empty(counts.sum(), dtype=np.float64)
    a = 0
    for i in range(r0, r1):
        nt = _row(knn, ptr, idx, i, cnt, touched)
        a = _emit(cnt, touched, nt, kf, prune, col, indices, data, a)
    return indices, data


@numba.njit(nogil=True, cache=True)
def _grown(indices, data, a, need):
    """indices and data (their first a entries kept) with room for `need`, doubling."""
    cap = indices.shape[0]
    while need > cap:
        cap *= 2
    grown_i = np.empty(cap, dtype=np.int32)
    grown_d = np.empty(cap, dtype=np.float64)
    grown_i[:a] = indices[:a]
    grown_d[:a] = data[:a]
    return grown_i, grown_d


@numba.njit(nogil=True, cache=True)
def snn_rows(knn, ptr, idx, r0, r1, prune, col):
    """snn_fill_rows without the counting sweep: rows r0..r1 in one sweep into arrays that
    grow as needed. Returns (entries per row, column indices, weights), as the two sweeps
    give them; for a caller that does not size the whole graph first (a streaming writer)."""
    n, k = knn.shape
    kf = float(k)
    cnt = np.zeros(n, dtype=np.int32)
    touched = np.empty(n, dtype=np.int32)  # (callers refuse n >= 2^31)
    counts = np.zeros(r1 - r0, dtype=np.int64)
    indices = np.empty(max(16, (r1 - r0) * k * 2), dtype=np.int32)
    data = np.empty(indices.shape[0], dtype=np.float64)
    a = 0
    for i in range(r0, r1):
        nt = _row(knn, ptr, idx, i, cnt, touched)
        if a + nt > indices.shape[0]:  # room for every touched column, kept or not
            indices, data = _grown(indices, data, a, a + nt)
        o = _emit(cnt, touched, nt, kf, prune, col, indices, data, a)
        counts[i - r0] = o - a
        a = o
    return counts, indices[:a].copy(), data[:a].copy()


@numba.njit(nogil=True, cache=True)
def gather_lists(ptr, idx, ms, lptr, out):
    """Copy the lists idx[ptr[m]:ptr[m + 1]] of the points ms (ascending: the reads go
    forward through idx) to out[lptr[t]:lptr[t + 1]] (t = 0.. len(ms))."""
    for t in range(ms.shape[0]):
        m = ms[t]
        o = lptr[t] - ptr[m]
        for q in range(ptr[m], ptr[m + 1]):
            out[o + q] = idx[q]


@numba.njit(nogil=True, cache=True)
def snn_rows_local(local, lptr, lrev, prune, cnt):
    """snn_rows for a block of rows from gathered reverse lists: local[r, p] is the position
    in lptr of row r's p-th neighbour (-1: none), lrev[lptr[u]:lptr[u + 1]] that neighbour's
    reverse list as output columns (cells). cnt: zeros, one per column (left all zero; a row
    touches the part near its columns). Returns (entries per row, columns ascending,
    weights) as snn_rows does."""
    rows, k = local.shape
    kf = float(k)
    counts = np.zeros(rows, dtype=np.int64)
    indices = np.empty(max(16, rows * k * 2), dtype=np.int32)
    data = np.empty(indices.shape[0], dtype=np.float64)
    touched = np.empty(max(1, lrev.shape[0]), dtype=np.int32)  # a row touches fewer columns
    cells = np.empty(0, dtype=np.int32)  # the columns are the counted values themselves
    a = 0
    for r in range(rows):
        nt = _row(local, lptr, lrev, r, cnt, touched)
        if a + nt > indices.shape[0]:  # room for every touched column, kept or not
            indices, data = _grown(indices, data, a, a + nt)
        o = _emit(cnt, touched, nt, kf, prune, cells, indices, data, a)
        counts[r] = o - a
        a = o
    return counts, indices[:a].copy(), data[:a].copy()


@numba.njit(nogil=True, cache=True)
def upper_edges(indptr, indices, data):
    """The entries above the diagonal of a symmetric CSR graph (sorted indices) as an edge list
    (E x 2 int64, row-major order, as igraph takes it) and their weights."""
    n = indptr.shape[0] - 1
    m = 0
    for i in range(n):
        for p in range(indptr[i], indptr[i + 1]):
            if indices[p] > i:
                m += 1
    edges = np.empty((m, 2), dtype=np.int64)
    weights = np.empty(m, dtype=np.float64)
    e = 0
    for i in range(n):
        for p in range(indptr[i], indptr[i + 1]):
            if indices[p] > i:
                edges[e, 0] = i
                edges[e, 1] = indices[p]
                weights[e] = data[p]
                e += 1
    return edges, weights
