"""Products with the scaled variable-gene matrix Z of a block of cells, as Seurat's ScaleData
makes it: y = ln(1 + x / n_counts * scale_factor) (LogNormalize), z = (y - mean) / sd,
z = min(z, clip) (no lower clip), genes with sd = 0 give 0. Zeros of the count matrix give
(0 - mean) / sd, so Z is dense, but Z = 1 zero^T + Y with Y nonzero only where the count is:
the Gram matrix Z^T Z and the projections Z V are taken through Y.
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


@numba.njit(nogil=True, cache=True, inline="always")
def _shifted(x, nc, c, mean, sd, clip, scale_factor, zero):
    """y = z - zero of a nonzero count x of a cell with total nc, variable-gene column c."""
    y = math.log1p(float(x) / nc * scale_factor)
    return min((y - mean[c]) / sd[c], clip) - zero[c]


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
            v = _shifted(data[q], nc, c, mean, sd, clip, scale_factor, zero)
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


@numba.njit(nogil=True, cache=True)
def project_rows(data, indices, indptr, n_counts, col_of_gene, mean, sd, clip, scale_factor,
                 zero, v, out):
    """out[r, :] = z_r V for every CSR row r (z_r its scaled variable genes, V = v, genes x
    components, C order), without the dense z: z = zero + y with y nonzero only where the
    count is, so z V = zero V + sum over the row's nonzeros of y_g V[g, :] (at 196k simulated
    cells: 15.6 CPU ms per 1,000 cells against 22.6 for the dense product). Sums in a fixed
    order (zero V over the genes in order, then the row's entries in order): the same bits for
    any block."""
    p, k = v.shape
    base = np.zeros(k)
    for c in range(p):
        zc = zero[c]
        for j in range(k):
            base[j] += zc * v[c, j]
    acc = np.empty(k)
    for r in range(len(indptr) - 1):
        for j in range(k):
            acc[j] = 0.0
        nc = n_counts[r]
        for q in range(indptr[r], indptr[r + 1]):
            c = col_of_gene[indices[q]]
            if c < 0 or sd[c] <= 0.0:
                continue
            t = _shifted(data[q], nc, c, mean, sd, clip, scale_factor, zero)
            for j in range(k):
                acc[j] += t * v[c, j]
        for j in range(k):
            out[r, j] = base[j] + acc[j]
