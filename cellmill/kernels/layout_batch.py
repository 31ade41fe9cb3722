"""The batch UMAP optimiser (stages/umap/streamed.py, `umap.optimizer = "batch"`): every gradient
of an epoch is taken at the positions the epoch started from and applied at its end (uwot's
`batch = TRUE` design), so vertices are independent within an epoch and run on all threads.

Each vertex sums its own gradient over its own row of the symmetric graph, in row order, in
float64: the attraction of a sampled edge i -> j counts twice for i (umap-learn moves both
ends of i -> j and of j -> i; here each end collects its share from its own row) and the
negatives of i -> j push i only, as in umap-learn. Which edges are sampled in an epoch and how
many negatives they draw follow umap-learn's schedule (layout.sample_counts); the negatives
come from the counter-based generator keyed by (seed, epoch, edge, sample). A thread only
writes the gradients of its own vertices, so the result is the same bit for bit for any
number of threads and any block of rows. The summed gradient then takes an Adam step
(uwot's batch optimiser), which keeps the step size sane however many edges a vertex has.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from cellmill.kernels.layout import _GOLDEN, _mix, sample_counts

CHUNK = 256  # rows per parallel work item: the result does not depend on it
_FOUR = np.float32(4.0)


@numba.njit(nogil=True, cache=True, inline="always")
def _clip(v):
    """umap-learn's clip to [-4, 4], as min / max: no branch to mispredict (a third of the
    time went to mispredicted branches)."""
    return min(max(v, -_FOUR), _FOUR)


@numba.njit(nogil=True, cache=True, inline="always")
def may_sample(n, w, inv_w_max):
    """False only when an edge of weight w is surely not sampled in epoch n: no integer
    within a hair of (n - 1) w / w_max .. n w / w_max. Multiplications only; the three
    divisions of sample_counts' exact test (a fifth of the time) run for the rest."""
    step = w * inv_w_max
    hi = n * step
    tol = 1e-12 * (hi + 1.0)  # far above the few ulps by which the two ways can differ
    return math.floor(hi + tol) > math.floor(hi - step - tol)


@numba.njit(parallel=True, nogil=True, cache=True)
def batch_gradients(indptr, cols, vals, r0, pos0, emb, n, a, b, gamma, neg_rate, w_max,
                    keep_from, seed, grad):
    """grad[r0 + r] = the epoch-`n` gradient of vertex r0 + r from its row r (entries
    numbered from pos0 in the whole graph), at the 2-D positions `emb` (float32, read only).
    Distances and coefficients in float32 (powf is the bulk of the work), sums in float64."""
    n_vertices = emb.shape[0]
    n_rows = len(indptr) - 1
    key = _mix(np.uint64(seed) * _GOLDEN + np.uint64(n))
    a32, b32 = np.float32(a), np.float32(b)
    ab2, gb2 = np.float32(2.0 * a * b), np.float32(2.0 * gamma * b)
    one, tiny = np.float32(1.0), np.float32(0.001)
    inv_w_max = 1.0 / w_max
    for c in numba.prange((n_rows + CHUNK - 1) // CHUNK):
        for r in range(c * CHUNK, min((c + 1) * CHUNK, n_rows)):
            i = r0 + r
            x, y = emb[i, 0], emb[i, 1]
            gx = 0.0
            gy = 0.0
            for p in range(indptr[r], indptr[r + 1]):
                w = vals[p]
                if w < keep_from or not may_sample(n, w, inv_w_max):
                    continue
                hit, n_neg = sample_counts(n, w_max / w, neg_rate)
                if not hit:
                    continue
                j = cols[p]
                dx, dy = x - emb[j, 0], y - emb[j, 1]
                d2 = dx * dx + dy * dy
                if d2 > 0.0:
                    pb = d2 ** b32  # one pow: d2^(b - 1) = d2^b / d2
                    coeff = -ab2 * (pb / d2) / (a32 * pb + one)
                    gx += 2.0 * _clip(coeff * dx)  # twice: i -> j and j -> i both pull i
                    gy += 2.0 * _clip(coeff * dy)
                state = _mix(key ^ np.uint64(pos0 + p))
                for _ in range(n_neg):
                    state += _GOLDEN
                    k = np.int64(_mix(state) % np.uint64(n_vertices))
                    if k == i:
                        continue
                    dx, dy = x - emb[k, 0], y - emb[k, 1]
                    d2 = dx * dx + dy * dy
                    if d2 > 0.0:
                        coeff = gb2 / ((tiny + d2) * (a32 * d2 ** b32 + one))
                        gx += _clip(coeff * dx)
                        gy += _clip(coeff * dy)
            grad[i, 0] = gx
            grad[i, 1] = gy


@numba.njit(parallel=True, nogil=True, cache=True)
def adam_step(emb, grad, m, v, alpha, beta1, beta2, bias1, bias2, eps):
    """One Adam step of every coordinate along its gradient (ascent: `grad` points where the
    vertex should go); bias1 / bias2 = 1 - beta^t of this step. m, v float64, in place."""
    n, dim = emb.shape
    for c in numba.prange((n + CHUNK - 1) // CHUNK):
        for i in range(c * CHUNK, min((c + 1) * CHUNK, n)):
            for d in range(dim):
                g = grad[i, d]
                m[i, d] = beta1 * m[i, d] + (1.0 - beta1) * g
                v[i, d] = beta2 * v[i, d] + (1.0 - beta2) * g * g
                step = (m[i, d] / bias1) / (math.sqrt(v[i, d] / bias2) + eps)
                emb[i, d] = np.float32(np.float64(emb[i, d]) + alpha * step)
