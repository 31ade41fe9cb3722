"""Numba kernels of the simulator: gamma-Poisson counts for a chunk of cells.

Counts are negative binomial (gamma-Poisson) with mean mu = depth * rel[g] and dispersion phi[g]
(variance mu + phi mu^2). Drawing 28k variates per cell is too slow, so each profile splits genes:
- "direct" genes (the few hundred with large means) get one NB draw each (inverse CDF);
- the others use the compound-Poisson form of the NB: NB(r = 1/phi, mu) is a Poisson number of
  clusters with rate r*log(1 + mu/r), each of Logarithmic(mu/(mu + r)) size. That rate is at most
  mu, so candidates are drawn as a Poisson process of rate depth along the cumulative rel axis
  (gene g owns an interval of length rel[g]) and kept with probability log(1+x)/x, x = mu*phi.
  Work follows the counts, not the number of genes, genes come out in order, and it is exact.
Each chunk seeds its generators itself (its own xoshiro256+ stream for the bulk of the draws,
Numba's per-thread generator for the few gamma/normal draws), so output does not depend on which
thread runs it.
"""

from __future__ import annotations

import numba
import numpy as np

_U11 = np.uint64(11)
_U17 = np.uint64(17)
_U45 = np.uint64(45)
_U19 = np.uint64(19)
_TO_UNIT = 1.0 / 9007199254740992.0  # 2**-53


@numba.njit(nogil=True, cache=True)
def seed_state(seed):
    """xoshiro256+ state from a 64-bit seed, expanded with splitmix64."""
    state = np.empty(4, dtype=np.uint64)
    z = np.uint64(seed)
    for i in range(4):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        x = z
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        state[i] = x ^ (x >> np.uint64(31))
    return state


@numba.njit(nogil=True, cache=True, inline="always")
def _uniform(s):
    """Uniform [0, 1) from xoshiro256+ (a small explicit generator: fast, and its stream is ours,
    not the thread's)."""
    result = s[0] + s[3]
    t = s[1] << _U17
    s[2] ^= s[0]
    s[3] ^= s[1]
    s[1] ^= s[2]
    s[0] ^= s[3]
    s[2] ^= t
    s[3] = (s[3] << _U45) | (s[3] >> _U19)
    return float(result >> _U11) * _TO_UNIT


@numba.njit(nogil=True, cache=True)
def _logseries(s, p):
    """Logarithmic(p) variate, P(k) = -p^k / (k log(1-p)); Kemp's LK algorithm."""
    r = 0.0
    while True:
        v = _uniform(s)
        if v >= p:
            return 1  # the usual case for small p: no logarithm needed
        if r == 0.0:
            r = np.log1p(-p)
        u = _uniform(s)
        q = -np.expm1(r * u)
        if v <= q * q:
            k = int(np.floor(1.0 + np.log(v) / np.log(q)))
            if k < 1 or v == 0.0:
                continue
            return k
        if v >= q:
            return 1
        return 2


@numba.njit(nogil=True, cache=True)
def _nb_direct(s, mu, phi):
    """NB(mean mu, dispersion phi) by inverse CDF for moderate means, else gamma then Poisson."""
    r = 1.0 / phi
    x = mu * phi
    log_p0 = -r * np.log1p(x)
    if mu > 40.0 or log_p0 < -50.0:
        return np.random.poisson(np.random.gamma(r, mu / r))
    q = x / (1.0 + x)
    pk = np.exp(log_p0)
    cdf = pk
    u = _uniform(s)
    k = 0
    while u > cdf and k < 100_000:
        k += 1
        pk *= (k - 1 + r) / k * q
        cdf += pk
    return k


@numba.njit(nogil=True, cache=True)
def _exp_gap(s, inv_depth):
    """Gap to the next candidate of a rate-depth Poisson process along the rel axis."""
    return -np.log(1.0 - _uniform(s)) * inv_depth


@numba.njit(nogil=True, cache=True)
def _draw_part(s, p, d, rel, phi, direct, n_direct, cum, bucket, step, out_idx, out_cnt):
    """Counts of one cell (profile p, depth d) as sorted gene indices and counts; returns how many.

    Direct genes get an NB draw each. The others are covered by a Poisson process of candidates
    along the cumulative rel axis (cum[p]); candidates falling in gene g's interval are thinned to
    clusters with logarithmic sizes. Both streams come out in gene order and are merged.
    The gene holding a candidate is found through equal-mass buckets of that axis: bucket b
    starts at bucket[p, b], the first gene whose interval ends beyond b * step[p].
    """
    n_genes = rel.shape[1]
    cum_p = cum[p]
    total = cum_p[n_genes - 1]
    inv_d = 1.0 / d
    nxt = _exp_gap(s, inv_d)
    j = 0
    nd = n_direct[p]
    n_buckets = bucket.shape[1]
    step_p = step[p]
    n = 0
    g = 0
    while True:
        if nxt < total:
            b = min(int(nxt / step_p), n_buckets - 1)
            while b > 0 and b * step_p > nxt:  # guard against rounding in the division
                b -= 1
            gt = max(bucket[p, b], g)
            while cum_p[gt] <= nxt:
                gt += 1
        else:
            gt = n_genes
        while j < nd and direct[p, j] < gt:
            gd = direct[p, j]
            c = _nb_direct(s, d * rel[p, gd], phi[gd])
            if c > 0:
                out_idx[n] = gd
                out_cnt[n] = c
                n += 1
            j += 1
        if gt >= n_genes:
            return n
        end = cum_p[gt]
        x = d * rel[p, gt] * phi[gt]
        c = 0
        while nxt < end:
            u = _uniform(s)
            # keep with probability log(1+x)/x (>= 1 - x/2, which usually saves the log)
            if u < 1.0 - 0.5 * x or u * x < np.log1p(x):
                c += _logseries(s, x / (1.0 + x))
            nxt += _exp_gap(s, inv_d)
        if c > 0:
            out_idx[n] = gt
            out_cnt[n] = c
            n += 1
        g = gt + 1


@numba.njit(nogil=True, cache=True)
def _merge(a_idx, a_cnt, na, b_idx, b_cnt, nb, out_idx, out_cnt):
    """Sum of two sorted sparse count vectors."""
    i = 0
    j = 0
    n = 0
    while i < na or j < nb:
        if j >= nb or (i < na and a_idx[i] < b_idx[j]):
            out_idx[n] = a_idx[i]
            out_cnt[n] = a_cnt[i]
            i += 1
        elif i >= na or b_idx[j] < a_idx[i]:
            out_idx[n] = b_idx[j]
            out_cnt[n] = b_cnt[j]
            j += 1
        else:
            out_idx[n] = a_idx[i]
            out_cnt[n] = a_cnt[i] + b_cnt[j]
            i += 1
            j += 1
        n += 1
    return n


@numba.njit(nogil=True, cache=True)
def simulate_chunk(seed, prof_a, prof_b, log_depth, depth_sd, lo, hi, rel, phi, direct, n_direct,
                   cum, bucket, step):
    """Counts for a chunk of cells, cell-major (CSC columns of the 10x matrix).

    Cell i uses profile prof_a[i] (plus prof_b[i] for a doublet, -1 otherwise) at a log-normal depth
    (mean log_depth[i], sd depth_sd); it is redrawn until its number of detected genes lies in
    [lo[i], hi[i]] (after each miss the depth is nudged toward the band).
    Returns (indptr, gene indices sorted within each cell, counts, total UMIs per cell).
    """
    state = seed_state(seed)
    np.random.seed(np.uint32(seed >> np.uint64(32)))  # Numba's generator: gamma, normal
    n_cells = prof_a.shape[0]
    n_genes = rel.shape[1]
    cap = 0
    for i in range(n_cells):
        cap += min(hi[i], n_genes)
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    indices = np.empty(cap, dtype=np.int32)
    data = np.empty(cap, dtype=np.int32)
    umis = np.zeros(n_cells, dtype=np.int64)
    a_idx = np.empty(n_genes, dtype=np.int32)
    a_cnt = np.empty(n_genes, dtype=np.int32)
    b_idx = np.empty(n_genes, dtype=np.int32)
    b_cnt = np.empty(n_genes, dtype=np.int32)
    m_idx = np.empty(n_genes, dtype=np.int32)
    m_cnt = np.empty(n_genes, dtype=np.int32)
    for i in range(n_cells):
        if lo[i] > n_genes:  # the band cannot be met: the redraws below would never end
            raise ValueError("a cell needs more detected genes than the study has genes")
    pos = 0
    for i in range(n_cells):
        nudge = 0.0
        tries = 0
        while True:
            d = np.exp(log_depth[i] + nudge + depth_sd * np.random.standard_normal())
            nt = _draw_part(state, prof_a[i], d, rel, phi, direct, n_direct, cum, bucket, step,
                            a_idx, a_cnt)
            scratch_idx, scratch_cnt = a_idx, a_cnt
            if prof_b[i] >= 0:  # doublet: a second cell of another population
                d = np.exp(log_depth[i] + nudge + depth_sd * np.random.standard_normal())
                nb = _draw_part(state, prof_b[i], d, rel, phi, direct, n_direct, cum, bucket,
                                step, b_idx, b_cnt)
                nt = _merge(a_idx, a_cnt, nt, b_idx, b_cnt, nb, m_idx, m_cnt)
                scratch_idx, scratch_cnt = m_idx, m_cnt
            if lo[i] <= nt <= hi[i]:
                break
            tries += 1
            if tries > 2000:
                raise ValueError("cannot draw a cell with the requested number of detected genes")
            nudge += 0.02 if nt < lo[i] else -0.02
        total = 0
        for j in range(nt):
            indices[pos + j] = scratch_idx[j]
            data[pos + j] = scratch_cnt[j]
            total += scratch_cnt[j]
        pos += nt
        indptr[i + 1] = pos
        umis[i] = total
    return indptr, indices[:pos].copy(), data[:pos].copy(), umis
