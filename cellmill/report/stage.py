"""Stage `report`: figures and the self-contained `report.html` from what the stages left.

Reads the store (obs, obsm, uns, the counts of a few genes) and `tables/*.csv`. Anything missing
(a partial run, a stage that found nothing) becomes a note in the report, never an error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import numpy as np
import pandas as pd

from cellmill.config import Config
from cellmill.engine.registry import ORDER, Context, stage
from cellmill.report import html as H
from cellmill.report.figures import (
    SIG,
    Missing,
    ReportInputs,
    sort_labels,
)
from cellmill.report.parallel import figure_workers, make_figures

log = logging.getLogger("cellmill")

N_TABLE3 = 30
N_PER_CLUSTER = 5  # markers per cluster shown when there is no study
# figures of the study (they need its condition column)
STUDY_FIGURES = ("fig1c", "fig1d", "fig1e", "fig2", "fig2b", "fig2c", "calib")


def _params(cfg: Config) -> dict:
    return {"study": dataclasses.asdict(cfg.study), "scale_factor": cfg.normalize.scale_factor,
            "n_pcs": cfg.neighbors.n_pcs, "gmt": cfg.gsea.gmt}


@stage("report", after=tuple(ORDER[:-1]), params=_params)
def run_report(ctx: Context) -> None:
    build_report(ctx)


# ----------------------------------------------------------------------------- tables


def _try(func, *args):
    """(result, None) or (None, reason) when the inputs are missing."""
    try:
        return func(*args), None
    except Missing as e:
        return None, f"skipped: {e}"
    except Exception as e:  # a table must never sink the run
        log.warning("report table failed", exc_info=True)
        return None, f"failed: {type(e).__name__}: {e}"


def _tp_order(inp: ReportInputs, values) -> list[str]:
    tps = list(inp.cfg.study.timepoints) + ["pooled"]
    present = list(dict.fromkeys(values))
    return [t for t in tps if t in present] + sorted(set(present) - set(tps))


def _sort_tests(inp: ReportInputs, df: pd.DataFrame) -> pd.DataFrame:
    cl = {c: i for i, c in enumerate(["all"] + sort_labels(set(df["cluster"]) - {"all"}))}
    tp = {t: i for i, t in enumerate(_tp_order(inp, df["timepoint"]))}
    key = pd.DataFrame({"g": df["gene"], "c": df["cluster"].map(cl),
                        "t": df["timepoint"].map(tp), "k": df["contrast"]})
    return df.iloc[np.lexsort((key["k"], key["t"], key["c"], key["g"]))]


def table1(inp: ReportInputs) -> pd.DataFrame:
    tt = inp.table("target_tests.csv", ("gene", "cluster", "timepoint", "contrast"))
    return _sort_tests(inp, tt[tt["cluster"] == "all"])


def table2(inp: ReportInputs) -> pd.DataFrame:
    tt = inp.condition_tests()
    return _sort_tests(inp, tt[tt["cluster"] != "all"])


def animals_verdict(t2: pd.DataFrame, case: str, control: str) -> str:
    """Plain words: which cell-level findings of Table 2 hold with the animals as the unit."""
    if "p_value_pseudobulk" not in t2:
        return ""
    p_cell = t2["p_value"].to_numpy(float)
    p_anim = t2["p_value_pseudobulk"].to_numpy(float)
    found = np.flatnonzero(p_cell < SIG)
    if not len(found):
        return (f"No row of Table 2 has a cell-level p < {SIG}, so there is no cell-level "
                "finding to check with the animals as replicates.")
    tested = [i for i in found if np.isfinite(p_anim[i])]
    hold = [i for i in tested if p_anim[i] < SIG]
    lost = [i for i in tested if p_anim[i] >= SIG]
    untested = [i for i in found if not np.isfinite(p_anim[i])]

    def names(idx):
        def when(tp):
            return "time points pooled" if tp == "pooled" else f"at {tp}"
        return "; ".join(f"{t2['gene'].iloc[i]} in cluster {t2['cluster'].iloc[i]} "
                         f"{when(t2['timepoint'].iloc[i])}" for i in idx)

    text = (f"{len(found)} row(s) of Table 2 show {case} > {control} at cell-level p < {SIG}. "
            "The cell-level test counts every cell as a replicate, but cells of one animal are "
            "not independent; the pseudobulk test (edgeR TMM + limma-voom on per-animal sums, "
            "p_value_pseudobulk) counts the animals. ")
    if hold:
        text += f"{len(hold)} hold with the animals as the unit ({names(hold)}). "
    if lost:
        text += (f"{len(lost)} do NOT hold with the animals as the unit (pseudobulk p >= "
                 f"{SIG}): {names(lost)}. ")
    if untested:
        text += (f"{len(untested)} could not be tested with the animals as the unit "
                 "(reason_pseudobulk says why, e.g. too few samples per group). ")
    return text.strip()


def table3(inp: ReportInputs) -> tuple[pd.DataFrame, str]:
    coi, _ = inp.cluster_of_interest()
    mk = inp.table("markers.csv", ("gene", "cluster", "p_val", "avg_log2FC"))
    m = mk[mk["cluster"] == coi]
    if m.empty:
        raise Missing(f"tables/markers.csv has no markers for cluster {coi}")
    m = m.sort_values(["p_val", "avg_log2FC"], ascending=[True, False], kind="stable")
    cols = [c for c in ("gene", "avg_log2FC", "pct.1", "pct.2", "p_val", "p_val_adj")
            if c in m.columns]
    return m[cols].head(N_TABLE3), coi


def cell_counts(inp: ReportInputs) -> pd.DataFrame:
    """Cells per cluster (rows, cluster order) and condition x time point (columns); per
    cluster and sample when the cells have no condition column (no study)."""
    s = inp.cfg.study
    lab = inp.clusters()
    if s.condition not in inp.store.obs_columns():
        return _counts_by_sample(inp, lab)
    cond = inp.meta(s.condition)
    tp = inp.meta(s.timepoint).reorder(inp.timepoints())
    present = cond.present()
    conds = [c for c in (s.control, s.case) if c in present]
    conds += sorted(set(present) - set(conds))
    cond = cond.reorder(conds)
    ok = (cond.codes >= 0) & (tp.codes >= 0)
    nc, nt = len(conds), len(tp.levels)
    flat = (lab.codes[ok].astype(np.int64) * nc + cond.codes[ok]) * nt + tp.codes[ok]
    counts = np.bincount(flat, minlength=len(lab.levels) * nc * nt).reshape(-1, nc * nt)
    cols = [f"{c} {t}" for c in conds for t in tp.levels]
    out = pd.DataFrame(counts, index=pd.Index(lab.levels, name="cluster"), columns=cols)
    out = out.loc[:, out.sum(axis=0) > 0]
    out["total"] = out.sum(axis=1)
    out["%"] = (100 * out["total"] / out["total"].sum()).round(1)
    return out.reset_index()


def _counts_by_sample(inp: ReportInputs, lab) -> pd.DataFrame:
    sample = inp.meta("sample")
    ok = sample.codes >= 0
    n = len(sample.levels)
    flat = lab.codes[ok].astype(np.int64) * n + sample.codes[ok]
    counts = np.bincount(flat, minlength=len(lab.levels) * n).reshape(-1, n)
    out = pd.DataFrame(counts, index=pd.Index(lab.levels, name="cluster"),
                       columns=sample.levels)
    out = out.loc[:, out.sum(axis=0) > 0]
    if out.shape[1] > 1:
        out["total"] = out.sum(axis=1)
    total = out.iloc[:, -1]
    out["%"] = (100 * total / total.sum()).round(1)
    return out.reset_index()


def markers_per_cluster(inp: ReportInputs, n: int = N_PER_CLUSTER) -> pd.DataFrame:
    """The top `n` markers of every cluster (by p_val, then avg_log2FC)."""
    mk = inp.table("markers.csv", ("gene", "cluster", "p_val", "avg_log2FC"))
    if mk.empty:
        raise Missing("tables/markers.csv has no rows")
    order = {c: i for i, c in enumerate(sort_labels(mk["cluster"].unique()))}
    mk = mk.iloc[np.lexsort((-mk["avg_log2FC"].to_numpy(float), mk["p_val"].to_numpy(float),
                             mk["cluster"].map(order).to_numpy()))]
    cols = [c for c in ("cluster", "gene", "avg_log2FC", "pct.1", "pct.2", "p_val", "p_val_adj")
            if c in mk.columns]
    return mk.groupby("cluster", sort=False).head(n)[cols]


def gsea_significant(inp: ReportInputs) -> pd.DataFrame:
    g = inp.table("gsea.csv", ("pathway", "padj", "NES", "cluster", "timepoint"))
    sig = g[g["padj"] < SIG].copy()
    cl = {c: i for i, c in enumerate(sort_labels(g["cluster"].unique()))}
    tp = {t: i for i, t in enumerate(_tp_order(inp, g["timepoint"]))}
    sig = sig.iloc[np.lexsort((sig["padj"].to_numpy(), sig["timepoint"].map(tp).to_numpy(),
                               sig["cluster"].map(cl).to_numpy()))]
    if "leadingEdge" in sig:
        sig["leadingEdge"] = sig["leadingEdge"].astype(str).map(_abbrev)
    cols = [c for c in ("cluster", "timepoint", "pathway", "NES", "ES", "pval", "padj", "size",
                        "leadingEdge") if c in sig.columns]
    return sig[cols]


def _abbrev(edge: str, n: int = 8) -> str:
    genes = [x for x in edge.split(";") if x]
    return ", ".join(genes[:n]) + (f", ... ({len(genes)})" if len(genes) > n else "")


def gsea_cluster_table(inp: ReportInputs) -> tuple[pd.DataFrame, str]:
    coi, _ = inp.cluster_of_interest()
    g = inp.table("gsea.csv", ("pathway", "padj", "NES", "cluster", "timepoint"))
    g = g[g["cluster"] == coi]
    if g.empty:
        raise Missing(f"tables/gsea.csv has no rows for cluster {coi}")
    tps = _tp_order(inp, g["timepoint"])
    wide = g.pivot_table(index="pathway", columns="timepoint", values=["NES", "padj"],
                         aggfunc="first")
    out = pd.DataFrame(index=wide.index)
    for t in tps:
        out[f"NES {t}"] = wide[("NES", t)] if ("NES", t) in wide else np.nan
        out[f"padj {t}"] = wide[("padj", t)] if ("padj", t) in wide else np.nan
    best = g.groupby("pathway")["padj"].min()
    out = out.loc[best.sort_values(kind="stable").index]
    out.index.name = "pathway"
    return out.reset_index(), coi


# ----------------------------------------------------------------------------- run info


def _toml(d: dict) -> str:
    lines = []
    for section, values in d.items():
        if isinstance(values, dict):
            lines.append(f"[{section}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
            lines.append("")
        else:
            lines.append(f"{section} = {json.dumps(values)}")
    return "\n".join(lines)


def timings_table(ctx: Context) -> tuple[pd.DataFrame, float]:
    records = {}
    if ctx.store is not None:
        try:
            records = ctx.store.stage_records()
        except Exception:  # no uns/cellmill yet
            records = {}
    rows, peak = [], 0.0
    for name in ORDER:
        t = ctx.timings.get(name)
        rec = records.get(name, {})
        if name == "report" and (t is None or not t.get("skipped")):
            rows.append((name, "this report", np.nan, np.nan, np.nan, ""))
            continue
        if t is not None:
            status = "up to date (skipped)" if t.get("skipped") else "ran"
            rec = t
        elif rec:
            status = "done earlier"
        else:
            rows.append((name, "not run", np.nan, np.nan, np.nan, ""))
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.get("finished", 0)))
        mb = float(rec.get("peak_rss_mb", np.nan))
        if np.isfinite(mb):
            peak = max(peak, mb)
        rows.append((name, status, rec.get("seconds", np.nan), rec.get("cpu_seconds", np.nan),
                     mb, when))
    df = pd.DataFrame(rows, columns=["stage", "status", "wall s", "CPU s", "peak RSS MB",
                                     "finished"])
    return df, peak


def _knn_info(ctx: Context, name: str) -> dict:
    """What the kNN search of stage `name` was (its record's info["knn"]); {} if unknown."""
    rec = ctx.timings.get(name)
    if rec is None and ctx.store is not None:
        try:
            rec = ctx.store.stage_records().get(name)
        except Exception:  # no uns/cellmill yet
            rec = None
    return ((rec or {}).get("info") or {}).get("knn") or {}


def knn_sentence(ctx: Context) -> str:
    """Which kNN search the neighbors and umap stages ran, in words; "" if unknown."""
    text = ""
    for name, what in (("neighbors", "kNN search"), ("umap", "UMAP's kNN search")):
        info = _knn_info(ctx, name)
        if not info:
            continue
        why = (f"neighbors.method = auto: exact up to {info['exact_up_to']:,} cells"
               if info.get("setting") == "auto" else f"neighbors.method = {info.get('setting')}")
        if info.get("method") == "nndescent":
            text += (f" {what}: NN-descent (pynndescent) on {info['cells']:,} cells ({why}), "
                     f"recall@k {info['recall']:.4f} against exact search on "
                     f"{info['recall_sample']:,} sampled cells.")
            continue
        text += f" {what}: exact on {info['cells']:,} cells ({why})"
        if "nndescent_recall" in info:
            text += (f"; NN-descent reached only recall {info['nndescent_recall']:.4f} on "
                     f"{info['recall_sample']:,} sampled cells, so exact search ran")
        text += "."
    return text


# ----------------------------------------------------------------------------- the report


def build_report(ctx: Context, partial: str | None = None):
    """Draw the figures and write OUTDIR/report.html; returns its path."""
    from cellmill.engine.provenance import versions
    from cellmill.io.store import Store

    store = ctx.store
    if store is None and ctx.store_path.exists():
        try:
            store = ctx.store = Store(ctx.store_path)
        except FileNotFoundError:
            store = None
    cfg, s = ctx.cfg, ctx.cfg.study
    inp = ReportInputs(cfg, store, ctx.outdir / "tables", scheduler=ctx.scheduler())
    figs = {f.key: f for f in make_figures(inp, ctx.figures, figure_workers(cfg))}
    notes: list[str] = []
    # no condition column: the study parts (target tests, GSEA, their figures) did not run;
    # one note says so instead of one per figure and table (no store: nothing is known yet)
    study = store is None or s.condition in store.obs_columns()
    off = "" if study else (f"study parts skipped: the cells' metadata has no {s.condition!r} "
                            "column (study.condition), so there are no target gene tests, no "
                            "per-condition GSEA and none of their figures")
    whys: list[tuple[str, str | None]] = []
    shown: list[str] = []  # figures placed in the page (their notes join the Notes)

    page = H.Page("cellmill report")

    def figure(key: str) -> None:
        shown.append(key)
        page.figure(figs[key])

    # -- summary
    page.section("Summary")
    rows = []
    if store is not None:
        qc = inp.qc
        rows += [("cells in the store", f"{store.n_cells:,}"),
                 ("cells passing QC", f"{int(qc.sum()):,}"), ("genes", f"{store.n_genes:,}"),
                 ("samples", f"{inp.column('sample').nunique():,}")]
        try:
            rows.append(("clusters", f"{len(inp.cluster_order())}"))
        except Missing:
            pass
    if study:
        rows.append(("target gene(s)", ", ".join(s.target_genes)))
        rows.append(("contrast", f"{s.case} vs {s.control} ({s.condition}), time points "
                                 f"{', '.join(s.timepoints)} ({s.timepoint})"))
    else:
        rows.append(("study", f"skipped (no {s.condition!r} column)"))
    coi, why = _try(inp.cluster_of_interest) if study or s.cluster_of_interest else (None, "")
    if coi is not None:
        rows.append(("cluster of interest", f"{coi[0]}: {coi[1]}"))
    elif why:
        notes.append(f"cluster of interest: {why}")
    page.html(H.table(pd.DataFrame(rows, columns=["", "value"]).astype(str)))
    counts, why = _try(cell_counts, inp)
    page.table("Cells per cluster, condition and time point" if study
               else "Cells per cluster and sample", counts, missing=why)

    # -- figure 1
    page.section("Clusters and target gene expression" if study else "Clusters")
    for key in ("fig1a", "fig1b", "fig1c", "fig1d", "fig1e"):
        # no study: the target genes are drawn by cluster if the data has them, else left out
        if study or (key not in STUDY_FIGURES and (key != "fig1b" or figs[key].path)):
            figure(key)

    # -- tables 1, 2
    page.section("Target gene tests")
    if study:
        cap = (f"Welch t-tests on log-normalised expression (tables/target_tests.csv); "
               f"one-tailed {s.case} > {s.control} unless the alternative says otherwise. "
               "p_adj_bh: Benjamini-Hochberg (the paper reported raw p). Highlighted: "
               "p_value < 0.05.")
        t1, why1 = _try(table1, inp)
        page.table("Table 1: target gene(s), all cells", t1, cap, why1,
                   highlight=None if t1 is None else t1["p_value"] < SIG)
        t2, why2 = _try(table2, inp)
        cap2 = cap + (" p_value_pseudobulk: the same contrast with the animals (samples) as "
                      "replicates, one-tailed in the same direction (edgeR TMM + limma-voom "
                      "on per-sample sums; tables/pseudobulk.csv), with the samples per "
                      "group in n_samples_case / n_samples_control.")
        page.table(f"Table 2: target gene(s), {s.case} vs {s.control} per cluster and time "
                   "point", t2, cap2, why2,
                   highlight=None if t2 is None else t2["p_value"] < SIG)
        if t2 is not None:
            verdict = animals_verdict(t2, s.case, s.control)
            if verdict:
                page.text(verdict)
        figure("calib")
        whys += [("Table 1", why1), ("Table 2", why2)]
    else:
        page.note(off)

    # -- table 3, figure 3
    if coi is not None or study:
        page.section("Markers of the cluster of interest")
        figure("fig3")
        t3, why3 = _try(table3, inp)
        if t3 is not None:
            page.table(f"Table 3: top {N_TABLE3} markers of cluster {t3[1]}", t3[0],
                       "Wilcoxon rank-sum, cluster vs all other cells (FindAllMarkers; "
                       "tables/markers.csv), sorted by p_val.")
        else:
            page.table("Table 3: markers of the cluster of interest", None, missing=why3)
    else:  # no study to choose a cluster of interest: every cluster's top markers
        page.section("Markers")
        t3, why3 = _try(markers_per_cluster, inp)
        page.table(f"Table 3: top {N_PER_CLUSTER} markers of each cluster", t3,
                   "Wilcoxon rank-sum, cluster vs all other cells (FindAllMarkers; "
                   "tables/markers.csv has them all), sorted by p_val.", why3, max_rows=500)
    whys.append(("Table 3", why3))

    # -- GSEA
    page.section("Gene set enrichment")
    if study:
        for key in ("fig2", "fig2b", "fig2c"):
            figure(key)
        t4, why4 = _try(gsea_significant, inp)
        page.table("Table 4: significant pathways (padj < 0.05)", t4,
                   f"Preranked GSEA of {s.case} vs {s.control} within each cluster and time "
                   "point (tables/gsea.csv has every pathway).", why4, max_rows=300)
        t5, why5 = _try(gsea_cluster_table, inp)
        if t5 is not None:
            page.table(f"Table 5: every pathway in cluster {t5[1]} (cluster of interest)",
                       t5[0], "NES and BH-adjusted p per time point; sorted by the smallest "
                       "padj.")
        else:
            page.table("Table 5: pathways of the cluster of interest", None, missing=why5)
        whys += [("Table 4", why4), ("Table 5", why5)]
    else:
        page.note(off)

    # -- QC and preprocessing
    page.section("Quality control and preprocessing")
    for key in ("qc", "hvg", "pca"):
        figure(key)

    # -- the run
    page.section("Run")
    tim, peak = timings_table(ctx)
    page.table("Stage timings and peak memory", tim,
               f"Peak resident memory of the run's stages: {peak:,.0f} MB.{knn_sentence(ctx)} "
               "Full provenance (versions, configuration, timings) in run.json.")
    page.heading("Parameters")
    page.html(f"<pre>{H.esc(_toml(cfg.to_dict()))}</pre>")
    page.heading("Versions")
    page.html(H.table(pd.DataFrame(sorted(versions().items()), columns=["package", "version"])))

    # -- notes
    if off:
        notes.append(off)
    notes += [f"{figs[k].title}: {figs[k].note}" for k in shown if figs[k].path is None]
    for title, why in sorted(whys):
        if why:
            notes.append(f"{title}: {why}")
    page.section("Notes")
    if partial:
        notes.insert(0, f"partial run: stages up to {partial!r} only (--until)")
    if notes:
        page.html("<ul>" + "".join(f"<li>{H.esc(n)}</li>" for n in notes) + "</ul>")
    else:
        page.text("Every figure and table was produced.")

    when = time.strftime("%Y-%m-%d %H:%M:%S")
    subtitle = H.esc(f"{ctx.outdir.resolve()} · {when}"
                     + (f" · partial run (until {partial})" if partial else ""))
    out = ctx.outdir / "report.html"
    H.write_atomic(out, page.render(subtitle))
    log.info("report: %s (%d notes)", out, len(notes))
    return out
