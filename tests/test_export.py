"""`cellmill export`: the .h5ad holds the store's counts, obs, var and embeddings (and the
LogNormalize layer on request), anndata and scanpy read it back, memory stays bounded, and bad
input is one line with nothing written. The store's counts are read straight from its Zarr
arrays and the LogNormalize values recomputed with scipy, independently of the exporter."""

from __future__ import annotations

import shutil
import tracemalloc

import matplotlib
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

from cellmill.cli import main
from cellmill.config import load_config
from cellmill.engine.workflow import run_workflow
from cellmill.io.export import export_h5ad
from cellmill.io.store import Store

matplotlib.use("Agg")

N_CELLS, N_GENES = 600, 5000  # > 4000 genes: the simulated doublet-like cells need them


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """(store after umap, simulated manifest)."""
    from cellmill.simulate import simulate_study

    root = tmp_path_factory.mktemp("export")
    sim = root / "sim"
    simulate_study(sim, n_cells=N_CELLS, seed=3, n_genes=N_GENES)
    cfg = load_config(None, [f'input.manifest="{sim / "manifest.csv"}"',
                             f'gsea.gmt="{sim / "planted.gmt"}"', "compute.progress=false"])
    run_workflow(cfg, root / "out", until="umap")
    return root / "out" / "study.zarr", sim / "manifest.csv"


@pytest.fixture(scope="module")
def store_path(study):
    return study[0]


def zarr_counts(path) -> sp.csr_matrix:
    """The store's X read with zarr alone."""
    g = zarr.open_group(path / "X", mode="r", zarr_format=3)
    return sp.csr_matrix((g["data"][:], g["indices"][:], g["indptr"][:]),
                         shape=tuple(g.attrs["shape"]))


def scipy_lognorm(counts: sp.csr_matrix, scale_factor: float) -> sp.csr_matrix:
    """log1p(x / row total * scale_factor) on the nonzeros."""
    c = sp.csr_matrix(counts, dtype=np.float64)
    totals = np.asarray(c.sum(axis=1)).ravel()
    y = sp.diags(scale_factor / totals) @ c
    y.data = np.log1p(y.data)
    return sp.csr_matrix(y)


def assert_same_csr(a, b, atol=0.0):
    a, b = sp.csr_matrix(a), sp.csr_matrix(b)
    a.sort_indices()
    b.sort_indices()
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.indptr, b.indptr)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.data, b.data, rtol=0, atol=atol)


def qc_keep(store_path) -> np.ndarray:
    obs = Store(store_path).obs()
    return np.flatnonzero(obs["qc_pass"].to_numpy(dtype=bool))


@pytest.mark.parametrize("cells, layers", [("all", None), ("QC-passed", "lognorm")])
def test_export_reads_back(store_path, tmp_path, cells, layers):
    import anndata as ad
    import matplotlib.pyplot as plt
    import scanpy as sc

    out = tmp_path / "out.h5ad"
    argv = ["-q", "export", str(store_path), "-o", str(out), "--cells", cells]
    assert main(argv + (["--layers", layers] if layers else [])) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5ad"]  # no temporary left

    store = Store(store_path)
    obs, var = store.obs(), store.var()
    counts = zarr_counts(store_path)
    keep = np.arange(store.n_cells) if cells == "all" else qc_keep(store_path)
    if cells != "all":
        assert 0 < len(keep) == N_CELLS < store.n_cells  # the simulated study has failing cells

    a = ad.read_h5ad(out)
    assert a.shape == (len(keep), N_GENES)
    assert a.X.dtype == np.int32 and sp.issparse(a.X) and a.X.format == "csr"
    assert_same_csr(a.X, counts[keep])
    pd.testing.assert_frame_equal(a.obs, obs.iloc[keep])
    assert isinstance(a.obs["cluster"].dtype, pd.CategoricalDtype)
    assert a.obs["cluster"].notna().sum() == N_CELLS  # QC-failing cells have no cluster
    assert {"n_counts", "n_features", "qc_pass"} <= set(a.obs.columns)
    pd.testing.assert_frame_equal(a.var, var)
    assert a.var["highly_variable"].dtype == bool and 0 < a.var["highly_variable"].sum() < N_GENES
    for name in ("X_pca", "X_umap"):
        np.testing.assert_array_equal(a.obsm[name], store.read_array("obsm", name)[keep])
    assert a.uns["cellmill"]["store"] == str(store_path.resolve())
    if layers:
        # anndata >= 0.13 also lists X as the layer None
        assert set(a.layers) - {None} == {"lognorm"}
        assert a.layers["lognorm"].dtype == np.float32
        assert a.uns["cellmill"]["lognorm_scale_factor"] == 1e4
        assert_same_csr(a.layers["lognorm"], scipy_lognorm(counts[keep], 1e4), atol=1e-6)
    else:
        assert set(a.layers) - {None} == set()

    b = ad.read_h5ad(out, backed="r")
    assert b.shape == a.shape and b.isbacked
    assert_same_csr(b.X[10:60], counts[keep[10:60]])
    pd.testing.assert_frame_equal(b.obs, a.obs)
    np.testing.assert_array_equal(b.obsm["X_umap"], a.obsm["X_umap"])
    b.file.close()

    s = sc.read_h5ad(out)
    ax = sc.pl.umap(s, color="cluster", show=False)
    drawn = sum(len(c.get_offsets()) for c in ax.collections)
    assert drawn == len(keep)  # one point per exported cell (NaN rows are not shown)
    plt.close("all")


def test_small_blocks_and_recorded_scale_factor(store_path, tmp_path):
    """Blocks of 37 cells (many appends, none aligned to the storage blocks) write the same
    matrices; the layer uses the scale factor the normalize stage recorded, 1e4 without one."""
    import anndata as ad

    copy = tmp_path / "copy.zarr"
    shutil.copytree(store_path, copy)
    Store(copy).write_array("uns", "lognorm_scale_factor", np.array([2500.0]))
    keep = qc_keep(store_path)
    counts = zarr_counts(store_path)[keep]

    out = tmp_path / "small.h5ad"
    assert export_h5ad(copy, out, cells="qc_passed", layers=["lognorm"],
                       block_cells=37) == (N_CELLS, N_GENES)
    a = ad.read_h5ad(out)
    assert_same_csr(a.X, counts)
    assert_same_csr(a.layers["lognorm"], scipy_lognorm(counts, 2500.0), atol=1e-6)
    assert a.uns["cellmill"]["lognorm_scale_factor"] == 2500.0

    shutil.rmtree(copy / "uns" / "lognorm_scale_factor")
    export_h5ad(copy, out, cells="QC-PASSED", layers="lognorm", overwrite=True, block_cells=37)
    assert_same_csr(ad.read_h5ad(out).layers["lognorm"], scipy_lognorm(counts, 1e4), atol=1e-6)


def test_memory_is_bounded_by_the_block(store_path, tmp_path):
    """Peak traced allocations with 50-cell blocks stay well below X and the layer held dense
    (about 3.6 MB against 25 MB here; the floor is var and the store's decoded 1 MB chunks, not
    the block); the same export in one block goes past the bound, so the check can fail."""
    export_h5ad(store_path, tmp_path / "warm.h5ad", layers="lognorm", block_cells=50)  # imports
    store = Store(store_path)
    dense_bytes = store.n_cells * store.n_genes * (4 + 4)  # int32 X + float32 layer

    def peak(block_cells, name):
        tracemalloc.start()
        try:
            export_h5ad(store_path, tmp_path / name, layers="lognorm", block_cells=block_cells)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small = peak(50, "small.h5ad")
    whole = peak(10**9, "whole.h5ad")
    assert small < dense_bytes / 3, (small, dense_bytes)
    assert whole > dense_bytes / 3, (whole, dense_bytes)


def _refused(capsys, argv, out, *words):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("cellmill: error:"), err
    for w in words:
        assert w in err, (w, err)
    assert not list(out.parent.glob("*.tmp-*"))
    return err


def test_bad_input_is_one_line_and_writes_nothing(study, tmp_path, capsys):
    store_path, manifest = study
    out = tmp_path / "out.h5ad"
    s = str(store_path)

    folder = tmp_path / "not_a_store"
    folder.mkdir()
    _refused(capsys, ["export", str(folder), "-o", str(out)], out, str(folder))
    _refused(capsys, ["export", str(tmp_path / "missing.zarr"), "-o", str(out)], out,
             "missing.zarr")
    _refused(capsys, ["export", s, "-o", str(tmp_path / "nope" / "out.h5ad")], out,
             "does not exist", "nope")
    _refused(capsys, ["export", s, "-o", str(folder)], out, "is a folder")
    _refused(capsys, ["export", s, "-o", str(out), "--layers", "lognorm,scaled"], out,
             "--layers", "'scaled'", "lognorm")
    _refused(capsys, ["export", s, "-o", str(out), "--layers", "counts"], out,
             "--layers", "X already holds the raw counts")
    _refused(capsys, ["export", s, "-o", str(out), "--cells", "passed"], out,
             "--cells", "qc-passed")
    assert not out.exists()

    raw = tmp_path / "raw.zarr"  # ingested only: no QC yet
    assert main(["-q", "ingest", str(manifest), "-o", str(raw)]) == 0
    _refused(capsys, ["export", str(raw), "-o", str(out), "--cells", "qc-passed"], out,
             "qc", str(raw))
    assert not out.exists()
    assert main(["-q", "export", str(raw), "-o", str(out)]) == 0  # all cells: fine

    out.write_text("keep me")
    _refused(capsys, ["export", s, "-o", str(out)], out, "--overwrite", str(out))
    assert out.read_text() == "keep me"
    assert main(["-q", "export", s, "-o", str(out), "--overwrite"]) == 0
    assert out.stat().st_size > 100_000


def test_failure_mid_write_leaves_nothing(store_path, tmp_path, monkeypatch):
    """An error after some blocks were written: no output, no temporary file, and an existing
    output (with --overwrite) is left as it was."""
    import cellmill.io.export as ex

    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk gone")
        return real(*args)

    real = ex.lognorm_values
    monkeypatch.setattr(ex, "lognorm_values", failing)
    out = tmp_path / "out.h5ad"
    with pytest.raises(OSError, match="disk gone"):
        export_h5ad(store_path, out, layers="lognorm", block_cells=100)
    assert list(tmp_path.iterdir()) == []
    out.write_text("old")
    calls.clear()
    with pytest.raises(OSError, match="disk gone"):
        export_h5ad(store_path, out, layers="lognorm", block_cells=100, overwrite=True)
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.h5ad"]
