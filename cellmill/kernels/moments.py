"""Per-gene moments of a CSR block of cells, for 'vst' and the scaling statistics.

Conventions: a block is CSR (data, indices, indptr) over the selected cells; `granule[r]` is
row r's granule index within the block (rows in cell order, so granules are non-decreasing).
Floating-point sums are returned per granule and folded in granule order by the caller, so
they do not depend on how cells were grouped into blocks. Integer sums are exact and are
returned per block.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from cellmill.kernels.lognorm import MEMO, lognorm_row


@njit(nogil=True, cache=True)
def vst_first_pass(data, indices, indptr, granule, n_granules, n_genes, n_counts, scale_factor):
    """Counts moments and log-normalised moments in one sweep over a block.

    Returns
      sx, sxx, nnz:  int64 (n_genes,) exact sums of x, x^2 and nonzero counts per gene;
      ln_sum:        float64 (n_granules, n_genes) sum of y = log1p(x / n_counts * sf);
      ln_m2:         float64 (n_granules, n_genes) sum over the granule's cells of
                     (y - granule mean)^2, zeros included (two sweeps over the granule's
                     values, so no cancellation); the caller combines granules with
                     M2 = sum_j M2_j + sum_j n_j (m_j - m)^2 (differences of means only).
    """
    n_rows = len(indptr) - 1
    sx = np.zeros(n_genes, np.int64)
    sxx = np.zeros(n_genes, np.int64)
    nnz = np.zeros(n_genes, np.int64)
    ln_sum = np.zeros((n_granules, n_genes), np.float64)
    ln_m2 = np.zeros((n_granules, n_genes), np.float64)
    cnt = np.zeros(n_genes, np.int64)
    mean = np.zeros(n_genes, np.float64)
    # one row of y at a time (recomputed in the second sweep: with the memo that is cheaper
    # than a block-sized buffer, whose fresh pages cost more than the arithmetic)
    y = np.empty(n_genes, np.float64)
    memo = np.empty(MEMO, np.float64)
    sf = np.float64(scale_factor)
    r0 = 0
    while r0 < n_rows:
        j = granule[r0]
        r1 = r0
        while r1 < n_rows and granule[r1] == j:
            r1 += 1
        s = ln_sum[j]
        for r in range(r0, r1):
            k0, k1 = indptr[r], indptr[r + 1]
            lognorm_row(data, k0, k1, np.float64(n_counts[r]), sf, memo, y, 0)
            for k in range(k0, k1):
                x = np.int64(data[k])
                g = indices[k]
                sx[g] += x
                sxx[g] += x * x
                cnt[g] += 1
                s[g] += y[k - k0]
        nj = np.float64(r1 - r0)
        for g in range(n_genes):
            mean[g] = s[g] / nj
        m2 = ln_m2[j]
        for r in range(r0, r1):
            k0, k1 = indptr[r], indptr[r + 1]
            lognorm_row(data, k0, k1, np.float64(n_counts[r]), sf, memo, y, 0)
            for k in range(k0, k1):
                g = indices[k]
                d = y[k - k0] - mean[g]
                m2[g] += d * d
        for g in range(n_genes):
            c = cnt[g]
            if c:
                m2[g] += np.float64(r1 - r0 - c) * mean[g] * mean[g]
                nnz[g] += c
                cnt[g] = 0
        r0 = r1
    return sx, sxx, nnz, ln_sum, ln_m2


@njit(nogil=True, cache=True)
def clipped_z2_nonzero(data, indices, indptr, granule, n_granules, mu, sd, vmax):
    """Per granule and gene: sum over the nonzeros of min((x - mu) / sd, vmax)^2.

    Genes with sd == 0 are skipped (Seurat gives them V = 0). The zeros' contribution,
    (N - nnz) * (mu / sd)^2, is added by the caller.
    """
    n_genes = len(mu)
    out = np.zeros((n_granules, n_genes), np.float64)
    for r in range(len(indptr) - 1):
        o = out[granule[r]]
        for k in range(indptr[r], indptr[r + 1]):
            g = indices[k]
            s = sd[g]
            if s == 0.0:
                continue
            z = (np.float64(data[k]) - mu[g]) / s
            if z > vmax:
                z = vmax
            o[g] += z * z
    return out
