"""Numba kernels of the simulator: gamma-Poisson counts for a chunk of cells.

Counts are negative binomial (gamma-Poisson) with mean mu = depth * rel[g] and dispersion phi[g]
(variance mu + phi mu^2). Drawing 28k variates per cell is too slow, so each profile splits genes:
- "direct" genes (the few hundred with large means) get one NB draw each (inverse CDF);
- the others use the compound-Poisson form of the NB: NB(r = 1/phi, mu) is a Poisson number of
  clusters with rate r*log(1 + mu/r), each of Logarithmic(mu/(mu + r)) size. That rate is at most
  mu, so candidates are drawn as a Poisson process of rate depth along the cumulative rel axis
  (gene g owns an interval of length rel[g]) and kept with probability log(1+x)/x, x = mu*phi.
  Work follows the counts, not the number of genes, genes come out in order, and it is exact.
Each chunk seeds Numba's generator itself, so output does not depend on which thread runs it.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def _logseries(p):
    """Logarithmic(p) variate, P(k) = -p^k / (k log(1-p)); Kemp's LK algorithm."""
    r = np.log1p(-p)
    while True:
        v = np.random.random()
        if v >= p:
            return 1
        u = np.random.random()
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
def _nb_direct(mu, phi):
    """NB(mean mu, dispersion phi) by inverse CDF for moderate means, else gamma then Poisson."""
    r = 1.0 / phi
    x = mu * phi
    log_p0 = -r * np.log1p(x)
    if mu > 40.0 or log_p0 < -50.0:
        return np.random.poisson(np.random.gamma(r, mu / r))
    q = x / (1.0 + x)
    pk = np.exp(log_p0)
    cdf = pk
    u = np.random.random()
    k = 0
    while u > cdf and k < 100_000:
        k += 1
        pk *= (k - 1 + r) / k * q
        cdf += pk
    return k


@numba.njit(nogil=True, cache=True)
def _exp_gap(depth):
    """Gap to the next candidate of a unit-rate Poisson process, in units of rel (1 / depth)."""
    return -np.log(1.0 - np.random.random()) / depth


@numba.njit(nogil=True, cache=True)
def _draw_cell(n_parts, profs, depths, rel, phi, is_direct, cum, out_idx, out_cnt, pos0):
    """One cell's counts (sum over its parts: 1, or 2 for a doublet), gene by gene in order.

    Direct genes get an NB draw each. The others are covered by a Poisson process of candidates
    along the cumulative rel axis (cum): candidates falling in gene g's interval are thinned to
    clusters and given logarithmic sizes. Writes sorted gene indices and counts at pos0 onward;
    returns the number of detected genes.
    """
    n_genes = rel.shape[1]
    nxt = np.empty(2)
    for t in range(n_parts):
        nxt[t] = _exp_gap(depths[t])
    nt = 0
    for g in range(n_genes):
        c = 0
        for t in range(n_parts):
            p = profs[t]
            d = depths[t]
            if is_direct[p, g]:
                c += _nb_direct(d * rel[p, g], phi[g])
            else:
                end = cum[p, g]
                while nxt[t] < end:
                    x = d * rel[p, g] * phi[g]
                    u = np.random.random()
                    # keep with probability log(1+x)/x (>= 1 - x/2, which saves the log)
                    if u < 1.0 - 0.5 * x or u * x < np.log1p(x):
                        c += _logseries(x / (1.0 + x))
                    nxt[t] += _exp_gap(d)
        if c > 0:
            out_idx[pos0 + nt] = g
            out_cnt[pos0 + nt] = c
            nt += 1
    return nt


@numba.njit(nogil=True, cache=True)
def simulate_chunk(seed, prof_a, prof_b, log_depth, depth_sd, lo, hi, rel, phi, is_direct, cum):
    """Counts for a chunk of cells, cell-major (CSC columns of the 10x matrix).

    Cell i uses profile prof_a[i] (plus prof_b[i] for a doublet, -1 otherwise) at a log-normal depth
    (mean log_depth[i], sd depth_sd); it is redrawn until its number of detected genes lies in
    [lo[i], hi[i]] (after each miss the depth is nudged toward the band).
    Returns (indptr, gene indices sorted within each cell, counts, total UMIs per cell).
    """
    np.random.seed(seed)
    n_cells = prof_a.shape[0]
    n_genes = rel.shape[1]
    cap = 0
    for i in range(n_cells):
        cap += min(hi[i], n_genes)
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    indices = np.empty(cap, dtype=np.int32)
    data = np.empty(cap, dtype=np.int32)
    umis = np.zeros(n_cells, dtype=np.int64)
    scratch_idx = np.empty(n_genes, dtype=np.int32)
    scratch_cnt = np.empty(n_genes, dtype=np.int32)
    profs = np.empty(2, dtype=np.int64)
    depths = np.empty(2)
    pos = 0
    for i in range(n_cells):
        n_parts = 1 if prof_b[i] < 0 else 2
        profs[0] = prof_a[i]
        profs[1] = prof_b[i]
        nudge = 0.0
        tries = 0
        while True:
            for t in range(n_parts):
                depths[t] = np.exp(log_depth[i] + nudge + depth_sd * np.random.standard_normal())
            nt = _draw_cell(n_parts, profs, depths, rel, phi, is_direct, cum,
                            scratch_idx, scratch_cnt, 0)
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
