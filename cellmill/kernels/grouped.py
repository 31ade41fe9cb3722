"""Grouped moments of the log-normalised counts, per (granule, group) slot and gene.

y = log1p(x / n_counts * scale_factor), in that operation order (Seurat's LogNormalize), so the
values are bit-identical to Seurat's. Per slot and gene the kernel returns n (per slot), the sum
of y, of y^2, of expm1(y), the nonzero count, and m2 = sum of squared deviations from the slot's
mean, computed in two passes (accurate variances: sum_sq - sum^2 / n cancels badly when the mean
is large relative to the spread). Slots are folded with Chan's formula in a fixed order.
"""

from __future__ import annotations

import math

import numba
import numpy as np

LUT = 32  # per row, y and expm1(y) of counts 1..LUT-1 are computed once (most counts are small)

SUM, SUM_SQ, SUM_EXPM1, NNZ, M2 = 0, 1, 2, 3, 4
N_SUMS = 4


@numba.njit(nogil=True, cache=True)
def lognorm_row_lut(n_counts, scale, lut_y, lut_e):
    """lut_y[x] = log1p(x / n_counts * scale), lut_e[x] = expm1(lut_y[x]) for x < LUT."""
    lut_y[0] = 0.0
    lut_e[0] = 0.0
    for x in range(1, len(lut_y)):
        y = math.log1p(x / n_counts * scale)
        lut_y[x] = y
        lut_e[x] = math.expm1(y)


@numba.njit(nogil=True, cache=True)
def grouped_block(data, indices, indptr, slot_of_row, n_counts_of_row, scale, n_slots, n_genes):
    """Moments of one CSR block of cells, per slot, for the genes a slot touches (sparse).

    slot_of_row[r]: slot of row r (-1: skip the row); a slot holds at most GRANULE rows. Rows
    are taken slot by slot (in row order within a slot), so the dense scratch is one gene
    vector. m2 comes from Welford's update over the slot's nonzeros, combined with the block
    of zeros by Chan's formula (both terms positive: no cancellation). Returns
      n       (n_slots,)          cells per slot
      ptr     (n_slots + 1,)      entries of slot s: ptr[s]:ptr[s + 1]
      genes   (n_entries,) int32  gene of each entry (genes with a nonzero in the slot)
      vals    (n_entries, 5)      sum y, sum y^2, sum expm1(y), nonzero count, m2 (sum of
                                  (y - slot mean)^2 over all the slot's cells, zeros included)
    """
    n_rows = len(indptr) - 1
    n = np.zeros(n_slots, dtype=np.float64)
    # rows grouped by slot (counting sort, stable)
    start = np.zeros(n_slots + 1, dtype=np.int64)
    for r in range(n_rows):
        s = slot_of_row[r]
        if s >= 0:
            start[s + 1] += 1
            n[s] += 1.0
    for s in range(n_slots):
        start[s + 1] += start[s]
    rows = np.empty(start[n_slots], dtype=np.int64)
    fill = start[:n_slots].copy()
    bound = 0  # entries of a slot <= min(n_genes, its nonzeros): untouched memory is free
    for r in range(n_rows):
        s = slot_of_row[r]
        if s >= 0:
            rows[fill[s]] = r
            fill[s] += 1
    for s in range(n_slots):
        nz = 0
        for i in range(start[s], start[s + 1]):
            nz += indptr[rows[i] + 1] - indptr[rows[i]]
        bound += min(nz, n_genes)
    max_k = 1
    for s in range(n_slots):
        max_k = max(max_k, start[s + 1] - start[s])
    inv = np.empty(max_k + 1, dtype=np.float64)
    inv[0] = 0.0
    for k in range(1, max_k + 1):
        inv[k] = 1.0 / k
    ptr = np.zeros(n_slots + 1, dtype=np.int64)
    genes = np.empty(bound, dtype=np.int32)
    vals = np.empty((bound, N_SUMS + 1), dtype=np.float64)
    # scratch per gene: sum, sum_sq, sum_expm1, nnz, Welford mean, Welford m2 (nonzeros)
    acc = np.zeros((n_genes, 6), dtype=np.float64)
    lut_y = np.empty(LUT, dtype=np.float64)
    lut_e = np.empty(LUT, dtype=np.float64)
    nt = 0
    for s in range(n_slots):
        base = nt
        for i in range(start[s], start[s + 1]):
            r = rows[i]
            nc = n_counts_of_row[r]
            lognorm_row_lut(nc, scale, lut_y, lut_e)
            for k in range(indptr[r], indptr[r + 1]):
                x = data[k]
                if x <= 0:
                    continue
                if x < LUT:
                    y = lut_y[x]
                    e = lut_e[x]
                else:
                    y = math.log1p(x / nc * scale)
                    e = math.expm1(y)
                g = indices[k]
                c = acc[g, NNZ] + 1.0
                if c == 1.0:
                    genes[nt] = g
                    nt += 1
                acc[g, SUM] += y
                acc[g, SUM_SQ] += y * y
                acc[g, SUM_EXPM1] += e
                acc[g, NNZ] = c
                d = y - acc[g, 4]
                acc[g, 4] += d * inv[int(c)]
                acc[g, 5] += d * (y - acc[g, 4])
        ns = n[s]
        for t in range(base, nt):
            g = genes[t]
            nz = acc[g, NNZ]
            mean_nz = acc[g, 4]
            for q in range(N_SUMS):
                vals[t, q] = acc[g, q]
            vals[t, M2] = acc[g, 5] + mean_nz * mean_nz * (nz * (ns - nz) / ns)
            for q in range(6):
                acc[g, q] = 0.0
        ptr[s + 1] = nt
    return n, ptr, genes[:nt], vals[:nt]


@numba.njit(nogil=True, cache=True)
def fold_slots(acc_n, acc_sums, acc_m2, n, ptr, genes, vals, group_of_slot):
    """Fold slot moments into the group accumulators, slot by slot in order (Chan et al.):
    m2_ab = m2_a + m2_b + (mean_b - mean_a)^2 n_a n_b / (n_a + n_b), over every gene (a gene
    the slot does not touch is a block of zeros: mean_b = 0, m2_b = 0)."""
    n_genes = acc_sums.shape[1]
    sb = np.zeros(n_genes, dtype=np.float64)
    m2b = np.zeros(n_genes, dtype=np.float64)
    for s in range(len(group_of_slot)):
        nb = n[s]
        if nb == 0:
            continue
        g = group_of_slot[s]
        na = acc_n[g]
        nab = na + nb
        if na > 0:
            for t in range(ptr[s], ptr[s + 1]):
                sb[genes[t]] = vals[t, SUM]
                m2b[genes[t]] = vals[t, M2]
            w = na * nb / nab
            for j in range(n_genes):
                delta = sb[j] / nb - acc_sums[g, j, SUM] / na
                acc_m2[g, j] += m2b[j] + delta * delta * w
            for t in range(ptr[s], ptr[s + 1]):
                sb[genes[t]] = 0.0
                m2b[genes[t]] = 0.0
        else:
            for t in range(ptr[s], ptr[s + 1]):
                acc_m2[g, genes[t]] = vals[t, M2]
        for t in range(ptr[s], ptr[s + 1]):
            j = genes[t]
            for q in range(N_SUMS):
                acc_sums[g, j, q] += vals[t, q]
        acc_n[g] = nab
