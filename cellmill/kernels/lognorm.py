"""LogNormalize (Seurat 4.3.0): y = log1p(x / N_c * scale_factor), N_c = total counts of cell c.

Seurat computes it per nonzero as `log1p(double(x) / colSums[c] * scale_factor)`; these kernels
use the same operations in the same order (division, then multiplication, then log1p), so the
values are the same doubles. Zeros stay zero, so only the nonzeros are ever transformed.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# Most counts are small (in 10x data ~95% of nonzeros are <= 16) and a cell's small counts
# repeat, so each row memoises log1p of x = 1..MEMO-1. Same expression, same doubles.
MEMO = 64


@njit(nogil=True, cache=True)
def lognorm_row(data, k0, k1, n, sf, memo, out, o):
    """out[o + k - k0] = log1p(data[k] / n * sf) for k in k0:k1 (one cell, total counts n).

    `memo` (MEMO float64s) caches small x within the row. One call per row, not per value:
    a per-value call that takes arrays costs reference counting on every nonzero.
    """
    memo[:] = -1.0
    for k in range(k0, k1):
        x = data[k]
        if x < MEMO:
            v = memo[x]
            if v < 0.0:
                v = math.log1p(np.float64(x) / n * sf)
                memo[x] = v
        else:
            v = math.log1p(np.float64(x) / n * sf)
        out[o + k - k0] = v


@njit(nogil=True, cache=True)
def row_totals(data, indptr):
    """Per-row sum of a CSR block's values as float64 (exact for integer counts < 2**53)."""
    n = len(indptr) - 1
    out = np.zeros(n, np.float64)
    for r in range(n):
        s = 0
        for k in range(indptr[r], indptr[r + 1]):
            s += np.int64(data[k])
        out[r] = s
    return out


@njit(nogil=True, cache=True)
def lognorm_values(data, indptr, n_counts, scale_factor):
    """Log-normalised values of the nonzeros of a cell-major (CSR) block.

    data, indptr: the block's CSR arrays (indptr indexes into data); n_counts[r]: total counts
    of row r's cell over all genes (obs `n_counts`, not the block's sum when only some genes
    were read). Returns float64 values aligned with data.
    """
    out = np.empty(len(data), np.float64)
    sf = np.float64(scale_factor)
    memo = np.empty(MEMO, np.float64)
    for r in range(len(indptr) - 1):
        k0 = indptr[r]
        lognorm_row(data, k0, indptr[r + 1], np.float64(n_counts[r]), sf, memo, out, k0)
    return out


@njit(nogil=True, cache=True)
def lognorm_values_by_cell(data, cells, n_counts, scale_factor):
    """Log-normalised values of nonzeros whose cell is given per nonzero.

    For gene-major (CSC) slabs: `cells` = the CSC `indices` (row index of each nonzero),
    `n_counts` indexed by those (e.g. obs `n_counts` of all cells).
    """
    out = np.empty(len(data), np.float64)
    sf = np.float64(scale_factor)
    for k in range(len(data)):
        out[k] = math.log1p(np.float64(data[k]) / np.float64(n_counts[cells[k]]) * sf)
    return out


@njit(nogil=True, cache=True)
def lognorm_inplace(values, indptr, n_counts, scale_factor):
    """As `lognorm_values`, writing into a float64 `values` array that holds the counts."""
    sf = np.float64(scale_factor)
    for r in range(len(indptr) - 1):
        n = np.float64(n_counts[r])
        for k in range(indptr[r], indptr[r + 1]):
            values[k] = math.log1p(values[k] / n * sf)
