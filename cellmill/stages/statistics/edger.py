"""edgeR's gene filter and TMM normalisation factors, as in edgeR 3.40 (Debian bookworm).

`filter_by_expr` is `filterByExpr(y, group = group)` with its defaults and `tmm_factors` is
`calcNormFactors(y)` (method "TMM") with its defaults, for a genes x samples count matrix.
Parity with R is tested in tests/test_pseudobulk_de.py (references from
tests/reference/pseudobulk_reference.R).

Version note: edgeR 3.40 picks the TMM reference sample as the one whose upper-quartile factor
(75th percentile of its counts / library size) is closest to the mean of those factors
(`which.min(abs(f75 - mean(f75)))`; `which.max(colSums(sqrt(x)))` when the median factor is
below 1e-20). edgeR 4 changed the rule; this module follows 3.40.
"""

from __future__ import annotations

import math

import numpy as np

TOL = 1e-14  # filterByExpr's tolerance on its count comparisons


def library_sizes(counts: np.ndarray) -> np.ndarray:
    """Column sums of a genes x samples matrix, refusing empty samples as edgeR's cpm() does."""
    lib = np.asarray(counts, dtype=np.float64).sum(axis=0)
    if not np.all(np.isfinite(lib)) or np.any(lib <= 0):
        bad = np.flatnonzero(~(lib > 0)).tolist()
        raise ValueError(f"library sizes should be finite and positive: sample(s) {bad} "
                         "have no counts")
    return lib


def _check_counts(counts) -> np.ndarray:
    x = np.asarray(counts, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"counts must be a genes x samples matrix, got {x.ndim} dimension(s)")
    if not np.all(np.isfinite(x)) or np.any(x < 0):
        raise ValueError("counts must be finite and non-negative")
    return x


def filter_by_expr(counts, group, lib_size=None, min_count: float = 10,
                   min_total_count: float = 15, large_n: int = 10,
                   min_prop: float = 0.7) -> np.ndarray:
    """Boolean mask of the genes (rows) edgeR's filterByExpr keeps.

    A gene is kept when its CPM reaches min_count / median(lib_size) * 1e6 in at least
    MinSampleSize samples (the smallest group's size; above large_n only min_prop of the excess
    counts) and its total count reaches min_total_count.
    """
    x = _check_counts(counts)
    lib = library_sizes(x) if lib_size is None else np.asarray(lib_size, dtype=np.float64)
    if lib.shape != (x.shape[1],):
        raise ValueError(f"lib_size has {lib.size} entries for {x.shape[1]} samples")
    if not np.all(np.isfinite(lib)) or np.any(lib <= 0):
        raise ValueError("library sizes should be finite and positive")
    group = np.asarray(group)
    if group.shape != (x.shape[1],):
        raise ValueError(f"group has {group.size} entries for {x.shape[1]} samples")
    _, n = np.unique(group, return_counts=True)
    min_size = float(n.min())
    if min_size > large_n:
        min_size = large_n + (min_size - large_n) * min_prop
    cutoff = min_count / np.median(lib) * 1e6
    cpm = x * (1e6 / lib)  # edgeR 3.40's calculate_cpm_raw: count * (one_million / lib)
    keep_cpm = (cpm >= cutoff).sum(axis=1) >= min_size - TOL
    keep_total = x.sum(axis=1) >= min_total_count - TOL
    return keep_cpm & keep_total


def quantile7(v: np.ndarray, p: float) -> float:
    """R's quantile(v, p) (type 7), with R's interpolation formula."""
    s = np.sort(v)
    index = (len(s) - 1) * p
    lo = math.floor(index)
    hi = math.ceil(index)
    q = s[lo]
    h = index - lo
    if index > lo and s[hi] != q:
        q = (1 - h) * q + h * s[hi]
    return float(q)


def _mean(v) -> float:
    """Mean with an exactly rounded sum (R's mean accumulates in long double)."""
    v = np.asarray(v, dtype=np.float64)
    return math.fsum(v) / len(v)


def average_ranks(v: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their mean rank (R's rank(); scipy's rankdata, without its
    general-purpose overhead: TMM ranks two vectors per sample and contrast)."""
    o = np.argsort(v, kind="stable")
    s = v[o]
    start = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first position of each run of ties
    end = np.r_[start[1:], s.size]
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[o] = np.repeat((start + 1 + end) / 2.0, end - start)
    return ranks


def tmm_factor(obs: np.ndarray, ref: np.ndarray, lib_obs: float, lib_ref: float,
               logratio_trim: float = 0.3, sum_trim: float = 0.05, do_weighting: bool = True,
               a_cutoff: float = -1e10) -> float:
    """TMM factor of one sample against the reference: 2^(trimmed, precision-weighted mean of
    the log ratios), trimming logratio_trim of the log ratios and sum_trim of the average log
    abundances at each end (edgeR's .calcFactorTMM)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        po = obs / lib_obs
        pr = ref / lib_ref
        log_r = np.log2(po / pr)
        abs_e = (np.log2(po) + np.log2(pr)) / 2
        v = (lib_obs - obs) / lib_obs / obs + (lib_ref - ref) / lib_ref / ref
    fin = np.isfinite(log_r) & np.isfinite(abs_e) & (abs_e > a_cutoff)
    log_r, abs_e, v = log_r[fin], abs_e[fin], v[fin]
    if log_r.size == 0 or np.max(np.abs(log_r)) < 1e-6:
        return 1.0
    n = log_r.size
    lo_l = math.floor(n * logratio_trim) + 1
    hi_l = n + 1 - lo_l
    lo_s = math.floor(n * sum_trim) + 1
    hi_s = n + 1 - lo_s
    rank_r = average_ranks(log_r)  # ties get their average rank, as R's rank()
    rank_e = average_ranks(abs_e)
    keep = (rank_r >= lo_l) & (rank_r <= hi_l) & (rank_e >= lo_s) & (rank_e <= hi_s)
    if do_weighting:
        lr, vk = log_r[keep], v[keep]
        ok = ~np.isnan(lr / vk)  # sum(..., na.rm = TRUE)
        num = math.fsum((lr / vk)[ok])
        ok = ~np.isnan(1 / vk)
        den = math.fsum((1 / vk)[ok])
        with np.errstate(divide="ignore", invalid="ignore"):
            f = float(np.float64(num) / np.float64(den))
    else:
        lr = log_r[keep]
        lr = lr[~np.isnan(lr)]
        f = _mean(lr) if lr.size else math.nan
    if math.isnan(f):
        f = 0.0
    return 2.0 ** f


def tmm_factors(counts, lib_size=None, ref_column: int | None = None,
                logratio_trim: float = 0.3, sum_trim: float = 0.05, do_weighting: bool = True,
                a_cutoff: float = -1e10) -> np.ndarray:
    """edgeR's calcNormFactors(method = "TMM") for a genes x samples matrix: one factor per
    sample, scaled to geometric mean 1. ref_column is 0-based (None: edgeR 3.40's rule)."""
    x = _check_counts(counts)
    n_samples = x.shape[1]
    lib = library_sizes(x) if lib_size is None else np.asarray(lib_size, dtype=np.float64)
    if lib.shape != (n_samples,):
        raise ValueError(f"lib_size has {lib.size} entries for {n_samples} samples")
    if not np.all(np.isfinite(lib)) or np.any(lib <= 0):
        raise ValueError("library sizes should be finite and positive")
    x = x[(x > 0).any(axis=1)]
    if x.shape[0] == 0 or n_samples == 1:
        return np.ones(n_samples)
    if ref_column is None:
        f75 = np.array([quantile7(x[:, j], 0.75) for j in range(n_samples)]) / lib
        if np.median(f75) < 1e-20:
            ref_column = int(np.argmax(np.sqrt(x).sum(axis=0)))
        else:
            ref_column = int(np.argmin(np.abs(f75 - _mean(f75))))
    f = np.array([tmm_factor(x[:, i], x[:, ref_column], lib[i], lib[ref_column],
                             logratio_trim, sum_trim, do_weighting, a_cutoff)
                  for i in range(n_samples)])
    return f / math.exp(_mean(np.log(f)))
