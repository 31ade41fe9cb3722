"""Ingest work on a slice of cells: remap gene columns and count QC metrics in one sweep;
re-sort rows whose genes the remap put out of order."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def remap_and_count(data, indices, indptr, cols, gene_cells, gene_counts):
    """Map sample columns to study columns (int32), return per-cell totals and detected
    genes, and add per-gene detected cells / total counts into the given arrays."""
    n = len(indptr) - 1
    out = np.empty(len(indices), dtype=np.int32)
    n_counts = np.zeros(n, dtype=np.int64)
    n_features = np.zeros(n, dtype=np.int32)
    for i in range(n):
        total = 0
        for p in range(indptr[i], indptr[i + 1]):
            c = cols[indices[p]]
            out[p] = c
            v = np.int64(data[p])
            total += v
            gene_cells[c] += 1
            gene_counts[c] += v
        n_counts[i] = total
        n_features[i] = indptr[i + 1] - indptr[i]
    return out, n_counts, n_features


@numba.njit(nogil=True, cache=True)
def sort_rows(data, indices, indptr):
    """Sort the column indices of each CSR row in place, moving the values along (the
    indices of a row are distinct, so the order is unique)."""
    for i in range(len(indptr) - 1):
        a, b = indptr[i], indptr[i + 1]
        if b - a < 2:
            continue
        order = np.argsort(indices[a:b], kind="mergesort")
        indices[a:b] = indices[a:b][order]
        data[a:b] = data[a:b][order]
