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
def scaled_block(data, indices, indptr, r0, r1, n_counts, col_of_gene, mean, sd, clip,
                 scale_factor, zero, out):
    """out[r - r0, :] = scaled variable genes of CSR row r, for r in r0..r1.

    col_of_gene maps a gene (column of the CSR) to its column in `out` (-1: not variable);
    n_counts[r] is the total count of row r over all genes; zero = zero_values(mean, sd, clip).
    """
    p = mean.shape[0]
    for r in range(r0, r1):
        o = r - r0
        for c in range(p):
            out[o, c] = zero[c]
        nc = n_counts[r]
        for q in range(indptr[r], indptr[r + 1]):
            c = col_of_gene[indices[q]]
            if c < 0 or sd[c] <= 0.0:
                continue
            y = math.log1p(float(data[q]) / nc * scale_factor)
            out[o, c] = min((y - mean[c]) / sd[c], clip)
