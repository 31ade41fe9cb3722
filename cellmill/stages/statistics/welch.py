"""Welch t-tests for every gene at once, from grouped moments (n, sum, m2).

R's `t.test(x, y, alternative)` (var.equal = FALSE) step by step:
  vx = var(x), stderrx = sqrt(vx / nx) (same for y), stderr = sqrt(stderrx^2 + stderry^2),
  df = stderr^4 / (stderrx^4 / (nx - 1) + stderry^4 / (ny - 1)), t = (mean x - mean y) / stderr,
  p: greater = P(T_df > t), less = P(T_df < t), two.sided = 2 P(T_df > |t|).
Where R stops with an error the result is NaN and `reason` says why: fewer than 2 values in a
group ("not enough 'x' observations"), or stderr < 10 eps max(|mean x|, |mean y|) ("data are
essentially constant").
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

ALTERNATIVES = ("greater", "less", "two.sided")
EPS = np.finfo(np.float64).eps


def pool_moments(n: np.ndarray, sums: np.ndarray, m2: np.ndarray, groups) -> tuple:
    """Combine the moments of `groups` (indices into the first axis, folded in that order with
    Chan's formula) into one group: (n, sum per gene, m2 per gene)."""
    tot_n = 0.0
    tot_s = np.zeros(sums.shape[1:], dtype=np.float64)
    tot_m2 = np.zeros(sums.shape[1:], dtype=np.float64)
    for g in groups:
        nb = float(n[g])
        if nb == 0:
            continue
        sb = np.asarray(sums[g], dtype=np.float64)
        mb = np.asarray(m2[g], dtype=np.float64)
        if tot_n == 0:
            tot_s, tot_m2 = sb.copy(), mb.copy()
        else:
            delta = sb / nb - tot_s / tot_n
            tot_m2 = tot_m2 + mb + delta * delta * (tot_n * nb / (tot_n + nb))
            tot_s = tot_s + sb
        tot_n += nb
    return tot_n, tot_s, tot_m2


def welch(n_x, mean_x, var_x, n_y, mean_y, var_y, alternative: str = "two.sided") -> dict:
    """Welch tests, vectorised (arrays broadcast). Returns t, df, p_value, reason arrays."""
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    n_x, n_y = np.asarray(n_x, dtype=np.float64), np.asarray(n_y, dtype=np.float64)
    mean_x, mean_y = np.asarray(mean_x, dtype=np.float64), np.asarray(mean_y, dtype=np.float64)
    var_x, var_y = np.asarray(var_x, dtype=np.float64), np.asarray(var_y, dtype=np.float64)
    shape = np.broadcast_shapes(n_x.shape, n_y.shape, mean_x.shape, mean_y.shape,
                                var_x.shape, var_y.shape)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        se_x = np.sqrt(var_x / n_x)
        se_y = np.sqrt(var_y / n_y)
        se = np.sqrt(se_x ** 2 + se_y ** 2)
        df = se ** 4 / (se_x ** 4 / (n_x - 1) + se_y ** 4 / (n_y - 1))
        t = (mean_x - mean_y) / se
    reason = np.full(shape, "", dtype=object)
    few_x = np.broadcast_to(n_x < 2, shape)
    few_y = np.broadcast_to(n_y < 2, shape) & ~few_x
    # R stops when stderr < 10 eps max(|mx|, |my|); stderr == 0 (both groups constant at 0)
    # gives NaN in R: both are reported as constant
    flat = ~(se >= 10 * EPS * np.maximum(np.abs(mean_x), np.abs(mean_y))) | (se == 0)
    constant = ~few_x & ~few_y & np.broadcast_to(flat, shape)
    reason[few_x] = "not enough case observations (n < 2)"
    reason[few_y] = "not enough control observations (n < 2)"
    reason[constant] = "data are essentially constant (zero variance)"
    bad = few_x | few_y | constant
    t = np.where(bad, np.nan, np.broadcast_to(t, shape))
    df = np.where(bad, np.nan, np.broadcast_to(df, shape))
    if alternative == "greater":
        p = stats.t.sf(t, df)
    elif alternative == "less":
        p = stats.t.cdf(t, df)
    else:
        p = 2 * stats.t.sf(np.abs(t), df)
    return {"t": t, "df": df, "p_value": np.where(bad, np.nan, p), "reason": reason}


def bh_adjust(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg as R's p.adjust(method = "BH"): NaN entries stay NaN and do not
    count in n."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = len(ok)
    if m == 0:
        return out
    order = np.argsort(-p[ok], kind="stable")  # decreasing, as R's order(p, decreasing = TRUE)
    ranks = m - np.arange(m)  # i = n:1
    adj = np.minimum.accumulate(m / ranks * p[ok][order])
    out[ok[order]] = np.minimum(1.0, adj)
    return out


def select_groups(coords: pd.DataFrame, **where) -> np.ndarray:
    """Indices of the groups whose coordinates match `where` (column -> value or list)."""
    keep = np.ones(len(coords), dtype=bool)
    for col, val in where.items():
        if val is None:
            continue
        vals = [val] if isinstance(val, str) or not hasattr(val, "__iter__") else list(val)
        keep &= coords[col].astype(str).isin([str(v) for v in vals]).to_numpy()
    return np.flatnonzero(keep)


def contrast(ds, case: dict, control: dict, genes=None, alternative: str = "two.sided",
             ) -> pd.DataFrame:
    """Welch test of case vs control cells for every gene (or `genes`), from a grouped-statistics
    Dataset (see statistics/grouped.py). case / control: {obs column: value or list of values};
    the matching groups are pooled (Chan's formula, in group order). Also gives Seurat's fold
    change on the CP10k scale (avg_log2FC, from the sums of expm1(y)) and the fractions of
    cells with y > 0 (pct_case, pct_control; not rounded)."""
    coords = group_coords(ds)
    sel = ds if genes is None else ds.sel(gene=list(genes))
    n = np.asarray(sel["n"].values, dtype=np.float64)
    sums = np.asarray(sel["sum"].values, dtype=np.float64)
    m2 = np.asarray(sel["m2"].values, dtype=np.float64)
    sum_e = np.asarray(sel["sum_expm1"].values, dtype=np.float64)
    nnz = np.asarray(sel["nnz"].values, dtype=np.float64)
    out = {}
    for side, where in (("case", case), ("control", control)):
        idx = select_groups(coords, **where)
        nn, s, q = pool_moments(n, sums, m2, idx)
        e = np.zeros(sums.shape[1:])
        z = np.zeros(sums.shape[1:])
        for g in idx:  # in group order
            e = e + sum_e[g]
            z = z + nnz[g]
        with np.errstate(divide="ignore", invalid="ignore"):
            out[side] = (nn, s / nn, q / (nn - 1), e / nn, z / nn)
    (nx, mx, vx, ex, px), (ny, my, vy, ey, py) = out["case"], out["control"]
    res = welch(nx, mx, vx, ny, my, vy, alternative)
    g = sel["gene"].values.astype(str)
    with np.errstate(divide="ignore", invalid="ignore"):
        fc = np.log2(ex + 1) - np.log2(ey + 1)
    return pd.DataFrame({"gene": g, "mean_case": np.broadcast_to(mx, g.shape),
                         "mean_control": np.broadcast_to(my, g.shape),
                         "n_case": int(nx), "n_control": int(ny), "t": res["t"],
                         "df": res["df"], "p_value": res["p_value"],
                         "alternative": alternative, "reason": res["reason"],
                         "avg_log2FC": fc, "pct_case": px, "pct_control": py})


def group_coords(ds) -> pd.DataFrame:
    """The group coordinates of a grouped-statistics Dataset as a DataFrame of str."""
    cols = list(ds.attrs.get("group_by", []))
    return pd.DataFrame({c: np.asarray(ds[c].values).astype(str) for c in cols})
