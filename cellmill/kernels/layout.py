"""Kernels of the streamed UMAP (stages/umap/streamed.py): umap-learn's fuzzy graph and its layout
optimiser, one block of rows at a time.

The fuzzy-graph kernels follow umap-learn's smooth_knn_dist / compute_membership_strengths
in the same float32/float64 types, so the weights are umap-learn's. The optimiser does
umap-learn's updates (attraction along each sampled edge, moving both ends; negative samples
pushing the head), in the graph's row order on one thread, but without umap-learn's per-edge
state: whether an edge is sampled in an epoch, and how many negatives it draws, follow in
closed form from the epoch and epochs-per-sample, and the negatives come from a counter-based
generator keyed by (seed, epoch, edge). So only the embedding is kept between blocks, and the
result does not depend on the block size.
"""

from __future__ import annotations

import math

import numba
import numpy as np

SMOOTH_K_TOLERANCE = 1e-5  # umap-learn's constants
MIN_K_DIST_SCALE = 1e-3


@numba.njit(nogil=True, cache=True)
def smooth_knn(dist, n_neighbors, mean_all, sigma, rho):
    """Per row of `dist` (float32, ascending, self first): rho, the first nonzero distance,
    and sigma, with sum_j exp(-(d_j - rho) / sigma) = log2(n_neighbors) over j >= 1 (binary
    search, 64 steps), floored at 1e-3 x the row's (or when rho = 0 all rows') mean distance."""
    target = math.log2(n_neighbors)
    m, k = dist.shape
    for i in range(m):
        lo = 0.0
        hi = np.inf
        mid = 1.0
        r = np.float32(0.0)
        for j in range(k):
            if dist[i, j] > 0.0:
                r = dist[i, j]
                break
        rho[i] = r
        for _ in range(64):
            psum = 0.0
            for j in range(1, k):
                d = dist[i, j] - r
                if d > 0:
                    psum += math.exp(-(d / mid))
                else:
                    psum += 1.0
            if abs(psum - target) < SMOOTH_K_TOLERANCE:
                break
            if psum > target:
                hi = mid
                mid = (lo + hi) / 2.0
            else:
                lo = mid
                if hi == np.inf:
                    mid *= 2
                else:
                    mid = (lo + hi) / 2.0
        s = np.float32(mid)
        if r > 0.0:
            mean_row = 0.0
            for j in range(k):
                mean_row += dist[i, j]
            mean_row /= k
            if s < MIN_K_DIST_SCALE * mean_row:
                s = np.float32(MIN_K_DIST_SCALE * mean_row)
        elif s < MIN_K_DIST_SCALE * mean_all:
            s = np.float32(MIN_K_DIST_SCALE * mean_all)
        sigma[i] = s


@numba.njit(nogil=True, cache=True)
def memberships(rows, idx, dist, sigma, rho, out):
    """out[i, j]: the membership strength of the edge rows[i] -> idx[i, j] (float32):
    0 to itself, 1 within rho, else exp(-(d - rho) / sigma)."""
    m, k = idx.shape
    for i in range(m):
        for j in range(k):
            if idx[i, j] == rows[i]:
                out[i, j] = 0.0
            elif dist[i, j] - rho[i] <= 0.0 or sigma[i] == 0.0:
                out[i, j] = 1.0
            else:
                out[i, j] = math.exp(-((dist[i, j] - rho[i]) / sigma[i]))


@numba.njit(nogil=True, cache=True)
def fuzzy_union(rows, cols, vals, r0, n_rows, indptr, out_cols, out_vals):
    """Entries sorted by (row, col) in which a pair occurs once (one direction) or twice (both):
    merged into CSR rows r0..r0+n_rows with a + b - a * b (float32, as scipy adds then
    subtracts the product). Returns the number of entries written."""
    n = len(rows)
    q = 0
    p = 0
    for r in range(n_rows + 1):
        indptr[r] = 0
    while p < n:
        v = vals[p]
        if p + 1 < n and rows[p + 1] == rows[p] and cols[p + 1] == cols[p]:
            w = vals[p + 1]
            v = np.float32(v + w) - np.float32(v * w)
            p += 2
        else:
            p += 1
        if v != 0.0:
            out_cols[q] = cols[p - 1]
            out_vals[q] = v
            indptr[rows[p - 1] - r0 + 1] += 1
            q += 1
    for r in range(n_rows):
        indptr[r + 1] += indptr[r]
    return q


@numba.njit(nogil=True, cache=True)
def row_sums(indptr, vals, keep_from, out):
    """out[r] += the weights >= keep_from of row r (float64)."""
    for r in range(len(indptr) - 1):
        s = 0.0
        for p in range(indptr[r], indptr[r + 1]):
            if vals[p] >= keep_from:
                s += vals[p]
        out[r] += s


@numba.njit(nogil=True, cache=True)
def _root(parent, i):
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


@numba.njit(nogil=True, cache=True)
def union_rows(indptr, cols, vals, keep_from, r0, parent):
    """Union-find over the edges of rows r0.. with weight >= keep_from."""
    for r in range(len(indptr) - 1):
        for p in range(indptr[r], indptr[r + 1]):
            if vals[p] >= keep_from:
                a = _root(parent, r0 + r)
                b = _root(parent, cols[p])
                if a != b:
                    if a < b:
                        parent[b] = a
                    else:
                        parent[a] = b


@numba.njit(nogil=True, cache=True)
def count_roots(parent):
    c = 0
    for i in range(len(parent)):
        if _root(parent, i) == i:
            c += 1
    return c


@numba.njit(nogil=True, cache=True, parallel=True)
def spmv_rows(indptr, cols, vals, keep_from, x, out):
    """out[r] = sum over kept entries of row r of w * x[col] (float64), the rows spread over
    the Numba threads: each row's sum is taken by one thread in entry order, so the result is
    the same bits for any thread count."""
    for r in numba.prange(len(indptr) - 1):
        s = 0.0
        for p in range(indptr[r], indptr[r + 1]):
            if vals[p] >= keep_from:
                s += vals[p] * x[cols[p]]
        out[r] = s


# ------------------------------------------------------------------ layout

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


@numba.njit(nogil=True, cache=True, inline="always")
def _mix(z):
    """splitmix64's finaliser: a well-spread 64-bit hash of z."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@numba.njit(nogil=True, cache=True)
def sample_counts(n, eps, neg_rate):
    """(sampled in epoch n?, its number of negative samples) for an edge sampled every `eps`
    epochs: umap-learn's epoch_of_next_sample / epoch_of_next_negative_sample bookkeeping in
    closed form. The m-th sample falls in the first epoch >= m * eps, and after it
    floor(epoch / (eps / neg_rate)) - 1 negatives have been drawn in all."""
    if n < 1:
        return False, 0
    m = math.floor(n / eps)
    if m <= math.floor((n - 1) / eps):
        return False, 0
    eps_neg = eps / neg_rate
    done = 0
    if m > 1:
        prev = int(math.ceil((m - 1) * eps))  # the epoch of sample m - 1
        while math.floor(prev / eps) < m - 1:
            prev += 1
        while prev > 1 and math.floor((prev - 1) / eps) >= m - 1:
            prev -= 1
        done = int(math.floor(prev / eps_neg)) - 1
    return True, int(math.floor(n / eps_neg)) - 1 - done


@numba.njit(nogil=True, cache=True, inline="always")
def _clip(v):
    if v > 4.0:
        return 4.0
    if v < -4.0:
        return -4.0
    return v


@numba.njit(nogil=True, cache=True)
def layout_rows(indptr, cols, vals, r0, pos0, emb, n, alpha, a, b, gamma, neg_rate,
                w_max, keep_from, seed):
    """One epoch `n` of umap-learn's optimiser over rows r0.. (entries numbered from pos0
    in the whole graph), updating the float32 embedding `emb` (n_vertices x dim) in place."""
    n_vertices, dim = emb.shape
    key = _mix(np.uint64(seed) * _GOLDEN + np.uint64(n))
    for r in range(len(indptr) - 1):
        i = r0 + r
        for p in range(indptr[r], indptr[r + 1]):
            w = vals[p]
            if w < keep_from:
                continue
            hit, n_neg = sample_counts(n, w_max / w, neg_rate)
            if not hit:
                continue
            j = cols[p]
            d2 = 0.0
            for d in range(dim):
                diff = emb[i, d] - emb[j, d]
                d2 += diff * diff
            coeff = 0.0
            if d2 > 0.0:
                pb = d2 ** b  # one pow: d2^(b - 1) = d2^b / d2
                coeff = -2.0 * a * b * (pb / d2) / (a * pb + 1.0)
            for d in range(dim):
                g = _clip(coeff * (emb[i, d] - emb[j, d]))
                emb[i, d] += g * alpha
                emb[j, d] += -g * alpha
            state = _mix(key ^ np.uint64(pos0 + p))
            for _ in range(n_neg):
                state += _GOLDEN
                k = np.int64(_mix(state) % np.uint64(n_vertices))
                d2 = 0.0
                for d in range(dim):
                    diff = emb[i, d] - emb[k, d]
                    d2 += diff * diff
                if d2 > 0.0:
                    coeff = 2.0 * gamma * b / ((0.001 + d2) * (a * d2 ** b + 1.0))
                elif i == k:
                    continue
                else:
                    coeff = 0.0
                if coeff > 0.0:
                    for d in range(dim):
                        emb[i, d] += _clip(coeff * (emb[i, d] - emb[k, d])) * alpha
