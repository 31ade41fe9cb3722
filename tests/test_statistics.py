"""Grouped statistics (one pass) and Welch t-tests from them: brute force, scipy and R's t.test."""

from __future__ import annotations

import math
from fractions import Fraction

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from make_10x import barcodes, write_10x_v3
from scipy import stats

from cellmill.config import Config, ConfigError
from cellmill.engine.registry import Context
from cellmill.io.ingest import ingest
from cellmill.io.store import Store
from cellmill.stages.statistics.grouped import (
    TARGET_COLUMNS,
    grouped_statistics,
    load_grouped_stats,
    write_grouped_stats,
)
from cellmill.stages.statistics.stage import add_pseudobulk, run_statistics, target_tests
from cellmill.stages.statistics.welch import bh_adjust, contrast, welch

COLS = ["cluster", "condition", "timepoint", "sample"]
N_GENES = 60


def _sample_counts(rng, n, cluster, condition):
    """Counts with cluster- and condition-specific genes; gene 0 is 'Sigmar1' (up in SNI)."""
    base = rng.lognormal(-1.5, 1.2, N_GENES)
    mu = np.outer(np.ones(n), base)
    for k in range(3):
        mu[cluster == k, 5 + 5 * k: 10 + 5 * k] *= 6.0
    mu[:, 0] = 0.8 * (2.0 if condition == "SNI" else 1.0)
    mu[:, 1] = 400.0  # a high, nearly constant gene: variance from sums would cancel
    depth = rng.uniform(0.5, 2.0, n)
    x = rng.poisson(mu * depth[:, None])
    x[:, 2] = 0  # a gene never seen
    return sp.csr_matrix(x.astype(np.int64))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    d = tmp_path_factory.mktemp("stats")
    rng = np.random.default_rng(7)
    rows, clusters = [], []
    genes = ["Sigmar1"] + [f"G{i}" for i in range(1, N_GENES)]
    k = 0
    for cond in ("SNI", "Sham"):
        for tp in ("3d", "14d", "5mo"):
            n = int(rng.integers(500, 900))
            cl = rng.integers(0, 3, n)
            name = f"{cond}_{tp}"
            write_10x_v3(d / f"{name}.h5", _sample_counts(rng, n, cl, cond),
                         barcodes(n, seed=k), genes)
            rows.append({"sample": name, "path": f"{name}.h5", "condition": cond,
                         "timepoint": tp})
            clusters.append(cl)
            k += 1
    pd.DataFrame(rows).to_csv(d / "manifest.csv", index=False)
    store = ingest(d / "manifest.csv", d / "study.zarr")
    cl = np.concatenate(clusters).astype(object)
    qc = np.ones(store.n_cells, dtype=bool)
    qc[rng.random(store.n_cells) < 0.05] = False
    cl[~qc] = None
    cl = pd.Categorical(np.where(qc, cl.astype(str), None), categories=["0", "1", "2"])
    store.update_obs(qc_pass=qc, cluster=cl)
    return Store(store.path)


def _lognorm(store):
    obs = store.obs()
    x = store.read_rows(0, store.n_cells).toarray().astype(np.float64)
    return np.log1p(x / obs["n_counts"].to_numpy()[:, None] * 1e4), obs


@pytest.fixture(scope="module")
def grouped(study):
    obs = study.obs()
    ds = grouped_statistics(study, COLS, 1e4, mask=obs["qc_pass"].to_numpy(),
                            scheduler=("threads", 2))
    return ds


def test_grouped_matches_brute_force(study, grouped):
    y, obs = _lognorm(study)
    x = study.read_rows(0, study.n_cells).toarray()
    ds = grouped
    qc = obs["qc_pass"].to_numpy()
    # str() of each value: pandas 3's astype(str) keeps NaN (the cluster of QC-failed cells)
    key = obs[COLS].astype(object).map(str).agg("|".join, axis=1).to_numpy()
    coords = pd.DataFrame({c: ds[c].values.astype(str) for c in COLS})
    assert len(coords) == len(set(key[qc]))  # every observed combination, nothing else
    for g in range(len(coords)):
        sel = qc & (key == "|".join(coords.iloc[g]))
        v = y[sel]
        assert ds["n"].values[g] == sel.sum()
        np.testing.assert_allclose(ds["sum"].values[g], v.sum(0), rtol=1e-13)
        np.testing.assert_allclose(ds["sum_sq"].values[g], (v * v).sum(0), rtol=1e-13)
        np.testing.assert_allclose(ds["sum_expm1"].values[g], np.expm1(v).sum(0), rtol=1e-13)
        assert np.array_equal(ds["nnz"].values[g], (v > 0).sum(0))
        assert np.array_equal(ds["counts"].values[g], x[sel].sum(0))  # the pseudobulk sums
        m2 = ((v - v.mean(0)) ** 2).sum(0)
        np.testing.assert_allclose(ds["m2"].values[g], m2, rtol=1e-11, atol=1e-300)


def test_m2_is_accurate_where_sums_cancel(study, grouped):
    """Gene G1 is high and nearly constant: exact rational arithmetic as the reference."""
    y, obs = _lognorm(study)
    ds = grouped
    j = 1
    for g in range(0, ds.sizes["group"], 5):
        sel = obs["qc_pass"].to_numpy().copy()
        for c in COLS:
            sel &= obs[c].astype(str).to_numpy() == str(ds[c].values[g])
        v = [Fraction(float(a)) for a in y[sel, j]]
        mean = sum(v) / len(v)
        exact = float(sum((a - mean) ** 2 for a in v))
        assert math.isclose(ds["m2"].values[g, j], exact, rel_tol=1e-13)
        naive = ds["sum_sq"].values[g, j] - ds["sum"].values[g, j] ** 2 / ds["n"].values[g]
        assert abs(naive - exact) / exact > 1e-13  # the naive formula would not do


def test_deterministic_for_any_block_size_and_scheduler(study, grouped):
    obs = study.obs()
    qc = obs["qc_pass"].to_numpy()
    assert study.n_cells > 4096  # the default granule: two slots a group, one or two blocks
    for kw in ({"block_cells": 4096, "scheduler": ("sync", 1)},
               {"block_cells": 8192, "scheduler": ("threads", 2)}):
        other = grouped_statistics(study, COLS, 1e4, mask=qc, **kw)
        for v in ("n", "sum", "sum_sq", "m2", "sum_expm1", "nnz", "counts"):
            assert np.array_equal(other[v].values, grouped[v].values), v
    # a finer granule: the same bits for blocks of one, three or all granules
    ref = grouped_statistics(study, COLS, 1e4, mask=qc, granule=1024, block_cells=1024,
                             scheduler=("sync", 1))
    for kw in ({"block_cells": 3072, "scheduler": ("threads", 2)},
               {"block_cells": 10**6, "scheduler": ("threads", 3)}):
        other = grouped_statistics(study, COLS, 1e4, mask=qc, granule=1024, **kw)
        for v in ("n", "sum", "sum_sq", "m2", "sum_expm1", "nnz", "counts"):
            assert np.array_equal(other[v].values, ref[v].values), v
    with pytest.raises(ValueError, match="granule"):
        grouped_statistics(study, COLS, 1e4, mask=qc, granule=1000)


def test_finished_groups_leave_memory_and_scratch_goes_with_the_dataset(study, grouped):
    """Cells come sample by sample: with blocks of 1,024 cells (samples of 500-900) a group is
    open for two blocks at most, so the pass holds a few of the 18 groups' accumulators, reusing
    rows, with the same moments as a pass that holds them all."""
    import gc

    qc = study.obs()["qc_pass"].to_numpy()
    timing = {}
    ds = grouped_statistics(study, COLS, 1e4, mask=qc, granule=1024, block_cells=1024,
                            scheduler=("sync", 1), timing=timing)
    assert timing["groups"] == ds.sizes["group"] == 18
    assert 3 <= timing["open_groups"] <= 9
    every = {}
    grouped_statistics(study, COLS, 1e4, mask=qc, granule=1024, block_cells=10**6,
                       scheduler=("sync", 1), timing=every)
    assert every["open_groups"] == 18  # one block: every group open at once
    for v in ("n", "nnz", "counts"):
        assert np.array_equal(ds[v].values, grouped[v].values), v
    for v in ("sum", "sum_sq", "m2", "sum_expm1"):
        np.testing.assert_allclose(ds[v].values, grouped[v].values, rtol=1e-12, atol=1e-300)
    scratch = list(study.path.parent.glob(f"{study.path.name}.statistics-scratch-*"))
    assert len(scratch) >= 1  # this Dataset's (and the module fixture's) planes
    del ds
    gc.collect()
    left = list(study.path.parent.glob(f"{study.path.name}.statistics-scratch-*"))
    assert len(left) == len(scratch) - 1


def test_group_spans_and_open_rows_match_brute_force():
    from cellmill.stages.statistics.grouped import group_spans, open_rows

    rng = np.random.default_rng(3)
    codes = np.repeat(rng.integers(-1, 7, 40), rng.integers(1, 300, 40))
    block = 256
    first, last, slots = group_spans(codes, 7, block)
    blocks = np.arange(len(codes)) // block
    n_blocks = int(blocks.max()) + 1
    for g in range(7):
        where = blocks[codes == g]
        if len(where):
            assert (first[g], last[g]) == (where.min(), where.max())
    assert slots == max(len(set(codes[blocks == b]) - {-1}) for b in range(n_blocks))
    seen = [g for g in range(7) if (codes == g).any()]
    open_at = [sum(first[g] <= b <= last[g] for g in seen) for b in range(n_blocks)]
    assert open_rows(first[seen], last[seen], n_blocks) == max(open_at)


def test_plane_files_read_windows_and_only_the_owner_removes_them(tmp_path):
    import gc
    import pickle

    from cellmill.io.planes import RowPlanes

    rows = RowPlanes(tmp_path / "planes", ["a"], (3, 5))
    want = np.arange(15, dtype=np.float64).reshape(3, 5)
    for r in (2, 0, 1):  # any order
        rows.write_row("a", r, want[r])
    rows.close()
    plane = rows.plane("a")
    assert np.array_equal(plane[0:3, 1:4], want[:, 1:4])
    assert rows.plane("a", np.int64)[1:2, :].dtype == np.int64
    copy = pickle.loads(pickle.dumps(plane))  # as a cluster's worker would get it
    assert np.array_equal(copy[:, :], want)
    del copy
    gc.collect()
    assert np.array_equal(plane[:, :], want)  # a copy's end does not remove the folder
    del rows
    gc.collect()
    assert (tmp_path / "planes").exists()  # the plane keeps it
    del plane
    gc.collect()
    assert not (tmp_path / "planes").exists()


def test_store_round_trip_and_anndata(study, grouped):
    write_grouped_stats(study, grouped)
    back = load_grouped_stats(study)
    assert back.attrs["group_by"] == COLS
    for v in ("n", "sum", "m2", "nnz", "counts"):
        assert np.array_equal(back[v].values, grouped[v].values)
    assert list(back["gene"].values.astype(str)) == list(study.var().index)
    a = ad.read_zarr(study.path)  # the store stays an AnnData store
    assert a.n_obs == study.n_cells and "grouped_stats" in a.uns


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_contrast_matches_scipy(study, grouped, alternative):
    y, obs = _lognorm(study)
    qc = obs["qc_pass"].to_numpy()
    alt_r = "two.sided" if alternative == "two-sided" else alternative
    case = {"condition": "SNI", "cluster": ["0", "2"]}
    control = {"condition": "Sham", "cluster": ["0", "2"], "timepoint": ["3d", "5mo"]}
    res = contrast(grouped, case, control, alternative=alt_r)
    cl, cond, tp = (obs[c].astype(str).to_numpy() for c in ("cluster", "condition", "timepoint"))
    x_sel = qc & (cond == "SNI") & np.isin(cl, ["0", "2"])
    y_sel = qc & (cond == "Sham") & np.isin(cl, ["0", "2"]) & np.isin(tp, ["3d", "5mo"])
    assert (res["n_case"] == x_sel.sum()).all() and (res["n_control"] == y_sel.sum()).all()
    for j in range(N_GENES):
        a, b = y[x_sel, j], y[y_sel, j]
        if j == 2:  # never expressed: NaN with a reason (R: t = NaN), not a crash
            assert np.isnan(res["p_value"][j]) and "constant" in res["reason"][j]
            continue
        ref = stats.ttest_ind(a, b, equal_var=False, alternative=alternative)
        assert math.isclose(res["t"][j], ref.statistic, rel_tol=1e-10)
        assert math.isclose(res["p_value"][j], ref.pvalue, rel_tol=1e-10)
        assert math.isclose(res["mean_case"][j], a.mean(), rel_tol=1e-13)
        va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
        df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
        assert math.isclose(res["df"][j], df, rel_tol=1e-10)
        assert res["reason"][j] == ""
        fc = np.log2(np.expm1(a).mean() + 1) - np.log2(np.expm1(b).mean() + 1)
        assert abs(res["avg_log2FC"][j] - fc) < 1e-12
        assert math.isclose(res["pct_case"][j], (a > 0).mean(), rel_tol=1e-15)
        assert math.isclose(res["pct_control"][j], (b > 0).mean(), rel_tol=1e-15)


def test_welch_edge_cases():
    r = welch([1, 5, 5, 3], [1.0, 2.0, 0.0, 1.0], [np.nan, 0.0, 0.0, 1.0],
              [5, 1, 5, 3], [0.0, 1.0, 0.0, 1.0], [1.0, np.nan, 0.0, 1.0], "greater")
    assert np.isnan(r["p_value"][:3]).all()
    assert "case" in r["reason"][0] and "control" in r["reason"][1]
    assert "constant" in r["reason"][2]
    assert r["reason"][3] == "" and math.isclose(r["p_value"][3], 0.5)


def test_bh_matches_scipy():
    rng = np.random.default_rng(3)
    p = rng.random(40) ** 3
    p[[3, 17]] = np.nan
    got = bh_adjust(p)
    ok = ~np.isnan(p)
    np.testing.assert_allclose(got[ok], stats.false_discovery_control(p[ok]), rtol=1e-15)
    assert np.isnan(got[~ok]).all()


def test_target_tests_table(study, grouped):
    cfg = Config()
    table = target_tests(grouped, cfg)
    assert list(table.columns) == TARGET_COLUMNS
    assert set(table["gene"]) == {"Sigmar1"}
    cond = table[table["contrast"] == "SNI_vs_Sham"]
    assert set(cond["cluster"]) == {"all", "0", "1", "2"}
    assert set(cond["timepoint"]) == {"3d", "14d", "5mo", "pooled"}
    assert len(cond) == 16
    times = table[table["contrast"] != "SNI_vs_Sham"]
    assert set(times["contrast"]) == {"3d_vs_5mo", "14d_vs_5mo"} and len(times) == 8
    assert (table["alternative"] == "greater").all()
    np.testing.assert_allclose(table["p_adj_bh"], stats.false_discovery_control(
        table["p_value"]), rtol=1e-14)
    # one row against scipy on the raw values: cluster 1 at 14d, SNI > Sham
    y, obs = _lognorm(study)
    qc = obs["qc_pass"].to_numpy()
    cl, cond_, tp = (obs[c].astype(str).to_numpy() for c in ("cluster", "condition", "timepoint"))
    row = table[(table["cluster"] == "1") & (table["timepoint"] == "14d")].iloc[0]
    a = y[qc & (cl == "1") & (tp == "14d") & (cond_ == "SNI"), 0]
    b = y[qc & (cl == "1") & (tp == "14d") & (cond_ == "Sham"), 0]
    ref = stats.ttest_ind(a, b, equal_var=False, alternative="greater")
    assert math.isclose(row["p_value"], ref.pvalue, rel_tol=1e-10)
    assert row["n_case"] == len(a) and row["n_control"] == len(b)
    # pooled time points, all clusters; and a time-point contrast (conditions pooled)
    row = table[(table["cluster"] == "all") & (table["timepoint"] == "pooled")].iloc[0]
    a, b = y[qc & (cond_ == "SNI"), 0], y[qc & (cond_ == "Sham"), 0]
    assert math.isclose(row["t"], stats.ttest_ind(a, b, equal_var=False).statistic,
                        rel_tol=1e-10)
    row = table[(table["cluster"] == "all") & (table["contrast"] == "14d_vs_5mo")].iloc[0]
    a, b = y[qc & (tp == "14d"), 0], y[qc & (tp == "5mo"), 0]
    ref = stats.ttest_ind(a, b, equal_var=False, alternative="greater")
    assert math.isclose(row["p_value"], ref.pvalue, rel_tol=1e-10)


def test_unknown_target_gene_is_a_config_error(grouped):
    cfg = Config()
    cfg.study.target_genes = ["Sigmar1", "Nope1"]
    with pytest.raises(ConfigError, match="Nope1"):
        target_tests(grouped, cfg)


def test_grouping_follows_the_study_columns():
    from cellmill.stages.statistics.stage import _group_by

    cfg = Config()
    assert _group_by(cfg, ["cluster", "condition", "timepoint", "sample", "sex"]) == COLS
    cfg.study.condition, cfg.study.timepoint = "surgery", "tp"  # GSE162807's manifest names
    assert _group_by(cfg, ["cluster", "surgery", "tp", "sample"]) == [
        "cluster", "surgery", "tp", "sample"]
    assert _group_by(Config(), ["sample", "sex"]) == ["sample"]  # e.g. one 10x file


def test_stage_refuses_unknown_gene_before_the_pass(study, tmp_path, monkeypatch):
    import cellmill.stages.statistics.stage as mod

    def no_pass(*a, **k):
        raise AssertionError("the pass ran")

    monkeypatch.setattr(mod, "grouped_statistics", no_pass)
    cfg = Config()
    cfg.study.target_genes = ["Nope1"]
    with pytest.raises(ConfigError, match="Nope1"):
        run_statistics(Context(cfg=cfg, outdir=tmp_path, store=study, progress=False))


def test_stage_writes_table_and_store(study, tmp_path):
    cfg = Config()
    cfg.compute.workers = 1
    ctx = Context(cfg=cfg, outdir=tmp_path, store=study, progress=False)
    scratch = f"{study.path.name}.statistics-scratch"
    dead = study.path.parent / f"{scratch}-999999999-x"  # a killed run's (no such pid)
    dead.mkdir()
    live = sorted(study.path.parent.glob(f"{scratch}-*"))  # this process's, in use
    run_statistics(ctx)
    assert not dead.exists()
    assert set(live) - {dead} <= set(study.path.parent.glob(f"{scratch}-*"))
    table = pd.read_csv(tmp_path / "tables" / "target_tests.csv")
    assert list(table.columns) == TARGET_COLUMNS and len(table) == 24
    assert load_grouped_stats(study).sizes["group"] > 0
    # one sample per condition x time point: pooled contrasts (3 vs 3 samples) are tested,
    # per time point they are skipped with the reason
    pb = pd.read_csv(tmp_path / "tables" / "pseudobulk.csv", keep_default_na=False)
    pooled = pb[(pb.timepoint == "pooled") & (pb.contrast == "SNI_vs_Sham")]
    assert (pooled["gene"] != "").sum() > 20 and (pooled["n_samples_case"] == 3).all()
    per_tp = pb[pb.timepoint == "3d"]
    assert (per_tp["gene"] == "").all() and per_tp["reason"].str.startswith("fewer than 2").all()
    assert study.has("uns", "pseudobulk")
    assert table["p_value_pseudobulk"].notna().sum() >= 4  # Sigmar1 pooled, per cluster + all
    # the stage keeps only the rows the target tests need while it writes the table: the same
    # target-test columns as from the whole table
    whole = pd.read_csv(tmp_path / "tables" / "pseudobulk.csv")
    whole[["gene", "reason"]] = whole[["gene", "reason"]].fillna("")
    want = add_pseudobulk(target_tests(load_grouped_stats(study), cfg), whole)
    np.testing.assert_allclose(table["p_value_pseudobulk"].to_numpy(),  # (CSV parsing: 1 ulp)
                               want["p_value_pseudobulk"].to_numpy(), rtol=1e-14)
    assert list(table["reason_pseudobulk"].fillna("")) == list(want["reason_pseudobulk"])
    assert list(table["n_samples_case"]) == list(want["n_samples_case"])
    # turned off: no sums, no table, and the target tests say why
    cfg.study.pseudobulk = False
    run_statistics(Context(cfg=cfg, outdir=tmp_path, store=study, progress=False))
    assert not study.has("uns", "pseudobulk")
    assert not (tmp_path / "tables" / "pseudobulk.csv").exists()
    table = pd.read_csv(tmp_path / "tables" / "target_tests.csv")
    assert table["p_value_pseudobulk"].isna().all()
    assert (table["reason_pseudobulk"] == "study.pseudobulk = false").all()


# ---------------------------------------------------------------- parity with R's t.test


def test_ttest_parity_with_r(seurat_reference, shared_data, tmp_path):
    ref_dir = seurat_reference / "pbmc1k"
    if not (ref_dir / "ttest.csv").exists():
        pytest.skip("Seurat reference outputs not generated")
    ref = pd.read_csv(ref_dir / "ttest.csv", float_precision="round_trip",
                      keep_default_na=False, na_values=["NA", "NaN"])
    clusters = pd.read_csv(ref_dir / "clusters.csv", dtype=str)
    store = ingest(shared_data / "10x" / "pbmc_1k_citeseq_v3.h5", tmp_path / "pbmc.zarr")
    obs = store.obs()
    qc = obs.index.isin(clusters["cell"])
    assert qc.sum() == len(clusters) == 821
    cl = pd.Series("", index=obs.index, dtype=object)
    cl[clusters["cell"].to_numpy()] = clusters["seurat_clusters"].to_numpy()
    # groups: the first cell of cluster 0, the rest of cluster 0, every other cell
    grp = np.where(cl.to_numpy() == "0", "0", "other").astype(object)
    grp[np.flatnonzero(qc & (cl.to_numpy() == "0"))[0]] = "first0"
    store.update_obs(qc_pass=qc, grp=pd.Categorical(np.where(qc, grp, None)))
    ds = grouped_statistics(store, ["grp"], 1e4, mask=qc)
    sides = {"cluster0_vs_rest": ({"grp": ["first0", "0"]}, {"grp": "other"}),
             "first_cell_of_cluster0_vs_rest": ({"grp": "first0"}, {"grp": ["0", "other"]})}
    checked = errors = 0
    for (case, alt), part in ref.groupby(["case", "alternative"], sort=False):
        if case not in sides:
            continue
        res = contrast(ds, *sides[case], genes=part["gene"], alternative=alt)
        for (_, r), (_, g) in zip(part.iterrows(), res.iterrows(), strict=True):
            assert r["gene"] == g["gene"]
            assert g["n_case"] == r["n_x"] and g["n_control"] == r["n_y"]
            assert math.isclose(g["mean_case"], r["mean_x"], rel_tol=1e-12, abs_tol=1e-300)
            assert math.isclose(g["mean_control"], r["mean_y"], rel_tol=1e-12, abs_tol=1e-300)
            if r["error"] or np.isnan(r["t"]):  # R stops, or gives NaN: NaN with a reason
                assert np.isnan(g["t"]) and np.isnan(g["p_value"]) and g["reason"]
                errors += 1
                continue
            for col in ("t", "df", "p_value"):
                assert math.isclose(g[col], r[col], rel_tol=1e-10), (r["gene"], alt, col)
            assert g["reason"] == ""
            checked += 1
    assert checked >= 100 and errors >= 4
    # R: "data are essentially constant" (five zeros vs five copies of a maximum)
    syn = ref[ref["case"] == "synthetic_5_zeros_vs_5_max"]
    for _, r in syn.iterrows():
        res = welch(5, 0.0, 0.0, 5, r["mean_y"], 0.0, r["alternative"])
        assert "constant" in str(res["reason"]) and np.isnan(res["p_value"])
        assert "constant" in r["error"]


def test_group_codes_match_pandas_groupby():
    """Codes and coordinates as pandas' sorted groupby numbers them (observed combinations in
    category-code order; cells with a missing value or outside the mask are left out)."""
    from cellmill.stages.statistics.grouped import group_codes

    rng = np.random.default_rng(3)
    n = 5000
    obs = pd.DataFrame({
        "cluster": pd.Categorical(rng.integers(0, 12, n).astype(str)),
        "sample": pd.Categorical(rng.choice(["s2", "s10", "s1", None], n),
                                 categories=["s2", "s10", "s1"]),
        "sex": pd.Categorical(rng.choice(["M", "F"], n))})
    mask = rng.random(n) < 0.9
    codes, coords = group_codes(obs, ["cluster", "sample", "sex"], mask)
    sub = obs[mask & obs["sample"].notna().to_numpy()]
    want = sub.groupby(["cluster", "sample", "sex"], observed=True, sort=True).ngroup()
    expect = np.full(n, -1)
    expect[want.index.to_numpy()] = want.to_numpy()
    np.testing.assert_array_equal(codes, expect)
    first = sub.groupby(["cluster", "sample", "sex"], observed=True, sort=True).size().index
    assert [tuple(r) for r in coords.itertuples(index=False)] == [tuple(map(str, t))
                                                                  for t in first]


def _slot_reference(x, n_counts, slot_of_row, n_slots):
    """Per slot and touched gene, with numpy: sum y, sum expm1(y), nonzeros, m2 of the
    nonzeros (two-pass), sum of counts."""
    out = {}
    y = np.log1p(x / n_counts[:, None] * 1e4)
    for s in range(n_slots):
        sel = slot_of_row == s
        xs, ys = x[sel], y[sel]
        for g in np.flatnonzero((xs > 0).any(0)):
            v = ys[xs[:, g] > 0, g]
            out[s, g] = (v.sum(), np.expm1(v).sum(), len(v), ((v - v.mean()) ** 2).sum(),
                         xs[:, g].sum())
    return out


def test_grouped_block_long_and_short_rows_match_numpy():
    """Rows past EAGER_ROW stored values take the table filled up front, shorter ones the
    memoised one; counts past the table (>= LUT) are computed directly."""
    from cellmill.kernels import grouped as kern

    rng = np.random.default_rng(3)
    n_rows, n_genes = 40, 700
    dense = rng.random((n_rows, n_genes)) < np.where(np.arange(n_rows) % 2, 0.6, 0.1)[:, None]
    x = np.where(dense, rng.geometric(0.15, (n_rows, n_genes)), 0).astype(np.int64)
    x[0, :5] = [40, 100, 31, 32, 1]
    lengths = (x > 0).sum(1)
    assert lengths.max() >= kern.EAGER_ROW > lengths.min()
    n_counts = x.sum(1).astype(np.float64)
    slot_of_row = rng.integers(-1, 4, n_rows)
    m = sp.csr_matrix(x)
    n, ptr, genes, vals = kern.grouped_block(m.data.astype(np.int32), m.indices,
                                             m.indptr.astype(np.int64), slot_of_row, n_counts,
                                             1e4, 4, n_genes)
    ref = _slot_reference(x, n_counts, slot_of_row, 4)
    assert np.array_equal(n, np.bincount(slot_of_row[slot_of_row >= 0], minlength=4))
    assert len(genes) == len(ref)
    for s in range(4):
        assert np.all(np.diff(genes[ptr[s]:ptr[s + 1]]) > 0)  # ascending within a slot
        for t in range(ptr[s], ptr[s + 1]):
            want = ref[s, genes[t]]
            got = vals[t]
            np.testing.assert_allclose(got[[kern.SUM, kern.SUM_EXPM1]], want[:2], rtol=1e-14)
            assert got[kern.NNZ] == want[2] and got[kern.COUNTS] == want[4]
            np.testing.assert_allclose(got[kern.M2], want[3], rtol=1e-10, atol=1e-14)


def test_grouped_block_into_reuses_arrays_that_hold_the_block_and_replaces_small_ones():
    """The pass hands each block arrays a former block filled (stale values): the entries must
    not depend on them, and arrays too small for the block's bound are replaced."""
    from cellmill.kernels import grouped as kern

    rng = np.random.default_rng(5)
    x = np.where(rng.random((30, 200)) < 0.3, rng.geometric(0.2, (30, 200)), 0)
    m = sp.csr_matrix(x.astype(np.int32))
    slot_of_row = rng.integers(0, 3, 30)
    args = (m.data, m.indices, m.indptr.astype(np.int64), slot_of_row,
            x.sum(1).astype(np.float64), 1e4, 3, 200)
    n, ptr, genes, vals = kern.grouped_block(*args)
    big_g = np.full(3 * 200, 7, dtype=np.int32)  # the bound is <= slots x genes
    big_v = np.full((3 * 200, kern.N_VALS), np.nan)
    n2, ptr2, g2, v2, nt = kern.grouped_block_into(*args, big_g, big_v)
    assert g2 is big_g and v2 is big_v and nt == len(genes)
    assert np.array_equal(n2, n) and np.array_equal(ptr2, ptr)
    assert np.array_equal(g2[:nt], genes) and np.array_equal(v2[:nt], vals)
    small_g, small_v = np.zeros(4, dtype=np.int32), np.zeros((4, kern.N_VALS))
    _, _, g3, v3, nt3 = kern.grouped_block_into(*args, small_g, small_v)
    assert g3 is not small_g and len(g3) >= nt3 == nt
    assert np.array_equal(g3[:nt3], genes) and np.array_equal(v3[:nt3], vals)


def test_grouped_block_refuses_counts_past_the_packed_sums():
    from cellmill.kernels import grouped as kern

    m = sp.csr_matrix(np.array([[3, 0, 2]], dtype=np.int32))
    with pytest.raises(ValueError, match="packed"):
        kern.grouped_block(m.data, m.indices, m.indptr.astype(np.int64), np.zeros(1, np.int64),
                           np.array([2.0 ** 44]), 1e4, 1, 3)
