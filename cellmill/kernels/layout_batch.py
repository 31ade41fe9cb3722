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
_32 = np.uint64(32)


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


# x ** b for float32 x in loops that vectorise: log2 and 2^y by series in float64, within an
# ulp of x ** b rounded to float32 (powf, one call at a time, was 40% of an epoch)
_LN2 = math.log(2.0)
_LOG2_ATANH = 2.0 / math.log(2.0)  # log2(m) = this * atanh(t), t = (m - 1) / (m + 1)
_SQRT2_BITS = 0x3FB504F3  # float32 bits of sqrt(2)
_NORMAL_MIN = 0x00800000  # float32 bits of the smallest normal number


@numba.njit(nogil=True, cache=True, error_model="numpy")
def pow_many(x, m, b, out, work):
    """out[q] = x[q] ** b for float32 x[q] > 0, q < m (work: m float32 of scratch). Loops
    without branches or library calls, so they vectorise; a subnormal x or a power outside
    float32's normal range goes to the library's pow."""
    xi = x.view(np.int32)
    wi = work.view(np.int32)
    wf = work.view(np.float32)
    for q in range(m):  # x = mant 2^e, mant in [sqrt(1/2), sqrt(2)): mant to work, e to out
        bits = xi[q]
        mb = (bits & 0x7FFFFF) | 0x3F800000
        big = np.int32(mb > _SQRT2_BITS)
        wi[q] = mb - (big << 23)
        out[q] = np.float32(((bits >> 23) & 0xFF) - 127 + big)
    for q in range(m):  # b log2(x) = k + f / ln 2, |f| <= ln 2 / 2: e^f to out, k to work
        mant = np.float64(wf[q])
        t = (mant - 1.0) / (mant + 1.0)
        t2 = t * t
        lg = t * (1.0 + t2 * (1.0 / 3.0 + t2 * (1.0 / 5.0 + t2 * (1.0 / 7.0 + t2 / 9.0))))
        y = b * (np.float64(out[q]) + _LOG2_ATANH * lg)
        k = np.float64(np.int32(y + 1024.5)) - 1024.0  # floor(y + 0.5) for |y| < 1000
        f = (y - k) * _LN2
        p = 1.0 + f * (1.0 + f * (0.5 + f * (1.0 / 6.0 + f * (1.0 / 24.0 + f * (
            1.0 / 120.0 + f * (1.0 / 720.0 + f * (1.0 / 5040.0 + f / 40320.0)))))))
        out[q] = np.float32(p)
        wi[q] = np.int32(k)
    oi = out.view(np.int32)
    rare = 0
    for q in range(m):  # times 2^k: added to the exponent bits
        oi[q] += wi[q] << 23
        rare += (xi[q] < _NORMAL_MIN) | (wi[q] < -125) | (wi[q] > 127)
    if rare:
        for q in range(m):
            if xi[q] < _NORMAL_MIN or wi[q] < -125 or wi[q] > 127:
                out[q] = x[q] ** np.float32(b)


BUF = 512  # pairs whose powers are taken together


@numba.njit(parallel=True, nogil=True, cache=True)
def batch_gradients(indptr, cols, vals, r0, pos0, emb, n, a, b, gamma, neg_rate, w_max,
                    keep_from, seed, grad):
    """grad[r0 + r] = the epoch-`n` gradient of vertex r0 + r from its row r (entries
    numbered from pos0 in the whole graph), at the 2-D positions `emb` (float32, read only).
    Distances and coefficients in float32, sums in float64. A vertex's pairs (each sampled
    edge, then its negatives) are gathered BUF at a time, their powers taken together
    (pow_many), and their forces added in that same order."""
    n_vertices = emb.shape[0]
    nv = np.uint64(n_vertices)
    n_rows = len(indptr) - 1
    key = _mix(np.uint64(seed) * _GOLDEN + np.uint64(n))
    a32, b64 = np.float32(a), np.float64(np.float32(b))
    ab2, gb2 = np.float32(2.0 * a * b), np.float32(2.0 * gamma * b)
    one, tiny = np.float32(1.0), np.float32(0.001)
    inv_w_max = 1.0 / w_max
    # an edge sampled every eps >= 1 epochs draws < (eps + 1) / eps * neg_rate + 1 <=
    # 2 neg_rate + 1 negatives in an epoch (sample_counts): it always fits an empty buffer
    cap = BUF + 2 * int(math.ceil(neg_rate)) + 2
    for c in numba.prange((n_rows + CHUNK - 1) // CHUNK):
        dxs = np.empty(cap, np.float32)
        dys = np.empty(cap, np.float32)
        d2s = np.empty(cap, np.float32)
        pbs = np.empty(cap, np.float32)
        work = np.empty(cap, np.float32)
        neg = np.empty(cap, np.bool_)
        for r in range(c * CHUNK, min((c + 1) * CHUNK, n_rows)):
            i = r0 + r
            x, y = emb[i, 0], emb[i, 1]
            gx = 0.0
            gy = 0.0
            p = indptr[r]
            while True:
                m = 0
                while p < indptr[r + 1]:
                    w = vals[p]
                    if w < keep_from or not may_sample(n, w, inv_w_max):
                        p += 1
                        continue
                    hit, n_neg = sample_counts(n, w_max / w, neg_rate)
                    if not hit:
                        p += 1
                        continue
                    if m > 0 and m + 1 + n_neg > cap:
                        break  # the edge and its negatives go to the next buffer
                    j = cols[p]
                    dx, dy = x - emb[j, 0], y - emb[j, 1]
                    d2 = dx * dx + dy * dy
                    if d2 > 0.0:
                        dxs[m], dys[m], d2s[m], neg[m] = dx, dy, d2, False
                        m += 1
                    state = _mix(key ^ np.uint64(pos0 + p))
                    for _ in range(n_neg):
                        state += _GOLDEN
                        # the hash's top 32 bits scaled to [0, n): a multiply, not a
                        # 64-bit division (n < 2^32; bias < n / 2^32)
                        k = np.int64(((_mix(state) >> _32) * nv) >> _32)
                        if k == i:
                            continue
                        dx, dy = x - emb[k, 0], y - emb[k, 1]
                        d2 = dx * dx + dy * dy
                        if d2 > 0.0:
                            dxs[m], dys[m], d2s[m], neg[m] = dx, dy, d2, True
                            m += 1
                    p += 1
                if m == 0:
                    break
                pow_many(d2s, m, b64, pbs, work)
                # the forces first, in a loop without a running sum (it vectorises), then
                # their float64 sums in order
                for q in range(m):
                    d2, pb, is_neg = d2s[q], pbs[q], neg[q]
                    den = a32 * pb + one
                    c_neg = gb2 / ((tiny + d2) * den)
                    c_pos = -ab2 * (pb / d2) / den  # d2^(b - 1) = d2^b / d2
                    coeff = c_neg if is_neg else c_pos
                    # an edge's pull counts twice (i -> j and j -> i both pull i)
                    twice = np.float32(1.0) if is_neg else np.float32(2.0)
                    dxs[q] = twice * _clip(coeff * dxs[q])  # (x 2 is exact)
                    dys[q] = twice * _clip(coeff * dys[q])
                for q in range(m):
                    gx += dxs[q]
                    gy += dys[q]
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
