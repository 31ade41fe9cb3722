"""limma's voom, lmFit, eBayes and topTable (limma 3.54, Debian bookworm) in numpy/scipy.

- `lowess` is R's stats::lowess (the clowess C routine: tricube neighbourhood weights, local
  linear fits, `iter` bisquare robustness passes, points within `delta` of the last fitted one
  interpolated), `approx_rule2` is approxfun(rule = 2, ties = list("ordered", mean)).
- `voom`: log2-CPM with offsets 0.5 / lib.size + 1, an unweighted fit, the lowess trend
  (span 0.5) of sqrt(sigma) against the average log count, weights = 1 / trend(fitted)^4.
- `lm_fit`: gene-wise (weighted) least squares by QR (coefficients, stdev.unscaled, sigma,
  df.residual, Amean). Rank-deficient designs and designs without residual df are refused with
  ValueError (R would drop the aliased coefficients; the callers skip such contrasts).
- `ebayes`: squeezeVar / fitFDist (trigamma inversion), moderated t with df.total capped at the
  pooled df, two-sided p, B (log-odds, proportion 0.01, stdev.coef.lim 0.1..4); df.prior = Inf
  when the sample variances vary less than chi-square sampling explains.
- `top_table`: logFC, AveExpr, t, P.Value, adj.P.Val (BH), B for one coefficient, gene order.
Parity with R: tests/test_pseudobulk_de.py.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import special, stats

from cellmill.kernels.lowess import clowess
from cellmill.kernels.wls import wls_fit
from cellmill.stages.statistics.welch import bh_adjust

RANK_TOL = 1e-7  # R's lm.fit / qr() (LINPACK dqrdc2) tolerance for a dependent column


# ---------------------------------------------------------------------------------------------
# lowess and approxfun


def lowess(x, y, f: float = 2 / 3, iter: int = 3, delta: float | None = None):
    """R's lowess(x, y, f, iter, delta): (x sorted ascending, fitted values at those x).
    delta defaults to 1% of the range of x, as in R."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ValueError("lowess needs two non-empty vectors of the same length")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("lowess needs finite values")
    o = np.argsort(x, kind="stable")
    xs, yv = x[o], y[o]
    if delta is None:
        delta = 0.01 * (xs[-1] - xs[0])
    return xs, clowess(xs, yv, float(f), int(iter), float(delta))


def approx_rule2(x, y, v):
    """approxfun(x, y, rule = 2, ties = list("ordered", mean))(v): x sorted ascending; tied x
    collapse to the mean of their y; linear in between, the end values outside."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    if x.size < 2:
        raise ValueError("need at least two points to interpolate")
    start = np.flatnonzero(np.r_[True, x[1:] != x[:-1]])
    if start.size < x.size:
        counts = np.diff(np.r_[start, x.size])
        base = y[start]  # mean as base + mean(deviation): exact for identical values
        y = base + np.add.reduceat(y - np.repeat(base, counts), start) / counts
        x = x[start]
    n = x.size
    if n < 2:
        raise ValueError("need at least two distinct x to interpolate")
    j = np.clip(np.searchsorted(x, v, side="right"), 1, n - 1)
    i = j - 1
    xi, xj, yi, yj = x[i], x[j], y[i], y[j]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = yi + (yj - yi) * ((v - xi) / (xj - xi))
    out = np.where(v == xj, yj, np.where(v == xi, yi, out))
    out = np.where(v < x[0], y[0], np.where(v > x[-1], y[-1], out))
    return np.where(np.isnan(v), v, out)


# ---------------------------------------------------------------------------------------------
# linear models


def check_design(design, n_samples: int | None = None) -> np.ndarray:
    """The design as a float matrix; ValueError when it is not estimable (a column that is
    (nearly) a combination of earlier ones, R's QR tolerance 1e-7) or leaves no residual df."""
    d = np.asarray(design, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError("design must be a samples x coefficients matrix")
    n, p = d.shape
    if n_samples is not None and n != n_samples:
        raise ValueError(f"design has {n} rows for {n_samples} samples")
    if not np.all(np.isfinite(d)):
        raise ValueError("design must be finite")
    if p == 0:
        raise ValueError("design has no columns")
    if p > n:
        raise ValueError(f"design not estimable: {p} coefficients for {n} samples")
    r = np.linalg.qr(d, mode="r")
    norms = np.linalg.norm(d, axis=0)
    dep = np.flatnonzero(~(np.abs(np.diag(r)) > RANK_TOL * norms))
    if dep.size:
        raise ValueError("design not estimable (rank deficient): column(s) "
                         f"{dep.tolist()} are linear combinations of the others")
    if n - p == 0:
        raise ValueError("no residual degrees of freedom: as many coefficients as samples")
    return d


def lm_fit(expr, design, weights=None) -> dict:
    """limma's lmFit(expr, design, weights) for a genes x samples matrix: coefficients and
    stdev_unscaled (genes x coefficients), sigma, df_residual, amean (row means of expr)."""
    e = np.asarray(expr, dtype=np.float64)
    if e.ndim != 2 or e.shape[0] == 0:
        raise ValueError("expression matrix must be genes x samples with at least one gene")
    if not np.all(np.isfinite(e)):
        raise ValueError("expression values must be finite")
    d = check_design(design, e.shape[1])
    g, n = e.shape
    p = d.shape[1]
    if weights is None:
        q, r = np.linalg.qr(d)
        coef = np.linalg.solve(r, q.T @ e.T).T
        rinv = np.linalg.inv(r)
        stdev = np.broadcast_to(np.sqrt((rinv * rinv).sum(axis=1)), (g, p)).copy()
        resid = e - coef @ d.T
        sigma = np.sqrt((resid * resid).sum(axis=1) / (n - p))
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != e.shape:
            w = np.broadcast_to(w, e.shape)
        if not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError("weights must be finite and positive")
        coef, stdev, sigma = wls_fit(d, np.ascontiguousarray(e), np.ascontiguousarray(w))
    return {"coefficients": coef, "stdev_unscaled": stdev, "sigma": sigma,
            "df_residual": np.full(g, float(n - p)), "amean": e.mean(axis=1), "design": d}


# ---------------------------------------------------------------------------------------------
# voom


def voom(counts, design, lib_size=None, span: float = 0.5) -> dict:
    """limma's voom(counts, design, lib.size, span): E (log2-CPM), weights (genes x samples),
    lib_size, and the trend (lowess x, y) for inspection. lib_size is the effective library
    size (edgeR: lib.size * norm.factors); default the column sums."""
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError("counts must be a genes x samples matrix")
    if c.shape[0] < 2:
        raise ValueError("need at least two genes to fit a mean-variance trend")
    if not np.all(np.isfinite(c)) or np.any(c < 0):
        raise ValueError("counts must be finite and non-negative")
    lib = c.sum(axis=0) if lib_size is None else np.asarray(lib_size, dtype=np.float64)
    if lib.shape != (c.shape[1],):
        raise ValueError(f"lib_size has {lib.size} entries for {c.shape[1]} samples")
    d = check_design(design, c.shape[1])
    e = np.log2((c + 0.5) / (lib + 1) * 1e6)
    fit = lm_fit(e, d)
    sx = fit["amean"] + np.mean(np.log2(lib + 1)) - np.log2(1e6)
    sy = np.sqrt(fit["sigma"])
    nonzero = c.sum(axis=1) != 0
    lx, ly = lowess(sx[nonzero], sy[nonzero], f=span)
    fitted = fit["coefficients"] @ d.T
    fitted_count = 1e-6 * (2.0 ** fitted * (lib + 1))
    w = 1.0 / approx_rule2(lx, ly, np.log2(fitted_count)) ** 4
    return {"E": e, "weights": w, "lib_size": lib, "design": d, "trend_x": lx, "trend_y": ly}


# ---------------------------------------------------------------------------------------------
# empirical Bayes


def trigamma_inverse(x: float) -> float:
    """limma's trigammaInverse: y with trigamma(y) = x (Newton's method from 0.5 + 1/x)."""
    if np.isnan(x):
        return x
    if x < 0:
        return math.nan
    if x > 1e7:
        return 1 / math.sqrt(x)
    if x < 1e-6:
        return 1 / x
    y = 0.5 + 1 / x
    for _ in range(51):
        tri = special.polygamma(1, y)
        dif = tri * (1 - tri / x) / special.polygamma(2, y)
        y = y + dif
        if -dif / y < 1e-8:
            break
    return float(y)


def fit_f_dist(x: np.ndarray, df1: np.ndarray) -> tuple[float, float]:
    """limma's fitFDist without covariate: (scale, df2) of a scaled F(df1, df2) fitted to x by
    moments of log(x); df2 = Inf when log(x) varies less than the df1 alone explain."""
    x = np.asarray(x, dtype=np.float64)
    df1 = np.broadcast_to(np.asarray(df1, dtype=np.float64), x.shape)
    n = x.size
    if n == 0:
        return math.nan, math.nan
    if n == 1:
        return float(x[0]), 0.0
    ok = np.isfinite(df1) & (df1 > 1e-15) & np.isfinite(x) & (x > -1e-15)
    nok = int(ok.sum())
    if nok == 0:
        return math.nan, math.nan
    if nok == 1:
        return float(x[ok][0]), 0.0
    x = np.maximum(x[ok], 0)
    df1 = df1[ok]
    m = np.median(x)
    if m == 0:
        m = 1.0  # R warns: more than half of the variances are exactly zero
    x = np.maximum(x, 1e-5 * m)
    e = np.log(x) - special.digamma(df1 / 2) + np.log(df1 / 2)
    emean = math.fsum(e) / nok
    evar = math.fsum((e - emean) ** 2) / (nok - 1)
    evar -= math.fsum(special.polygamma(1, df1 / 2)) / nok
    if evar > 0:
        df2 = 2 * trigamma_inverse(evar)
        s20 = math.exp(emean + special.digamma(df2 / 2) - math.log(df2 / 2))
    else:
        df2 = math.inf
        s20 = math.fsum(x) / nok
    return float(s20), float(df2)


def squeeze_var(var: np.ndarray, df: np.ndarray) -> dict:
    """limma's squeezeVar (no covariate, not robust): df_prior, var_prior, var_post."""
    var = np.array(var, dtype=np.float64)
    df = np.broadcast_to(np.asarray(df, dtype=np.float64), var.shape)
    if var.size == 0:
        raise ValueError("var is empty")
    if var.size == 1:
        return {"df_prior": 0.0, "var_prior": float(var[0]), "var_post": var}
    var[df == 0] = 0
    s20, df2 = fit_f_dist(var, df)
    if math.isnan(df2):
        raise ValueError("could not estimate the prior degrees of freedom")
    if math.isinf(df2):
        post = np.full(var.shape, s20)
    else:
        post = (df * var + df2 * s20) / (df + df2)
    return {"df_prior": df2, "var_prior": s20, "var_post": post}


def _tmixture(tstat, stdev, df, proportion, lim) -> float:
    """limma's tmixture.vector: the prior variance of the non-null coefficients, from the
    largest |t| (a proportion/2 of the genes)."""
    ok = ~np.isnan(tstat)
    tstat, stdev, df = np.abs(tstat[ok]), stdev[ok], df[ok]
    ngenes = tstat.size
    ntarget = math.ceil(proportion / 2 * ngenes)
    if ntarget < 1:
        return math.nan
    p = max(ntarget / ngenes, proportion)
    max_df = df.max()
    low = df < max_df
    if low.any():  # put every t on the largest df's scale, through its tail probability
        tstat = tstat.copy()
        tstat[low] = stats.t.isf(np.exp(stats.t.logsf(tstat[low], df[low])), max_df)
    o = np.argsort(-tstat, kind="stable")[:ntarget]
    tstat = tstat[o]
    v1 = stdev[o] ** 2
    r = np.arange(1, ntarget + 1)
    p0 = 2 * stats.t.sf(tstat, max_df)
    ptarget = ((r - 0.5) / ngenes - (1 - p) * p0) / p
    v0 = np.zeros(ntarget)
    pos = ptarget > p0
    if pos.any():
        qtarget = stats.t.isf(ptarget[pos] / 2, max_df)
        v0[pos] = v1[pos] * ((tstat[pos] / qtarget) ** 2 - 1)
    v0 = np.clip(v0, lim[0], lim[1])
    return math.fsum(v0) / ntarget


def ebayes(fit: dict, proportion: float = 0.01, stdev_coef_lim=(0.1, 4.0),
           coefs=None) -> dict:
    """limma's eBayes(fit) (trend = FALSE, robust = FALSE): the fit plus t, p_value, lods,
    df_prior, s2_prior, s2_post, df_total, var_prior (per coefficient). With `coefs` (0-based
    columns), p_value, var_prior and lods are computed for those columns only (NaN in the
    others): each column's tail probabilities cost more than the fit."""
    coef = fit["coefficients"]
    stdev = fit["stdev_unscaled"]
    sigma = fit["sigma"]
    df_res = np.asarray(fit["df_residual"], dtype=np.float64)
    if np.max(df_res) == 0:
        raise ValueError("no residual degrees of freedom in the linear model fits")
    if not np.any(np.isfinite(sigma)):
        raise ValueError("no finite residual standard deviations")
    sq = squeeze_var(sigma ** 2, df_res)
    df_prior, s2_prior, s2_post = sq["df_prior"], sq["var_prior"], sq["var_post"]
    t = coef / stdev / np.sqrt(s2_post)[:, None]
    df_total = np.minimum(df_res + df_prior, np.nansum(df_res))
    cols = range(t.shape[1]) if coefs is None else sorted(set(int(c) for c in coefs))
    p = np.full(t.shape, np.nan)
    var_prior = np.full(t.shape[1], np.nan)
    lim = np.asarray(stdev_coef_lim, dtype=np.float64) ** 2 / s2_prior  # median of a scalar
    for j in cols:
        p[:, j] = 2 * special.stdtr(df_total, -np.abs(t[:, j]))  # 2 t.sf(|t|, df)
        var_prior[j] = _tmixture(t[:, j], stdev[:, j], df_total, proportion, lim)
        if np.isnan(var_prior[j]):
            var_prior[j] = 1 / s2_prior
    r = (stdev ** 2 + var_prior) / stdev ** 2
    t2 = t ** 2
    if df_prior > 1e6:
        kernel = t2 * (1 - 1 / r) / 2
    else:
        dft = df_total[:, None]
        kernel = (1 + dft) / 2 * np.log((t2 + dft) / (t2 / r + dft))
    lods = math.log(proportion / (1 - proportion)) - np.log(r) / 2 + kernel
    return {**fit, "t": t, "p_value": p, "lods": lods, "df_prior": df_prior,
            "s2_prior": s2_prior, "s2_post": s2_post, "df_total": df_total,
            "var_prior": var_prior}


def top_table(fit: dict, coef: int, genes=None) -> pd.DataFrame:
    """limma's topTable(fit, coef, number = Inf, sort.by = "none") for one coefficient
    (0-based column of the design): logFC, AveExpr, t, P.Value, adj.P.Val (BH), B."""
    k = int(coef)
    if not 0 <= k < fit["coefficients"].shape[1]:
        raise ValueError(f"coef {coef} is not a column of the design "
                         f"(0..{fit['coefficients'].shape[1] - 1})")
    p = fit["p_value"][:, k]
    return pd.DataFrame({"logFC": fit["coefficients"][:, k], "AveExpr": fit["amean"],
                         "t": fit["t"][:, k], "P.Value": p, "adj.P.Val": bh_adjust(p),
                         "B": fit["lods"][:, k]},
                        index=None if genes is None else pd.Index(genes, name="gene"))
