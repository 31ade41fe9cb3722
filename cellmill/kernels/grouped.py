"""Grouped moments of the log-normalised counts, per (granule, group) slot and gene.

y = log1p(x / n_counts * scale_factor), in that operation order (Seurat's LogNormalize), so the
values are bit-identical to Seurat's. Per slot and per gene with a nonzero in the slot, the
kernel returns the sum of y, of expm1(y), the nonzero count, the raw counts' sum and m2_nz,
the sum of squared deviations of the nonzero values from their mean (the Youngs-Cramer update
m2 += (c - 1) / c (y - S / (c - 1))^2, as stable as Welford's; accurate where
sum_sq - sum^2 / n cancels). Slots are folded into the group accumulators with Chan's formula
over the nonzeros only, in a fixed order; the zeros (all equal) join once at the end:
  m2 = m2_nz + mean_nz^2 nnz (n - nnz) / n,   sum_sq = m2 + sum^2 / n
(sums of terms >= 0: nothing cancels), so folding costs O(nonzero entries), not O(genes), and
the per-gene scratch of a slot is 4 doubles (the whole gene vector stays in L2).
"""

from __future__ import annotations

import math

import numba
import numpy as np

LUT = 32  # per row, y and expm1(y) of counts 1..LUT-1 are memoised (most counts are small)
EAGER_ROW = 8 * LUT  # rows with this many stored values get the whole table up front

# columns of the slot values and of the accumulators; COUNTS: the raw counts' sum (the
# pseudobulk; exact in float64 below 2^53)
SUM, SUM_EXPM1, NNZ, M2, COUNTS = 0, 1, 2, 3, 4
PACK_BITS = 20  # a slot holds < 2^20 cells, and its counts' sums stay < 2^43
PACK_MASK = (1 << PACK_BITS) - 1
N_VALS = 5


@numba.njit(nogil=True, cache=True)
def _emit(acc, acc_i, s, base, nt, genes, vals, slot_nz, start, rows, indptr, indices, n_genes):
    """Slot s's partials (its touched genes from position `base` on), with their rows of acc
    cleared for the next slot. Returns the new end of the entries."""
    # the touched genes in gene order (the fold then walks each group's planes forward,
    # not at random): found by a scan of all genes, or for a slot of few values listed
    # from its rows and sorted
    if 4 * slot_nz[s] >= n_genes:
        for g in range(n_genes):
            if acc_i[g, 3] != 0:
                genes[nt] = g
                nt += 1
    else:
        for i in range(start[s], start[s + 1]):
            for k in range(indptr[rows[i]], indptr[rows[i] + 1]):
                g = indices[k]
                if acc_i[g, 3] > 0:
                    acc_i[g, 3] = -acc_i[g, 3]  # listed
                    genes[nt] = g
                    nt += 1
        genes[base:nt].sort()
    for t in range(base, nt):
        g = genes[t]
        vals[t, SUM] = acc[g, 0]
        vals[t, SUM_EXPM1] = acc[g, 1]
        packed = abs(acc_i[g, 3])
        vals[t, NNZ] = packed & PACK_MASK
        vals[t, M2] = acc[g, 2]
        vals[t, COUNTS] = packed >> PACK_BITS
        for q in range(4):
            acc_i[g, q] = 0
    return nt


@numba.njit(nogil=True, cache=True)
def grouped_block(data, indices, indptr, slot_of_row, n_counts_of_row, scale, n_slots, n_genes):
    """grouped_block_into with new arrays: (n, ptr, genes, vals)."""
    n, ptr, genes, vals, nt = grouped_block_into(
        data, indices, indptr, slot_of_row, n_counts_of_row, scale, n_slots, n_genes,
        np.empty(0, dtype=np.int32), np.empty((0, N_VALS), dtype=np.float64))
    return n, ptr, genes[:nt], vals[:nt]


@numba.njit(nogil=True, cache=True)
def grouped_block_into(data, indices, indptr, slot_of_row, n_counts_of_row, scale, n_slots,
                       n_genes, genes, vals):
    """Moments of one CSR block of cells, per slot, for the genes a slot touches (sparse).

    slot_of_row[r]: slot of row r (-1: skip the row). Rows are taken slot by slot (in row order
    within a slot), so the dense scratch is one gene vector. Returns
      n       (n_slots,)          cells per slot
      ptr     (n_slots + 1,)      entries of slot s: ptr[s]:ptr[s + 1]
      genes   (>= nt,) int32      gene of each entry (genes with a nonzero in the slot,
                                  ascending)
      vals    (>= nt, 5)          sum y, sum expm1(y), nonzero count, m2 of the nonzeros,
                                  sum of the raw counts
      nt      the entries: genes[:nt], vals[:nt]
    The genes and vals given are used when they can hold the block's bound on its entries,
    otherwise new ones a quarter larger are made: a pass that recycles them skips the page
    faults of ~10 MB of new memory a block (a sixth of the pass's CPU at 196k cells).
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
    for r in range(n_rows):
        s = slot_of_row[r]
        if s >= 0:
            rows[fill[s]] = r
            fill[s] += 1
    # entries of a slot <= min(n_genes, its nonzeros); untouched memory costs nothing
    bound = 0
    max_nz = 1
    slot_nz = np.zeros(n_slots, dtype=np.int64)  # stored values of each slot
    for s in range(n_slots):
        nz = 0
        total = 0.0  # the slot's counts: a bound on any gene's sum of counts in it
        for i in range(start[s], start[s + 1]):
            nz += indptr[rows[i] + 1] - indptr[rows[i]]
            total += n_counts_of_row[rows[i]]
        if start[s + 1] - start[s] > PACK_MASK or total >= 2.0 ** (63 - PACK_BITS):
            raise ValueError("a slot has too many cells or counts for the packed count sums")
        slot_nz[s] = nz
        bound += min(nz, n_genes)
        max_nz = max(max_nz, nz)
    inv = np.empty(min(max_nz, n_rows) + 2, dtype=np.float64)  # 1 / k for the m2 update
    inv[0] = 0.0
    for k in range(1, len(inv)):
        inv[k] = 1.0 / k
    ptr = np.zeros(n_slots + 1, dtype=np.int64)
    if len(genes) < bound or vals.shape[0] < bound:
        genes = np.empty(bound + bound // 4, dtype=np.int32)
        vals = np.empty((bound + bound // 4, N_VALS), dtype=np.float64)
    # a gene's running sums share one 32-byte row: sum y, sum expm1(y), m2 (float64) and one
    # int64 packing its counts' sum (high bits) and nonzero count (low PACK_BITS bits), both
    # exact; one add updates both (~0.45 ns a nonzero less than a separate count array)
    acc_i = np.zeros((n_genes, 4), dtype=np.int64)
    acc = acc_i.view(np.float64)
    lut_y = np.empty(LUT, dtype=np.float64)
    lut_e = np.empty(LUT, dtype=np.float64)
    nt = 0
    for s in range(n_slots):
        base = nt
        for i in range(start[s], start[s + 1]):
            r = rows[i]
            nc = n_counts_of_row[r]
            if indptr[r + 1] - indptr[r] >= EAGER_ROW:
                for x in range(1, LUT):  # a long row meets most small counts
                    lut_y[x] = math.log1p(x / nc * scale)
                    lut_e[x] = math.expm1(lut_y[x])
            else:
                lut_y[:] = -1.0  # memoised on first use
            for k in range(indptr[r], indptr[r + 1]):
                x = data[k]
                if x <= 0:
                    continue
                if x < LUT:
                    y = lut_y[x]
                    if y < 0.0:
                        y = math.log1p(x / nc * scale)
                        lut_y[x] = y
                        lut_e[x] = math.expm1(y)
                    e = lut_e[x]
                else:
                    y = math.log1p(x / nc * scale)
                    e = math.expm1(y)
                g = indices[k]
                packed = acc_i[g, 3]
                nb = packed & PACK_MASK
                sm = acc[g, 0]
                d = y - sm * inv[nb]
                acc[g, 2] += d * d * (nb * inv[nb + 1])
                acc_i[g, 3] = packed + ((np.int64(x) << PACK_BITS) | 1)
                acc[g, 0] = sm + y
                acc[g, 1] += e
        nt = _emit(acc, acc_i, s, base, nt, genes, vals, slot_nz, start, rows, indptr, indices,
                   n_genes)
        ptr[s + 1] = nt
    return n, ptr, genes, vals, nt


@numba.njit(nogil=True, cache=True)
def fold_slots(acc_n, s_y, s_e, s_nz, s_m2, s_x, n, ptr, genes, vals, group_of_slot):
    """Fold slot moments into the group accumulators (one (groups, genes) plane per quantity:
    sum y, sum expm1(y), nonzeros, m2, raw counts), slot by slot in order. Over the nonzeros
    (Chan et al.):
    m2_ab = m2_a + m2_b + (mean_b - mean_a)^2 nnz_a nnz_b / (nnz_a + nnz_b); sums add.
    Zeros join in `finish_m2`."""
    for s in range(len(group_of_slot)):
        g = group_of_slot[s]
        acc_n[g] += n[s]
        for t in range(ptr[s], ptr[s + 1]):
            j = genes[t]
            na = s_nz[g, j]
            nb = vals[t, NNZ]
            if na == 0.0:
                s_y[g, j] = vals[t, SUM]
                s_e[g, j] = vals[t, SUM_EXPM1]
                s_nz[g, j] = nb
                s_m2[g, j] = vals[t, M2]
                s_x[g, j] = vals[t, COUNTS]
                continue
            delta = vals[t, SUM] / nb - s_y[g, j] / na
            s_m2[g, j] += vals[t, M2] + delta * delta * (na * nb / (na + nb))
            s_y[g, j] += vals[t, SUM]
            s_e[g, j] += vals[t, SUM_EXPM1]
            s_nz[g, j] = na + nb
            s_x[g, j] += vals[t, COUNTS]


@numba.njit(nogil=True, cache=True)
def finish_m2(acc_n, s_y, s_nz, s_m2, rows):
    """m2 over all cells of the groups in `rows` (the nonzeros' m2 plus the block of zeros,
    m2 = m2_nz + mean_nz^2 nnz (n - nnz) / n), in place."""
    for g in rows:
        ng = acc_n[g]
        for j in range(s_y.shape[1]):
            nz = s_nz[g, j]
            if nz > 0.0:
                mean = s_y[g, j] / nz
                s_m2[g, j] += mean * mean * (nz * (ng - nz) / ng)


@numba.njit(nogil=True, cache=True)
def sum_of_squares(n, s_y, s_m2):
    """sum y^2 = m2 + sum^2 / n of some groups' rows (n: their cell counts)."""
    out = np.zeros(s_y.shape, dtype=np.float64)
    for g in range(s_y.shape[0]):
        if n[g] > 0:
            for j in range(s_y.shape[1]):
                if s_y[g, j] != 0.0:
                    out[g, j] = s_m2[g, j] + s_y[g, j] * s_y[g, j] / n[g]
    return out
