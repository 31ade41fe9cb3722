"""Stage `pca`: exact out-of-core PCA against a dense numpy SVD and against Seurat 4.3.0.

The scaling inputs (var ln_mean / ln_std / highly_variable, obs qc_pass) are filled here from
an independent dense numpy computation (and Seurat's own variable genes for pbmc_1k), so these
tests do not depend on the normalize / hvg stages.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from make_10x import barcodes, write_10x_v3

from cellmill.config import Config
from cellmill.engine.registry import Context
from cellmill.io.ingest import ingest
from cellmill.stages.pca import compute_pca, fold_aligned, orient, run_pca

N_CELLS, N_GENES = 5000, 300


def lognorm(counts: sp.csr_matrix) -> np.ndarray:
    x = counts.toarray().astype(np.float64)
    return np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4)


def scaled(y: np.ndarray, clip: float = 10.0) -> np.ndarray:
    """Seurat's ScaleData, densely: centre, divide by the n-1 sd, clip from above."""
    m, s = y.mean(axis=0), y.std(axis=0, ddof=1)
    z = np.divide(y - m, s, out=np.zeros_like(y), where=s > 0)
    return np.minimum(z, clip)


def set_scaling(store, counts: sp.csr_matrix, qc: np.ndarray, hvg: np.ndarray) -> None:
    """Fill the hvg stage's columns (over QC-passed cells) and the qc mask from numpy."""
    y = lognorm(counts[np.flatnonzero(qc)])
    store.update_obs(qc_pass=qc)
    rank = np.zeros(counts.shape[1], dtype=np.int64)
    rank[hvg] = np.arange(1, len(hvg) + 1)
    store.update_var(highly_variable=rank > 0, hvg_rank=rank, ln_mean=y.mean(axis=0),
                     ln_std=y.std(axis=0, ddof=1))


def simulated_counts(seed: int = 0) -> sp.csr_matrix:
    """Cells of 5 types with their own expression profiles; gene 0 never expressed, gene 1
    rare and high (its scaled values hit the clip at 10)."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(0.6, 1.0, N_GENES)
    types = rng.integers(0, 5, N_CELLS)
    prof = base * rng.lognormal(0.0, 0.8, (5, N_GENES))
    depth = rng.lognormal(0.0, 0.3, N_CELLS)
    lam = prof[types] * depth[:, None]
    x = rng.poisson(lam)
    x[:, 0] = 0
    x[:, 1] = 0
    x[rng.choice(N_CELLS, 8, replace=False), 1] = 40
    return sp.csr_matrix(x.astype(np.int64))


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    d = tmp_path_factory.mktemp("pca")
    counts = simulated_counts()
    h5 = d / "sim.h5"
    write_10x_v3(h5, counts, barcodes(N_CELLS), [f"G{i}" for i in range(N_GENES)])
    store = ingest(h5, d / "sim.zarr", block_cells=2048)
    qc = np.ones(N_CELLS, dtype=bool)
    qc[::7] = False
    hvg = np.concatenate([[0, 1], np.arange(2, N_GENES, 2)])  # includes the zero-sd gene 0
    set_scaling(store, counts, qc, hvg)
    z = scaled(lognorm(counts[np.flatnonzero(qc)]))[:, np.sort(hvg)]
    return store, z, qc, np.sort(hvg)


def align(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a with each column's sign flipped to best match b."""
    s = np.sign((a * b).sum(axis=0))
    return a * np.where(s == 0, 1.0, s)


def test_pca_matches_dense_svd(sim):
    store, z, qc, hvg = sim
    assert z.max() == 10.0  # the clip is exercised
    res = compute_pca(store, n_components=30, block_cells=1024, scheduler=("threads", 2))
    u, d, vt = np.linalg.svd(z, full_matrices=False)
    n = z.shape[0]
    np.testing.assert_array_equal(res.genes, hvg)
    np.testing.assert_array_equal(res.cells, np.flatnonzero(qc))
    np.testing.assert_allclose(res.stdev, d[:30] / np.sqrt(n - 1), rtol=1e-10)
    v = vt[:30].T
    np.testing.assert_allclose(res.loadings, align(v, res.loadings), atol=1e-8)
    np.testing.assert_allclose(res.embeddings, align(u[:, :30] * d[:30], res.embeddings),
                               atol=1e-8 * d[0])
    # the sign convention: the largest |loading| of each component is positive
    top = np.abs(res.loadings).argmax(axis=0)
    assert (res.loadings[top, np.arange(30)] > 0).all()
    np.testing.assert_array_equal(orient(-res.loadings), res.loadings)


@pytest.mark.parametrize("dense_at", [0.0, 0.3, 0.9, 2.0])
def test_gram_any_dense_sparse_split_equals_dense_product(sim, monkeypatch, dense_at):
    """The hybrid Gram kernel (often-detected genes dense, the rest sparse, the zero-count
    shift added at the end) against Z^T Z of the dense scaled matrix, for all-dense,
    mixed and all-sparse splits."""
    from cellmill.stages import pca

    store, z, qc, _ = sim
    monkeypatch.setattr(pca, "DENSE_AT", dense_at)
    _, sc = pca.scaling_inputs(store, 10.0, 1e4)
    detected = store.var()["n_cells"].to_numpy()[np.flatnonzero(sc.col_of_gene >= 0)]
    want_dense = int((detected >= dense_at * store.n_cells).sum())
    assert sc.n_dense == want_dense
    if 0 < dense_at <= 1:
        assert 0 < sc.n_dense < len(sc.mean)  # a real mix of both parts
    n_counts = np.asarray(store.obs_column("n_counts"), dtype=np.float64)
    g = pca.gram_matrix(store, qc, sc, n_counts, 1, scheduler=("threads", 2))
    ref = z.T @ z
    np.testing.assert_allclose(g, ref, rtol=1e-11, atol=1e-9 * np.abs(ref).max())
    np.testing.assert_array_equal(g, g.T)


def test_pca_bit_identical_across_blocks_and_schedulers(sim):
    from cellmill.engine.schedulers import close_clients, scheduler_for

    store = sim[0]
    ref = compute_pca(store, n_components=20, block_cells=1024, scheduler=("sync", 1))
    runs = [compute_pca(store, n_components=20, block_cells=b, scheduler=("threads", 2))
            for b in (2048, 4096, 16384)]
    try:
        runs.append(compute_pca(store, n_components=20, block_cells=2048,
                                scheduler=scheduler_for("processes", 2)))
    finally:
        close_clients()
    for r in runs:
        np.testing.assert_array_equal(r.stdev, ref.stdev)
        np.testing.assert_array_equal(r.loadings, ref.loadings)
        np.testing.assert_array_equal(r.embeddings, ref.embeddings)


def test_pca_bit_identical_across_blocks_with_groups_of_granules(sim, monkeypatch):
    """Groups of 2 granules (the study's 5 granules make 3 groups, the last one short):
    the same bits for leaves of 1 and 2 granules, and the same PCA as one tree to 1e-10."""
    from cellmill.stages import pca

    store = sim[0]
    one_tree = compute_pca(store, n_components=20, block_cells=1024, scheduler=("sync", 1))
    monkeypatch.setattr(pca, "GROUP_GRANULES", 2)
    runs = [compute_pca(store, n_components=20, block_cells=b, scheduler=s)
            for b, s in ((1024, ("sync", 1)), (2048, ("threads", 2)), (16384, ("threads", 2)))]
    for r in runs[1:]:
        np.testing.assert_array_equal(r.stdev, runs[0].stdev)
        np.testing.assert_array_equal(r.embeddings, runs[0].embeddings)
    np.testing.assert_allclose(runs[0].stdev, one_tree.stdev, rtol=1e-10)
    with pytest.raises(ValueError, match="power of two up to 2"):
        pca.gram_matrix(store, sim[2], None, None, 4)


def test_pca_stage_writes_store(sim, tmp_path):
    store, z, qc, hvg = sim
    cfg = Config()
    cfg.pca.n_components = 10
    run_pca(Context(cfg=cfg, outdir=tmp_path, store=store, progress=False))
    x = store.read_array("obsm", "X_pca")
    pcs = store.read_array("varm", "PCs")
    stdev = store.read_array("uns", "pca_stdev")
    assert x.shape == (N_CELLS, 10) and pcs.shape == (N_GENES, 10) and stdev.shape == (10,)
    assert np.isnan(x[~qc]).all() and np.isfinite(x[qc]).all()
    other = np.setdiff1d(np.arange(N_GENES), hvg)
    assert (pcs[other] == 0).all()
    d = np.linalg.svd(z, compute_uv=False)
    np.testing.assert_allclose(stdev, d[:10] / np.sqrt(qc.sum() - 1), rtol=1e-10)
    # embeddings = scaled matrix x loadings
    np.testing.assert_allclose(x[qc], z @ pcs[hvg], atol=1e-9 * d[0])
    # streamed block by block into the store: the same bits as the in-memory embeddings
    mem = compute_pca(store, n_components=10, block_cells=2048, scheduler=("threads", 2))
    np.testing.assert_array_equal(x[qc], mem.embeddings)
    assert not list(store.path.glob("obsm/*.__new__"))


# ------------------------------------------------------------------ Seurat 4.3.0 on pbmc_1k


def read_ref(path, **kw) -> pd.DataFrame:
    return pd.read_csv(path, float_precision="round_trip", **kw)


@pytest.fixture(scope="module")
def pbmc(shared_data, seurat_reference, tmp_path_factory):
    ref = seurat_reference / "pbmc1k"
    if not (ref / "pca_stdev.csv").exists():
        pytest.skip("pbmc1k Seurat references not generated")
    d = tmp_path_factory.mktemp("pbmc")
    store = ingest(shared_data / "10x" / "pbmc_1k_citeseq_v3.h5", d / "pbmc.zarr")
    obs, var = store.obs(), store.var()
    counts = store.read_rows(0, store.n_cells)
    nf = np.diff(counts.indptr)
    qc = (nf > 500) & (nf < 4000)
    hv = read_ref(ref / "hvg.csv.gz")
    assert (hv["gene"].to_numpy() == var.index.to_numpy()).all()
    hvg = np.flatnonzero(hv["rank"].notna().to_numpy())
    set_scaling(store, counts, qc, hvg)
    cells = read_ref(ref / "cells.csv")["cell"].to_numpy()
    assert (obs.index.to_numpy()[qc] == cells).all()
    return store, ref


def test_pca_parity_with_seurat(pbmc):
    store, ref = pbmc
    res = compute_pca(store, n_components=50)
    sd = read_ref(ref / "pca_stdev.csv")["stdev"].to_numpy()
    emb = read_ref(ref / "pca_embeddings.csv.gz", index_col=0).to_numpy()
    load = read_ref(ref / "pca_loadings.csv.gz", index_col=0)
    genes = store.var().index.to_numpy()[res.genes]
    lv = load.loc[genes].to_numpy()
    assert np.abs(res.stdev / sd - 1).max() <= 1e-4
    for i in range(15):
        assert abs(np.corrcoef(res.embeddings[:, i], emb[:, i])[0, 1]) >= 0.9999
        assert abs(np.corrcoef(res.loadings[:, i], lv[:, i])[0, 1]) >= 0.9999
    # after sign alignment the values themselves agree (irlba's tolerance is 1e-5)
    np.testing.assert_allclose(align(res.embeddings[:, :15], emb[:, :15]), emb[:, :15],
                               atol=1e-4 * np.abs(emb[:, 0]).max())


def _pairwise_levels(parts):
    """The reference order: neighbours paired level by level, an unpaired last one carried up."""
    level = [None if p is None else p.copy() for p in parts]
    while len(level) > 1:
        nxt = []
        for i in range(0, len(level), 2):
            a = level[i]
            b = level[i + 1] if i + 1 < len(level) else None
            nxt.append(b if a is None else (a if b is None else a + b))
        level = nxt
    return level[0]


@pytest.mark.parametrize("count", [1, 2, 3, 5, 7, 8, 13, 31, 32, 33, 96])
def test_fold_aligned_adds_in_the_tree_order(count):
    """Floats of wildly different sizes: any other order of additions gives other bits."""
    rng = np.random.default_rng(count)
    parts = [rng.normal(size=64) * 10.0 ** rng.integers(-8, 9, 64) for _ in range(count)]
    if count > 4:
        parts[3] = None  # a leaf without passed cells
    want = _pairwise_levels(parts)
    got = fold_aligned([None if p is None else p.copy() for p in parts])
    np.testing.assert_array_equal(got, want)
    if count >= 13:  # and the order matters for these numbers
        flat = sum(p for p in parts if p is not None)
        assert not np.array_equal(flat, want)
    # in groups: one tree per group of 4 parts, the groups' sums added in order
    total = None
    for a in range(0, count, 4):
        tree = _pairwise_levels(parts[a:a + 4])
        total = tree if total is None else (total if tree is None else total + tree)
    got = fold_aligned([None if p is None else p.copy() for p in parts], group=4)
    np.testing.assert_array_equal(got, total)
