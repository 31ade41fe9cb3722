"""Preranked GSEA compatible with fgsea 1.24.0 (`fgsea()` = fgseaMultilevel).

ES, size and leading edge are deterministic and follow fgsea exactly (stable
decreasing sort of the stats, 1.24.0 leading-edge rule). NES and p-values are Monte
Carlo estimates: nPermSimple random gene sets first, then adaptive multilevel
splitting for the pathways whose p-value that cannot pin down (down to `eps`).
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import special

from cellmill.errors import InputError
from cellmill.io.gmt import matched_sizes, read_gmt
from cellmill.kernels import gsea as kern

SCORE_TYPES = {"std": kern.STD, "pos": kern.POS, "neg": kern.NEG}
COLUMNS = ["pathway", "pval", "padj", "log2err", "ES", "NES", "size", "leadingEdge"]
MAX_LEVELS = 1100  # 2^-1100 underflows a double: no p-value needs more levels


# ---------------------------------------------------------------- preparation


def prepare(stats: pd.Series, pathways: dict, min_size, max_size, gsea_param):
    """Sort stats decreasing (stable), weight them, match pathways to positions.

    Returns (genes, weights, {name: positions}) with positions the unique matched
    positions of each kept pathway in first-occurrence order, like fgsea.
    """
    if not isinstance(stats, pd.Series):
        raise TypeError("stats must be a pandas Series indexed by gene")
    genes = stats.index.astype(str)
    values = stats.to_numpy(dtype=np.float64)
    if len(values) < 2:
        raise ValueError("stats must hold at least two genes")
    if not np.all(np.isfinite(values)):
        raise ValueError("Not all stats values are finite numbers")
    if (genes == "").any():
        raise ValueError("Empty strings are not allowed as gene names in stats")
    if genes.duplicated().any():
        dups = list(genes[genes.duplicated()][:5])
        raise ValueError(f"Duplicate gene names in stats are not allowed: {dups}")
    nz = values[values != 0]
    ties = len(nz) - len(np.unique(nz))
    if ties:
        warnings.warn(
            f"There are ties in the preranked stats ({100 * ties / len(values):.2f}% of the "
            "list); like fgsea, tied genes keep their input order.",
            stacklevel=3,
        )
    order = np.argsort(-values, kind="stable")
    genes = np.asarray(genes)[order]
    weights = np.abs(values[order]) ** gsea_param
    index = {g: i for i, g in enumerate(genes)}
    n = len(genes)
    min_size = max(min_size, 1)
    max_size = n - 1 if max_size is None else min(max_size, n - 1)
    kept = {}
    for name, members in pathways.items():
        seen = dict.fromkeys(index[g] for g in members if g in index)
        if min_size <= len(seen) <= max_size:
            kept[name] = np.fromiter(seen, dtype=np.int64, count=len(seen))
    return genes, weights, kept


def gsea_stat(weights, positions, score_type="std"):
    """fgsea calcGseaStat: (ES, leading-edge positions) for one non-empty pathway."""
    s = np.sort(positions)
    m, n = len(s), len(weights)
    if m == n:
        raise ValueError("GSEA statistic is not defined when all genes are selected")
    # R's sum() and cumsum() accumulate in long double, left to right
    cum_ld = np.cumsum(weights[s].astype(np.longdouble))
    nr = np.float64(cum_ld[-1])
    if nr == 0:
        cum = np.arange(1, m + 1) / m
        step = np.full(m, 1.0 / m)
    else:
        cum = cum_ld.astype(np.float64) / nr
        step = weights[s] / nr
    tops = cum - (s - np.arange(m)) / (n - m)
    bottoms = tops - step
    max_p, min_p = tops.max(), bottoms.min()
    if score_type == "pos":
        es = max_p
    elif score_type == "neg":
        es = min_p
    else:
        es = 0.0 if max_p == -min_p else (max_p if max_p > -min_p else min_p)
    # 1.24.0 rule: up to the first max of `bottoms` (positive), from the first
    # min of `bottoms` to the end, reversed (negative)
    if score_type == "pos" or (score_type == "std" and max_p > -min_p):
        edge = s[: np.argmax(bottoms) + 1]
    elif score_type == "neg" or (score_type == "std" and max_p < -min_p):
        edge = s[np.argmin(bottoms):][::-1]
    else:
        edge = s[:0]
    return float(es), edge


# ---------------------------------------------------------------- error formulas


def trigamma(x):
    return special.polygamma(1, x)


def multilevel_error(pval, sample_size):
    """fgsea multilevelError: sd of log2(p) for the multilevel estimate."""
    pval = np.asarray(pval, dtype=float)
    return np.sqrt(
        np.floor(-np.log2(pval) + 1)
        * (trigamma((sample_size + 1) / 2) - trigamma(sample_size + 1))
    ) / math.log(2)


def simple_error(n_more, nperm):
    """sd of log2(p) for the simple estimate with n_more more-extreme random ES."""
    return np.sqrt(trigamma(n_more + 1) - trigamma(nperm + 1)) / math.log(2)


def qbeta(q, a, b):
    """R's qbeta, including the degenerate shapes a = 0 (mass at 0), b = 0 (at 1)."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    out = special.betaincinv(np.where(a > 0, a, 1.0), np.where(b > 0, b, 1.0), q)
    out = np.where(a == 0, 0.0, out)
    return np.where((b == 0) & (a > 0), 1.0, out)


def simple_is_precise(n_more, nperm, sample_size):
    """fgsea's choice: keep the simple estimate unless multilevel would be more precise."""
    with np.errstate(divide="ignore"):
        left = np.log2(qbeta(0.025, n_more, nperm - n_more + 1))
        right = np.log2(qbeta(0.975, n_more + 1, nperm - n_more))
    crude = np.log2((n_more + 1) / (nperm + 1))
    s_err = 0.5 * np.maximum(crude - left, right - crude)
    m_err = multilevel_error((n_more + 1) / (nperm + 1), sample_size)
    return m_err >= s_err


def bh_adjust(p):
    """Benjamini-Hochberg over the non-NaN values (R p.adjust ignores NAs)."""
    p = np.asarray(p, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    if len(ok) == 0:
        return out
    q = p[ok]
    m = len(q)
    o = np.argsort(-q, kind="stable")
    adj = np.minimum.accumulate(q[o] * m / np.arange(m, 0, -1))
    res = np.empty(m)
    res[o] = np.minimum(adj, 1.0)
    out[ok] = res
    return out


# ---------------------------------------------------------------- the two estimators


def simple_counts(weights, es, sizes, nperm, seed, score_type):
    """fgseaSimpleImpl counts from nperm random gene sets of each pathway's size."""
    uniq, inv = np.unique(sizes, return_inverse=True)
    several = len(es) > 1
    w = weights
    if several:
        # fgsea's cumulative calculation replaces zero weights by a tiny epsilon
        nz = np.abs(weights[weights != 0])
        tiny = nz.min() / 1024 if len(nz) else 1.0
        w = np.maximum(np.abs(weights), tiny)
    rand = kern.random_prefix_es(
        w, uniq.astype(np.int64), nperm, seed, SCORE_TYPES[score_type], several
    )[:, inv]
    return {
        "nLeEs": (rand <= es).sum(0),
        "nGeEs": (rand >= es).sum(0),
        "nLeZero": (rand <= 0).sum(0),
        "nGeZero": (rand >= 0).sum(0),
        "leZeroSum": np.minimum(rand, 0).sum(0),
        "geZeroSum": np.maximum(rand, 0).sum(0),
    }


def ruler_pvalue(ruler, es, sample_size, sign):
    """fgsea EsRuler::getPvalue: (p before R's division by P(sign), isCpGeHalf)."""
    scores, corr, stuck = ruler
    half = (sample_size + 1) // 2
    if es >= scores[-1]:
        indx = len(scores) - 1
    else:
        indx = int(np.searchsorted(scores, es, side="left"))
    k = indx // half
    remainder = sample_size - indx % half

    def bml(a, b):
        return special.digamma(a) - special.digamma(b + 1)

    log_p = k * bml(half, sample_size) + bml(remainder + 1, sample_size)
    reliable = not (stuck and es > scores[-1])
    if sign:
        return min(1.0, max(0.0, math.exp(log_p))), reliable
    cond = bml(corr[indx] + 1, remainder)
    log_p += cond
    return min(1.0, max(0.0, math.exp(log_p))), reliable and math.exp(cond) >= 0.5


def multilevel_pvalues(weights, es, size, sample_size, seed, eps, sign):
    """fgseaMultilevelCpp for the pathways of one size: (p-values, isCpGeHalf)."""
    w = np.abs(weights)
    rulers = {}
    if es.max() >= 0:
        rulers[1] = kern.es_ruler(w, size, sample_size, abs(es.max()), seed, eps, MAX_LEVELS)
    if es.min() < 0:
        rulers[-1] = kern.es_ruler(
            w[::-1].copy(), size, sample_size, abs(es.min()), seed, eps, MAX_LEVELS
        )
    out = [ruler_pvalue(rulers[1 if e >= 0 else -1], abs(e), sample_size, sign) for e in es]
    return np.array([p for p, _ in out]), np.array([h for _, h in out])


# ---------------------------------------------------------------- public API


def fgsea(
    stats: pd.Series,
    pathways: dict[str, list[str]],
    min_size: int = 1,
    max_size: int | None = None,
    gsea_param: float = 1.0,
    nperm_simple: int = 1000,
    sample_size: int = 101,
    eps: float = 1e-50,
    score_type: str = "std",
    seed: int = 0,
) -> pd.DataFrame:
    """Preranked GSEA like fgsea 1.24.0 `fgsea(pathways, stats, ...)`.

    Returns one row per pathway with min_size <= matched size <= max_size, sorted by
    name: pathway, pval, padj, log2err, ES, NES, size, leadingEdge (list of genes).
    NaN marks what fgsea reports as NA (unbalanced stats, log2err at the eps floor).
    `attrs` of the result: "multilevel" and "unbalanced" pathway names, stage "seconds".
    Results depend only on `seed` (own random streams, not numpy's global state).
    """
    if score_type not in SCORE_TYPES:
        raise ValueError(f"score_type must be one of {list(SCORE_TYPES)}, got {score_type!r}")
    if nperm_simple < 1:
        raise ValueError("nperm_simple must be >= 1")
    if sample_size < 3:
        warnings.warn("sample_size is too small, so sample_size = 3 is set.", stacklevel=2)
        sample_size = 3
    if sample_size % 2 == 0:
        sample_size += 1
    eps = max(0.0, min(1.0, float(eps)))
    genes, weights, kept = prepare(stats, pathways, min_size, max_size, gsea_param)
    if not kept:
        return pd.DataFrame({c: pd.Series(dtype=object if c in ("pathway", "leadingEdge")
                                          else float) for c in COLUMNS})
    names = list(kept)
    size = np.array([len(kept[p]) for p in names], dtype=np.int64)
    es = np.empty(len(names))
    edges = []
    for i, p in enumerate(names):
        es[i], edge = gsea_stat(weights, kept[p], score_type)
        edges.append(list(genes[edge]))

    seeds = np.random.SeedSequence(seed).generate_state(2)
    t0 = time.perf_counter()
    c = simple_counts(weights, es, size, nperm_simple, int(seeds[0]), score_type)
    t_simple = time.perf_counter() - t0
    with np.errstate(divide="ignore", invalid="ignore"):
        le_mean = c["leZeroSum"] / c["nLeZero"]
        ge_mean = c["geZeroSum"] / c["nGeZero"]
        nes = np.full(len(es), np.nan)
        if score_type == "std":
            ok = ((es > 0) & (ge_mean != 0)) | ((es <= 0) & (le_mean != 0))
            nes[ok] = (es / np.where(es > 0, ge_mean, np.abs(le_mean)))[ok]
            n_more = np.where(es > 0, c["nGeEs"], c["nLeEs"])
            mode = np.where(es >= 0, c["nGeZero"], c["nLeZero"])
        elif score_type == "pos":
            ok = (es >= 0) & (ge_mean != 0)
            nes[ok] = (es / ge_mean)[ok]
            n_more, mode = c["nGeEs"], c["nGeZero"]
        else:
            ok = (es <= 0) & (le_mean != 0)
            nes[ok] = (es / np.abs(le_mean))[ok]
            n_more, mode = c["nLeEs"], c["nLeZero"]
    pval = np.minimum((1 + c["nLeEs"]) / (1 + c["nLeZero"]), (1 + c["nGeEs"]) / (1 + c["nGeZero"]))
    pval = np.where(np.isnan(nes), np.nan, pval)
    padj = bh_adjust(pval)
    unbalanced = mode < 10
    if unbalanced.any():
        warnings.warn(
            f"There were {int(unbalanced.sum())} pathways for which P-values were not "
            "calculated properly due to unbalanced (positive and negative) gene-level "
            "statistic values; their pval, padj, NES and log2err are NaN. Try a larger "
            f"nperm_simple (for example {nperm_simple * 10}).",
            stacklevel=2,
        )
    pval[unbalanced] = np.nan
    padj[unbalanced] = np.nan
    nes[unbalanced] = np.nan
    log2err = np.where(np.isnan(pval), np.nan, simple_error(n_more, nperm_simple))

    valid = ~np.isnan(pval)
    keep_simple = simple_is_precise(n_more, nperm_simple, sample_size)
    multi = valid & ~keep_simple
    t0 = time.perf_counter()
    if multi.any():
        ml_seed = int(seeds[1])
        denom = (mode + 1) / (nperm_simple + 1)
        sign = score_type != "std"
        any_capped = False
        for s in np.unique(size[multi]):
            idx = np.flatnonzero(multi & (size == s))
            cpp_p, half_ok = multilevel_pvalues(
                weights, es[idx], int(s), sample_size, ml_seed + 7919 * int(s),
                eps * denom[idx].min(), sign,
            )
            p = np.minimum(1.0, cpp_p / denom[idx])
            pval[idx] = p
            log2err[idx] = np.where(half_ok, multilevel_error(p, sample_size), np.nan)
            any_capped |= not half_ok.all()
        if any_capped:
            warnings.warn(
                "For some of the pathways the P-values were likely overestimated. "
                "For such pathways log2err is set to NaN.",
                stacklevel=2,
            )
        low = valid & (pval < eps)
        pval[low] = eps
        log2err[low] = np.nan
        padj = bh_adjust(pval)
        if low.any():
            warnings.warn(
                f"For some pathways, in reality P-values are less than {eps}. "
                "You can set eps to zero for better estimation.",
                stacklevel=2,
            )

    res = pd.DataFrame({
        "pathway": names, "pval": pval, "padj": padj, "log2err": log2err, "ES": es,
        "NES": nes, "size": size, "leadingEdge": edges,
    })
    res = res.sort_values("pathway", kind="stable", key=_c_locale).reset_index(drop=True)
    res.attrs["multilevel"] = sorted(np.asarray(names)[multi].tolist())
    res.attrs["unbalanced"] = sorted(np.asarray(names)[unbalanced].tolist())
    res.attrs["seconds"] = {"simple": t_simple, "multilevel": time.perf_counter() - t0}
    return res


def _c_locale(col):
    # data.table::setorder sorts strings in C locale (byte order)
    return col.map(lambda s: s.encode("utf-8"))


# ---------------------------------------------------------------- command line


def read_ranks(path: str | Path) -> pd.Series:
    """A ranks CSV with columns gene, stat -> Series stat indexed by gene (file order)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "ranks file not found")
    try:
        df = pd.read_csv(path, dtype={"gene": str})
    except (ValueError, OSError) as e:
        raise InputError(path, f"cannot read ranks CSV: {e}") from None
    missing = {"gene", "stat"} - set(df.columns)
    if missing:
        raise InputError(path, f"missing column(s) {sorted(missing)}; need gene, stat")
    if df["gene"].isna().any():
        raise InputError(path, f"line {int(df['gene'].isna().to_numpy().argmax()) + 2}: no gene")
    stat = pd.to_numeric(df["stat"], errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(stat)
    if bad.any():
        raise InputError(path, f"line {int(np.argmax(bad)) + 2}: stat is not a finite number")
    dup = df["gene"].duplicated().to_numpy()
    if dup.any():
        i = int(np.argmax(dup))
        raise InputError(path, f"line {i + 2}: duplicate gene {df['gene'].iloc[i]!r}")
    return pd.Series(stat, index=df["gene"].to_numpy(), name="stat")


def to_csv_frame(res: pd.DataFrame) -> pd.DataFrame:
    out = res.copy()
    out["leadingEdge"] = out["leadingEdge"].map(";".join)
    return out


def _gmt_file(gmt, genes, ranks_csv):
    """--gmt: a file, or the built-in "hallmark" ("hallmark:mouse" / "hallmark:human"; plain
    "hallmark" picks the organism from the ranked genes)."""
    from cellmill.genesets import builtin_organisms, builtin_path, detect_organism

    orgs = builtin_organisms(str(gmt))
    if orgs is None:
        return gmt
    return builtin_path(orgs[0] if len(orgs) == 1 else detect_organism(genes, ranks_csv))


def gsea_command(ranks_csv, gmt, out_csv, **params) -> pd.DataFrame:
    """`cellmill gsea RANKS.csv --gmt FILE|hallmark[:mouse|:human] -o OUT.csv [options]`.

    params: min_size, max_size, seed, nperm_simple, sample_size, eps, score_type,
    gsea_param (None values mean the default). Prints matched-gene counts.
    """
    stats = read_ranks(ranks_csv)
    pathways = read_gmt(_gmt_file(gmt, stats.index, ranks_csv))
    params = {k.replace("-", "_"): v for k, v in params.items() if v is not None}
    sizes = matched_sizes(pathways, stats.index)
    lo = params.get("min_size", 1)
    hi = params.get("max_size", len(stats) - 1)
    tested = int(((sizes["matched"] >= lo) & (sizes["matched"] <= hi)).sum())
    print(
        f"gsea: {len(stats)} ranked genes, {len(pathways)} gene sets; matched genes per set "
        f"min {sizes['matched'].min()}, median {int(sizes['matched'].median())}, "
        f"max {sizes['matched'].max()}; {tested} sets within size limits [{lo}, {hi}]"
    )
    res = fgsea(stats, pathways, **params)
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    to_csv_frame(res).to_csv(out_csv, index=False)
    print(f"gsea: wrote {len(res)} pathways to {out_csv}")
    return res
