"""The report: figures and report.html from a small synthetic study with stand-in stage outputs.

The store comes from real ingest + qc of synthetic 10x files; the outputs of the later stages
(clusters, UMAP, tables) are written here by hand, so the report is tested without them.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).parent))
from make_10x import barcodes, write_10x_v3  # noqa: E402

from cellmill.config import load_config  # noqa: E402
from cellmill.engine.registry import Context, run_stages

N_GENES = 300
TARGET = "Sigmar1"
SAMPLES = [(f"{c}_{t}", c, t) for c in ("SNI", "Sham") for t in ("3d", "14d", "5mo")]
N_CLUSTERS = 3


def _sim(tmp: Path, seed: int = 0):
    """Six samples; cell types 0..2 with marker genes; Sigmar1 up in SNI in type 1.
    Returns the config path and the truth (per cell: name, type, counts row)."""
    rng = np.random.default_rng(seed)
    genes = [TARGET] + [f"Gene{i}" for i in range(1, N_GENES)]
    rows, truth = [], []
    lines = ["sample,path,condition,timepoint"]
    for s, cond, tp in SAMPLES:
        n = 90
        types = rng.integers(0, N_CLUSTERS, n)
        mu = np.full((n, N_GENES), 0.6)
        for k in range(N_CLUSTERS):  # markers: genes 10k+1 .. 10k+10
            mu[types == k, 10 * k + 1: 10 * k + 11] = 6.0
        mu[:, 0] = 0.3
        if cond == "SNI":
            mu[types == 1, 0] = 3.0
        x = rng.poisson(mu)
        x[:3, :] = 0  # three near-empty cells that fail QC
        x[:3, :5] = 1
        m = sp.csr_matrix(x)
        bc = barcodes(n, seed=len(rows))
        write_10x_v3(tmp / f"{s}.h5", m, bc, genes)
        lines.append(f"{s},{s}.h5,{cond},{tp}")
        rows.append(x)
        truth += [(f"{s}_{b}", int(t)) for b, t in zip(bc, types, strict=True)]
    (tmp / "manifest.csv").write_text("\n".join(lines) + "\n")
    gmt = ["SET_UP\tdesc\t" + "\t".join(genes[11:21]),  # type-1 markers
           "SET_OTHER\tdesc\t" + "\t".join(genes[100:115])]
    (tmp / "sets.gmt").write_text("\n".join(gmt) + "\n")
    cfg = tmp / "study.toml"
    cfg.write_text('[input]\nmanifest = "manifest.csv"\n[qc]\nmin_features = 20\n'
                   'max_features = 299\n[gsea]\ngmt = "sets.gmt"\nmin_size = 2\n')
    truth = pd.DataFrame(truth, columns=["cell", "type"]).set_index("cell")
    return cfg, truth, np.vstack(rows)


def _stand_ins(ctx: Context, truth: pd.DataFrame) -> None:
    """What the later stages would write: clusters, UMAP, PCA sd and the tables."""
    store, tables = ctx.store, ctx.tables
    obs = store.obs()
    qc = obs["qc_pass"].to_numpy()
    typ = truth.loc[obs.index, "type"].to_numpy()
    lab = pd.Categorical(np.where(qc, typ.astype(str), None), categories=["0", "1", "2"])
    store.update_obs(cluster=lab)
    rng = np.random.default_rng(1)
    umap = np.column_stack([typ * 5.0, (typ % 2) * 3.0]) + rng.normal(size=(len(obs), 2))
    umap[~qc] = np.nan
    store.write_array("obsm", "X_umap", umap)
    store.write_array("uns", "pca_stdev", np.sort(rng.uniform(1, 10, 50))[::-1].copy())
    var = store.var()
    pd.DataFrame({"gene": var.index, "mean": rng.uniform(0.1, 5, len(var)),
                  "variance": 1.0, "variance_expected": 1.0,
                  "variance_standardized": rng.uniform(0.5, 3, len(var)),
                  "highly_variable": np.arange(len(var)) < 40,
                  "rank": np.where(np.arange(len(var)) < 40, np.arange(len(var)) + 1, 0)}
                 ).to_csv(tables / "hvg.csv", index=False)
    rows = []
    for cl in ["all", "0", "1", "2"]:
        for tp in ["3d", "14d", "5mo", "pooled"]:
            up = cl == "1"
            rows.append((TARGET, cl, tp, "SNI > Sham", 1.2 if up else 0.3, 0.3, 40, 40, 5.0 if up
                         else 0.1, 70.0, 1e-6 if up else 0.45, 1e-5 if up else 0.6, "greater"))
    rows.append((TARGET, "all", "pooled", "3d vs 5mo", 0.5, 0.4, 80, 80, 1.0, 150.0, 0.3, 0.3,
                 "two.sided"))
    tt = pd.DataFrame(rows, columns=["gene", "cluster", "timepoint", "contrast", "mean_case",
                                     "mean_control", "n_case", "n_control", "t", "df",
                                     "p_value", "p_adj_bh", "alternative"])
    # with the animals as replicates, cluster 1's finding holds at 5mo only
    tt["p_value_pseudobulk"] = np.where(tt["cluster"] != "1", 0.5,
                                        np.where(tt["timepoint"] == "5mo", 0.004, 0.2))
    tt["n_samples_case"], tt["n_samples_control"] = 3, 3
    tt.to_csv(tables / "target_tests.csv", index=False)
    pb = []
    for cl in ["0", "1", "2"]:
        for tp in ["3d", "14d", "5mo"]:
            p = rng.uniform(size=len(var))
            pb.append(pd.DataFrame({"gene": var.index, "cluster": cl, "timepoint": tp,
                                    "contrast": "SNI_vs_Sham", "P.Value": p,
                                    "p_value_cells": p ** 3}))
    pd.concat(pb).to_csv(tables / "pseudobulk.csv", index=False)
    mk = []
    for k in range(3):
        for j in range(10):
            mk.append((1e-20 * (j + 1), 2.0 - 0.1 * j, 0.9, 0.2, 1e-18 * (j + 1), str(k),
                       f"Gene{10 * k + 1 + j}"))
    pd.DataFrame(mk, columns=["p_val", "avg_log2FC", "pct.1", "pct.2", "p_val_adj", "cluster",
                              "gene"]).to_csv(tables / "markers.csv", index=False)
    (tables / "gsea_ranks").mkdir(exist_ok=True)
    gs = []
    for cl in ["0", "1", "2"]:
        for tp in ["3d", "14d", "5mo"]:
            stat = rng.normal(size=len(var))
            if cl == "1" and tp == "5mo":
                stat[11:21] += 3
            pd.DataFrame({"gene": var.index, "stat": stat}).to_csv(
                tables / "gsea_ranks" / f"{cl}_{tp}.csv", index=False)
            hit = cl == "1" and tp == "5mo"
            gs.append(("SET_UP", 1e-4 if hit else 0.5, 1e-3 if hit else 0.7, 0.5, 0.8, 2.1 if hit
                       else 0.3, 10, "Gene11;Gene12", cl, tp))
            gs.append(("SET_OTHER", 0.6, 0.7, 0.1, -0.2, -0.5, 15, "Gene100", cl, tp))
    pd.DataFrame(gs, columns=["pathway", "pval", "padj", "log2err", "ES", "NES", "size",
                              "leadingEdge", "cluster", "timepoint"]).to_csv(
        tables / "gsea.csv", index=False)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    cfg_path, truth, counts = _sim(tmp)
    cfg = load_config(cfg_path)
    ctx = Context(cfg=cfg, outdir=tmp / "out", progress=False)
    run_stages(ctx, until="qc")
    _stand_ins(ctx, truth)
    return ctx, truth, counts


def _imgs(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', text)]


def test_expression_matches_direct_lognormalisation(study):
    from cellmill.report.figures import ReportInputs

    ctx, truth, counts = study
    inp = ReportInputs(ctx.cfg, ctx.store, ctx.tables)
    y = inp.expression([TARGET, "Gene5"])
    obs = ctx.store.obs()
    var = ctx.store.var().index
    qc = obs["qc_pass"].to_numpy()
    # independent: the generated matrix (cells in manifest order), total counts from the rows
    x = counts[qc].astype(float)
    tot = x.sum(axis=1)
    for g in (TARGET, "Gene5"):
        ref = np.log1p(x[:, var.get_loc(g)] / tot * 1e4)
        np.testing.assert_allclose(y[g], ref, rtol=1e-12)


def test_expression_from_the_gene_major_copy(study, tmp_path):
    from cellmill.io.gene_major import build_gene_major
    from cellmill.io.store import Store
    from cellmill.report.figures import ReportInputs

    ctx, truth, counts = study
    shutil.copytree(ctx.store_path, tmp_path / "s.zarr")
    store = Store(tmp_path / "s.zarr")
    build_gene_major(store, 256 * 2**20)
    assert store.has_gene_major()
    y = ReportInputs(ctx.cfg, store, ctx.tables).expression([TARGET])[TARGET]
    qc = store.obs()["qc_pass"].to_numpy()
    x = counts[qc].astype(float)
    np.testing.assert_allclose(y, np.log1p(x[:, 0] / x.sum(axis=1) * 1e4), rtol=1e-12)


def test_partial_run_writes_a_report(study, tmp_path):
    from cellmill.engine.workflow import run_workflow

    ctx, *_ = study
    run_workflow(ctx.cfg, tmp_path, until="qc")
    text = (tmp_path / "report.html").read_text()
    assert "partial run: stages up to &#x27;qc&#x27;" in text
    assert (tmp_path / "figures" / "qc_distributions.png").is_file()
    assert json.loads((tmp_path / "run.json").read_text())["until"] == "qc"


def test_cluster_of_interest(study):
    from cellmill.report.figures import ReportInputs

    ctx, *_ = study
    inp = ReportInputs(ctx.cfg, ctx.store, ctx.tables)
    coi, why = inp.cluster_of_interest()
    assert coi == "1" and "5mo" in why
    ctx.cfg.study.cluster_of_interest = "2"
    try:
        assert ReportInputs(ctx.cfg, ctx.store, ctx.tables).cluster_of_interest()[0] == "2"
    finally:
        ctx.cfg.study.cluster_of_interest = ""


def test_cluster_of_interest_ignores_tiny_groups(study, tmp_path):
    from cellmill.report.figures import ReportInputs

    ctx, *_ = study
    cols = ["gene", "cluster", "timepoint", "contrast", "mean_case", "mean_control", "n_case",
            "n_control", "p_value"]
    rows = [(TARGET, "2", "5mo", "SNI_vs_Sham", 0.9, 0.0, 6, 5, 1e-8),  # tiny: not trusted
            (TARGET, "1", "5mo", "SNI_vs_Sham", 0.5, 0.2, 120, 110, 1e-3),
            (TARGET, "0", "5mo", "SNI_vs_Sham", 0.1, 0.3, 120, 110, 1e-4),  # a decrease
            (TARGET, "0", "3d", "SNI_vs_Sham", 0.9, 0.1, 120, 110, 1e-9)]  # not the last
    pd.DataFrame(rows, columns=cols).to_csv(tmp_path / "target_tests.csv", index=False)
    assert ReportInputs(ctx.cfg, ctx.store, tmp_path).cluster_of_interest()[0] == "1"


def test_running_es_matches_brute_force():
    from cellmill.report.figures import running_es

    rng = np.random.default_rng(0)
    stats = pd.Series(rng.normal(size=50), index=[f"g{i}" for i in range(50)])
    genes = {"g1", "g7", "g20", "g33"}
    es, hits = running_es(stats, genes)
    order = stats.sort_values(ascending=False, kind="stable")
    hit_w = sum(abs(order[g]) for g in genes)
    acc, ref = 0.0, []
    for g, v in order.items():
        acc += abs(v) / hit_w if g in genes else -1 / (50 - 4)
        ref.append(acc)
    np.testing.assert_allclose(es, ref, atol=1e-12)
    assert sorted(order.index[hits]) == sorted(genes)
    assert abs(es[-1]) < 1e-12


@pytest.fixture(scope="module")
def report(study):
    from cellmill.report.stage import build_report

    return build_report(study[0])


def test_full_report(study, report):
    ctx, *_ = study
    text = report.read_text()
    for name in ("fig1a_umap_clusters", "fig1b_target_by_cluster", "fig1c_target_by_condition",
                 "fig1d_target_by_timepoint", "fig1e_target_cluster_of_interest",
                 "fig2_gsea_nes_heatmap", "fig2b_gsea_nes_bars", "fig2c_enrichment_curves",
                 "fig3_markers_cluster_of_interest", "qc_distributions", "hvg_mean_variance",
                 "pca_elbow", "calibration_qq"):
        png = ctx.figures / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    imgs = _imgs(text)
    assert len(imgs) == 13 and all(b[:4] == b"\x89PNG" for b in imgs)
    # Table 2 has both p-values and says in words which findings need the cells as replicates
    assert "p_value_pseudobulk" in text
    assert ("3 do NOT hold with the animals as the unit (pseudobulk p &gt;= 0.05): "
            f"{TARGET} in cluster 1 at 3d; {TARGET} in cluster 1 at 14d; {TARGET} in cluster "
            "1 time points pooled") in text
    assert f"1 hold with the animals as the unit ({TARGET} in cluster 1 at 5mo)" in text
    # self-contained: nothing fetched from elsewhere
    assert not re.search(r'(src|href)="(?!data:|#)', text)
    for title in ("Table 1", "Table 2", "Table 3", "Table 4", "Table 5", "Parameters",
                  "Versions", "Stage timings"):
        assert title in text
    assert "Every figure and table was produced." in text
    # Table 3 lists cluster 1's markers; Table 4 the one significant pathway
    assert "Gene11" in text and "SET_UP" in text
    # the cells-per-cluster table counts the QC-passed cells of each planted type
    obs = ctx.store.obs()
    n1 = int(((obs["cluster"] == "1") & (obs["condition"] == "SNI")
              & (obs["timepoint"] == "5mo")).sum())
    assert f"<td>{n1}</td>" in text


def test_partial_report_notes_what_is_missing(tmp_path, study):
    from cellmill.report.stage import build_report

    ctx, *_ = study
    part = Context(cfg=ctx.cfg, outdir=tmp_path, progress=False)
    shutil.copytree(ctx.store_path, part.store_path)
    from cellmill.io.store import Store

    st = Store(part.store_path)
    obs = st.obs().drop(columns=["cluster"])
    st.write_df("obs", obs)
    shutil.copy(ctx.tables / "qc.csv", part.tables / "qc.csv")
    (part.figures / "fig1a_umap_clusters.png").write_bytes(b"stale")  # from an earlier run
    text = build_report(part, partial="qc").read_text()
    assert len(_imgs(text)) == 2  # QC and the PCA elbow (pca_stdev is in the copied store)
    assert "partial run" in text
    assert "skipped: obs has no &#x27;cluster&#x27; column" in text
    assert "skipped: tables/hvg.csv not found" in text
    assert sorted(p.name for p in part.figures.iterdir()) == ["pca_elbow.png",
                                                             "qc_distributions.png"]


def test_report_without_store(tmp_path):
    from cellmill.report.stage import build_report

    ctx = Context(cfg=load_config(None), outdir=tmp_path, progress=False)
    text = build_report(ctx, partial="ingest").read_text()
    assert "no store" in text and "<html" in text


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")
def test_renders_in_headless_chromium(report, tmp_path):
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
           "--window-size=1280,4000", report.resolve().as_uri()]
    # no pipes: Chromium's helper processes would hold them open long after the screenshot
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=120)
    assert shot.is_file() and shot.stat().st_size > 20_000
    from matplotlib.image import imread

    px = imread(shot)
    # rendered content, not a blank page: many distinct colours (figures drawn)
    rgb = (px[..., :3] * 255).astype(np.uint32).reshape(-1, 3)
    assert len(np.unique(rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2])) > 50


def test_dot_image_matches_brute_force():
    from cellmill.report.raster import dot_image

    rng = np.random.default_rng(7)
    n, h, w = 300, 23, 31
    xy = rng.uniform(-2, 5, size=(n, 2))
    codes = rng.integers(0, 4, n)
    palette = rng.integers(1, 256, size=(4, 4))
    order = rng.permutation(n)
    limits = (-2.5, 5.5, -2.2, 5.1)
    for diameter in (0.4, 2.0, 3.3):
        img = dot_image(xy, codes, palette, order, (h, w), diameter, limits)
        want = np.zeros((h, w, 4), np.uint8)
        r2 = max(diameter / 2, 0.5) ** 2
        cx = np.floor((xy[:, 0] - limits[0]) / (limits[1] - limits[0]) * w)
        cy = np.floor((limits[3] - xy[:, 1]) / (limits[3] - limits[2]) * h)
        for y in range(h):
            for x in range(w):
                hit = [c for c in order if (y - cy[c]) ** 2 + (x - cx[c]) ** 2 <= r2]
                if hit:  # the last cell painted wins
                    want[y, x] = palette[codes[hit[-1]]]
        np.testing.assert_array_equal(img, want)


def test_cell_counts_match_a_crosstab(study):
    from cellmill.report.figures import ReportInputs
    from cellmill.report.stage import cell_counts

    ctx, *_ = study
    inp = ReportInputs(ctx.cfg, ctx.store, ctx.outdir / "tables")
    obs = ctx.store.obs()
    obs = obs[obs["qc_pass"].astype(bool)]
    want = pd.crosstab(obs["cluster"].astype(str),
                       [obs["condition"].astype(str), obs["timepoint"].astype(str)])
    got = cell_counts(inp).set_index("cluster")
    assert got["total"].sum() == len(obs)
    for (c, t) in want.columns:
        np.testing.assert_array_equal(got[f"{c} {t}"].to_numpy(),
                                      want[(c, t)].reindex(got.index).to_numpy())
    # conditions: control first, then case; time points in the study's order
    s = ctx.cfg.study
    assert [col.split()[0] for col in got.columns[:3]] == [s.control] * 3
    assert [col.split()[1] for col in got.columns[:3]] == ["3d", "14d", "5mo"]


def _pixels(path: Path) -> np.ndarray:
    import matplotlib.image as mpimg

    return mpimg.imread(path)


def test_figures_drawn_by_several_processes_match_one(study, tmp_path):
    """The same figures, notes and captions with 3 processes as with one; the pixels the
    same up to antialiasing (matplotlib itself varies by 1/255 in a few pixels of long
    curves from one run to the next, in one process too)."""
    from cellmill.report.figures import ReportInputs
    from cellmill.report.parallel import make_figures

    ctx, *_ = study
    one = make_figures(ReportInputs(ctx.cfg, ctx.store, ctx.tables), tmp_path / "one", 1)
    three = make_figures(ReportInputs(ctx.cfg, ctx.store, ctx.tables), tmp_path / "three", 3)
    assert [(r.key, r.title, r.caption, r.note) for r in one] == \
        [(r.key, r.title, r.caption, r.note) for r in three]
    assert sum(r.path is not None for r in one) == 13
    for a, b in zip(one, three, strict=True):
        assert b.path == tmp_path / "three" / a.path.name
        pa, pb = _pixels(a.path), _pixels(b.path)
        assert pa.shape == pb.shape, a.key
        off = np.abs(pa - pb).max(axis=2)
        assert off.max() <= 2 / 255 + 1e-6 and (off > 0).mean() < 1e-3, a.key


def test_figures_of_a_broken_worker_pool_are_drawn_here(study, tmp_path, monkeypatch):
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    import cellmill.report.parallel as par
    from cellmill.report.figures import ReportInputs
    from cellmill.report.parallel import make_figures

    class Broken:  # a pool whose worker died: every task fails
        def submit(self, *a):
            f = Future()
            f.set_exception(BrokenProcessPool("a worker died"))
            return f

        def shutdown(self, **kw):
            pass

    monkeypatch.setattr(par, "spawn_pool", lambda *a: Broken())
    ctx, *_ = study
    res = make_figures(ReportInputs(ctx.cfg, ctx.store, ctx.tables), tmp_path, 4)
    assert [r.key for r in res if r.path is None] == []
    assert len(list(tmp_path.glob("*.png"))) == 13


@pytest.mark.parametrize("workers,memory,want", [
    (2, "2GB", 2), (2, "1GB", 2), (2, "600MB", 1), (16, "1GB", 2), (16, "2GB", 4),
    (16, "64GB", 13), (1, "8GB", 1)])
def test_figure_processes_fit_the_memory_budget(workers, memory, want):
    from cellmill.config import Config
    from cellmill.report.parallel import figure_workers

    cfg = Config()
    cfg.compute.workers, cfg.compute.memory = workers, memory
    assert figure_workers(cfg) == want


def test_figure_processes_on_a_cluster_are_this_machines_share(monkeypatch):
    """With a cluster, compute.workers and compute.memory are the cluster's: the report draws
    on this machine with at most its CPUs and one worker's share of memory each."""
    from cellmill import config
    from cellmill.report.parallel import figure_workers

    cfg = config.Config()
    cfg.compute.scheduler = "tcp://10.1.2.3:8786"
    cfg.compute.workers, cfg.compute.memory = 64, "256GB"
    monkeypatch.setattr(config, "_usable_cpus", lambda: 4)
    assert cfg.compute.local_workers == 4
    assert cfg.compute.local_memory_bytes == 4 * (256 * 10**9 // 64)
    assert figure_workers(cfg) == 4
    cfg.compute.memory = "16GB"  # 250 MB a worker: 1 GB here holds the parent and one more
    assert figure_workers(cfg) == 2
    cfg.compute.scheduler = "threads"  # a local scheduler: workers and memory as given
    assert cfg.compute.local_workers == 64 and figure_workers(cfg) == 13
