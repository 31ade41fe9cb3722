"""The scaled variable-gene matrix of a block of cells, dense, as Seurat's ScaleData makes it.

y = ln(1 + x / n_counts * scale_factor) (LogNormalize), z = (y - mean) / sd, z = min(z, clip)
(no lower clip), genes with sd = 0 give 0. Zeros of the count matrix give (0 - mean) / sd, so the
scaled block is dense: it is built for one block of cells at a time (bounded memory) and fed to
BLAS (Gram matrix Z^T Z, projections Z V) by the engine.
"""

import math

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def zero_values(mean, sd, clip):
    """Scaled value of a zero count per variable gene."""
    out = np.zeros(mean.shape[0])
    for c in range(mean.shape[0]):
        if sd[c] > 0.0:
            out[c] = min((0.0 - mean[c]) / sd[c], clip)
    return out


@numba.njit(nogil=True, cache=True)
def scaled_block(data, indices, indptr, rows, n_counts, col_of_gene, mean, sd, clip,
                 scale_factor, zero, out):
    """out[o, :] = scaled variable genes of CSR row rows[o] (the rows are picked here, so the
    caller never copies a sub-matrix).

    col_of_gene maps a gene (column of the CSR) to its column in `out` (-1: not variable);
    n_counts[r] is the total count of row r over all genes; zero = zero_values(mean, sd, clip).
    """
    p = mean.shape[0]
    for o in range(rows.shape[0]):
        r = rows[o]
        for c in range(p):
            out[o, c] = zero[c]
        nc = n_counts[r]
        for q in range(indptr[r], indptr[r + 1]):
            c = col_of_gene[indices[q]]
            if c < 0 or sd[c] <= 0.0:
                continue
            y = math.log1p(float(data[q]) / nc * scale_factor)
            out[o, c] = min((y - mean[c]) / sd[c], clip)


@numba.njit(nogil=True, cache=True)
def shifted_gram(data, indices, indptr, rows, n_counts, col_of_gene, n_dense, mean, sd, clip,
                 scale_factor, zero, dense, gram, colsum):
    """The sparse part of the Gram matrix of Y = Z - 1 zero^T for the CSR rows `rows`.

    Y is zero wherever the count is zero, so Z^T Z = Y^T Y + s zero^T + zero s^T + n zero
    zero^T (s = column sums of Y). Columns are permuted (col_of_gene): the n_dense densest
    genes first. Their values go to `dense` (len(rows) x n_dense, for a BLAS syrk by the
    caller); here, added into gram (p x p, zeroed by the caller): the sparse x dense block at
    gram[sparse, :n_dense] and the sparse x sparse upper triangle; colsum += column sums of Y.
    """
    p = mean.shape[0]
    sc = np.empty(p, dtype=np.int64)
    sv = np.empty(p)
    for o in range(rows.shape[0]):
        r = rows[o]
        for c in range(n_dense):
            dense[o, c] = 0.0
        ns = 0
        nc = n_counts[r]
        for q in range(indptr[r], indptr[r + 1]):
            c = col_of_gene[indices[q]]
            if c < 0 or sd[c] <= 0.0:
                continue
            y = math.log1p(float(data[q]) / nc * scale_factor)
            v = min((y - mean[c]) / sd[c], clip) - zero[c]
            colsum[c] += v
            if c < n_dense:
                dense[o, c] = v
            else:
                sc[ns] = c
                sv[ns] = v
                ns += 1
        for a in range(ns):
            ca, va = sc[a], sv[a]
            row = gram[ca]
            for c in range(n_dense):
                row[c] += va * dense[o, c]
            for b in range(a, ns):
                cb = sc[b]
                if ca <= cb:
                    gram[ca, cb] += va * sv[b]
                else:
                    gram[cb, ca] += va * sv[b]
