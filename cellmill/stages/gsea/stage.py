"""Stage `gsea`: per cluster x time point, rank all genes by case vs control FindMarkers
(thresholds 0) and run fgsea-style preranked GSEA with the configured GMT (study Fig. 2).
Cells without a study.condition column: no GSEA and no gsea.csv (the study is off); without a
time-point column: per cluster, time points pooled (timepoint "pooled")."""

from __future__ import annotations

import logging
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from cellmill.config import Config
from cellmill.engine.cells import qc_passed
from cellmill.engine.registry import Context, stage
from cellmill.engine.tables import write_table
from cellmill.errors import InputError
from cellmill.genesets import gmt_digest, gmt_path

log = logging.getLogger("cellmill")

POOLED = "pooled"  # the time point of contrasts over all time points (no time-point column)


def _gmt_path(cfg: Config, genes):
    """The GMT file gsea.gmt names ("hallmark": the organism of the store's genes)."""
    path = gmt_path(cfg, genes, "the store")
    if not path.is_file():
        raise InputError(path, "gsea.gmt: gene set file not found (set gsea.gmt in the config)")
    return path


def _params(cfg: Config) -> dict:
    # computed from the config alone, before the data exists: a run without study columns
    # needs no GMT, so an absent file is recorded by its path (it reruns the stage once the
    # file is there) and reported by preflight or the stage when the study needs it; the
    # built-in "hallmark" is recorded by both collections' content (the store's genes, an
    # upstream of this stage, pick one)
    return {"gsea": vars(cfg.gsea) | {"gmt": gmt_digest(cfg)},
            "study": [cfg.study.condition, cfg.study.case, cfg.study.control,
                      cfg.study.timepoint, cfg.study.timepoints],
            "scale_factor": cfg.normalize.scale_factor,
            "min_cells_group": cfg.markers.min_cells_group}


def ranking(de: pd.DataFrame, how: str) -> pd.Series:
    """Gene ranking from a FindMarkers table: avg_log2FC, or sign(avg_log2FC) * -log10(p)."""
    if how == "avg_log2FC":
        return de["avg_log2FC"].astype(float)
    p = np.clip(de["p_val"].to_numpy(float), 1e-300, 1.0)
    return pd.Series(np.sign(de["avg_log2FC"].to_numpy(float)) * -np.log10(p), index=de.index)


def contrasts(obs: pd.DataFrame, mask: np.ndarray, cfg: Config, min_cells: int):
    """(cluster, timepoint, case cells, control cells) for every testable combination, the
    cells as ascending indices (not masks over all cells: 60 pairs x 2 masks were 120 MB at 1M
    cells). Without a time-point column, each cluster's cells of all time points ("pooled")."""
    st = cfg.study
    for col in ("cluster", st.condition):
        if col not in obs:
            raise InputError("config", f"obs column {col!r} needed by gsea is missing")
    cluster, c_levels = _codes(obs["cluster"])
    cond, cond_levels = _codes(obs[st.condition])
    if st.timepoint in obs:
        tp, tp_levels = _codes(obs[st.timepoint])
        timepoints = list(st.timepoints)
    else:
        tp, tp_levels, timepoints = np.zeros(len(obs), dtype=np.int32), [POOLED], [POOLED]
    levels = list(obs["cluster"].cat.categories) if hasattr(obs["cluster"], "cat") else \
        sorted(set(np.asarray(c_levels)[np.unique(cluster[mask & (cluster >= 0)])]))
    wanted = cfg.gsea.clusters or levels
    unknown = [c for c in wanted if c not in levels]
    if unknown:
        raise InputError("config", f"gsea.clusters: unknown cluster(s) {unknown}")
    # one pass over the cells: the passed cells sorted by (cluster, time point, condition)
    cells = np.flatnonzero(mask)
    key = np.stack([cluster[cells], tp[cells], cond[cells]])
    order = np.lexsort(key[::-1])
    cells, key = cells[order], key[:, order]
    bounds = np.flatnonzero(np.any(np.diff(key, axis=1) != 0, axis=0)) + 1
    groups = {}
    for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(cells)], strict=True):
        if b > a:
            groups[tuple(int(v) for v in key[:, a])] = np.sort(cells[a:b])
    empty = np.empty(0, dtype=np.int64)

    def code(levels_, value):
        return levels_.index(str(value)) if str(value) in levels_ else -2

    skipped = []
    for c in wanted:
        for t in timepoints:
            ci, ti = code(c_levels, c), code(tp_levels, t)
            case = groups.get((ci, ti, code(cond_levels, st.case)), empty)
            ctrl = groups.get((ci, ti, code(cond_levels, st.control)), empty)
            if len(case) < min_cells or len(ctrl) < min_cells:
                skipped.append((c, t))
                continue
            yield c, t, case, ctrl
    if skipped:
        log.warning("gsea: skipped %d cluster x time point pairs with < %d cells per group",
                    len(skipped), min_cells)


def _codes(column) -> tuple[np.ndarray, list[str]]:
    """Integer codes of a column's values as strings (-1: missing) and the string levels."""
    s = pd.Series(column)
    if not isinstance(s.dtype, pd.CategoricalDtype):
        s = s.astype(str).astype("category")
    levels = [str(v) for v in s.cat.categories]
    codes = s.cat.codes.to_numpy().astype(np.int32)
    # categories whose strings coincide ("1" and 1) share the first one's code
    first = {lv: levels.index(lv) for lv in levels}
    remap = np.array([first[lv] for lv in levels] + [-1], dtype=np.int32)
    return remap[codes], levels


def pseudobulk_rankings(tables, cfg: Config, pairs) -> list[pd.Series]:
    """gsea.ranking = "pseudobulk_t": limma's moderated t of each pair's pseudobulk contrast
    (tables/pseudobulk.csv, written by the statistics stage); an empty ranking where the
    contrast was skipped (too few samples) or the time point is not one of its rows."""
    path = tables / "pseudobulk.csv"
    if not path.is_file():
        raise InputError(path, 'gsea.ranking = "pseudobulk_t" needs the pseudobulk tests, '
                         "which did not run (no sample column, or study.pseudobulk = false)")
    pb = pd.read_csv(path, usecols=["gene", "cluster", "timepoint", "contrast", "t"],
                     dtype={"gene": str, "cluster": str, "timepoint": str, "contrast": str},
                     keep_default_na=False, na_values=[""], float_precision="round_trip")
    st = cfg.study
    pb = pb[(pb["contrast"] == f"{st.case}_vs_{st.control}") & pb["gene"].notna()]
    out = []
    for c, t, _, _ in pairs:
        rows = pb[(pb["cluster"] == str(c)) & (pb["timepoint"] == str(t))]
        out.append(pd.Series(rows["t"].to_numpy(float), index=rows["gene"].to_numpy()))
    return out


@stage("gsea", after=("qc", "cluster", "statistics"), params=_params)
def run_gsea(ctx: Context) -> None:
    from cellmill.engine.preflight import study_columns
    from cellmill.io.gmt import read_gmt
    from cellmill.stages.gsea.fgsea import fgsea, to_csv_frame
    from cellmill.stages.shared.findmarkers import find_markers_many

    cfg, store = ctx.cfg, ctx.store
    have = store.obs_columns()  # only the columns the contrasts need, not every cell name
    ranks_dir = ctx.tables / "gsea_ranks"
    if not study_columns(cfg, have)[0]:  # GSEA is per condition: no condition, no GSEA
        (ctx.tables / "gsea.csv").unlink(missing_ok=True)  # an earlier run's would mislead
        shutil.rmtree(ranks_dir, ignore_errors=True)
        log.info("gsea: no %r column in the cells' metadata: GSEA skipped", cfg.study.condition)
        return
    pathways = read_gmt(_gmt_path(cfg, store.var().index))
    obs = pd.DataFrame({c: store.obs_column(c) for c in
                        dict.fromkeys(("cluster", cfg.study.condition, cfg.study.timepoint))
                        if c in have}, index=range(store.n_cells))
    pairs = list(contrasts(obs, qc_passed(store), cfg, cfg.markers.min_cells_group))
    del obs
    columns = ["pathway", "pval", "padj", "log2err", "ES", "NES", "size", "leadingEdge",
               "cluster", "timepoint"]
    ranks_dir.mkdir(exist_ok=True)
    tables = []
    if pairs and cfg.gsea.ranking == "pseudobulk_t":
        rankings = pseudobulk_rankings(ctx.tables, cfg, pairs)
    elif pairs:
        des = find_markers_many(store, [(a, b) for _, _, a, b in pairs],
                                min_cells_group=cfg.markers.min_cells_group,
                                scale_factor=cfg.normalize.scale_factor,
                                memory_bytes=cfg.compute.memory_bytes,
                                scheduler=ctx.scheduler(), progress=ctx.progress)
        rankings = [ranking(de, cfg.gsea.ranking) for de in des]
        del des
    if pairs:
        todo = []
        for (c, t, _, _), stats in zip(pairs, rankings, strict=True):
            if stats.empty:
                log.info("gsea: cluster %s at %s: no pseudobulk test (too few samples), "
                         "skipped", c, t)
                continue
            todo.append((c, t, stats))
        del rankings
        g = cfg.gsea

        def one(stats):
            return to_csv_frame(fgsea(stats, pathways, min_size=g.min_size, max_size=g.max_size,
                                      nperm_simple=g.nperm_simple, seed=g.seed))

        # rankings are independent and the kernels release the GIL: one per worker thread,
        # results kept in pair order (each ranking's streams depend on the seed alone); the
        # ranking CSVs (pandas, holding the GIL) are written meanwhile
        with warnings.catch_warnings():  # fold-change rankings always have ties
            warnings.filterwarnings("ignore", message=".*ties.*")
            with ThreadPoolExecutor(max_workers=cfg.compute.local_workers) as pool:
                futures = [pool.submit(one, stats) for _, _, stats in todo]
                for c, t, stats in todo:
                    write_table(pd.DataFrame({"gene": stats.index, "stat": stats.to_numpy()}),
                                ranks_dir / f"{c}_{t}.csv")
                results = [f.result() for f in futures]
        for (c, t, _), res in zip(todo, results, strict=True):
            res["cluster"], res["timepoint"] = c, t
            tables.append(res)
    out = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=columns)
    write_table(out[columns], ctx.tables / "gsea.csv")
