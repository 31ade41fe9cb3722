"""The gsea stage: case vs control rankings per cluster x time point, then preranked GSEA."""

import shutil

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from make_10x import barcodes, write_10x_v3

from cellmill.config import load_config
from cellmill.engine.registry import Context
from cellmill.io.ingest import ingest
from cellmill.stages.gsea.stage import run_gsea

N_GENES = 300
PLANTED = [f"G{i}" for i in range(20)]  # shifted up in SNI, cluster "0", time point 3d


def _study(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    mu = rng.gamma(1.0, 1.0, N_GENES) * 0.8
    for s, (cond, tp) in enumerate([(c, t) for c in ("SNI", "Sham") for t in ("3d", "5mo")]):
        n = 400
        lam = np.tile(mu, (n, 1))
        clusters = np.where(np.arange(n) < n // 2, 0, 1)
        if cond == "SNI" and tp == "3d":
            lam[clusters == 0, :20] *= 3.0
        counts = sp.csr_matrix(rng.poisson(lam))
        write_10x_v3(tmp_path / f"s{s}.h5", counts, barcodes(n, seed=s),
                     [f"G{i}" for i in range(N_GENES)])
        rows.append({"sample": f"S{s}", "path": f"s{s}.h5", "condition": cond, "timepoint": tp})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    gmt = tmp_path / "sets.gmt"
    sets = {"PLANTED": PLANTED, "OTHER": [f"G{i}" for i in range(100, 130)]}
    gmt.write_text("".join(f"{k}\tna\t" + "\t".join(v) + "\n" for k, v in sets.items()))
    store = ingest(tmp_path / "m.csv", tmp_path / "s.zarr")
    cluster = np.tile(np.where(np.arange(400) < 200, "0", "1"), 4)
    store.update_obs(cluster=pd.Categorical(cluster, categories=["0", "1"]))
    return store, gmt


def test_gsea_stage_finds_planted_set(tmp_path):
    store, gmt = _study(tmp_path)
    cfg = load_config(None, [f"gsea.gmt={gmt}", "gsea.min_size=5",
                             "study.timepoints=['3d','5mo']"])
    ctx = Context(cfg, tmp_path / "out", store=store, progress=False)
    run_gsea(ctx)
    res = pd.read_csv(ctx.tables / "gsea.csv")
    assert list(res.columns) == ["pathway", "pval", "padj", "log2err", "ES", "NES", "size",
                                 "leadingEdge", "cluster", "timepoint"]
    assert len(res) == 2 * 2 * 2
    hit = res[(res.pathway == "PLANTED") & (res.cluster == 0) & (res.timepoint == "3d")].iloc[0]
    assert hit.NES > 0 and hit.pval < 1e-3
    others = res[~((res.pathway == "PLANTED") & (res.cluster == 0) & (res.timepoint == "3d"))]
    assert (others.pval > 1e-3).all()

    # the ranking is Seurat's avg_log2FC of SNI vs Sham in that cluster and time point
    ranks = pd.read_csv(ctx.tables / "gsea_ranks" / "0_3d.csv").set_index("gene")["stat"]
    x = store.read_rows(0, store.n_cells).toarray().astype(float)
    obs = store.obs()
    y = np.log1p(x / obs["n_counts"].to_numpy()[:, None] * 1e4)
    sel = (obs.cluster == "0") & (obs.timepoint == "3d")
    m1 = np.expm1(y[(sel & (obs.condition == "SNI")).to_numpy()]).mean(0)
    m2 = np.expm1(y[(sel & (obs.condition == "Sham")).to_numpy()]).mean(0)
    expected = np.log2(m1 + 1) - np.log2(m2 + 1)
    np.testing.assert_allclose(ranks.loc[store.var().index].to_numpy(), expected, atol=1e-9)


def test_gsea_missing_gmt_is_clear(tmp_path):
    """The stage's parameters need no GMT (a run without study columns has none, issue 18);
    the stage names the missing file when the study needs it (preflight, before any work)."""
    from cellmill.engine.registry import load_stages, stage_hash
    from cellmill.errors import InputError

    store, _ = _study(tmp_path)
    cfg = load_config(None, [f"gsea.gmt={tmp_path / 'none.gmt'}"])
    stage_hash(load_stages()["gsea"], cfg, {})
    with pytest.raises(InputError, match="none.gmt"):
        run_gsea(Context(cfg=cfg, outdir=tmp_path / "out", store=store, progress=False))


def test_gsea_stage_same_for_any_worker_count(tmp_path):
    """Rankings run in worker threads: the table is the same for 1 and 3 workers and for
    another memory budget (the gene-major copy is rebuilt with other windows)."""
    from cellmill.io.store import GENE_MAJOR

    store, gmt = _study(tmp_path)
    got = []
    for workers, memory in ((1, "2GB"), (3, "100MB")):
        cfg = load_config(None, [f"gsea.gmt={gmt}", "gsea.min_size=5",
                                 "study.timepoints=['3d','5mo']", f"compute.workers={workers}",
                                 f"compute.memory='{memory}'"])
        out = tmp_path / f"out{workers}"
        shutil.rmtree(store.path / "layers" / GENE_MAJOR, ignore_errors=True)
        run_gsea(Context(cfg, out, store=store, progress=False))
        got.append((out / "tables" / "gsea.csv").read_bytes())
    assert got[0] == got[1] and len(got[0]) > 100
