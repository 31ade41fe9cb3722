"""Pseudobulk counts and differential expression with the animals (samples) as replicates.

The statistics pass sums every gene's raw counts per group (grouped.py, `counts`); here the
groups of one sample x cluster are added up into an xarray Dataset kept at uns/pseudobulk:
  dims    sample, cluster, gene
  counts  (sample, cluster, gene)  raw count sums of the QC-passed cells
  n_cells (sample, cluster)        cells behind each sum
  coords  sample, cluster, gene, and per sample its condition / time point / sex (when the
          cells' metadata has them and they are constant within the sample)
Every contrast (a cluster x time point, a cluster with time points pooled, all cells) runs
edgeR's filterByExpr and TMM and limma's voom / lmFit / eBayes (pseudobulk_de.py) on the
samples with >= min_cells cells, the condition as the tested coefficient and time point and
sex as covariates where they vary; a contrast with < 2 samples in a group is skipped with the
reason stated.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

log = logging.getLogger("cellmill")

PSEUDOBULK = "pseudobulk"
ALL = "all"
POOLED = "pooled"
# p_value_cells: the cell-level two-sided Welch p of the same gene and contrast (all of its
# QC-passed cells, as the study's tests), side by side for calibration
COLUMNS = ["gene", "cluster", "timepoint", "contrast", "logFC", "AveExpr", "t", "P.Value",
           "adj.P.Val", "n_samples_case", "n_samples_control", "p_value_cells", "reason"]
MIN_SAMPLES = 2


def sample_metadata(obs: pd.DataFrame, sample_col: str, columns: list[str]) -> pd.DataFrame:
    """One row per sample (index: sample name, str, in order of first appearance) with each of
    `columns` that is constant within every sample (a column that varies inside a sample is
    not a sample property), as str ("nan" for a missing value). Works on category codes: no
    string per cell (a million cells would make hundreds of MB of them)."""
    def codes(col):
        s = obs[col]
        if not isinstance(s.dtype, pd.CategoricalDtype):
            s = s.astype("category")
        labels = np.append(np.asarray(s.cat.categories).astype(str), "nan")
        c = s.cat.codes.to_numpy().astype(np.int64)
        return np.where(c < 0, len(labels) - 1, c), labels

    sc, s_labels = codes(sample_col)
    has = sc != len(s_labels) - 1  # cells without a sample are left out
    sc = sc[has]
    present, first = np.unique(sc, return_index=True)
    order = present[np.argsort(first, kind="stable")]
    out = {}
    for c in columns:
        if c not in obs or c == sample_col:
            continue
        vc, v_labels = codes(c)
        pairs = np.unique(sc * len(v_labels) + vc[has])  # distinct (sample, value) pairs
        per_sample = np.bincount(pairs // len(v_labels), minlength=len(s_labels))
        if (per_sample[order] <= 1).all():
            value = np.empty(len(s_labels), dtype=np.int64)
            value[pairs // len(v_labels)] = pairs % len(v_labels)
            out[c] = v_labels[value[order]]
    return pd.DataFrame(out, index=pd.Index(s_labels[order], name=sample_col))


def pseudobulk_dataset(ds, sample_col: str, meta: pd.DataFrame):
    """Sum the grouped statistics' `counts` and `n` over the groups of each sample x cluster.
    The counts are a dask array computed a slab of genes at a time from `ds` when written or
    read (samples x clusters x genes grows with the samples: an atlas's would not fit)."""
    import dask.array as da
    import xarray as xr

    samples = ds[sample_col].values.astype(str)
    clusters = ds["cluster"].values.astype(str) if "cluster" in ds.coords \
        else np.full(ds.sizes["group"], ALL)
    s_levels = [s for s in meta.index if s in set(samples)]
    c_levels = list(dict.fromkeys(clusters))
    si = pd.Index(s_levels).get_indexer(samples)
    ci = pd.Index(c_levels).get_indexer(clusters)
    n_cells = np.zeros((len(s_levels), len(c_levels)), dtype=np.int64)
    np.add.at(n_cells, (si, ci), ds["n"].values)
    sums = _GroupSums(ds["counts"], si, ci, n_cells.shape)
    step = slab_genes(ds.sizes["group"])
    counts = da.from_array(sums, chunks=(max(1, sums.shape[0]), max(1, sums.shape[1]), step),
                           name=False, meta=np.empty((0, 0, 0), np.int64))
    coords = {"sample": ("sample", np.array(s_levels)),
              "cluster": ("cluster", np.array(c_levels)),
              "gene": ("gene", ds["gene"].values.astype(str))}
    for c in meta.columns:
        coords[f"sample_{c}"] = ("sample", meta.loc[s_levels, c].to_numpy().astype(str))
    return xr.Dataset({"counts": (("sample", "cluster", "gene"), counts),
                       "n_cells": (("sample", "cluster"), n_cells)}, coords=coords,
                      attrs={"sample_column": sample_col, "cells": "QC-passed",
                             "value": "sum of raw counts per sample x cluster"})


def _local(arr) -> np.ndarray:
    """A DataArray's values read in this process (the grouped statistics' planes are this
    process's scratch files: never a cluster's tasks)."""
    return np.asarray(arr.compute(scheduler="synchronous").values)


def slab_genes(rows: int, bytes_a_plane: int = 32 << 20) -> int:
    """Genes a slab when reading `rows` rows of a (rows, genes) float64/int64 plane: 4,096 (a
    stored chunk) or fewer, so that a slab stays within bytes_a_plane (at least 256)."""
    fit = bytes_a_plane // max(1, 8 * rows)
    return int(max(256, min(4096, fit // 256 * 256)))


class _GroupSums:
    """(samples, clusters, genes) sums of a (groups, genes) counts DataArray over the groups
    of each sample x cluster, computed for the genes asked for (an array-like for dask)."""

    ndim, dtype = 3, np.dtype(np.int64)

    def __init__(self, counts, si, ci, shape):
        self.counts, self.si, self.ci = counts, si, ci
        self.shape = (shape[0], shape[1], counts.shape[1])

    def __getitem__(self, key):
        s_key, c_key, g_key = key
        slab = _local(self.counts[:, g_key])
        out = np.zeros((self.shape[0], self.shape[1], slab.shape[1]), dtype=np.int64)
        np.add.at(out, (self.si, self.ci), slab)  # integer sums: exact in any order
        return out[s_key, c_key]


def write_pseudobulk(store, pb) -> None:
    import dask

    data = pb["counts"].data
    width = data.chunks[2][0] if hasattr(data, "chunks") and data.chunks[2] else 4096
    chunk = (max(1, pb.sizes["sample"]), 1, max(1, min(pb.sizes["gene"], width)))
    # the sums are read from this process's grouped statistics: on its threads, never a
    # cluster
    with dask.config.set(scheduler="threads"):
        store.write_dataset("uns", PSEUDOBULK, pb, encoding={"counts": {"chunks": chunk}})


def load_pseudobulk(store):
    """The pseudobulk Dataset written by the statistics stage (lazy)."""
    return store.read_dataset("uns", PSEUDOBULK)


# ----------------------------------------------------------------------------- contrasts

def _design(meta: pd.DataFrame, case_mask: np.ndarray, covariates: list[str]):
    """Intercept + the tested indicator (column 1) + treatment-coded covariates that vary;
    a covariate that would leave the design rank-deficient or without residual df is left
    out (in the order given: time point before sex)."""
    n = len(meta)
    cols = [np.ones(n), case_mask.astype(np.float64)]
    used = []
    for cov in covariates:
        if cov not in meta:
            continue
        levels = sorted(set(meta[cov]))
        if len(levels) < 2:
            continue
        extra = [(meta[cov].to_numpy() == lv).astype(np.float64) for lv in levels[1:]]
        trial = np.column_stack(cols + extra)
        if np.linalg.matrix_rank(trial) == trial.shape[1] and n - trial.shape[1] >= 1:
            cols += extra
            used.append(cov)
    return np.column_stack(cols), used


def run_contrast(counts: np.ndarray, meta: pd.DataFrame, case_mask: np.ndarray,
                 covariates: list[str]):
    """voom-limma of `counts` (genes x samples): the coefficient of case_mask. Returns the
    topTable frame (index: gene positions kept by filterByExpr); voom_de's ValueError when the
    design cannot be estimated."""
    from cellmill.stages.statistics.pseudobulk_de import voom_de

    design, _ = _design(meta, case_mask, covariates)
    res = voom_de(counts, np.where(case_mask, "case", "control"), design, coef=1)
    table = res.table.reset_index(drop=True)
    table.index = np.flatnonzero(res.keep)
    return table


def plan(pb, cfg, min_cells: int):
    """(cluster, timepoint label, contrast name, case samples, control samples, covariates)
    for every pseudobulk contrast: case vs control per cluster x time point, per cluster with
    time points pooled, and over all cells ("all"). (The cell-level time-point contrasts of
    the target tests have no pseudobulk twin: each is as many contrasts again over all genes,
    for a secondary question.)"""
    st = cfg.study
    cond = _coord(pb, st.condition)
    tp = _coord(pb, st.timepoint)
    has_tp = tp is not None
    tps = [t for t in st.timepoints] if has_tp else []
    clusters = [ALL] + [c for c in pb["cluster"].values.astype(str) if c != ALL]
    n_all = pb["n_cells"].values.sum(axis=1)
    n_by = {c: pb["n_cells"].values[:, i] for i, c in enumerate(pb["cluster"].values.astype(str))}
    name = f"{st.case}_vs_{st.control}"
    out = []
    for c in clusters:
        enough = (n_all if c == ALL else n_by[c]) >= min_cells
        for t in tps + [POOLED]:
            in_tp = np.ones(len(cond), bool) if t == POOLED or not has_tp else tp == t
            case = enough & in_tp & (cond == st.case)
            ctrl = enough & in_tp & (cond == st.control)
            covs = ([st.timepoint] if t == POOLED and has_tp else []) + ["sex"]
            out.append((c, t if has_tp else POOLED, name, case, ctrl, covs))
    return out


def _coord(pb, column: str):
    key = f"sample_{column}"
    return pb[key].values.astype(str) if key in pb.coords else None


def _cell_selectors(cfg, cluster: str, tp: str) -> tuple[dict, dict]:
    """The grouped-statistics selectors of the cells of one contrast (welch.contrast)."""
    st = cfg.study
    where = {} if cluster == ALL else {"cluster": cluster}
    tsel = {} if tp == POOLED else {st.timepoint: tp}
    return ({**where, st.condition: st.case, **tsel}, {**where, st.condition: st.control, **tsel})


def pseudobulk_tests(pb, cfg, min_cells: int = 10, ds=None, workers: int = 1):
    """All of `iter_pseudobulk_tests` as one table, and how many contrasts ran."""
    frames = list(iter_pseudobulk_tests(pb, cfg, min_cells, ds, workers))
    ran = sum(1 for f in frames if len(f) and f["gene"].iloc[0] != "")
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
    return table.reindex(columns=COLUMNS), ran


def iter_pseudobulk_tests(pb, cfg, min_cells: int = 10, ds=None, workers: int = 1):
    """Every planned contrast, in plan order, as a frame of COLUMNS (a skipped contrast: one
    row, no gene, the reason); with the grouped statistics `ds` (n, sum, m2 are used), each
    gene's cell-level Welch p beside it. Contrasts run on `workers` threads, a few ahead of
    the consumer (so the frames are never all in memory); the result is the same for any
    number."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor
    from itertools import islice

    from cellmill.engine.schedulers import on_a_thread

    genes = pb["gene"].values.astype(str)
    counts = _ClusterCounts(pb["counts"], keep=2 * max(1, workers))
    totals = counts.totals()  # per sample, all clusters ("all")
    meta = pd.DataFrame({c[len("sample_"):]: pb[c].values.astype(str)
                         for c in pb.coords if c.startswith("sample_")})
    clusters = list(pb["cluster"].values.astype(str))
    items = plan(pb, cfg, min_cells)
    if ds is not None:
        if list(ds["gene"].values.astype(str)) != list(genes):
            raise ValueError("grouped statistics and pseudobulk genes differ")
        ran = [(c, t) for c, t, _, case, ctrl, _ in items
               if min(int(case.sum()), int(ctrl.sum())) >= MIN_SAMPLES]
        # the cell-level p-values, on a thread beside the first contrasts' fits
        cell_p = on_a_thread(cell_level_pvalues, ds, cfg, ran)

    def one(item):
        cluster, tp, name, case, ctrl, covs = item
        n_case, n_ctrl = int(case.sum()), int(ctrl.sum())
        row = dict(cluster=cluster, timepoint=tp, contrast=name, n_samples_case=n_case,
                   n_samples_control=n_ctrl)
        if min(n_case, n_ctrl) < MIN_SAMPLES:
            why = (f"fewer than {MIN_SAMPLES} samples with >= {min_cells} cells in a group "
                   f"(case {n_case}, control {n_ctrl})")
            return pd.DataFrame([{**row, "gene": "", "reason": why}]).reindex(columns=COLUMNS)
        sel = case | ctrl
        x = totals[sel] if cluster == ALL else counts.get(clusters.index(cluster))[sel]
        try:
            table = run_contrast(np.ascontiguousarray(x.T), meta[sel].reset_index(drop=True),
                                 case[sel], [c for c in covs if c in meta])
        except ValueError as e:
            return pd.DataFrame([{**row, "gene": "", "reason": f"not estimable: {e}"}]
                                ).reindex(columns=COLUMNS)
        cols = np.asarray(table.index)
        # built in COLUMNS order here, on the worker (a reindex would copy it on the consumer)
        values = {"gene": genes[cols], **{k: table[k].to_numpy() for k in
                                          ("logFC", "AveExpr", "t", "P.Value", "adj.P.Val")},
                  **{k: np.full(len(cols), v, dtype=object if isinstance(v, str) else None)
                     for k, v in row.items()},
                  "p_value_cells": (np.full(len(cols), np.nan) if ds is None
                                    else cell_p()[(cluster, tp)][cols]),
                  "reason": np.full(len(cols), "", dtype=object)}
        return pd.DataFrame({k: values[k] for k in COLUMNS})

    items = iter(items)
    ahead = 2 * max(1, workers)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending = deque(pool.submit(one, item) for item in islice(items, ahead))
        while pending:
            frame = pending.popleft().result()
            for item in items:
                pending.append(pool.submit(one, item))
                break
            yield frame


class _ClusterCounts:
    """One cluster's (samples, genes) counts at a time from a pseudobulk counts DataArray:
    read when asked for, the last few kept (the contrasts come cluster by cluster)."""

    def __init__(self, counts, keep: int):
        import threading
        from collections import OrderedDict

        self.counts, self.keep = counts, keep
        self.kept, self.lock = OrderedDict(), threading.Lock()

    def get(self, i: int) -> np.ndarray:
        with self.lock:
            if i in self.kept:
                self.kept.move_to_end(i)
                return self.kept[i]
            x = _local(self.counts[:, i])
            self.kept[i] = x
            while len(self.kept) > self.keep:
                self.kept.popitem(last=False)
            return x

    def totals(self) -> np.ndarray:
        out = np.zeros((self.counts.shape[0], self.counts.shape[2]), dtype=np.int64)
        for i in range(self.counts.shape[1]):
            out += _local(self.counts[:, i])
        return out


def cell_level_pvalues(ds, cfg, contrasts) -> dict:
    """The cell-level two-sided Welch p of every gene for each (cluster, time point) in
    `contrasts` (case vs control cells, pooled from the grouped statistics `ds`), computed a
    slab of genes at a time: memory is one slab of two planes plus the p-values, not the
    planes (groups x genes, as many rows as clusters x samples)."""
    from cellmill.stages.statistics.welch import group_coords, pool_moments, select_groups, welch

    coords = group_coords(ds)
    g_n = np.asarray(ds["n"].values, dtype=np.float64)
    sides = {key: [select_groups(coords, **where) for where in _cell_selectors(cfg, *key)]
             for key in dict.fromkeys(contrasts)}
    n_genes, step = ds.sizes["gene"], slab_genes(ds.sizes["group"])
    out = {key: np.empty(n_genes, dtype=np.float64) for key in sides}
    for a in range(0, n_genes, step):
        b = min(a + step, n_genes)
        g_sum, g_m2 = _local(ds["sum"][:, a:b]), _local(ds["m2"][:, a:b])
        for key, idx_both in sides.items():
            moments = []
            for idx in idx_both:
                nn, sm, q = pool_moments(g_n[idx], g_sum[idx], g_m2[idx], range(len(idx)))
                with np.errstate(divide="ignore", invalid="ignore"):
                    moments.append((nn, sm / nn, q / (nn - 1)))
            out[key][a:b] = welch(*moments[0], *moments[1], "two.sided")["p_value"]
    return out


def one_sided(t: np.ndarray, p_two: np.ndarray, alternative: str = "greater") -> np.ndarray:
    """One-sided p-values from the moderated t and its two-sided p (pt is symmetric)."""
    t = np.asarray(t, dtype=np.float64)
    half = np.asarray(p_two, dtype=np.float64) / 2.0
    up = np.where(t > 0, half, 1.0 - half)
    return up if alternative == "greater" else 1.0 - up
