"""Pseudobulk in the statistics stage (issue 20): the per sample x cluster sums made in the
grouped pass, the contrasts and designs, and the target-test columns, checked against the
simulated study the R references were made from (tests/reference/pseudobulk/: edgeR + limma
on the same sums), against sums read straight from the 10x files, and against scipy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from test_pseudobulk_de import REF, assert_rel, read

from cellmill.config import load_config
from cellmill.io.ingest import ingest
from cellmill.io.store import Store
from cellmill.simulate import simulate_study
from cellmill.stages.statistics.grouped import grouped_statistics
from cellmill.stages.statistics.pseudobulk import (
    _design,
    one_sided,
    pseudobulk_dataset,
    pseudobulk_tests,
    sample_metadata,
)
from cellmill.stages.statistics.stage import add_pseudobulk, target_tests

COLS = ["cluster", "condition", "timepoint", "sample"]
POPULATIONS = ("MG_homeostatic_1", "MG_Apoe_high", "MG_homeostatic_2")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The references' simulated study (6,000 cells, seed 20, no animal variation), with the
    planted populations as the clusters and the truth's QC (as make_pseudobulk_input.py)."""
    root = tmp_path_factory.mktemp("pb")
    simulate_study(root / "sim", n_cells=6000, seed=20, threads=1, replicate_sd=0.0)
    store = ingest(root / "sim" / "manifest.csv", root / "study.zarr")
    truth = pd.read_csv(root / "sim" / "truth.csv").set_index("cell")["population"]
    pop = truth.reindex(store.obs().index).to_numpy()
    qc = ~np.isin(pop, ["low_quality", "doublet"])
    levels = sorted(set(pop[qc]))
    store.update_obs(qc_pass=qc, cluster=pd.Categorical(np.where(qc, pop, None),
                                                         categories=levels))
    store = Store(store.path)
    obs = store.obs()
    ds = grouped_statistics(store, COLS, 1e4, mask=qc, scheduler=("threads", 2))
    meta = sample_metadata(obs, "sample", ["condition", "timepoint", "sex"])
    pb = pseudobulk_dataset(ds, "sample", meta)
    cfg = load_config(None, [])
    table, fitted = pseudobulk_tests(pb, cfg, 10, ds=ds, workers=2)
    return dict(store=store, ds=ds, pb=pb, cfg=cfg, table=table, fitted=fitted, qc=qc, pop=pop)


def test_sums_equal_the_committed_input(study):
    """The grouped pass's sums are the sums make_pseudobulk_input.py read from the files."""
    pb, samples = study["pb"], pd.read_csv(REF / "sim" / "samples.csv")
    for p in POPULATIONS:
        ref = pd.read_csv(REF / "sim" / f"counts_{p}.csv.gz", index_col=0)
        got = pb["counts"].sel(cluster=p).to_pandas().T  # genes x samples
        assert list(got.index) == list(ref.index)
        assert np.array_equal(got[ref.columns].to_numpy(), ref.to_numpy())
        s = samples[samples.population == p].set_index("sample")["n_cells"]
        assert np.array_equal(pb["n_cells"].sel(cluster=p).to_pandas()[s.index].to_numpy(),
                              s.to_numpy())
    # sample properties come with the sums
    assert list(pb["sample_sex"].values[:2]) == ["female", "male"]


def test_sums_equal_brute_force(study):
    store, pb, qc = study["store"], study["pb"], study["qc"]
    obs = store.obs()
    x = store.read_rows(0, store.n_cells)
    for s in ("SNI_3d_F", "Sham_5mo_M"):
        for c in ("MG_interferon", "Neutrophil"):
            sel = np.flatnonzero(qc & (obs["sample"].astype(str) == s).to_numpy()
                                 & (study["pop"] == c))
            want = np.asarray(x[sel].sum(axis=0)).ravel()
            assert np.array_equal(pb["counts"].sel(sample=s, cluster=c).values, want)
            assert int(pb["n_cells"].sel(sample=s, cluster=c)) == len(sel)


@pytest.mark.parametrize("case,cluster,tp", [("sim_homeo1_pooled", "MG_homeostatic_1", "pooled"),
                                             ("sim_homeo2_5mo", "MG_homeostatic_2", "5mo")])
def test_contrasts_match_r(study, case, cluster, tp):
    """The stage's design for a cluster with time points pooled (~ condition + timepoint +
    sex) and for a cluster x time point (~ condition + sex) gives R's topTable."""
    t = study["table"]
    got = t[(t.cluster == cluster) & (t.timepoint == tp) & (t.contrast == "SNI_vs_Sham")]
    ref = read(REF / case / "toptable.csv.gz")
    assert list(got["gene"]) == list(ref["gene"])  # filterByExpr's genes, in gene order
    for col in ("logFC", "AveExpr", "t", "P.Value", "adj.P.Val"):
        assert_rel(got[col].to_numpy(), ref[col].to_numpy(), 1e-6, f"{case} {col}")
    n = 6 if tp == "pooled" else 2
    assert (got["n_samples_case"] == n).all() and (got["n_samples_control"] == n).all()


def test_cell_level_p_beside_it_matches_scipy(study):
    store, qc, pop = study["store"], study["qc"], study["pop"]
    t = study["table"]
    rows = t[(t.cluster == "MG_Apoe_high") & (t.timepoint == "3d")
             & (t.contrast == "SNI_vs_Sham")].iloc[::400]
    obs = store.obs()
    x = store.read_rows(0, store.n_cells).toarray().astype(np.float64)
    y = np.log1p(x / obs["n_counts"].to_numpy()[:, None] * 1e4)
    base = qc & (pop == "MG_Apoe_high") & (obs["timepoint"].astype(str) == "3d").to_numpy()
    case = base & (obs["condition"].astype(str) == "SNI").to_numpy()
    ctrl = base & (obs["condition"].astype(str) == "Sham").to_numpy()
    genes = list(store.var().index)
    for r in rows.itertuples():
        g = genes.index(r.gene)
        p = stats.ttest_ind(y[case, g], y[ctrl, g], equal_var=False).pvalue
        assert r.p_value_cells == pytest.approx(p, rel=1e-9)


def test_skipped_contrasts_say_why(study):
    t = study["table"]
    cfg = study["cfg"]
    few, _ = pseudobulk_tests(study["pb"], cfg, min_cells=10_000)
    assert (few["gene"] == "").all() and len(few) == len(t.drop_duplicates(
        ["cluster", "timepoint", "contrast"]))
    assert few["reason"].str.startswith("fewer than 2 samples with >= 10000 cells").all()
    # the target-test rows carry it
    tt = add_pseudobulk(target_tests(study["ds"], cfg), few)
    assert tt["p_value_pseudobulk"].isna().all()
    cond = tt["contrast"] == "SNI_vs_Sham"
    assert tt.loc[cond, "reason_pseudobulk"].str.startswith("fewer than 2 samples").all()
    # the time-point contrasts (3d vs 5mo, ...) have no pseudobulk twin, and say so
    assert (~cond).sum() > 0
    assert (tt.loc[~cond, "reason_pseudobulk"]
            == "no pseudobulk test of time-point contrasts").all()


def test_target_rows_get_the_one_sided_sample_p(study):
    cfg, t = study["cfg"], study["table"]
    tt = add_pseudobulk(target_tests(study["ds"], cfg), t)
    tested = tt[tt["p_value_pseudobulk"].notna()]
    assert len(tested) >= 10
    for r in tested.itertuples():
        hit = t[(t.gene == r.gene) & (t.cluster == r.cluster) & (t.timepoint == r.timepoint)
                & (t.contrast == r.contrast)].iloc[0]
        # limma's moderated t has df_total; the one-sided p is half the two-sided one on the
        # side of t, as pt(t, df, lower = FALSE) in R
        want = hit["P.Value"] / 2 if hit["t"] > 0 else 1 - hit["P.Value"] / 2
        assert r.p_value_pseudobulk == pytest.approx(want, rel=1e-12)
        assert (r.n_samples_case, r.n_samples_control) == (hit.n_samples_case,
                                                           hit.n_samples_control)
    # Sigmar1 is planted up in MG_homeostatic_2 at 5mo: the cell-level test finds it
    sig = tt[(tt.gene == "Sigmar1") & (tt.cluster == "MG_homeostatic_2") & (tt.timepoint == "5mo")]
    assert sig["p_value"].iloc[0] < 1e-3


def test_one_sided_and_design_rules():
    t = np.array([2.0, -2.0, 0.0])
    p = 2 * stats.t.sf(np.abs(t), 5)
    np.testing.assert_allclose(one_sided(t, p), stats.t.sf(t, 5), rtol=1e-12)
    np.testing.assert_allclose(one_sided(t, p, "less"), stats.t.cdf(t, 5), rtol=1e-12)
    # sex confounded with the condition: left out (the design would be rank-deficient)
    meta = pd.DataFrame({"sex": ["f", "f", "m", "m"], "timepoint": ["3d"] * 4})
    d, used = _design(meta, np.array([True, True, False, False]), ["timepoint", "sex"])
    assert used == [] and d.shape == (4, 2)
    # balanced: kept
    meta = pd.DataFrame({"sex": ["f", "m", "f", "m"]})
    d, used = _design(meta, np.array([True, True, False, False]), ["sex"])
    assert used == ["sex"] and d.shape == (4, 3) and d[:, 2].tolist() == [0, 1, 0, 1]


def test_gsea_ranks_by_the_moderated_t(study, tmp_path):
    """gsea.ranking = "pseudobulk_t": each cluster x time point is ranked by limma's t of its
    pseudobulk contrast; a skipped contrast gives an empty ranking (that pair is skipped)."""
    from cellmill.engine.tables import write_table
    from cellmill.errors import InputError
    from cellmill.stages.gsea.stage import pseudobulk_rankings

    t = study["table"]
    cfg = study["cfg"]
    pairs = [("MG_homeostatic_2", "5mo", None, None), ("Neutrophil", "3d", None, None)]
    with pytest.raises(InputError, match="pseudobulk.csv"):
        pseudobulk_rankings(tmp_path, cfg, pairs)
    skipped = pd.DataFrame([{"gene": "", "cluster": "Neutrophil", "timepoint": "3d",
                             "contrast": "SNI_vs_Sham", "reason": "fewer than 2 samples"}])
    write_table(pd.concat([t, skipped], ignore_index=True), tmp_path / "pseudobulk.csv")
    got = pseudobulk_rankings(tmp_path, cfg, pairs)
    want = t[(t.cluster == "MG_homeostatic_2") & (t.timepoint == "5mo")
             & (t.contrast == "SNI_vs_Sham")]
    assert list(got[0].index) == list(want["gene"])
    np.testing.assert_array_equal(got[0].to_numpy(), want["t"].to_numpy())
    assert got[1].empty


def test_narrow_slabs_and_sums_read_from_the_store_give_the_same_table(study, monkeypatch):
    """An atlas's many groups narrow the slabs of genes (slab_genes) and keep the sums on disk
    (a cluster read at a time): the same sums and the same table, bit for bit."""
    import cellmill.stages.statistics.pseudobulk as mod
    from cellmill.stages.statistics.pseudobulk import load_pseudobulk, write_pseudobulk

    assert mod.slab_genes(255) == 4096 and mod.slab_genes(3000) == 1280
    assert mod.slab_genes(10**6) == 256
    ds, store, cfg = study["ds"], study["store"], study["cfg"]
    monkeypatch.setattr(mod, "slab_genes", lambda rows: 64)
    assert ds.sizes["gene"] > 64 * 3
    narrow = pseudobulk_dataset(ds, "sample", sample_metadata(store.obs(), "sample",
                                                              ["condition", "timepoint", "sex"]))
    assert narrow["counts"].data.chunks[2][0] == 64
    assert np.array_equal(narrow["counts"].values, study["pb"]["counts"].values)
    write_pseudobulk(store, narrow)
    back = load_pseudobulk(store)
    assert np.array_equal(back["counts"].values, study["pb"]["counts"].values)
    table, _ = pseudobulk_tests(back, cfg, 10, ds=ds, workers=2)
    pd.testing.assert_frame_equal(table, study["table"])
