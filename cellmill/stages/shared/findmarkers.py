"""The FindMarkers / FindAllMarkers method (Seurat 4.3.0 with limma installed).

Per gene, on the log-normalised values y = log1p(x / n_counts * scale_factor) of the cells in
the test (QC-passed cells by default):
  avg_log2FC = log2(mean_1(expm1(y)) + 1) - log2(mean_2(expm1(y)) + 1)      (CP10k scale;
               expm1(y) = x / n_counts * scale_factor up to ~1e-15 relative, which is summed)
  pct.k      = fraction of group k with y > 0, rounded to 3 decimals as R's round()
  tested     : max(pct.1, pct.2) >= min_pct and avg_log2FC >= logfc_threshold (only_pos) or
               |avg_log2FC| >= logfc_threshold; with only_pos, avg_log2FC > 0 after the test
  p_val      : Wilcoxon rank-sum, normal approximation with tie and continuity correction,
               two-sided (limma::rankSumTestWithCorrelation as Seurat calls it: all values tied
               -> p = 1); identical to scipy.stats.mannwhitneyu(use_continuity=True,
               method="asymptotic")
  p_val_adj  : min(1, p_val * number of genes in the store)
FindMarkers' rows are sorted by p_val (equal p-values in gene order: Seurat's
order(p_val, -de.results[, 1]) names p_val twice); FindAllMarkers: each cluster against all other
cells, rows sorted by (p_val, -avg_log2FC) (stable), p_val < return_thresh, clusters in level
order.

Computed on the gene-major copy: per gene one sort of the nonzeros serves every cluster (zeros
are one tied block). Many disjoint two-group contrasts share one pass (`find_markers_many`).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
from scipy import special

from cellmill.io.heap import release_heap
from cellmill.io.store import Store
from cellmill.kernels import wilcoxon as kern

log = logging.getLogger("cellmill")

COLUMNS = ["p_val", "avg_log2FC", "pct.1", "pct.2", "p_val_adj"]
ALL_COLUMNS = COLUMNS + ["cluster", "gene"]
SLAB_NNZ_MAX = 1 << 24  # nonzeros per gene slab task (about 128 MB in flight with buffers)


# ------------------------------------------------------------------------------- helpers

def r_round(x: np.ndarray, digits: int = 3) -> np.ndarray:
    """R (>= 4.0.0)'s round(x, digits) for x >= 0: the nearer of the two decimal candidates,
    ties to the even last digit (numpy's round differs, e.g. 0.0125 -> 0.012 in numpy, 0.013
    in R)."""
    x = np.asarray(x, dtype=np.float64)
    p10 = 10.0 ** digits
    x10 = x * p10
    i10 = np.floor(x10)
    lo = i10 / p10
    hi = np.ceil(x10) / p10
    du, dd = hi - x, x - lo
    return np.where((du < dd) | ((du == dd) & (np.fmod(i10, 2.0) == 1.0)), hi, lo)


def wilcoxon_p(rank_sum_1, n1, n2, tie_sum) -> np.ndarray:
    """Two-sided p of the rank-sum test as limma::rankSumTestWithCorrelation (correlation 0)
    and Seurat: rank_sum_1 = sum of the ranks of group 1 among all n1 + n2 values, tie_sum =
    sum over tied runs of t^3 - t."""
    r1 = np.asarray(rank_sum_1, dtype=np.float64)
    n1 = np.asarray(n1, dtype=np.float64)
    n2 = np.asarray(n2, dtype=np.float64)
    n = n1 + n2
    u = n1 * n2 + n1 * (n1 + 1) / 2 - r1
    mu = n1 * n2 / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma2 = n1 * n2 * (n + 1) / 12
        sigma2 = sigma2 * (1 - np.asarray(tie_sum, dtype=np.float64) / (n * (n + 1) * (n - 1)))
        sd = np.sqrt(sigma2)
        z_lower = (u + 0.5 - mu) / sd
        z_upper = (u - 0.5 - mu) / sd
    p_less = special.ndtr(-z_upper)
    p_greater = special.ndtr(z_lower)
    p = np.minimum(2 * np.minimum(p_less, p_greater), 1.0)
    return np.where(np.isnan(p), 1.0, p)  # 0/0: every value tied


def log2fc(mean_1, mean_2) -> np.ndarray:
    return np.log2(np.asarray(mean_1) + 1.0) - np.log2(np.asarray(mean_2) + 1.0)


def _cell_index(store: Store, cells, obs_names=None) -> np.ndarray:
    """Absolute indices (sorted) of a cell selection: boolean mask, indices or cell names."""
    arr = np.asarray(cells)
    if arr.dtype == bool:
        if arr.shape != (store.n_cells,):
            raise ValueError(f"a boolean cell mask needs {store.n_cells} values, got {arr.shape}")
        return np.flatnonzero(arr)
    if arr.dtype.kind in "iu":
        idx = np.unique(arr.astype(np.int64))
        if len(idx) and (idx[0] < 0 or idx[-1] >= store.n_cells):
            raise ValueError("cell index out of range")
        return idx
    names = pd.Index(obs_names if obs_names is not None else store.obs_names())
    pos = names.get_indexer(arr.astype(str))
    if (pos < 0).any():
        raise ValueError(f"unknown cell {arr.astype(str)[np.argmax(pos < 0)]!r}")
    return np.unique(pos)


def ensure_gene_major(store: Store, memory_bytes: int, progress: bool = False,
                      workers: int = 2) -> None:
    if not store.has_gene_major():
        from cellmill.io.gene_major import build_gene_major

        log.info("markers: building the gene-major copy of the counts")
        build_gene_major(store, memory_bytes, progress=progress, workers=workers)


# ------------------------------------------------------------------------------- the pass

def _slab_task(store, g0, g1, indptr, label_of_cell, stratum_of_label, n_labels, n_strata,
               n_counts, scale):
    m = store.read_genes(g0, g1, indptr)
    return kern.rank_slab(m.data, m.indices, m.indptr.astype(np.int64), label_of_cell,
                          stratum_of_label, n_labels, n_strata, n_counts, float(scale))


def rank_pass(store: Store, label_of_cell: np.ndarray, stratum_of_label: np.ndarray,
              scale_factor: float = 1e4, memory_bytes: int = 2 * 10**9, scheduler=None,
              progress: bool = False) -> dict:
    """One pass over the gene-major copy: per gene x label rank sums (ranks within the
    label's stratum, zeros included), nonzero counts, sums of expm1(y) (as x / n_counts *
    scale, see kernels/wilcoxon.py); per gene x stratum the tie sums (zeros included).
    Labels: 0..L-1 per cell, -1 = not in any group."""
    import dask

    from cellmill.engine.schedulers import in_waves, n_workers
    from cellmill.io.gene_major import plan_slabs

    workers = n_workers(scheduler)
    ensure_gene_major(store, memory_bytes, progress=progress, workers=workers)
    label_of_cell = np.ascontiguousarray(label_of_cell, dtype=np.int32)
    stratum_of_label = np.ascontiguousarray(stratum_of_label, dtype=np.int32)
    n_labels, n_strata = len(stratum_of_label), int(stratum_of_label.max()) + 1
    n_counts = np.asarray(store.obs_column("n_counts"), dtype=np.float64)
    indptr = store.gene_major_indptr()
    # a task holds its slab (8 bytes a nonzero) and the kernel's sort scratch for the densest
    # gene (24 bytes a value, up to one per cell: 24 MB at 1M cells): the slab gives way to
    # the scratch, so a task's memory does not grow with the number of cells
    slab_bytes = min(SLAB_NNZ_MAX * 8, memory_bytes / 8 / max(workers, 1))
    densest = int(np.diff(indptr).max()) if len(indptr) > 1 else 0
    max_nnz = int(max(slab_bytes - 24 * densest, slab_bytes / 4) // 8)
    # at least a few slabs per worker, for balance
    max_nnz = max(1, min(max_nnz, int(indptr[-1]) // (4 * max(workers, 1)) + 1))
    slabs = plan_slabs(indptr, max_nnz)
    shared = [dask.delayed(a) for a in (label_of_cell, stratum_of_label, n_counts)]
    tasks = [dask.delayed(_slab_task, pure=False)(store, g0, g1, indptr, shared[0], shared[1],
                                                  n_labels, n_strata, shared[2], scale_factor)
             for g0, g1 in slabs]
    # each slab's results copied into place as it comes (computing all slabs first held them
    # twice over, and the zeros' terms below made whole-array temporaries: GSEA's ~260 labels
    # at 1M cells peaked at 1.15-1.33 GB)
    n_genes = len(indptr) - 1
    # the kernel's types: float64 rank and expm1 sums and tie terms, int64 counts
    rank_sum, sum_e = np.empty((n_genes, n_labels)), np.empty((n_genes, n_labels))
    nnz = np.empty((n_genes, n_labels), dtype=np.int64)
    tie, nnz_s = np.empty((n_genes, n_strata)), np.empty((n_genes, n_strata), dtype=np.int64)
    out = (rank_sum, nnz, sum_e, tie, nnz_s)
    for (g0, g1), part in zip(slabs, in_waves(tasks, scheduler, "markers", progress,
                                              per_worker=2), strict=True):
        for dst, src in zip(out, part, strict=True):
            dst[g0:g1] = src
        del part
    # add the zeros: per stratum one tied block at ranks 1..n0 (mid-rank (n0 + 1) / 2), a
    # block of genes at a time (the same operations in the same order as whole arrays)
    n_label = np.bincount(label_of_cell[label_of_cell >= 0], minlength=n_labels).astype(float)
    n_stratum = np.bincount(stratum_of_label, weights=n_label, minlength=n_strata)
    n0 = n_stratum[None, :] - nnz_s  # genes x strata
    step = max(1, (1 << 20) // max(n_labels, 1))
    for a in range(0, n_genes, step):
        n0_l = n0[a:a + step][:, stratum_of_label]  # genes x labels
        rank_sum[a:a + step] += nnz[a:a + step] * n0_l
        rank_sum[a:a + step] += (n_label[None, :] - nnz[a:a + step]) * (n0_l + 1) / 2
    tie += n0 * (n0 + 1) * (n0 - 1)
    return {"rank_sum": rank_sum, "nnz": nnz, "sum_expm1": sum_e, "tie": tie,
            "n_label": n_label, "n_stratum": n_stratum}


# ------------------------------------------------------------------------------- tables

def _gene_names(store: Store) -> pd.Index:
    """The store's gene names as one Index: the tables taken from it share its name strings
    (each table building its own held ~3 MB of them at 28k genes, and the GSEA stage keeps a
    table per cluster x time point: ~100 MB at 1M cells)."""
    return pd.Index(np.asarray(store.var().index).astype(str))


def de_table(genes, n1, n2, nnz_1, nnz_2, sum_e_1, sum_e_2, rank_sum_1, tie_sum, n_genes_total,
             logfc_threshold=0.0, min_pct=0.0, only_pos=False) -> pd.DataFrame:
    """FindMarkers' table from per-gene group statistics (index = gene, Seurat's order)."""
    pct1 = r_round(np.asarray(nnz_1) / n1)
    pct2 = r_round(np.asarray(nnz_2) / n2)
    fc = log2fc(np.asarray(sum_e_1) / n1, np.asarray(sum_e_2) / n2)
    keep = np.maximum(pct1, pct2) >= min_pct
    keep &= (fc >= logfc_threshold) if only_pos else (np.abs(fc) >= logfc_threshold)
    idx = np.flatnonzero(keep)
    p = wilcoxon_p(np.asarray(rank_sum_1)[idx], n1, n2, np.asarray(tie_sum)[idx])
    df = pd.DataFrame({"p_val": p, "avg_log2FC": fc[idx], "pct.1": pct1[idx],
                       "pct.2": pct2[idx]}, index=pd.Index(genes, name=None)[idx])
    if only_pos:
        df = df[df["avg_log2FC"] > 0]
    df["p_val_adj"] = np.minimum(1.0, df["p_val"].to_numpy() * n_genes_total)
    # Seurat's order(p_val, -de.results[, 1]): column 1 is p_val itself, so rows are sorted
    # by p_val alone, equal p-values in gene order (R's order() is stable)
    return df.iloc[np.argsort(df["p_val"].to_numpy(), kind="stable")]


def _check_sizes(n1: int, n2: int, min_cells_group: int) -> None:
    if n1 < min_cells_group:
        raise ValueError(f"Cell group 1 has fewer than {min_cells_group} cells")
    if n2 < min_cells_group:
        raise ValueError(f"Cell group 2 has fewer than {min_cells_group} cells")


def find_markers_many(store: Store, contrasts: list, logfc_threshold: float = 0.0,
                      min_pct: float = 0.0, only_pos: bool = False, min_cells_group: int = 3,
                      scale_factor: float = 1e4, memory_bytes: int = 2 * 10**9,
                      scheduler=None, progress: bool = False) -> list[pd.DataFrame]:
    """FindMarkers for many (cells_1, cells_2) pairs. Pairs whose cells do not overlap share one
    pass over the gene-major copy (each pair is its own ranking)."""
    names = None  # cell names are read only when a selection is given by name
    if any(np.asarray(c).dtype.kind not in "biu" for pair in contrasts for c in pair):
        names = store.obs_names()
    sets = []
    for c1, c2 in contrasts:
        i1 = _cell_index(store, c1, names)
        i2 = _cell_index(store, c2, names)
        if np.intersect1d(i1, i2).size:
            raise ValueError("cells_1 and cells_2 overlap")
        _check_sizes(len(i1), len(i2), min_cells_group)
        sets.append((i1, i2))
    # greedy: a contrast joins the first pass whose cells it does not touch
    passes: list[tuple[list[int], np.ndarray]] = []
    for k, (i1, i2) in enumerate(sets):
        for members, used in passes:
            if not used[i1].any() and not used[i2].any():
                members.append(k)
                used[i1] = used[i2] = True
                break
        else:
            used = np.zeros(store.n_cells, dtype=bool)
            used[i1] = used[i2] = True
            passes.append(([k], used))
    genes = _gene_names(store)
    out: list[pd.DataFrame | None] = [None] * len(sets)
    for members, _ in passes:
        label = np.full(store.n_cells, -1, dtype=np.int32)
        for s, k in enumerate(members):
            label[sets[k][0]] = 2 * s
            label[sets[k][1]] = 2 * s + 1
        stratum = np.repeat(np.arange(len(members), dtype=np.int32), 2)
        r = rank_pass(store, label, stratum, scale_factor, memory_bytes, scheduler, progress)
        del label
        # the pass's freed slabs and scratch go back to the system before the tables are
        # built (glibc keeps them otherwise: at 1M cells the tables then grew the heap further)
        release_heap()
        for s, k in enumerate(members):
            a, b = 2 * s, 2 * s + 1
            out[k] = de_table(genes, r["n_label"][a], r["n_label"][b], r["nnz"][:, a],
                              r["nnz"][:, b], r["sum_expm1"][:, a], r["sum_expm1"][:, b],
                              r["rank_sum"][:, a], r["tie"][:, s], len(genes),
                              logfc_threshold, min_pct, only_pos)
    return out


def find_markers(store: Store, cells_1, cells_2=None, logfc_threshold: float = 0.0,
                 min_pct: float = 0.0, only_pos: bool = False, min_cells_group: int = 3,
                 scale_factor: float = 1e4, memory_bytes: int = 2 * 10**9, scheduler=None,
                 progress: bool = False) -> pd.DataFrame:
    """Seurat's FindMarkers(ident.1 = cells_1, ident.2 = cells_2) with test.use = "wilcox".

    cells_1, cells_2: boolean masks over the store's cells, cell indices or cell names.
    cells_2 = None: every other QC-passed cell. Returns a DataFrame indexed by gene with
    columns p_val, avg_log2FC, pct.1, pct.2, p_val_adj, in Seurat's row order. Thresholds
    default to 0 (every gene is tested), as the GSEA rankings need.
    """
    if cells_2 is None:
        from cellmill.engine.cells import qc_passed

        rest = qc_passed(store).copy()
        rest[_cell_index(store, cells_1)] = False
        cells_2 = rest
    return find_markers_many(store, [(cells_1, cells_2)], logfc_threshold, min_pct, only_pos,
                             min_cells_group, scale_factor, memory_bytes, scheduler,
                             progress)[0]


def cluster_labels(store: Store, column: str = "cluster") -> tuple[np.ndarray, list[str]]:
    """Codes of obs[column] for QC-passed cells (-1 elsewhere) and the level names."""
    from cellmill.engine.cells import qc_passed

    if column not in store.obs_columns():
        raise ValueError(f"no {column!r} column in the cells' metadata (run the cluster stage)")
    s = pd.Series(store.obs_column(column))
    if not isinstance(s.dtype, pd.CategoricalDtype):
        s = s.astype("category")
    codes = s.cat.codes.to_numpy().astype(np.int32)
    codes[~qc_passed(store)] = -1
    return codes, [str(c) for c in s.cat.categories]


def find_all_markers(store: Store, labels: np.ndarray | None = None,
                     levels: list[str] | None = None, logfc_threshold: float = 0.25,
                     min_pct: float = 0.1, only_pos: bool = False,
                     return_thresh: float = 0.01, min_cells_group: int = 3,
                     scale_factor: float = 1e4, memory_bytes: int = 2 * 10**9,
                     scheduler=None, progress: bool = False) -> pd.DataFrame:
    """Seurat's FindAllMarkers (test.use = "wilcox"): every level against all other labelled
    cells. labels: code per cell (-1: left out); default the QC-passed cells' `cluster`.
    Returns columns p_val, avg_log2FC, pct.1, pct.2, p_val_adj, cluster, gene."""
    if labels is None:
        labels, default_levels = cluster_labels(store)
        levels = levels or default_levels
    labels = np.asarray(labels, dtype=np.int32)
    n_labels = int(labels.max()) + 1 if (labels >= 0).any() else 0
    levels = levels or [str(i) for i in range(n_labels)]
    n_labels = max(n_labels, len(levels))
    genes = _gene_names(store)
    if n_labels == 0:
        return pd.DataFrame(columns=ALL_COLUMNS)
    r = rank_pass(store, labels, np.zeros(n_labels, dtype=np.int32), scale_factor,
                  memory_bytes, scheduler, progress)
    n_total = r["n_stratum"][0]
    tables = []
    for k in range(n_labels):
        n1 = r["n_label"][k]
        n2 = n_total - n1
        try:
            _check_sizes(n1, n2, min_cells_group)
        except ValueError as e:
            if n1 > 0:  # Seurat reports the error for the level and moves on
                warnings.warn(f"FindAllMarkers: cluster {levels[k]}: {e}", stacklevel=2)
            continue
        others = [q for q in range(n_labels) if q != k]
        sum_e_2 = np.zeros(len(genes))
        for q in others:  # in level order, not total - own (no cancellation)
            sum_e_2 += r["sum_expm1"][:, q]
        nnz_2 = r["nnz"][:, others].sum(axis=1)
        t = de_table(genes, n1, n2, r["nnz"][:, k], nnz_2, r["sum_expm1"][:, k], sum_e_2,
                     r["rank_sum"][:, k], r["tie"][:, 0], len(genes), logfc_threshold,
                     min_pct, only_pos)
        # FindAllMarkers re-sorts: order(p_val, -avg_log2FC), stable over FindMarkers' order
        t = t.iloc[np.lexsort((-t["avg_log2FC"].to_numpy(), t["p_val"].to_numpy()))]
        t = t[t["p_val"] < return_thresh]
        if len(t):
            t = t.assign(cluster=levels[k], gene=t.index.to_numpy())
            tables.append(t)
    if not tables:
        return pd.DataFrame(columns=ALL_COLUMNS)
    out = pd.concat(tables)
    if only_pos:
        out = out[out["avg_log2FC"] > 0]
    out = out[ALL_COLUMNS].reset_index(drop=True)
    out["cluster"] = pd.Categorical(out["cluster"], categories=list(levels))
    return out
