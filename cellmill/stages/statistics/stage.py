"""Stage `statistics`: the grouped moments pass (statistics/grouped.py, which also sums the
raw counts per sample x cluster), the study's one-tailed Welch tests of the target genes
(statistics/welch.py) into tables/target_tests.csv, and the same contrasts with the samples
as replicates (statistics/pseudobulk.py: edgeR TMM + limma-voom) into tables/pseudobulk.csv
and beside each target test."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd

from cellmill.config import Config, ConfigError
from cellmill.engine.registry import Context, stage
from cellmill.engine.schedulers import on_a_thread
from cellmill.io.planes import remove_stale
from cellmill.stages.statistics.grouped import (
    SCRATCH,
    TARGET_COLUMNS,
    grouped_statistics,
    write_grouped_stats,
)
from cellmill.stages.statistics.pseudobulk import PSEUDOBULK
from cellmill.stages.statistics.welch import bh_adjust, contrast, group_coords

log = logging.getLogger("cellmill")


def target_tests(ds, cfg: Config) -> pd.DataFrame:
    """One-tailed Welch tests (case > control) of every target gene, per cluster x time point,
    per cluster with time points pooled, for all cells ("all"), plus the time-point contrasts
    (each time point but the last vs the last, case and control conditions pooled).

    p_adj_bh: Benjamini-Hochberg over all rows of this table that have a p-value (all target
    genes, clusters, time points and contrasts together), as R's p.adjust(p, "BH").
    """
    st = cfg.study
    genes = np.asarray(ds["gene"].values).astype(str)
    known = set(genes)
    for g in st.target_genes:
        if g not in known:
            raise ConfigError(f"study.target_genes: gene {g!r} is not in the store "
                              f"({len(genes)} genes)")
    by = list(ds.attrs["group_by"])
    if st.condition not in by:
        warnings.warn(f"statistics: no {st.condition!r} column among the grouping columns "
                      f"({by}); target tests skipped", stacklevel=2)
        return pd.DataFrame(columns=TARGET_COLUMNS)
    # in-memory arrays (grouped.py's sum_sq); the scheduler named, not set in dask's config:
    # this runs on a thread beside the pseudobulk tests
    sub = ds.sel(gene=list(st.target_genes)).load(scheduler="synchronous")
    coords = group_coords(sub)
    clusters = list(dict.fromkeys(coords["cluster"])) if "cluster" in by else []
    has_tp = st.timepoint in by
    tps = list(st.timepoints) if has_tp else []
    pooled_tps = tps or None
    rows = []

    def add(cluster, tp_label, name, case, control):
        where_c = {} if cluster == "all" else {"cluster": cluster}
        res = contrast(sub, {**where_c, **case}, {**where_c, **control},
                       alternative="greater")
        res.insert(1, "cluster", cluster)
        res.insert(2, "timepoint", tp_label)
        res.insert(3, "contrast", name)
        rows.append(res)

    name = f"{st.case}_vs_{st.control}"
    for cluster in ["all"] + clusters:
        for tp in tps + ["pooled"]:
            tsel = {st.timepoint: pooled_tps if tp == "pooled" else tp} if has_tp else {}
            add(cluster, tp, name, {st.condition: st.case, **tsel},
                {st.condition: st.control, **tsel})
    both = [st.case, st.control]
    for tp in tps[:-1]:
        last = tps[-1]
        for cluster in ["all"] + clusters:
            add(cluster, f"{tp}_vs_{last}", f"{tp}_vs_{last}",
                {st.timepoint: tp, st.condition: both}, {st.timepoint: last, st.condition: both})
    table = pd.concat(rows, ignore_index=True)
    order = {g: i for i, g in enumerate(st.target_genes)}
    table = table.sort_values("gene", key=lambda s: s.map(order), kind="stable")
    table["p_adj_bh"] = bh_adjust(table["p_value"].to_numpy())
    for col in TARGET_COLUMNS:
        if col not in table:
            table[col] = np.nan if col == "p_value_pseudobulk" else (
                "" if col == "reason_pseudobulk" else 0)
    return table[TARGET_COLUMNS].reset_index(drop=True)


def add_pseudobulk(table: pd.DataFrame, pb_table: pd.DataFrame | None, reason: str = "",
                   ) -> pd.DataFrame:
    """The sample-level one-sided p-value (the cell-level row's direction) and sample counts
    of every target-test row, from the pseudobulk contrast of the same cluster, time point
    and contrast; `reason` for all rows when there are no pseudobulk tests."""
    from cellmill.stages.statistics.pseudobulk import one_sided

    table = table.copy()
    if pb_table is None:
        table["p_value_pseudobulk"] = np.nan
        table["n_samples_case"] = 0
        table["n_samples_control"] = 0
        table["reason_pseudobulk"] = reason
        return table
    key = ["cluster", "timepoint", "contrast"]
    ran = pb_table[pb_table["gene"] != ""].set_index(key + ["gene"])
    skipped = pb_table[pb_table["gene"] == ""].set_index(key)
    counts = pb_table.drop_duplicates(key).set_index(key)
    p, n_case, n_ctrl, why = [], [], [], []
    for row in table.itertuples(index=False):
        k = (str(row.cluster), str(row.timepoint), str(row.contrast))
        if k not in counts.index:
            p.append(np.nan), n_case.append(0), n_ctrl.append(0)
            why.append("no pseudobulk test of time-point contrasts")
            continue
        n_case.append(int(counts.loc[k, "n_samples_case"]))
        n_ctrl.append(int(counts.loc[k, "n_samples_control"]))
        if k in skipped.index:
            p.append(np.nan), why.append(str(skipped.loc[k, "reason"]))
        elif k + (row.gene,) in ran.index:
            hit = ran.loc[k + (row.gene,)]
            p.append(float(one_sided(hit["t"], hit["P.Value"], str(row.alternative))))
            why.append("")
        else:
            p.append(np.nan), why.append("filtered out by filterByExpr (too few counts)")
    table["p_value_pseudobulk"] = p
    table["n_samples_case"] = n_case
    table["n_samples_control"] = n_ctrl
    table["reason_pseudobulk"] = why
    return table


def _group_by(cfg: Config, obs_columns) -> list[str]:
    """study.group_by's columns present in obs; the study's condition and time-point columns
    (named by study.condition / study.timepoint) join when present, so the target tests work
    whatever the metadata columns are called."""
    st = cfg.study
    alias = {"condition": st.condition, "timepoint": st.timepoint}
    wanted = list(dict.fromkeys(
        [alias.get(c, c) if c not in obs_columns else c for c in st.group_by]
        + ["cluster", st.condition, st.timepoint]))
    cols = [c for c in wanted if c in obs_columns]
    dropped = [c for c in st.group_by if c not in obs_columns and alias.get(c) not in obs_columns]
    # an absent condition / time-point column is the study being off: preflight's warning
    # says so once, for every stage
    study = {"condition", "timepoint", st.condition, st.timepoint}
    other = [c for c in dropped if c not in study]
    if other:
        log.warning("statistics: grouping columns absent from the cells' metadata, left out: %s",
                    ", ".join(other))
    if len(other) < len(dropped):
        log.info("statistics: study columns absent from the cells' metadata, left out: %s",
                 ", ".join(c for c in dropped if c in study))
    return cols


def _params(cfg: Config) -> dict:
    st = cfg.study
    return {"group_by": list(st.group_by), "scale_factor": cfg.normalize.scale_factor,
            "target_genes": list(st.target_genes), "condition": st.condition,
            "case": st.case, "control": st.control, "timepoint": st.timepoint,
            "timepoints": list(st.timepoints), "pseudobulk": st.pseudobulk,
            "pseudobulk_min_cells": st.pseudobulk_min_cells}


@stage("statistics", after=("qc", "cluster"), params=_params)
def run_statistics(ctx: Context) -> dict:

    from cellmill.engine.cells import qc_passed
    from cellmill.engine.preflight import study_columns, study_warning
    from cellmill.engine.tables import write_table

    store, cfg = ctx.store, ctx.cfg
    obs_cols = store.obs_columns()
    # without the condition column there is no study: the grouped statistics (by cluster,
    # sample, ...) are still computed; the target tests, and so the target genes, are not
    study, _ = study_columns(cfg, obs_cols)
    msg = study_warning(cfg, obs_cols)
    if msg:  # the one line saying so in a run (gsea and the report follow quietly)
        log.warning(msg)
    if study:
        genes = set(store.var().index)
        unknown = [g for g in cfg.study.target_genes if g not in genes]
        if unknown:  # before the pass, not after it
            raise ConfigError(f"study.target_genes: gene {unknown[0]!r} is not in the store "
                              f"({len(genes)} genes)")
    columns = _group_by(cfg, obs_cols)
    remove_stale(store.path, SCRATCH)  # a killed run's
    timing = {"passes": 1}  # the streaming part, for the benchmark's throughput
    ds = grouped_statistics(store, columns, cfg.normalize.scale_factor, mask=qc_passed(store),
                            memory_bytes=cfg.compute.memory_bytes, scheduler=ctx.scheduler(),
                            progress=ctx.progress, timing=timing)
    info = {"pass": timing}
    write_grouped_stats(store, ds)
    # from here on the planes are read a slab at a time (from the pass's scratch files, which
    # go with the Dataset)
    out = ctx.tables / "target_tests.csv"
    pb_out = ctx.tables / "pseudobulk.csv"
    # the target tests (reads and small sums) on a thread beside the pseudobulk's
    targets = on_a_thread(target_tests, ds, cfg) if study else None
    pb, why = (None, "") if not study else _pseudobulk_sums(store, ds, cfg, columns)
    if pb is None:  # an earlier run's sums and tests would contradict this one
        store.remove("uns", PSEUDOBULK)
        pb_out.unlink(missing_ok=True)
        pb_rows = None
    else:
        pb_rows = _pseudobulk_tests(pb, ds, cfg, pb_out, ctx.scheduler())
    targets = targets() if study else None
    del ds
    if not study:  # no table at all (an earlier run's would contradict this one)
        out.unlink(missing_ok=True)
        log.info("statistics: no %r column in the cells' metadata: target tests skipped",
                 cfg.study.condition)
        return info
    write_table(add_pseudobulk(targets, pb_rows, why), out)
    return info


def _pseudobulk_sums(store, ds, cfg: Config, columns: list[str]):
    """The pseudobulk Dataset (also stored), or (None, why) when there is none."""
    from cellmill.stages.statistics.pseudobulk import (
        load_pseudobulk,
        pseudobulk_dataset,
        sample_metadata,
        write_pseudobulk,
    )

    st = cfg.study
    if not st.pseudobulk:
        return None, "study.pseudobulk = false"
    if "sample" not in columns:
        log.warning("statistics: no 'sample' column among the grouping columns: pseudobulk "
                    "tests (samples as replicates) skipped")
        return None, "no sample column"
    have = set(store.obs_columns())
    obs = pd.DataFrame({c: store.obs_column(c) for c in
                        dict.fromkeys(["sample", st.condition, st.timepoint, "sex"])
                        if c in have})
    meta = sample_metadata(obs, "sample", [st.condition, st.timepoint, "sex"])
    del obs
    if st.condition not in meta:
        log.warning("statistics: %r varies within samples: pseudobulk tests skipped",
                    st.condition)
        return None, f"{st.condition!r} varies within samples"
    write_pseudobulk(store, pseudobulk_dataset(ds, "sample", meta))
    pb = load_pseudobulk(store)
    if pb["counts"].nbytes <= cfg.compute.memory_bytes / 8:  # else a cluster at a time
        pb = pb.load()
    return pb, ""


def _pseudobulk_tests(pb, ds, cfg: Config, path, scheduler=None) -> pd.DataFrame:
    """Every pseudobulk contrast into `path` (tables/pseudobulk.csv), written as the
    contrasts finish; returns the rows add_pseudobulk needs (target genes, skipped
    contrasts, and the first row of every contrast for its sample counts)."""
    import time

    from cellmill.engine.tables import TableWriter
    from cellmill.stages.statistics.pseudobulk import COLUMNS, iter_pseudobulk_tests

    st = cfg.study
    t0 = time.perf_counter()
    workers = scheduler[1] if isinstance(scheduler, tuple) else cfg.compute.local_workers
    targets = set(st.target_genes)
    kept, ran, skipped = [], 0, 0
    with TableWriter(path, COLUMNS) as table:
        for frame in iter_pseudobulk_tests(pb, cfg, st.pseudobulk_min_cells, ds=ds,
                                           workers=workers):
            table.write(frame)
            gene = frame["gene"]
            if len(frame) and gene.iloc[0] == "":
                skipped += 1
                kept.append(frame)
            else:
                ran += 1
                first = np.arange(len(frame)) == 0
                kept.append(frame[gene.isin(targets).to_numpy() | first])
    log.info("statistics: pseudobulk: %d samples x %d clusters, %d contrasts tested, %d "
             "skipped (%.1f s)", pb.sizes["sample"], pb.sizes["cluster"], ran, skipped,
             time.perf_counter() - t0)
    return pd.concat(kept, ignore_index=True) if kept else pd.DataFrame(columns=COLUMNS)
