"""Per-gene moments of a CSR block of cells, for 'vst' and the scaling statistics.

Conventions: a block is CSR (data, indices, indptr) over the selected cells; `granule[r]` is
row r's granule index within the block (rows in cell order, so granules are non-decreasing).
Floating-point sums are returned per granule and folded in granule order by the caller, so
they do not depend on how cells were grouped into blocks. Integer sums are exact and are
returned per block.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# Per row, y of counts 1..LUT-1 is computed once before the sweep (~60% of the counts are 1,
# ~99% below 32): a lookup, not a branch on whether the value is memoised yet
LUT = 32


@njit(nogil=True, cache=True)
def _sift_down(heap, i, n):
    while True:
        lo, left = i, 2 * i + 1
        if left < n and heap[left] < heap[lo]:
            lo = left
        if left + 1 < n and heap[left + 1] < heap[lo]:
            lo = left + 1
        if lo == i:
            return
        heap[i], heap[lo] = heap[lo], heap[i]
        i = lo


@njit(nogil=True, cache=True)
def keep_largest(row, state, x):
    """Offer x to `row`, which keeps the len(row) largest values offered; state[7] counts
    the values kept, state[6] is set to the smallest once the row is full (a min-heap from
    then on; before that it is left as the caller set it, 0 or a floor). Values must be > 0;
    callers may skip any x <= state[6]."""
    k = row.shape[0]
    n = state[7]
    if n < k:
        row[n] = x
        state[7] = n + 1
        if n + 1 == k:
            for i in range(k // 2 - 1, -1, -1):
                _sift_down(row, i, k)
            state[6] = row[0]
    elif x > row[0]:
        row[0] = x
        _sift_down(row, 0, k)
        state[6] = row[0]


@njit(nogil=True, cache=True)
def merge_largest(top, state, part, part_genes):
    """Fold the kept values of one block (`part` row i: gene part_genes[i], as vst_first_pass
    returns them) into `top`/`state` (as keep_largest keeps them)."""
    for i in range(len(part_genes)):
        g = part_genes[i]
        for j in range(part.shape[1]):
            x = part[i, j]
            if x > state[g, 6]:
                keep_largest(top[g], state[g], x)


@njit(nogil=True, cache=True)
def vst_first_pass(data, indices, indptr, n_counts, granule, keep, n_granules, n_genes,
                   scale_factor, n_top, floor):
    """Counts moments and log-normalised moments in one sweep over a block.

    n_counts[r]: row r's cell's total counts (float64; obs n_counts). Rows with
    keep[r] == 0 are skipped (left-out cells: no copy of the block without them). floor[g]:
    counts <= floor[g] are not offered to `top` (the caller's running top of the gene is full
    and its smallest value is floor[g], so they cannot enter it; 0: no floor).
    Returns
      sx, sxx, nnz:  int64 (n_genes,) exact sums of x, x^2 and nonzero counts per gene
                     (exact while a gene's sum of x^2 stays below 2^63, ~9.2e18);
      ln_sum:        float64 (n_granules, n_genes) sum of y = log1p(x / n_counts * sf);
      ln_m2:         float64 (n_granules, n_genes) sum over the granule's cells (zeros
                     included) of (y - granule mean)^2;
      top, top_genes: int32 (n_kept, n_top), (n_kept,): row i holds the n_top largest
                     counts of gene top_genes[i] that passed its floor (a min-heap once full,
                     0 in empty slots; see keep_largest); genes with none have no row. All
                     that the vst clip at sqrt(N) needs when a gene has at most n_top counts
                     above its clip.
    M2 of a granule comes from sums of y - K, K = the gene's first value in the granule
    (shifted data): (mean - K)^2 <= n_j * variance, so at most log2(1024) bits cancel, unlike
    sum y^2 - n mean^2 whose loss is unbounded. The caller merges granules in order with
    Chan's update (differences of means only).
    """
    n_rows = len(indptr) - 1
    # one 64-byte cache line per gene: sum x, sum x^2, nonzeros in the granule (int64), then
    # viewed as float64: shift K, sum (y - K), sum (y - K)^2; then (int64) the smallest
    # value kept in `top` (0 until it is full) and how many it keeps
    acc = np.zeros((n_genes, 8), np.int64)
    # rows of `top` are handed out as genes get their first kept count: once the floors
    # are up most genes get none, and untouched memory costs nothing
    top = np.empty((n_genes, n_top), np.int32)
    top_row = np.full(n_genes, -1, np.int32)
    top_genes = np.empty(n_genes, np.int32)
    n_kept = 0
    accf = acc.view(np.float64)
    nnz = np.zeros(n_genes, np.int64)
    ln_sum = np.zeros((n_granules, n_genes), np.float64)
    ln_m2 = np.zeros((n_granules, n_genes), np.float64)
    lut = np.empty(LUT, np.float64)
    sf = np.float64(scale_factor)
    # acc[g, 6] is then the bar a count must pass to enter `top`: the floor, raised to the
    # smallest kept value once the top is full (one compare a nonzero, in the gene's line)
    for g in range(n_genes):
        acc[g, 6] = floor[g]
    r0 = 0
    while r0 < n_rows:
        j = granule[r0]
        r1 = r0
        while r1 < n_rows and granule[r1] == j:
            r1 += 1
        kept = 0
        for r in range(r0, r1):
            if keep[r] == 0:
                continue
            kept += 1
            k0, k1 = indptr[r], indptr[r + 1]
            n = n_counts[r]
            # LogNormalize exactly as kernels.lognorm.lognorm_row (the same expression),
            # inlined so that one sweep computes y and the sums
            for x in range(1, LUT):
                lut[x] = math.log1p(np.float64(x) / n * sf)
            for k in range(k0, k1):
                x = np.int64(data[k])
                g = indices[k]
                if x < LUT:
                    v = lut[x]
                else:
                    v = math.log1p(np.float64(x) / n * sf)
                acc[g, 0] += x
                acc[g, 1] += x * x
                if x > acc[g, 6]:  # top is touched only then
                    i = top_row[g]
                    if i < 0:
                        i = n_kept
                        top_row[g] = i
                        top_genes[i] = g
                        top[i, :] = 0
                        n_kept += 1
                    keep_largest(top[i], acc[g], x)
                    if acc[g, 6] < floor[g]:
                        acc[g, 6] = floor[g]
                c = acc[g, 2]
                if c == 0:
                    accf[g, 3] = v
                acc[g, 2] = c + 1
                d = v - accf[g, 3]
                accf[g, 4] += d
                accf[g, 5] += d * d
        if kept == 0:
            r0 = r1
            continue
        nj = np.float64(kept)
        for g in range(n_genes):
            c = acc[g, 2]
            if c:
                kg = accf[g, 3]
                zeros = nj - np.float64(c)
                b = accf[g, 4] - zeros * kg
                a = accf[g, 5] + zeros * kg * kg
                ln_sum[j, g] = accf[g, 4] + np.float64(c) * kg
                m2 = a - b * b / nj
                ln_m2[j, g] = m2 if m2 > 0.0 else 0.0
                nnz[g] += c
                acc[g, 2] = 0
                accf[g, 4] = 0.0
                accf[g, 5] = 0.0
        r0 = r1
    return (acc[:, 0].copy(), acc[:, 1].copy(), nnz, ln_sum, ln_m2, top[:n_kept].copy(),
            top_genes[:n_kept].copy())


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
