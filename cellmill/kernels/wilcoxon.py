"""Rank sums for Wilcoxon tests on a slab of genes of the gene-major (CSC) counts.

Cells carry a label (-1: not in the test); labels belong to strata (a stratum is one ranking:
FindAllMarkers ranks all labelled cells together; disjoint two-group contrasts are separate
strata of one pass). Per gene and stratum only the nonzeros are sorted: the zeros are one tied
block with the lowest ranks, mid-rank (n0 + 1) / 2, added by the caller from the counts. One
sort per gene and stratum serves every label in it.

y = log1p(v), v = x / n_counts * scale_factor (Seurat's operation order). The nonzeros are
sorted by v, not y: log1p is increasing, so the order is the same, and the expensive log1p is
skipped. Equal v give equal y. Distinct v more than CLOSE_ULPS apart (relative gap > 2.3e-10)
give distinct y (the relative gap shrinks by at most ~40x through log1p, far above rounding);
only runs of v closer than that (distinct count ratios x/N that near do not occur in count data,
but are handled) are re-sorted and split by y itself. So ranks and ties are exactly those of y.
Fold changes need mean expm1(y): expm1(log1p(v)) = v up to ~1e-15 relative, so v is summed.
"""

from __future__ import annotations

import math

import numba
import numpy as np

RADIX_BITS = 11
RADIX = 1 << RADIX_BITS
WIDE_BITS = 13  # digits of runs of at least WIDE_FROM keys: 8192 counters (64 KB)
WIDE_RADIX = 1 << WIDE_BITS
WIDE_FROM = 8192
SMALL = 32  # below this many values, insertion sort
# v closer than this many units in the last place (relative gap < 2^21 * 2^-52 ~ 4.7e-10, and
# more than 2^21 ulps means a relative gap > 2.3e-10) are decided by y itself
CLOSE_ULPS = 1 << 21
QUICK = 1500  # below this many values, quicksort (radix passes cost 3 x RADIX bucket sweeps)
HIGH = 32  # the radix passes sort by the bits above this one
LOW_MASK = (1 << HIGH) - 1


@numba.njit(nogil=True, cache=True)
def _insertion_sort(keys, payload, lo, hi):
    for i in range(lo + 1, hi):
        k = keys[i]
        p = payload[i]
        j = i - 1
        while j >= lo and keys[j] > k:
            keys[j + 1] = keys[j]
            payload[j + 1] = payload[j]
            j -= 1
        keys[j + 1] = k
        payload[j + 1] = p


@numba.njit(nogil=True, cache=True)
def _quicksort(keys, payload, lo, hi):
    """Sort keys[lo:hi] carrying payload: quicksort, median of three, small runs by insertion.
    Iterative (an explicit stack; recursion does not survive Numba's cache across modules):
    the larger side is pushed, the smaller one is taken next, so the stack stays < 64 deep."""
    stack = np.empty(128, dtype=np.int64)
    top = 0
    while True:
        while hi - lo > SMALL:
            mid = (lo + hi) >> 1
            a, b, c = keys[lo], keys[mid], keys[hi - 1]
            if a < b:
                pivot = b if b < c else (c if a < c else a)
            else:
                pivot = a if a < c else (c if b < c else b)
            i, j = lo, hi - 1
            while i <= j:
                while keys[i] < pivot:
                    i += 1
                while keys[j] > pivot:
                    j -= 1
                if i <= j:
                    keys[i], keys[j] = keys[j], keys[i]
                    payload[i], payload[j] = payload[j], payload[i]
                    i += 1
                    j -= 1
            if j + 1 - lo < hi - i:
                stack[top] = i
                stack[top + 1] = hi
                hi = j + 1
            else:
                stack[top] = lo
                stack[top + 1] = j + 1
                lo = i
            top += 2
        _insertion_sort(keys, payload, lo, hi)
        if top == 0:
            return
        top -= 2
        lo = stack[top]
        hi = stack[top + 1]


@numba.njit(nogil=True, cache=True)
def _sorted(keys, lo, hi):
    for i in range(lo + 1, hi):
        if keys[i] < keys[i - 1]:
            return False
    return True


@numba.njit(nogil=True, cache=True)
def sort_pairs(keys, payload, lo, hi, tmp_keys, tmp_payload, count):
    """Sort keys[lo:hi] (uint64) ascending, carrying payload: LSD radix on the upper 32 bits
    only, then the runs that share them (mostly equal keys: already in order) by a comparison
    sort. Half the radix passes of a full 64-bit sort, for the same order (any order of equal
    keys is fine for rank sums).

    The radix passes sort key - min(keys), so only the bits its span covers are digits: a
    gene's v = x / N * scale span a few binary orders of magnitude, ~25 bits above the lower
    32, split into as few passes as digits of at most 11 bits (13 for long runs, with
    `count` of WIDE_RADIX entries: two passes instead of three) allow, of equal widths."""
    n = hi - lo
    if n < QUICK:
        _quicksort(keys, payload, lo, hi)
        return
    k0 = keys[lo]
    kmin = k0
    kmax = k0
    diff = np.uint64(0)
    for i in range(lo, hi):
        k = keys[i]
        diff |= k ^ k0
        kmin = min(kmin, k)
        kmax = max(kmax, k)
    span = (kmax - kmin) >> np.uint64(HIGH)
    bits = 0
    while span >> np.uint64(bits):
        bits += 1
    widest = WIDE_BITS if n >= WIDE_FROM and len(count) >= WIDE_RADIX else RADIX_BITS
    passes = (bits + widest - 1) // widest
    width = (bits + passes - 1) // passes if passes else 0
    mask = np.uint64((1 << width) - 1)
    src_k, src_p, dst_k, dst_p = keys, payload, tmp_keys, tmp_payload
    src_lo, dst_lo = lo, 0
    for step in range(passes):
        shift = np.uint64(HIGH + step * width)
        for d in range(1 << width):
            count[d] = 0
        for i in range(src_lo, src_lo + n):
            count[((src_k[i] - kmin) >> shift) & mask] += 1
        total = 0
        for d in range(1 << width):
            c = count[d]
            count[d] = total
            total += c
        for i in range(src_lo, src_lo + n):
            d = ((src_k[i] - kmin) >> shift) & mask
            pos = dst_lo + count[d]
            count[d] += 1
            dst_k[pos] = src_k[i]
            dst_p[pos] = src_p[i]
        src_k, dst_k = dst_k, src_k
        src_p, dst_p = dst_p, src_p
        src_lo, dst_lo = dst_lo, src_lo
    if passes % 2:  # result is in the temporaries: copy back
        for i in range(n):
            keys[lo + i] = tmp_keys[i]
            payload[lo + i] = tmp_payload[i]
    if diff & np.uint64(LOW_MASK) == 0:
        return  # the lower bits are equal in every key: sorted already
    i = lo
    while i < hi:  # keys sharing (key - min) >> HIGH: contiguous now, each run sorted alone
        top = (keys[i] - kmin) >> np.uint64(HIGH)
        e = i + 1
        while e < hi and (keys[e] - kmin) >> np.uint64(HIGH) == top:
            e += 1
        if e - i > 1 and not _sorted(keys, i, e):
            _quicksort(keys, payload, i, e)
        i = e


@numba.njit(nogil=True, cache=True)
def _resolve_close(kk, ll, lo, hi, yy):
    """kk[lo:hi] (bits of v) are pairwise close: order them by y = log1p(v) (insertion sort),
    store y (as bits) in kk so that ties are equal keys."""
    for q in range(lo, hi):
        yy[q - lo] = math.log1p(np.uint64(kk[q]).view(np.float64))
    for q in range(lo + 1, hi):
        y = yy[q - lo]
        lab = ll[q]
        p = q - 1
        while p >= lo and yy[p - lo] > y:
            yy[p + 1 - lo] = yy[p - lo]
            ll[p + 1] = ll[p]
            p -= 1
        yy[p + 1 - lo] = y
        ll[p + 1] = lab
    for q in range(lo, hi):
        kk[q] = np.float64(yy[q - lo]).view(np.uint64)


@numba.njit(nogil=True, cache=True)
def rank_slab(data, indices, indptr, label_of_cell, stratum_of_label, n_labels, n_strata,
              n_counts, scale):
    """Per gene (column) of a CSC slab: for every label the sum of the ranks of its nonzeros
    within its stratum (ranks counted after the stratum's zeros), its nonzero count and its sum
    of expm1(y) (summed as v); per stratum the nonzero count and sum(t^3 - t) over tied runs of
    nonzeros.

    A gene's nonzeros are sorted once, all strata together; a walk along that order then counts
    each stratum's ranks (a stratum's values, in the gene's order, are in its own order), so
    many small strata cost one sort instead of one each. Every sum gets its terms in the same
    order as sorting each stratum alone would give them.

    Returns rank_sum (G, L), nnz (G, L), sum_expm1 (G, L), tie (G, S), nnz_stratum (G, S).
    """
    n_genes = len(indptr) - 1
    rank_sum = np.zeros((n_genes, n_labels), dtype=np.float64)
    nnz = np.zeros((n_genes, n_labels), dtype=np.int64)
    sum_e = np.zeros((n_genes, n_labels), dtype=np.float64)
    tie = np.zeros((n_genes, n_strata), dtype=np.float64)
    nnz_s = np.zeros((n_genes, n_strata), dtype=np.int64)
    max_len = 0
    for j in range(n_genes):
        max_len = max(max_len, indptr[j + 1] - indptr[j])
    keys = np.empty(max_len, dtype=np.uint64)
    labs = np.empty(max_len, dtype=np.int32)
    tmp_k = np.empty(max_len, dtype=np.uint64)
    tmp_l = np.empty(max_len, dtype=np.int32)
    # the close runs' y (rare) use the sort's scratch, free once a gene is sorted: 8 bytes a
    # value less (the densest gene of 1M cells has ~1M values; two slabs run at a time)
    yy = tmp_k.view(np.float64)
    count = np.empty(WIDE_RADIX, dtype=np.int64)
    done = np.zeros(n_strata, dtype=np.int64)  # a stratum's values walked so far
    in_run = np.zeros(n_strata, dtype=np.int64)  # its values in the current tied run
    t_acc = np.zeros(n_strata, dtype=np.float64)
    one = n_strata == 1  # then a value's stratum position is its gene position: no counter
    for j in range(n_genes):
        m = 0
        for k in range(indptr[j], indptr[j + 1]):
            c = indices[k]
            lab = label_of_cell[c]
            x = data[k]
            if lab < 0 or x <= 0:
                continue
            v = x / n_counts[c] * scale
            keys[m] = np.float64(v).view(np.uint64)  # positive doubles order as their bits
            labs[m] = lab
            m += 1
            nnz[j, lab] += 1
            sum_e[j, lab] += v
        if m == 0:
            continue
        sort_pairs(keys, labs, 0, m, tmp_k, tmp_l, count)
        # distinct but close v (never in count data, but exactness): decided by y
        close = False
        for q in range(1, m):
            d = keys[q] - keys[q - 1]
            if d != 0 and d <= CLOSE_ULPS:
                close = True
                break
        if close:
            i = 0
            while i < m:
                e = i + 1
                mixed = False
                while e < m and keys[e] - keys[e - 1] <= CLOSE_ULPS:
                    mixed |= keys[e] != keys[e - 1]
                    e += 1
                if mixed:
                    _resolve_close(keys, labs, i, e, yy)
                i = e
        for s in range(n_strata):
            done[s] = 0
            t_acc[s] = 0.0
        # tied runs: mid-rank within the stratum's nonzeros (1-based), zeros added later
        i = 0
        while i < m:
            e = i + 1
            while e < m and keys[e] == keys[i]:
                e += 1
            if e - i == 1:
                lab = labs[i]
                if one:
                    rank_sum[j, lab] += i + 1
                else:
                    s = stratum_of_label[lab]
                    done[s] += 1
                    rank_sum[j, lab] += done[s]
            else:
                if one:
                    done[0] = i
                for q in range(i, e):
                    in_run[stratum_of_label[labs[q]]] += 1
                for q in range(i, e):
                    lab = labs[q]
                    s = stratum_of_label[lab]
                    t = in_run[s]
                    if t > 0:  # the stratum's first value in the run closes its share
                        if t > 1:
                            tf = float(t)
                            t_acc[s] += tf * (tf + 1.0) * (tf - 1.0)
                        in_run[s] = -t
                    t = -in_run[s]
                    rank_sum[j, lab] += (2 * done[s] + t + 1) * 0.5
                for q in range(i, e):
                    s = stratum_of_label[labs[q]]
                    if in_run[s] < 0:
                        done[s] -= in_run[s]
                        in_run[s] = 0
            i = e
        if one:
            done[0] = m
        for s in range(n_strata):
            nnz_s[j, s] = done[s]
            tie[j, s] = t_acc[s]
    return rank_sum, nnz, sum_e, tie, nnz_s
