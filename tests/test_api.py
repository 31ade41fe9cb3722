"""The Python API (cellmill/api.py), used as in a notebook."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import cellmill
from cellmill.config import ConfigError


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    sim = cellmill.simulate(root / "sim", n_cells=1200, seed=7, n_genes=6000)
    config = {"input": {"manifest": sim["manifest"]}, "gsea": {"gmt": str(sim["gmt"])},
              "compute": {"progress": False}}
    res = cellmill.run(config, root / "out", until="umap", log=False)
    return res


def test_run_returns_the_paths_and_timings(result):
    assert result.store.is_dir() and result.run_json.is_file()
    assert list(result.timings) == ["ingest", "qc", "normalize", "hvg", "pca", "neighbors",
                                    "cluster", "umap"]
    assert all(t["seconds"] >= 0 and not t["skipped"] for t in result.timings.values())
    assert result.timings["pca"]["cells"] == 1200


def test_anndata_of_qc_passed_cells_matches_the_store(result):
    store = cellmill.open_store(result.store)
    adata = cellmill.to_anndata(result.store, cells="qc_passed")
    qc = np.flatnonzero(np.asarray(store.obs_column("qc_pass"), dtype=bool))
    assert adata.shape == (len(qc), store.n_genes) == (1200, store.n_genes)
    assert {"sample", "condition", "n_counts", "qc_pass", "cluster"} <= set(adata.obs.columns)
    assert list(adata.obs_names) == list(store.obs_names()[qc])
    assert list(adata.var_names) == list(store.var().index)
    counts = store.read_rows(0, store.n_cells)[qc]
    assert adata.X.dtype == np.int32 and (adata.X != counts).nnz == 0
    for name in ("X_pca", "X_umap"):
        np.testing.assert_array_equal(adata.obsm[name], store.read_array("obsm", name)[qc])
    # any index array, in its order
    sub = cellmill.to_anndata(store, cells=np.array([7, 2, 1100]))
    assert list(sub.obs_names) == list(store.obs_names()[[7, 2, 1100]])
    assert (sub.X != store.read_rows(0, store.n_cells)[[7, 2, 1100]]).nnz == 0


def test_backed_anndata_is_lazy(result):
    try:
        from anndata.experimental import read_lazy  # noqa: F401
    except ImportError:
        pytest.skip("anndata < 0.12 has no read_lazy")
    lazy = cellmill.to_anndata(result.store, cells="qc_passed", backed=True)
    assert lazy.shape[0] == 1200 and "X_umap" in lazy.obsm


def test_rerun_skips_and_a_bad_value_names_the_key(result, tmp_path):
    with pytest.raises(ConfigError, match=r"cluster\.resolution"):
        cellmill.run({"input": {"manifest": "m.csv"}, "cluster": {"resolution": -1}}, tmp_path)
    with pytest.raises(ConfigError, match=r"qc\.nope"):
        cellmill.load({"qc": {"nope": 1}})


def test_import_cellmill_is_light():
    code = ("import sys, cellmill; assert cellmill.__version__; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('dask', 'numba', 'numpy', 'pandas', 'anndata', 'zarr')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
    assert set(cellmill.__all__) >= {"run", "simulate", "open_store", "to_anndata"}
