"""Stages `normalize` and `hvg`: LogNormalize on the fly, Seurat 4.3.0 'vst' and scaling stats.

Nothing is stored as a second matrix: LogNormalize is applied to each block as it is read
(`cellmill.kernels.lognorm`), with the scale factor recorded by `normalize` in
`uns/lognorm_scale_factor`. `hvg` makes one pass over the QC-passed cells, two at most:

1. exact integer sums of x and x^2 per gene (-> mean and variance of the counts), nonzero
   counts, each gene's 16 largest counts, and per-granule sums / centred second moments of
   the log-normalised values (-> `ln_mean`, `ln_std`, the centring and scaling ScaleData
   applies);
2. after R's loess (scikit-misc, the same netlib code) of log10(variance) on log10(mean),
   Seurat's sum of squared z-scores clipped at sqrt(N): from the integer sums (all cells,
   zeros included) with each kept count above the clip swapped for the clip. Only when a
   gene may have more clipped counts than pass 1 kept is a second pass made, summing the
   clipped squared z-scores over the nonzeros.

Float sums are per granule and folded in granule order, so results do not depend on block
size, worker count or scheduler.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellmill.config import Config, ConfigError
from cellmill.engine.passes import block_cells_for_budget, granules, stream_blocks
from cellmill.engine.registry import Context, stage
from cellmill.engine.schedulers import on_a_thread
from cellmill.errors import InputError
from cellmill.io.store import GRANULE, Store
from cellmill.kernels.lognorm import lognorm_values
from cellmill.kernels.moments import clipped_z2_nonzero, merge_largest, vst_first_pass

log = logging.getLogger("cellmill")

SCALE_FACTOR_KEY = "lognorm_scale_factor"
# Messages R's loess issues as warnings (ehg184a), not errors; scikit-misc raises them.
LOESS_WARNINGS = ("pseudoinverse used", "neighborhood radius", "reciprocal condition number",
                  "There are other near singularities", "zero-width neighborhood",
                  "k-d tree limited by memory", "Chernobyl")
HVG_COLUMNS = ("vst_mean", "vst_variance", "vst_variance_expected", "vst_variance_standardized",
               "highly_variable", "hvg_rank", "ln_mean", "ln_std")


# --------------------------------------------------------------------------- LogNormalize


def seurat_scale_factor(value: float) -> float:
    """The scale factor Seurat 4.3.0 really uses: its C++ LogNorm takes an `int`, so a
    fractional value is truncated (1e4 is unaffected)."""
    eff = float(math.trunc(value))
    if eff < 1:
        raise ConfigError(f"normalize.scale_factor {value!r}: Seurat truncates it to an "
                          "integer, which must be >= 1")
    return eff


def scale_factor(store: Store, cfg: Config | None = None) -> float:
    """The scale factor recorded by the `normalize` stage (or derived from the config)."""
    if store.has("uns", SCALE_FACTOR_KEY):
        return float(store.read_array("uns", SCALE_FACTOR_KEY)[0])
    if cfg is None:
        raise RuntimeError(f"{store.path}: the normalize stage has not run")
    return seurat_scale_factor(cfg.normalize.scale_factor)


def lognorm_csr(m: sp.csr_matrix, n_counts: np.ndarray, sf: float) -> sp.csr_matrix:
    """A CSR block of counts -> the same sparsity with log-normalised float64 values.
    n_counts: total counts of each row's cell (obs `n_counts` of those cells)."""
    m = sp.csr_matrix(m)
    vals = lognorm_values(m.data, m.indptr, np.asarray(n_counts, dtype=np.float64), float(sf))
    return sp.csr_matrix((vals, m.indices, m.indptr), shape=m.shape)


def _normalize_params(cfg: Config):
    sf = seurat_scale_factor(cfg.normalize.scale_factor)
    return {"method": "LogNormalize", "scale_factor": sf}


@stage("normalize", after=("qc",), params=_normalize_params)
def run_normalize(ctx: Context) -> None:
    from cellmill.engine.cells import qc_passed

    store = ctx.store
    sf = seurat_scale_factor(ctx.cfg.normalize.scale_factor)
    if sf != ctx.cfg.normalize.scale_factor:
        log.warning("normalize.scale_factor %s truncated to %s as Seurat does",
                    ctx.cfg.normalize.scale_factor, sf)
    mask = qc_passed(store)
    n_counts = np.asarray(store.obs_column("n_counts"))
    bad = np.flatnonzero(mask & (n_counts <= 0))
    if len(bad):
        raise InputError(store.path, f"{len(bad)} QC-passed cell(s) have no counts; "
                         "LogNormalize would divide by zero")
    store.write_array("uns", SCALE_FACTOR_KEY, np.array([sf], dtype=np.float64))


# --------------------------------------------------------------------------- vst passes


def _granule_rows(start: int, stop: int, cells: np.ndarray) -> tuple[np.ndarray, int]:
    return ((cells - start) // GRANULE).astype(np.int64), granules(start, stop)


# Largest counts kept per gene in pass 1: when no gene has more counts than this above its
# clip, the clipped variance follows from pass 1 alone and pass 2 is skipped.
TOP_K = 16


def _first_block(start, stop, m, cells, keep, n_counts, sf, floor):
    # every row of the block is read (the kernel skips the rows with keep 0: no row copy)
    gran, n_gran = _granule_rows(start, stop, cells)
    return vst_first_pass(m.data, m.indices, m.indptr, n_counts, gran, keep, n_gran,
                          m.shape[1], sf, TOP_K, floor)


def _warm_first_pass(store: Store) -> None:
    """_first_block run once on the store's first granule and thrown away (with the argument
    types a pass gives it: the floor is a column of the top's state)."""
    if store.n_cells == 0:
        return
    stop = min(GRANULE, store.n_cells)
    floor = np.zeros((store.n_genes, 8), np.int64)[:, 6]
    _first_block(0, stop, store.read_rows(0, stop), np.arange(stop), np.ones(stop, np.uint8),
                 np.ones(stop), 1e4, floor)


def _second_block(start, stop, m, cells, mu, sd, vmax):
    gran, n_gran = _granule_rows(start, stop, cells)
    return clipped_z2_nonzero(m.data, m.indices, m.indptr, gran, n_gran, mu, sd, vmax)


def centred_sum_of_squares(sx: np.ndarray, sxx: np.ndarray, n: int) -> np.ndarray:
    """n * sum (x - mean)^2 = n*sxx - sx^2 from exact integer sums, computed exactly (int64
    when it cannot overflow, else Python integers) and rounded once to float64."""
    lim = np.iinfo(np.int64).max
    if sxx.max(initial=0) <= lim // max(n, 1) and sx.max(initial=0) <= math.isqrt(lim):
        return (n * sxx - sx * sx).astype(np.float64)  # int64 -> float64 rounds to nearest
    return np.array([float(n * int(b) - int(a) * int(a))
                     for a, b in zip(sx.tolist(), sxx.tolist(), strict=True)])


def exact_count_variance(sx: np.ndarray, sxx: np.ndarray, n: int) -> np.ndarray:
    """sum (x - mean)^2 / (n - 1) from exact integer sums: (n*sxx - sx^2) / (n (n - 1)),
    so only the conversion and the division round."""
    return centred_sum_of_squares(sx, sxx, n) / float(n * (n - 1))


def first_pass(store: Store, mask: np.ndarray, sf: float, block_cells: int | None = None,
               scheduler=None, progress: bool = False) -> dict[str, np.ndarray]:
    """Pass 1: count mean/variance, nonzeros per gene, ln_mean / ln_std (n-1)."""
    n = int(mask.sum())
    g = store.n_genes
    sx = np.zeros(g, np.int64)
    sxx = np.zeros(g, np.int64)
    nnz = np.zeros(g, np.int64)
    # log-normalised moments: sum of y folded granule by granule in cell order (as
    # ordered_sum); M2 by Chan's pairwise update in the same order, each granule's M2
    # centred on its own mean, so no large sums cancel
    total = np.zeros(g, np.float64)
    run_n = 0
    run_mean = np.zeros(g, np.float64)
    run_m2 = np.zeros(g, np.float64)
    top = np.zeros((g, TOP_K), np.int32)
    top_state = np.zeros((g, 8), np.int64)  # as keep_largest's state
    mask = np.ascontiguousarray(mask, dtype=bool)
    n_counts = np.asarray(store.obs_column("n_counts"), dtype=np.float64)
    # top_state[:, 6], the smallest of each full running top, is the blocks' floor: they skip
    # counts that cannot enter it. The driver raises it as results are folded, while later
    # blocks read it: a floor only rises and any floor it had is safe, so every result is
    # the same whatever a block read (or with no floor at all)
    for (a, b), r in stream_blocks(store, _first_block, float(sf), top_state[:, 6],
                                   cell_arrays=(mask.view(np.uint8), n_counts),
                                   block_cells=block_cells, scheduler=scheduler,
                                   desc="hvg: pass 1", progress=progress):
        sx += r[0]  # integer sums: exact in any order
        sxx += r[1]
        nnz += r[2]
        merge_largest(top, top_state, r[5], r[6])  # the TOP_K largest counts so far
        counts = np.add.reduceat(mask[a:b].astype(np.int64), np.arange(0, b - a, GRANULE))
        for s_j, m2_j, n_j in zip(r[3], r[4], counts, strict=True):
            total += s_j
            if n_j == 0:
                continue
            new_n = run_n + int(n_j)
            delta = s_j / n_j - run_mean
            run_mean += delta * (n_j / new_n)
            run_m2 += m2_j + delta * delta * (run_n * n_j / new_n)
            run_n = new_n
    return {"n": n, "mean": sx.astype(np.float64) / n,
            "variance": exact_count_variance(sx, sxx, n), "nnz": nnz,
            "ln_mean": total / n, "ln_std": np.sqrt(run_m2 / (n - 1)),
            "sx": sx, "sxx": sxx, "top": top}


def loess_expected_variance(mean: np.ndarray, variance: np.ndarray, span: float,
                            where: str = "vst") -> np.ndarray:
    """Seurat: loess(log10(variance) ~ log10(mean), span) on genes with variance > 0, R's
    defaults (degree 2, gaussian, surface interpolate); 10^fitted, 0 for the other genes."""
    from skmisc.loess import loess

    fit = variance > 0
    expected = np.zeros(len(mean), np.float64)
    if fit.sum() * span < 1:  # R: "span is too small" (scikit-misc would crash)
        raise InputError(where, f"vst: only {int(fit.sum())} genes vary across the QC-passed "
                         f"cells, too few for loess with span {span}")
    lo = loess(np.log10(mean[fit]), np.log10(variance[fit]), span=span, degree=2,
               family="gaussian", surface="interpolate")
    try:
        lo.fit()
    except ValueError as e:
        # scikit-misc raises on what R's loess only warns about (near singularities with
        # few distinct means); the fit has completed and equals R's, so carry on like R.
        msg = e.args[0].decode() if e.args and isinstance(e.args[0], bytes) else str(e)
        if not msg.startswith(LOESS_WARNINGS):
            raise InputError(where, f"vst loess fit failed ({msg})") from None
        log.warning("vst loess: %s (R warns and continues; so does cellmill)", msg)
    fitted = np.asarray(lo.outputs.fitted_values, dtype=np.float64)
    expected[fit] = np.power(10.0, fitted)
    return expected


def second_pass(store: Store, mask: np.ndarray, mean: np.ndarray, sd: np.ndarray, nnz: np.ndarray,
                block_cells: int | None = None, scheduler=None,
                progress: bool = False) -> np.ndarray:
    """Pass 2: V_g = sum_c min((x - mu)/s, sqrt(N))^2 / (N - 1); 0 where s == 0."""
    n = int(mask.sum())
    vmax = math.sqrt(n)
    acc = np.zeros(store.n_genes, np.float64)
    for _, r in stream_blocks(store, _second_block, mean, sd, vmax, mask=mask,
                              block_cells=block_cells, scheduler=scheduler,
                              desc="hvg: pass 2", progress=progress):
        for row in r:  # granule order, as ordered_sum
            acc += row
    ok = sd > 0
    zeros = np.zeros_like(acc)
    zeros[ok] = ((0.0 - mean[ok]) / sd[ok]) ** 2 * (n - nnz[ok])
    out = np.zeros_like(acc)
    out[ok] = (acc[ok] + zeros[ok]) / (n - 1)
    return out


def clipped_variance_from_sums(p1: dict, mean: np.ndarray, sd: np.ndarray
                               ) -> np.ndarray | None:
    """Pass 2's V_g without reading the counts again, or None when some gene may have more
    clipped counts than pass 1 kept.

    sum_c ((x - mu)/s)^2 = (n*sxx - sx^2) / n / s^2 over all cells (zeros included), from
    exact integer sums; then each kept count whose z exceeds sqrt(N) swaps its z^2 for N.
    Every count not kept is at most the smallest kept one, so when that one is not clipped
    (or the gene has at most TOP_K nonzeros) no clipped count is missing."""
    n = int(p1["n"])
    vmax = math.sqrt(n)
    top, nnz = p1["top"], p1["nnz"]
    ok = sd > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        z_min = (top.min(axis=1).astype(np.float64) - mean) / sd
    if np.any(ok & (nnz > top.shape[1]) & (z_min > vmax)):
        return None
    out = np.zeros(len(mean), np.float64)
    ss = centred_sum_of_squares(p1["sx"], p1["sxx"], n)[ok] / n
    total = ss / (sd[ok] * sd[ok])
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (top[ok].astype(np.float64) - mean[ok, None]) / sd[ok, None]
    clipped = (top[ok] > 0) & (z > vmax)
    rows = np.flatnonzero(clipped.any(axis=1))
    for i in rows:  # few genes
        zc = z[i, clipped[i]]
        total[i] += float(np.sum(vmax * vmax - zc * zc))
    out[ok] = total / (n - 1)
    return out


def rank_hvg(mean: np.ndarray, standardized: np.ndarray, n_top: int) -> np.ndarray:
    """Rank 1..n_top by standardized variance (descending, stable), genes with mean 0 dropped;
    0 for the others."""
    cand = np.flatnonzero(mean != 0)
    order = cand[np.argsort(-standardized[cand], kind="stable")][:n_top]
    rank = np.zeros(len(mean), np.int64)
    rank[order] = np.arange(1, len(order) + 1)
    return rank


def vst(store: Store, mask: np.ndarray, sf: float, n_top: int = 2000, span: float = 0.3,
        block_cells: int | None = None, scheduler=None, progress: bool = False,
        timing: dict | None = None) -> pd.DataFrame:
    """Seurat 4.3.0 FindVariableFeatures(selection.method = "vst") on the masked cells, plus
    the scaling statistics. Returns a frame indexed like `store.var()` with HVG_COLUMNS.
    `timing` (a dict) gets the seconds spent streaming the counts and the passes made."""
    import time

    mask = np.asarray(mask, dtype=bool)
    n = int(mask.sum())
    if n < 2:
        raise InputError(store.path, f"vst needs at least 2 QC-passed cells, found {n}")
    t0 = time.perf_counter()
    p1 = first_pass(store, mask, sf, block_cells, scheduler, progress)
    seconds, passes = time.perf_counter() - t0, 1
    expected = loess_expected_variance(p1["mean"], p1["variance"], span, str(store.path))
    sd = np.sqrt(expected)
    standardized = clipped_variance_from_sums(p1, p1["mean"], sd)
    if standardized is None:
        log.info("vst: a gene has more than %d clipped counts; reading the counts again", TOP_K)
        t0 = time.perf_counter()
        standardized = second_pass(store, mask, p1["mean"], sd, p1["nnz"], block_cells,
                                   scheduler, progress)
        seconds, passes = seconds + time.perf_counter() - t0, 2
    if timing is not None:
        timing.update(seconds=round(seconds, 3), passes=passes)
    rank = rank_hvg(p1["mean"], standardized, n_top)
    return pd.DataFrame({
        "vst_mean": p1["mean"], "vst_variance": p1["variance"],
        "vst_variance_expected": expected, "vst_variance_standardized": standardized,
        "highly_variable": rank > 0, "hvg_rank": rank,
        "ln_mean": p1["ln_mean"], "ln_std": p1["ln_std"],
    }, index=store.var().index)


def hvg_table(res: pd.DataFrame) -> pd.DataFrame:
    """tables/hvg.csv: Seurat's vst columns; rank empty for genes not selected."""
    rank = pd.array(res["hvg_rank"].where(res["hvg_rank"] > 0).to_numpy(), dtype="Int64")
    return pd.DataFrame({
        "gene": res.index, "mean": res["vst_mean"].to_numpy(),
        "variance": res["vst_variance"].to_numpy(),
        "variance_expected": res["vst_variance_expected"].to_numpy(),
        "variance_standardized": res["vst_variance_standardized"].to_numpy(),
        "highly_variable": res["highly_variable"].to_numpy(), "rank": rank})


def _hvg_params(cfg: Config):
    return {"method": "vst", "n_top": cfg.hvg.n_top, "span": cfg.hvg.span,
            "clip": "sqrt(N)", "scale_stats": "ln_mean, ln_std (n-1)"}


@stage("hvg", after=("normalize",), params=_hvg_params)
def run_hvg(ctx: Context) -> dict:
    from cellmill.engine.cells import qc_passed
    from cellmill.engine.tables import write_table

    store = ctx.store
    # the pass's kernel is loaded from Numba's cache (~0.1-0.2 s) on a thread while the mask
    # and the scale factor are read, not in the first block's task
    warmed = on_a_thread(_warm_first_pass, store)
    mask = qc_passed(store)
    sf = scale_factor(store, ctx.cfg)
    warmed()
    # a block in flight holds its decoded counts (8 bytes a nonzero) and decode scratch; the
    # kernel skips left-out cells in place (no copy of the block)
    bc = block_cells_for_budget(store, ctx.cfg.compute.memory_bytes, bytes_per_nnz=16,
                                workers=ctx.cfg.compute.workers)
    timing: dict = {}
    res = vst(store, mask, sf, n_top=ctx.cfg.hvg.n_top, span=ctx.cfg.hvg.span, block_cells=bc,
              scheduler=ctx.scheduler(), progress=ctx.progress, timing=timing)
    store.update_var(**{c: res[c].to_numpy() for c in HVG_COLUMNS})
    write_table(hvg_table(res), ctx.tables / "hvg.csv")
    n_sel = int(res["highly_variable"].sum())
    if n_sel < ctx.cfg.hvg.n_top:
        log.warning("hvg: only %d genes with non-zero mean; selected all of them", n_sel)
    return {"pass": timing}  # the streaming part, for the benchmark's throughput
