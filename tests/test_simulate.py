"""The study simulator (issue 3): design, file layout, determinism, realism, planted truth.

The files are read back with h5py and scipy only, so every check is independent of the simulator's
own code. One 20,000-cell study (the demo size) is shared by the module.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

from cellmill.simulate import simulate_study

REQUIRED_SYMBOLS = [
    "Sigmar1", "Tspo", "Cacna1b", "Eif4ebp1", "Xist", "Tsix", "Neat1", "Malat1", "Tnpo3",
    "AY036118", "P2ry12", "Tmem119", "Cx3cr1", "Hexb", "Csf1r", "Aif1", "Apoe",
    "mt-Nd1", "mt-Nd2", "mt-Co1", "mt-Co2", "mt-Atp8", "mt-Atp6", "mt-Co3", "mt-Nd3",
    "mt-Nd4l", "mt-Nd4", "mt-Nd5", "mt-Nd6", "mt-Cytb",
]
STUDY = {("SNI", "3d"): 31_852, ("SNI", "14d"): 35_560, ("SNI", "5mo"): 35_279,
         ("Sham", "3d"): 27_993, ("Sham", "14d"): 31_131, ("Sham", "5mo"): 33_903}
N = 20_000


def read_10x(path: Path):
    """(genes x cells CSC matrix, gene names, gene ids, barcodes) straight from the HDF5 file."""
    with h5py.File(path, "r") as f:
        m = f["matrix"]
        shape = tuple(int(v) for v in m["shape"][:])
        X = sp.csc_matrix((m["data"][:], m["indices"][:], m["indptr"][:]), shape=shape)
        names = [v.decode() for v in m["features/name"][:]]
        ids = [v.decode() for v in m["features/id"][:]]
        barcodes = [v.decode() for v in m["barcodes"][:]]
    return X, names, ids, barcodes


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim20k")
    # no animal variation: these tests check the cell-level calibration of unplanted contrasts
    # (test_replicates_vary_as_planted covers the variation)
    info = simulate_study(out, n_cells=N, seed=0, replicate_sd=0.0)
    manifest = pd.read_csv(out / "manifest.csv")
    truth = pd.read_csv(out / "truth.csv")
    planted = json.loads((out / "planted.json").read_text())
    mats, frames = [], []
    for row in manifest.itertuples():
        X, names, ids, barcodes = read_10x(out / row.path)
        mats.append(X)
        frames.append(pd.DataFrame({
            "cell": [f"{row.sample}_{b}" for b in barcodes], "sample": row.sample,
            "condition": row.condition, "timepoint": row.timepoint, "sex": row.sex}))
    X = sp.hstack(mats, format="csc")
    cells = pd.concat(frames, ignore_index=True)
    cells["population"] = truth.set_index("cell").loc[cells["cell"], "population"].to_numpy()
    cells["n_features"] = np.diff(X.indptr)
    cells["n_umi"] = np.asarray(X.sum(axis=0)).ravel()
    gene = {g: i for i, g in enumerate(names)}
    return dict(out=out, info=info, manifest=manifest, truth=truth, planted=planted, X=X,
                cells=cells, names=names, ids=ids, gene=gene)


@pytest.fixture(scope="module")
def passing(study):
    """QC-passing cells (Seurat's 500 < nFeature < 4000) and their log-normalised matrix (CSR)."""
    cells = study["cells"]
    keep = ((cells["n_features"] > 500) & (cells["n_features"] < 4000)).to_numpy()
    X = study["X"][:, np.flatnonzero(keep)]
    umi = np.asarray(X.sum(axis=0)).ravel()
    L = X.multiply(1e4 / umi[None, :]).tocsr()
    L.data = np.log1p(L.data)
    return cells[keep].reset_index(drop=True), X.tocsr(), L


def lognorm_row(passing, g):
    return np.asarray(passing[2][g].todense()).ravel()


# ---------------------------------------------------------------- design and layout


def test_design_samples_and_manifest(study):
    man = study["manifest"]
    assert list(man.columns) == ["sample", "path", "condition", "timepoint", "sex"]
    assert len(man) == 12
    assert set(man["condition"]) == {"SNI", "Sham"}
    assert set(man["timepoint"]) == {"3d", "14d", "5mo"}
    assert set(man["sex"]) == {"female", "male"}
    assert man.groupby(["condition", "timepoint"]).size().eq(2).all()
    for row in man.itertuples():
        assert row.sample == f"{row.condition}_{row.timepoint}_{row.sex[0].upper()}"
        assert not Path(row.path).is_absolute() and (study["out"] / row.path).is_file()


def test_design_cell_counts_follow_the_study(study, passing):
    cells = passing[0]
    assert len(cells) == N
    counts = cells.groupby(["condition", "timepoint"]).size()
    total = sum(STUDY.values())
    for key, n_study in STUDY.items():
        assert abs(counts[key] - N * n_study / total) <= 1
    fail = 1 - len(cells) / len(study["cells"])
    assert 0.03 <= fail <= 0.06


def test_truth_names_and_population_sizes(study, passing):
    truth, cells = study["truth"], study["cells"]
    assert list(truth.columns[:3]) == ["cell", "sample", "population"]
    assert truth["cell"].is_unique and len(truth) == len(cells)
    assert set(truth["cell"]) == set(cells["cell"])
    pattern = re.compile(r"^(SNI|Sham)_(3d|14d|5mo)_[FM]_[ACGT]{16}-1$")
    assert truth["cell"].map(lambda c: bool(pattern.match(c))).all()
    assert (truth["cell"].str.rsplit("_", n=1).str[0] == truth["sample"]).all()
    share = passing[0]["population"].value_counts(normalize=True)
    names = [p["name"] for p in study["planted"]["populations"]]
    assert len(names) == 12 and set(share.index) == set(names)
    assert 0.17 <= share.max() <= 0.23
    assert 0.005 <= share.min() <= 0.02


def test_qc_failing_cells_are_the_labelled_extras(study):
    cells = study["cells"]
    passes = (cells["n_features"] > 500) & (cells["n_features"] < 4000)
    extra = cells["population"].isin(["low_quality", "doublet"])
    assert (passes == ~extra).all()
    low = cells[cells["population"] == "low_quality"]["n_features"]
    dbl = cells[cells["population"] == "doublet"]["n_features"]
    assert len(low) and len(dbl) and low.max() < 500 and dbl.min() > 4000


def test_hdf5_layout_is_cell_ranger_v3(study):
    path = study["out"] / study["manifest"]["path"][0]
    with h5py.File(path, "r") as f:
        assert set(f["matrix"].keys()) == {"barcodes", "data", "indices", "indptr", "shape",
                                           "features"}
        feats = f["matrix/features"]
        assert {"_all_tag_keys", "feature_type", "genome", "id", "name"} <= set(feats.keys())
        assert f["matrix/data"].dtype == np.int32 and f["matrix/indices"].dtype == np.int64
        assert f["matrix/indptr"].dtype == np.int64
        for name in ("barcodes", "features/id", "features/name", "features/feature_type"):
            assert f["matrix"][name].dtype.kind == "S"
        assert set(feats["feature_type"][:]) == {b"Gene Expression"}
        shape = f["matrix/shape"][:]
        assert shape[0] == 27_998 and shape[1] == len(f["matrix/barcodes"])
        assert f["matrix/indptr"][-1] == len(f["matrix/data"])
    X = study["X"]
    for j in range(0, X.shape[1], 997):  # gene indices sorted and unique within each cell
        col = X.indices[X.indptr[j]:X.indptr[j + 1]]
        assert np.all(np.diff(col) > 0)
    assert X.data.min() >= 1


def test_gene_universe(study):
    names, ids = study["names"], study["ids"]
    assert len(names) == 27_998 and len(set(names)) == len(names)
    assert set(REQUIRED_SYMBOLS) <= set(names)
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"ENSMUSG\d{11}", i) for i in ids)
    assert sum(n.startswith("mt-") for n in names) == 13


# ---------------------------------------------------------------- realism


def test_detected_genes_and_library_sizes(passing):
    cells = passing[0]
    assert 1600 <= cells["n_features"].median() <= 2400
    for _, grp in cells.groupby("population"):
        if len(grp) < 300:
            continue
        log_umi = np.log(grp["n_umi"].to_numpy())
        # log-normal library sizes: the log is roughly symmetric, the raw sizes right-skewed
        assert abs(stats.skew(log_umi)) < 0.5
        assert stats.skew(grp["n_umi"].to_numpy()) > 0.4


def test_gene_means_span_orders_of_magnitude(passing):
    X = passing[1]
    mean = np.asarray(X.mean(axis=1)).ravel()
    pos = mean[mean > 0]
    assert pos.max() / np.quantile(pos, 0.05) >= 1e4


def test_dispersion_decreases_with_mean(passing):
    """Method-of-moments NB dispersion within one population, with library-size factors."""
    cells, X, _ = passing
    cols = np.flatnonzero((cells["population"] == "MG_homeostatic_1").to_numpy())
    Y = X[:, cols].tocsr().astype(np.float64)
    s = np.asarray(Y.sum(axis=0)).ravel()
    s = s / s.mean()
    n = s.size
    mu = np.asarray(Y @ (1.0 / s)).ravel() / n  # mean per unit size factor
    sum_y2 = np.asarray(Y.multiply(Y).sum(axis=1)).ravel()
    sum_sy = np.asarray(Y @ s).ravel()
    resid2 = sum_y2 - 2 * mu * sum_sy + mu**2 * np.sum(s**2)  # sum (y - s mu)^2
    ok = (mu > 0.05) & (mu < 100)
    mu, resid2 = mu[ok], resid2[ok]
    phi = (resid2 - mu * s.sum()) / (mu**2 * np.sum(s**2))
    rho = stats.spearmanr(mu, phi).statistic
    assert rho < -0.3
    low = np.median(phi[mu < 0.2])
    high = np.median(phi[mu > 5])
    assert low > 1.5 * high > 0


def test_sex_genes(study, passing):
    cells, X, _ = passing
    g = study["gene"]
    female = (cells["sex"] == "female").to_numpy()
    for gene in ("Xist", "Tsix"):
        row = np.asarray(X[g[gene]].todense()).ravel()
        assert row[~female].sum() == 0
        assert row[female].sum() > 0
    assert (np.asarray(X[g["Xist"]].todense()).ravel()[female] > 0).mean() > 0.7


# ---------------------------------------------------------------- planted biology


def test_sigmar1_level_and_time_course(study, passing):
    cells = passing[0]
    sig = lognorm_row(passing, study["gene"]["Sigmar1"])
    assert 0.12 <= sig.mean() <= 0.18
    by_tp = pd.Series(sig).groupby(cells["timepoint"].to_numpy()).mean()
    assert by_tp["3d"] > by_tp["5mo"] * 1.15 and by_tp["14d"] > by_tp["5mo"] * 1.15


def welch_greater(x, y):
    return stats.ttest_ind(x, y, equal_var=False, alternative="greater").pvalue


def test_welch_detects_planted_sigmar1_contrasts(study, passing):
    cells = passing[0]
    sig = lognorm_row(passing, study["gene"]["Sigmar1"])
    gene_effects = [e for e in study["planted"]["effects"] if e["kind"] == "gene"]
    assert {(e["population"], e["timepoint"]) for e in gene_effects} == {
        ("MG_homeostatic_2", "5mo"), ("MG_Apoe_high", "3d")}
    for e in gene_effects:
        assert e["name"] == "Sigmar1" and e["condition"] == "SNI" and e["log2_fold_change"] > 0
        grp = ((cells["population"] == e["population"])
               & (cells["timepoint"] == e["timepoint"])).to_numpy()
        sni = grp & (cells["condition"] == "SNI").to_numpy()
        sham = grp & (cells["condition"] == "Sham").to_numpy()
        assert welch_greater(sig[sni], sig[sham]) < 1e-3


def test_unplanted_contrasts_are_calibrated(study, passing):
    cells = passing[0]
    sig = lognorm_row(passing, study["gene"]["Sigmar1"])
    planted = {(e["population"], e["timepoint"]) for e in study["planted"]["effects"]}
    pvals = []
    for pop in cells["population"].unique():
        for tp in ("3d", "14d", "5mo"):
            if (pop, tp) in planted:
                continue
            grp = ((cells["population"] == pop) & (cells["timepoint"] == tp)).to_numpy()
            sni = grp & (cells["condition"] == "SNI").to_numpy()
            sham = grp & (cells["condition"] == "Sham").to_numpy()
            if sni.sum() >= 20 and sham.sum() >= 20:
                pvals.append(welch_greater(sig[sni], sig[sham]))
    assert len(pvals) >= 30
    assert stats.kstest(pvals, "uniform").pvalue > 0.01

    # Many genes, one population at 14d (no planted effect there): two-sided Welch p ~ uniform.
    avoid = set(study["planted"]["sample_shift_genes"]["genes"])
    avoid |= {"Xist", "Tsix", "Ddx3y", "Eif2s3y", "Kdm5d", "Uty"}
    L = passing[2]
    grp = ((cells["population"] == "MG_homeostatic_1") & (cells["timepoint"] == "14d")).to_numpy()
    sni = np.flatnonzero(grp & (cells["condition"] == "SNI").to_numpy())
    sham = np.flatnonzero(grp & (cells["condition"] == "Sham").to_numpy())
    detected = np.asarray((passing[1][:, np.flatnonzero(grp)] > 0).mean(axis=1)).ravel()
    genes = [i for i in np.flatnonzero(detected > 0.2) if study["names"][i] not in avoid]
    rng = np.random.default_rng(1)
    genes = rng.choice(genes, size=min(400, len(genes)), replace=False)
    A = L[genes][:, sni].toarray()
    B = L[genes][:, sham].toarray()
    p = stats.ttest_ind(A, B, axis=1, equal_var=False).pvalue
    assert 0.01 <= np.mean(p < 0.05) <= 0.10
    assert stats.kstest(p, "uniform").pvalue > 0.001


def test_gene_sets_shifted_where_planted(study, passing):
    cells, X, _ = passing
    umi = np.asarray(X.sum(axis=0)).ravel()
    sets = [e for e in study["planted"]["effects"] if e["kind"] == "gene_set"]
    assert {e["name"] for e in sets} == {"HALLMARK_INFLAMMATORY_RESPONSE",
                                         "HALLMARK_TNFA_SIGNALING_VIA_NFKB"}
    gmt = {line.split("\t")[0]: line.rstrip("\n").split("\t")[2:]
           for line in (study["out"] / "planted.gmt").read_text().splitlines()}
    for e in sets:
        assert set(e["genes"]) <= set(gmt[e["name"]])
        assert 0.5 <= e["log2_fold_change"] <= 1.0
        rows = [study["gene"][g] for g in e["genes"]]

        def lfc(tp, e=e, rows=rows):
            grp = ((cells["population"] == e["population"]) & (cells["timepoint"] == tp))
            a = grp.to_numpy() & (cells["condition"] == "SNI").to_numpy()
            b = grp.to_numpy() & (cells["condition"] == "Sham").to_numpy()
            Y = X[rows]
            ma = np.asarray(Y[:, a].multiply(1e4 / umi[a]).mean(axis=1)).ravel()
            mb = np.asarray(Y[:, b].multiply(1e4 / umi[b]).mean(axis=1)).ravel()
            ok = (ma + mb) > 0.2  # expressed enough for a stable ratio
            return np.median(np.log2(ma[ok] / mb[ok]))

        assert 0.4 <= lfc(e["timepoint"]) <= 1.2
        assert abs(lfc("14d")) < 0.2  # the same genes, same population, a time point without


# ---------------------------------------------------------------- determinism and options


def _file_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_deterministic_whatever_the_threads(tmp_path):
    a = simulate_study(tmp_path / "a", n_cells=1200, seed=7, threads=1)
    b = simulate_study(tmp_path / "b", n_cells=1200, seed=7, threads=2)
    c = simulate_study(tmp_path / "c", n_cells=1200, seed=8, threads=2)
    fa, fb, fc = (_file_bytes(Path(x["out_dir"])) for x in (a, b, c))
    assert set(fa) == set(fb) and len(fa) == 12 + 4
    for name in fa:
        assert fa[name] == fb[name], name
    assert all(fa[n] != fc[n] for n in fa if n.endswith(".h5"))
    assert fa["truth.csv"] != fc["truth.csv"]


def test_gmt_genes_and_sets_are_used(tmp_path):
    gmt = tmp_path / "sets.gmt"
    infl = ["Il1b", "Tnf", "Ccl2", "Cxcl10", "Sele", "Madeup1"] + [f"Infl{i}" for i in range(40)]
    tnfa = ["Il1b", "Tnf", "Nfkbia", "Junb"] + [f"Nfkb{i}" for i in range(40)]
    gmt.write_text(f"HALLMARK_INFLAMMATORY_RESPONSE\thttp://x\t{chr(9).join(infl)}\n"
                   f"HALLMARK_TNFA_SIGNALING_VIA_NFKB\thttp://x\t{chr(9).join(tnfa)}\n"
                   "OTHER\tdesc\tZzz1\tZzz2\n")
    info = simulate_study(tmp_path / "o", n_cells=240, seed=1, n_genes=12_000, gmt=gmt)
    out = Path(info["out_dir"])
    assert not (out / "planted.gmt").exists()
    _, names, _, _ = read_10x(out / "SNI_3d_F.h5")
    assert len(names) == 12_000 and set(infl + tnfa + ["Zzz1", "Zzz2"]) <= set(names)
    planted = json.loads((out / "planted.json").read_text())
    genes = {e["name"]: set(e["genes"]) for e in planted["effects"] if e["kind"] == "gene_set"}
    assert genes["HALLMARK_INFLAMMATORY_RESPONSE"] == set(infl)
    assert genes["HALLMARK_TNFA_SIGNALING_VIA_NFKB"] == set(tnfa)


def test_real_hallmark_gmt(tmp_path, shared_data):
    gmt = shared_data / "gmt" / "mh.all.mouse_hallmark_2025.Mm.symbols.gmt"
    info = simulate_study(tmp_path, n_cells=120, seed=2, gmt=gmt)
    _, names, _, _ = read_10x(Path(info["out_dir"]) / "Sham_5mo_M.h5")
    wanted = {g for line in gmt.read_text().splitlines() for g in line.split("\t")[2:] if g}
    assert len(names) == 27_998 and wanted <= set(names)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        simulate_study(tmp_path / "x", n_cells=5)
    with pytest.raises(ValueError):
        simulate_study(tmp_path / "y", n_cells=100, n_genes=50)


def test_too_few_genes_for_doublets_refused_fast(tmp_path):
    """2000 genes cannot hold the doublet-like cells' > 4000 detected genes: a clear error at once
    (it used to redraw those cells forever), nothing written; 60 cells have no doublets and run."""
    import time

    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="n_genes=2000 is too small"):
        simulate_study(tmp_path / "big", n_cells=600, seed=3, n_genes=2000)
    assert time.perf_counter() - t0 < 5 and not (tmp_path / "big").exists()
    info = simulate_study(tmp_path / "small", n_cells=60, seed=1, n_genes=2000)
    assert info["n_cells_total"] == 60


def test_kernel_refuses_a_band_beyond_the_genes():
    """The kernel's own guard: a cell asking for more detected genes than exist raises instead of
    nudging its depth up without end."""
    from cellmill.simulate.kernels import simulate_chunk

    rel = np.full((1, 3), 1 / 3)
    cum = np.cumsum(rel, axis=1)
    with pytest.raises(ValueError, match="more detected genes"):
        simulate_chunk(np.uint64(1), np.zeros(1, np.int64), np.full(1, -1, np.int64),
                       np.full(1, np.log(100.0)), 0.0, np.array([4]), np.array([9]), rel,
                       np.full(3, 0.1), np.array([[0]]), np.array([0]), cum,
                       np.zeros((1, 4), np.int64), cum[:, -1] / 4)


def test_kernel_draws_negative_binomial_counts():
    """Both sampling paths (direct inverse-CDF and thinned compound Poisson) give NB counts:
    goodness of fit against scipy's negative binomial, gene by gene."""
    from cellmill.simulate.kernels import simulate_chunk

    depth = 1000.0
    mu = np.array([5.0, 0.5, 0.05, 2.0, 30.0])
    phi = np.array([0.3, 2.0, 5.0, 0.5, 0.2])
    is_direct = np.array([True, False, False, False, False])  # gene 4: thinned, large mean
    rel = (mu / depth)[None, :]
    cum = np.cumsum(np.where(is_direct, 0.0, rel[0]))[None, :]
    n_buckets = 64
    step = cum[:, -1] / n_buckets
    bucket = np.searchsorted(cum[0], np.arange(n_buckets) * step[0], side="right")[None, :]
    n = 60_000
    indptr, idx, cnt, _ = simulate_chunk(
        np.uint64(12345), np.zeros(n, np.int64), np.full(n, -1, np.int64),
        np.full(n, np.log(depth)), 0.0, np.zeros(n, np.int64), np.full(n, 5, np.int64),
        rel, phi, np.array([[0]]), np.array([1]), cum, bucket.astype(np.int64), step)
    X = sp.csc_matrix((cnt, idx, indptr), shape=(5, n)).toarray()
    for g in range(5):
        r = 1.0 / phi[g]
        dist = stats.nbinom(r, r / (r + mu[g]))
        top = int(dist.ppf(0.999))
        observed = np.bincount(np.minimum(X[g], top), minlength=top + 1)
        expected = np.r_[dist.pmf(np.arange(top)), dist.sf(top - 1)] * n
        keep = expected >= 5
        obs = np.r_[observed[keep], observed[~keep].sum()]
        exp = np.r_[expected[keep], expected[~keep].sum()]
        if exp[-1] < 5:
            obs, exp = obs[:-1], exp[:-1]
        exp *= obs.sum() / exp.sum()
        assert stats.chisquare(obs, exp).pvalue > 1e-4, (g, mu[g], phi[g])
        assert abs(X[g].mean() - mu[g]) < 5 * np.sqrt(dist.var() / n)


def _population_pseudobulk(out: Path, population: str):
    """Per sample: the summed counts of one population's QC-passing cells (genes x samples), read
    straight from the HDF5 files and truth.csv."""
    manifest = pd.read_csv(out / "manifest.csv")
    truth = pd.read_csv(out / "truth.csv").set_index("cell")["population"]
    cols = []
    for row in manifest.itertuples():
        X, _, _, barcodes = read_10x(out / row.path)
        pop = truth.loc[[f"{row.sample}_{b}" for b in barcodes]].to_numpy()
        cols.append(np.asarray(X[:, np.flatnonzero(pop == population)].sum(axis=1)).ravel())
    return manifest, np.stack(cols, axis=1).astype(np.float64)


def _within_group_log_var(manifest, counts, genes):
    """Per gene: the pooled variance of log CPM between animals of the same condition x time
    point x sex (groups of replicates), natural log."""
    logcpm = np.log((counts[genes] + 0.5) / counts.sum(axis=0) * 1e6)
    key = manifest["condition"] + manifest["timepoint"] + manifest["sex"]
    ss, df = 0.0, 0
    for _, idx in manifest.groupby(key).indices.items():
        block = logcpm[:, idx]
        ss = ss + ((block - block.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
        df += len(idx) - 1
    return ss / df


def test_replicates_vary_as_planted(tmp_path):
    """--replicates 3 gives 36 animals; with --replicate-sd every gene's log expression varies
    between animals of one group by the sd planted.json records (the same study without animal
    variation is the baseline: what cell sampling alone gives)."""
    runs = {}
    for sd in (0.5, 0.0):
        out = tmp_path / f"sd{sd}"
        simulate_study(out, n_cells=6000, seed=5, replicates=3, replicate_sd=sd)
        runs[sd] = (out, json.loads((out / "planted.json").read_text()))
    out, planted = runs[0.5]
    manifest = pd.read_csv(out / "manifest.csv")
    assert len(manifest) == 36 and manifest["sample"].is_unique
    assert manifest.groupby(["condition", "timepoint", "sex"]).size().eq(3).all()
    rep = planted["replicates"]
    assert rep["per_group"] == 3 and rep["replicate_sd"] == 0.5
    gene_sd = np.asarray(rep["gene_sd"])
    assert gene_sd.size == 27_998
    # the per-gene sds follow the stated prior: sd^2 * d0 / replicate_sd^2 ~ chi2(d0) inverted
    scaled = rep["prior_df"] * rep["replicate_sd"] ** 2 / gene_sd[gene_sd < rep["sd_max"]] ** 2
    assert stats.kstest(scaled, stats.chi2(rep["prior_df"]).cdf).statistic < 0.02
    assert runs[0.0][1]["replicates"]["gene_sd"] == [0.0] * 27_998

    manifest, with_var = _population_pseudobulk(out, "MG_homeostatic_1")
    _, without = _population_pseudobulk(runs[0.0][0], "MG_homeostatic_1")
    # genes with >= 50 counts in every animal: sampling noise not far above sd^2 (it cancels in
    # the difference on average; 316 genes, measured ratio 1.03, Spearman 0.81)
    genes = np.flatnonzero(without.min(axis=1) >= 50)
    assert genes.size >= 200
    excess = (_within_group_log_var(manifest, with_var, genes)
              - _within_group_log_var(manifest, without, genes))
    planted_var = gene_sd[genes] ** 2
    ratio = excess.mean() / planted_var.mean()
    assert 0.85 <= ratio <= 1.15, ratio
    assert stats.spearmanr(excess, planted_var).statistic > 0.5
