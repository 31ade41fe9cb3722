"""normalize + hvg: LogNormalize, Seurat 4.3.0 'vst' and the scaling statistics.

References: dense numpy / scipy / scikit-misc computations of the formulas written here from
the parity notes (reference section 3-5), C's log1p through `math.log1p`, scanpy's
`flavor="seurat_v3"`, and Seurat 4.3.0's own outputs in tests/reference (skipped when absent).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellmill.config import ConfigError, load_config
from cellmill.engine.registry import Context, run_stages
from cellmill.engine.schedulers import close_clients, scheduler_for
from cellmill.errors import InputError
from cellmill.io.sample import Sample
from cellmill.io.store import GRANULE, Store
from cellmill.io.writer import StoreWriter
from cellmill.kernels.lognorm import lognorm_values, lognorm_values_by_cell, row_totals
from cellmill.stages.preprocess import (
    HVG_COLUMNS,
    SCALE_FACTOR_KEY,
    exact_count_variance,
    loess_expected_variance,
    lognorm_csr,
    run_normalize,
    seurat_scale_factor,
    vst,
)

PBMC = "10x/pbmc_1k_citeseq_v3.h5"
MOUSE = "mex/mouse_brain_10k_x_1k"


# --------------------------------------------------------------------------- references


def dense_vst(x: np.ndarray, n_top: int, sf: float = 1e4, span: float = 0.3) -> dict:
    """Reference section 4 and 5 on a dense cells x genes count matrix, plainly."""
    from skmisc.loess import loess

    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    seen = np.flatnonzero(x.any(axis=0))
    if len(seen) < x.shape[1]:  # all-zero genes: 0 everywhere, never selected
        out = dense_vst(x[:, seen], n_top, sf, span)  # (same cell totals)
        for k, v in out.items():
            if k != "top":
                full = np.zeros(x.shape[1])
                full[seen] = v
                out[k] = full
        out["top"] = seen[out["top"]]
        return out
    mean = x.mean(axis=0)
    var = ((x - mean) ** 2).sum(axis=0) / (n - 1)
    fit = var > 0
    lo = loess(np.log10(mean[fit]), np.log10(var[fit]), span=span, degree=2)
    lo.fit()
    expected = np.zeros_like(mean)
    expected[fit] = 10 ** lo.outputs.fitted_values
    sd = np.sqrt(expected)
    ok = sd > 0
    z = np.minimum((x[:, ok] - mean[ok]) / sd[ok], math.sqrt(n))
    standardized = np.zeros_like(mean)
    standardized[ok] = (z**2).sum(axis=0) / (n - 1)
    cand = np.flatnonzero(mean != 0)
    top = cand[np.argsort(-standardized[cand], kind="stable")][:n_top]
    y = np.log1p(x / x.sum(axis=1, keepdims=True) * sf)
    ln_mean = y.mean(axis=0)
    ln_std = np.sqrt(((y - ln_mean) ** 2).sum(axis=0) / (n - 1))
    return {"vst_mean": mean, "vst_variance": var, "vst_variance_expected": expected,
            "vst_variance_standardized": standardized, "top": top,
            "ln_mean": ln_mean, "ln_std": ln_std}


def ranked_genes(rank: np.ndarray) -> np.ndarray:
    """Gene positions in rank order from a 1..n_top rank column (0 = not selected)."""
    sel = np.flatnonzero(rank > 0)
    return sel[np.argsort(rank[sel])]


def assert_same_ranking(ours: np.ndarray, ref: np.ndarray, standardized: np.ndarray) -> None:
    """Identical order, except where standardized variances tie within 1e-12 (relative)."""
    assert len(ours) == len(ref)
    for i in np.flatnonzero(ours != ref):
        a, b = standardized[ours[i]], standardized[ref[i]]
        assert abs(a - b) <= 1e-12 * max(abs(a), abs(b)), f"rank {i + 1}: {ours[i]} vs {ref[i]}"


def assert_matches_dense(res: pd.DataFrame, ref: dict, rtol: float = 1e-10) -> None:
    for col in ("vst_mean", "vst_variance", "vst_variance_expected",
                "vst_variance_standardized", "ln_mean", "ln_std"):
        np.testing.assert_allclose(res[col].to_numpy(), ref[col], rtol=rtol, atol=1e-300,
                                   err_msg=col)
    assert_same_ranking(ranked_genes(res["hvg_rank"].to_numpy()), ref["top"],
                        ref["vst_variance_standardized"])
    assert res["highly_variable"].dtype == bool
    np.testing.assert_array_equal(res["highly_variable"].to_numpy(), res["hvg_rank"] > 0)


# --------------------------------------------------------------------------- a synthetic store


def synthetic_counts(n_cells: int = 5000, n_genes: int = 400, seed: int = 7) -> sp.csr_matrix:
    """Gamma-Poisson counts over genes spanning orders of magnitude, plus edge cases:
    all-zero genes, a constant gene (variance 0, mean > 0), two identical genes (a tie),
    a gene with one huge count (clipped at sqrt(N)), counts above the log1p memo (> 64)."""
    rng = np.random.default_rng(seed)
    depth = rng.lognormal(np.log(1500), 0.5, n_cells)
    p = rng.lognormal(0, 1.8, n_genes)
    p /= p.sum()
    lam = rng.gamma(1.5, depth[:, None] * p[None, :] / 1.5)
    x = rng.poisson(lam).astype(np.int64)
    x[:, 0:3] = 0                     # never expressed
    x[:, 3] = 1                       # constant: variance 0, mean 1
    x[:, 5] = x[:, 4]                 # identical to gene 4: equal standardized variance
    x[:, 6] = 0
    x[123, 6] = 5000                  # one huge count: z clipped
    x[:, 7] = rng.poisson(150, n_cells)  # dense, large counts
    return sp.csr_matrix(x.astype(np.int32))


def write_store(path: Path, counts: sp.csr_matrix, block_cells: int = 2 * GRANULE) -> Store:
    n_cells, n_genes = counts.shape
    names = [f"Gene{i}" for i in range(n_genes)]
    var = pd.DataFrame({"gene_ids": [f"ID{i}" for i in range(n_genes)],
                        "feature_types": "Gene Expression"}, index=names)
    sample = Sample(counts=counts, barcodes=np.array([f"C{i}-1" for i in range(n_cells)],
                                                     dtype=object),
                    var=var, source="synthetic")
    w = StoreWriter(path, overwrite=True, block_cells=block_cells)
    w.add_sample("s1", sample, {}, prefix_cells=False)
    return w.finish()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    counts = synthetic_counts()
    store = write_store(tmp_path_factory.mktemp("synth") / "s.zarr", counts)
    rng = np.random.default_rng(3)
    mask = rng.random(counts.shape[0]) > 0.1
    mask[GRANULE: 2 * GRANULE] = False  # a granule without any selected cell
    return store, counts, mask


@pytest.fixture(scope="module")
def synth_result(synth):
    store, _, mask = synth
    return vst(store, mask, 1e4, n_top=100, block_cells=None, scheduler=("sync", 1))


# --------------------------------------------------------------------------- kernels


def test_lognorm_kernels_are_seurats_expression():
    rng = np.random.default_rng(0)
    m = sp.random(300, 500, density=0.05, format="csr", random_state=1,
                  data_rvs=lambda k: rng.integers(1, 400, k)).astype(np.int32)
    m = m[np.diff(m.indptr) > 0]
    n_counts = row_totals(m.data, m.indptr)
    np.testing.assert_array_equal(n_counts, np.asarray(m.sum(axis=1)).ravel())
    y = lognorm_values(m.data, m.indptr, n_counts, 1e4)
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    # Seurat's C++: log1p(double(x) / colSums[c] * scale_factor), C library log1p
    expect = [math.log1p(float(x) / n_counts[r] * 1e4)
              for x, r in zip(m.data, rows, strict=True)]
    np.testing.assert_array_equal(y, np.array(expect))
    # gene-major: the same values, found by cell index
    c = m.tocsc()
    yc = lognorm_values_by_cell(c.data, c.indices, n_counts, 1e4)
    back = sp.csc_matrix((yc, c.indices, c.indptr), shape=c.shape).tocsr()
    np.testing.assert_array_equal(back.toarray(), sp.csr_matrix((y, m.indices, m.indptr),
                                                                shape=m.shape).toarray())
    np.testing.assert_array_equal(lognorm_csr(m, n_counts, 1e4).data, y)


def test_scale_factor_is_truncated_like_seurat():
    assert seurat_scale_factor(1e4) == 10000.0
    assert seurat_scale_factor(10000.9) == 10000.0  # Seurat's LogNorm takes an int
    with pytest.raises(ConfigError):
        seurat_scale_factor(0.5)


# --------------------------------------------------------------------------- loess


# A fit with 5 distinct means, where R 4.2.2's loess(y ~ x, span = 0.3) warns ("reciprocal
# condition number 0", "There are other near singularities as well. 0.010081") and continues;
# scikit-misc raises. Gene g: mean k/64, variance k/64 * (1 + m/2). R's fitted values
# (log10 expected variance) per k, printed with %.17g:
LOESS_K = [5, 4, 3, 2, 2, 1, 1, 1, 1, 5, 4, 5, 3, 4, 5, 4, 4, 3, 3, 5, 2, 5, 4, 1, 2, 5, 3, 1, 4,
           4, 5, 1, 1, 5, 1, 3, 1, 2, 3, 3, 3, 1, 1, 1, 1, 4, 3, 4, 2, 4, 4, 2, 3, 5, 5, 5, 2, 4,
           5, 4]
LOESS_M = [2, 2, 2, 1, 2, 0, 1, 2, 2, 1, 1, 0, 1, 1, 2, 2, 0, 2, 1, 1, 2, 1, 0, 0, 2, 1, 1, 1, 2,
           1, 0, 2, 0, 0, 2, 1, 0, 0, 1, 2, 1, 2, 0, 0, 2, 2, 0, 0, 2, 1, 1, 0, 2, 1, 2, 2, 2, 0,
           2, 0]
R_FITTED = {1: -1.652011224548513, 2: -1.2949948236479574, 3: -1.123543488628769,
            4: -1.0552216770891873, 5: -0.9237017947556909}


def test_loess_continues_where_r_only_warns():
    k, m = np.array(LOESS_K), np.array(LOESS_M)
    mean = k / 64.0
    variance = k / 64.0 * (1 + m * 0.5)
    expected = loess_expected_variance(mean, variance, 0.3)
    r = np.array([R_FITTED[v] for v in k])
    np.testing.assert_allclose(np.log10(expected), r, rtol=0, atol=1e-12)


def test_loess_real_errors_are_input_errors():
    with pytest.raises(InputError, match="too few for loess"):  # R: "span is too small"
        loess_expected_variance(np.array([0.1, 0.2, 0.3]), np.array([0.1, 0.3, 0.2]), 0.3)
    x = np.linspace(0.1, 1, 5)
    with pytest.raises(InputError, match="loess fit failed"):  # svddc failed in l2fit
        loess_expected_variance(x, x**2, 0.3)


# --------------------------------------------------------------------------- vst formulas


def test_exact_count_variance():
    from fractions import Fraction

    rng = np.random.default_rng(0)
    x = rng.poisson(3, (100, 20)).astype(np.int64)
    x[:, 0] = 100_000_000 + rng.integers(0, 5, 100)  # n * sum x^2 overflows int64
    x[:, 1] = 7
    sx, sxx = x.sum(axis=0), (x * x).sum(axis=0)
    ref = [float(Fraction(100 * int(b) - int(a) ** 2, 100 * 99))
           for a, b in zip(sx, sxx, strict=True)]
    for cols in (slice(None), slice(1, None)):  # Python-integer path, int64 path
        np.testing.assert_array_equal(exact_count_variance(sx[cols], sxx[cols], 100),
                                      np.array(ref)[cols])


def test_vst_matches_dense_formulas(synth, synth_result):
    _, counts, mask = synth
    ref = dense_vst(counts[mask].toarray(), n_top=100)
    assert_matches_dense(synth_result, ref)
    res = synth_result
    assert (res["vst_variance_standardized"].iloc[[0, 1, 2, 3]] == 0).all()
    assert res["vst_variance_expected"].iloc[3] == 0 and res["vst_mean"].iloc[3] == 1
    assert (res["hvg_rank"].iloc[[0, 1, 2]] == 0).all()  # mean 0: never selected
    # the tie keeps gene order
    r4, r5 = res["hvg_rank"].iloc[4], res["hvg_rank"].iloc[5]
    assert res["vst_variance_standardized"].iloc[4] == res["vst_variance_standardized"].iloc[5]
    assert r4 == 0 and r5 == 0 or r5 == r4 + 1


def test_vst_clip_is_active(synth, synth_result):
    _, counts, mask = synth
    n = int(mask.sum())
    x = counts[mask][:, 6].toarray().ravel().astype(float)
    res = synth_result.iloc[6]
    z = (x - res["vst_mean"]) / math.sqrt(res["vst_variance_expected"])
    assert z.max() > math.sqrt(n)  # the huge count would exceed the clip
    unclipped = (z**2).sum() / (n - 1)
    assert res["vst_variance_standardized"] < unclipped


def test_results_identical_for_any_block_size_and_scheduler(synth, synth_result):
    store, _, mask = synth
    for bc, sched in ((GRANULE, ("sync", 1)), (4 * GRANULE, ("threads", 2)),
                      (3 * GRANULE, scheduler_for("threads", 2)),
                      (None, scheduler_for("synchronous"))):
        other = vst(store, mask, 1e4, n_top=100, block_cells=bc, scheduler=sched)
        for col in HVG_COLUMNS:
            np.testing.assert_array_equal(other[col].to_numpy(), synth_result[col].to_numpy(),
                                          err_msg=f"{col} block_cells={bc}")


def test_results_identical_on_processes(synth, synth_result):
    store, _, mask = synth
    try:
        other = vst(store, mask, 1e4, n_top=100, block_cells=GRANULE,
                    scheduler=scheduler_for("processes", 2))
    finally:
        close_clients()
    for col in HVG_COLUMNS:
        np.testing.assert_array_equal(other[col].to_numpy(), synth_result[col].to_numpy(),
                                      err_msg=col)


@pytest.mark.parametrize("scheduler", [("sync", 1), ("threads", 2)])
def test_first_pass_keeps_each_genes_largest_counts(synth, scheduler):
    """The TOP_K largest counts of every gene over the selected cells, as brute force finds
    them, with one-granule blocks (so later blocks skip what cannot enter the running top,
    raised as earlier blocks are folded) and the left-out cells skipped in place."""
    from cellmill.stages import preprocess

    store, counts, mask = synth
    p1 = preprocess.first_pass(store, mask, 1e4, GRANULE, scheduler)
    dense = counts[mask].toarray()
    want = -np.sort(-dense, axis=0)[: preprocess.TOP_K].T  # genes x TOP_K, largest first
    got = -np.sort(-p1["top"].astype(np.int64), axis=1)
    np.testing.assert_array_equal(got, want)
    assert np.array_equal(p1["nnz"], (dense > 0).sum(axis=0))


def test_ln_std_is_numerically_sound(tmp_path):
    """A gene with a large mean and a tiny spread: sum y^2 - n mean^2 would lose ~all digits."""
    n = 3000
    rng = np.random.default_rng(5)
    other = rng.poisson(3.0, (n, 50))
    total = 10**6
    a = np.full(n, 400_000) + rng.integers(0, 3, n)  # y ~ 10.6, sd ~ 1e-6
    x = np.column_stack([a, other, total - a - other.sum(axis=1)]).astype(np.int32)
    store = write_store(tmp_path / "t.zarr", sp.csr_matrix(x))
    res = vst(store, np.ones(n, bool), 1e4, n_top=10, scheduler=("sync", 1))
    y = np.array([math.log1p(float(v) / total * 1e4) for v in a])  # C log1p, as the kernel
    mean = math.fsum(y) / n
    exact_sd = math.sqrt(math.fsum((y - mean) ** 2) / (n - 1))
    assert abs(res["ln_std"].iloc[0] - exact_sd) <= 1e-9 * exact_sd
    assert res["ln_mean"].iloc[0] == pytest.approx(mean, rel=1e-15)


def test_vst_needs_two_cells(synth):
    store, _, _ = synth
    one = np.zeros(store.n_cells, bool)
    one[0] = True
    with pytest.raises(InputError):
        vst(store, one, 1e4)


def test_normalize_rejects_empty_passing_cell(tmp_path):
    x = np.array([[1, 2, 0], [0, 0, 0], [3, 0, 1]], dtype=np.int32)
    store = write_store(tmp_path / "e.zarr", sp.csr_matrix(x))
    ctx = Context(load_config(None, []), tmp_path, store=store, progress=False)
    with pytest.raises(InputError, match="no counts"):
        run_normalize(ctx)


# --------------------------------------------------------------------------- real data: stages


def run_until_hvg(src: Path, outdir: Path, extra: list[str] = ()) -> Context:
    cfg = load_config(None, [f"input.path={json.dumps(str(src))}", "compute.progress=false",
                             *extra])
    ctx = Context(cfg, outdir, progress=False)
    run_stages(ctx, until="hvg")
    return ctx


@pytest.fixture(scope="module")
def pbmc(shared_data, tmp_path_factory):
    return run_until_hvg(shared_data / PBMC, tmp_path_factory.mktemp("pbmc"))


def pbmc_result(ctx: Context) -> pd.DataFrame:
    return ctx.store.var()[list(HVG_COLUMNS)]


def test_pbmc_stage_outputs(pbmc):
    store = pbmc.store
    var = store.var()
    for col in HVG_COLUMNS:
        assert col in var
    assert var["highly_variable"].dtype == bool and var["hvg_rank"].sum() == 2000 * 2001 // 2
    assert float(store.read_array("uns", SCALE_FACTOR_KEY)[0]) == 1e4
    table = pd.read_csv(pbmc.tables / "hvg.csv", float_precision="round_trip")
    assert list(table.columns) == ["gene", "mean", "variance", "variance_expected",
                                   "variance_standardized", "highly_variable", "rank"]
    assert list(table["gene"]) == list(var.index)
    sel = table["highly_variable"].to_numpy()
    assert table["rank"].notna().to_numpy().tolist() == sel.tolist()
    np.testing.assert_array_equal(table["rank"][sel].to_numpy(), var["hvg_rank"][sel].to_numpy())
    np.testing.assert_array_equal(table["variance_standardized"],
                                  var["vst_variance_standardized"])
    assert set(store.stage_records()) >= {"normalize", "hvg"}


def test_pbmc_matches_dense_formulas(pbmc):
    store = pbmc.store
    mask = store.obs()["qc_pass"].to_numpy()
    x = store.read_rows(0, store.n_cells)[np.flatnonzero(mask)].toarray()
    assert_matches_dense(pbmc_result(pbmc), dense_vst(x, n_top=2000))


def test_pbmc_matches_scanpy_seurat_v3(pbmc):
    import anndata as ad
    import scanpy as sc

    store = pbmc.store
    mask = store.obs()["qc_pass"].to_numpy()
    adata = ad.AnnData(store.read_rows(0, store.n_cells)[np.flatnonzero(mask)].astype(np.float64))
    sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=2000)
    res = pbmc_result(pbmc)
    np.testing.assert_allclose(res["vst_variance_standardized"].to_numpy(),
                               adata.var["variances_norm"].to_numpy(), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(res["vst_mean"].to_numpy(), adata.var["means"].to_numpy(),
                               rtol=1e-12)
    np.testing.assert_allclose(res["vst_variance"].to_numpy(),
                               adata.var["variances"].to_numpy(), rtol=1e-9, atol=1e-300)
    # scanpy keeps mean-0 genes and sorts unstably: the selections differ at most by genes
    # tied with the last selected one
    v = res["vst_variance_standardized"].to_numpy()
    cut = v[ranked_genes(res["hvg_rank"].to_numpy())[-1]]
    differ = np.flatnonzero(res["highly_variable"].to_numpy() != adata.var["highly_variable"])
    assert len(differ) <= 10
    np.testing.assert_allclose(v[differ], cut, rtol=1e-12)


def test_rerun_is_skipped(pbmc):
    again = Context(pbmc.cfg, pbmc.outdir, progress=False)
    timings = run_stages(again, until="hvg")
    assert timings["normalize"]["skipped"] and timings["hvg"]["skipped"]


# --------------------------------------------------------------------------- Seurat 4.3.0


def ref_file(folder: Path, name: str) -> Path:
    for p in (folder / name, folder / (name + ".gz")):
        if p.exists():
            return p
    pytest.skip(f"Seurat reference {folder.name}/{name} not generated yet")


def check_seurat_parity(ctx: Context, folder: Path, n_top: int) -> None:
    store = ctx.store
    obs, var = store.obs(), store.var()
    qc = pd.read_csv(ref_file(folder, "qc.csv"), float_precision="round_trip")
    assert list(qc["cell"]) == list(obs.index)
    np.testing.assert_array_equal(obs["n_counts"].to_numpy(), qc["nCount_RNA"].to_numpy())
    np.testing.assert_array_equal(obs["n_features"].to_numpy(), qc["nFeature_RNA"].to_numpy())
    np.testing.assert_array_equal(obs["qc_pass"].to_numpy(), qc["pass"].to_numpy(dtype=bool))

    hvg = pd.read_csv(ref_file(folder, "hvg.csv"), keep_default_na=False,
                      na_values={"rank": ["NA"]}, float_precision="round_trip")
    assert list(hvg["gene"]) == list(var.index)  # same genes, same order, Seurat's names
    for ours, theirs in (("vst_mean", "vst.mean"), ("vst_variance", "vst.variance"),
                         ("vst_variance_expected", "vst.variance.expected"),
                         ("vst_variance_standardized", "vst.variance.standardized")):
        np.testing.assert_allclose(var[ours].to_numpy(), hvg[theirs].to_numpy(dtype=float),
                                   rtol=1e-6, atol=0, err_msg=ours)
    ref_top = ranked_genes(hvg["rank"].fillna(0).to_numpy(dtype=np.int64))
    our_top = ranked_genes(var["hvg_rank"].to_numpy())
    assert len(our_top) == n_top
    assert_same_ranking(our_top, ref_top, hvg["vst.variance.standardized"].to_numpy(dtype=float))
    np.testing.assert_array_equal(var["highly_variable"].to_numpy(),
                                  hvg["vst.variable"].to_numpy(dtype=bool))


def test_seurat_pbmc(pbmc, seurat_reference):
    folder = seurat_reference / "pbmc1k"
    check_seurat_parity(pbmc, folder, 2000)
    # ScaleData of the first 20 variable genes: (y - ln_mean) / ln_std, clipped at 10
    scaled = pd.read_csv(ref_file(folder, "scaled_sample.csv"), float_precision="round_trip")
    store, var = pbmc.store, pbmc.store.var()
    obs = store.obs()
    keep = np.flatnonzero(obs["qc_pass"].to_numpy())
    assert list(scaled["cell"]) == list(obs.index[keep])
    genes = [c for c in scaled.columns if c != "cell"]
    cols = var.index.get_indexer(genes)
    assert (cols >= 0).all()
    m = store.read_rows(0, store.n_cells)[keep]
    y = lognorm_csr(m, obs["n_counts"].to_numpy()[keep], 1e4)[:, cols].toarray()
    ours = np.minimum((y - var["ln_mean"].to_numpy()[cols]) / var["ln_std"].to_numpy()[cols], 10)
    np.testing.assert_allclose(ours, scaled[genes].to_numpy(dtype=float), rtol=1e-6, atol=1e-9)


def test_seurat_mouse_brain(shared_data, seurat_reference, tmp_path_factory):
    folder = seurat_reference / "mouse_brain"
    params_path = ref_file(folder, "params.json")
    ref_file(folder, "hvg.csv")
    params = json.loads(params_path.read_text())
    n_top = int(params["nfeatures"])
    ctx = run_until_hvg(shared_data / MOUSE, tmp_path_factory.mktemp("mouse"), [
        f"qc.min_features={int(params['qc_min_exclusive'])}",
        f"qc.max_features={int(params['qc_max_exclusive'])}", "qc.inclusive=false",
        f"hvg.n_top={n_top}"])
    check_seurat_parity(ctx, folder, n_top)


def test_clipped_variance_from_pass_one_or_a_second_pass(tmp_path, synth, monkeypatch):
    """Pass 2 is skipped when pass 1 kept every clipped count (the synthetic store); a gene
    with more clipped counts than pass 1 keeps makes vst read the counts again. Both give
    the dense reference's values."""
    from cellmill.stages import preprocess
    from cellmill.stages.preprocess import clipped_variance_from_sums, first_pass

    store, counts, mask = synth
    p1 = first_pass(store, mask, 1e4)
    sd = np.sqrt(vst(store, mask, 1e4, n_top=100)["vst_variance_expected"].to_numpy())
    assert clipped_variance_from_sums(p1, p1["mean"], sd) is not None

    monkeypatch.setattr(preprocess, "TOP_K", 2)  # pass 1 keeps 2 counts per gene
    x = counts.toarray()
    x[:, 8] = 0
    x[np.flatnonzero(mask)[:5], 8] = 5000  # 5 clipped counts
    x = sp.csr_matrix(x)
    other = write_store(tmp_path / "many_clipped.zarr", x)
    p1 = first_pass(other, mask, 1e4)
    assert p1["top"].shape[1] == 2
    res = vst(other, mask, 1e4, n_top=100)
    sd = np.sqrt(res["vst_variance_expected"].to_numpy())
    assert clipped_variance_from_sums(p1, p1["mean"], sd) is None
    ref = dense_vst(x[mask].toarray(), n_top=100)
    assert_matches_dense(res, ref)
    z = (x[mask][:, 8].toarray().ravel() - ref["vst_mean"][8]) / sd[8]
    assert (z > math.sqrt(mask.sum())).sum() == 5


def test_largest_counts_kept_per_gene_match_a_sort():
    from cellmill.kernels.moments import keep_largest, merge_largest

    rng = np.random.default_rng(5)
    k, n_genes = 8, 6
    offered = [rng.integers(1, 50, size=rng.integers(0, 30)) for _ in range(n_genes)]
    # two "blocks" kept separately, then merged, as pass 1 does
    tops, states = [], []
    for half in (0, 1):
        top, state = np.zeros((n_genes, k), np.int32), np.zeros((n_genes, 8), np.int64)
        for g, vals in enumerate(offered):
            for x in vals[half::2]:
                if x > state[g, 6]:
                    keep_largest(top[g], state[g], np.int64(x))
        tops.append(top)
        states.append(state)
    # the second block's rows as vst_first_pass returns them: only genes that kept a count
    kept = np.flatnonzero(states[1][:, 7] > 0).astype(np.int32)
    merge_largest(tops[0], states[0], tops[1][kept], kept)
    for g, vals in enumerate(offered):
        want = np.sort(vals)[::-1][:k]
        got = np.sort(tops[0][g])[::-1][: len(want)]
        np.testing.assert_array_equal(got, want)
        assert states[0][g, 7] == min(len(vals), k)
        assert (tops[0][g][len(want):] == 0).all() or len(want) == k
