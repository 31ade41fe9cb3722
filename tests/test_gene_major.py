"""The out-of-core gene-major (CSC) copy: exact against scipy's tocsc, any memory budget."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from make_10x import barcodes, write_10x_v3

from cellmill.io import gene_major
from cellmill.io.gene_major import build_gene_major, plan_slabs
from cellmill.io.ingest import ingest
from cellmill.io.scratch import scratch_dir
from cellmill.io.store import GENE_MAJOR, Store


def _counts(n_cells, n_genes, seed):
    rng = np.random.default_rng(seed)
    # skewed gene densities: some genes everywhere, many rare, a few never seen
    dens = np.clip(rng.lognormal(-3, 1.5, n_genes), 0, 0.9)
    dens[:3] = 0.0
    dens[3] = 0.95
    dense = (rng.random((n_cells, n_genes)) < dens) * rng.integers(1, 60, (n_cells, n_genes))
    return sp.csr_matrix(dense.astype(np.int64))


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    d = tmp_path_factory.mktemp("gm")
    m = _counts(5000, 300, seed=1)
    write_10x_v3(d / "s.h5", m, barcodes(5000, seed=1), [f"G{i}" for i in range(300)])
    store = ingest(d / "s.h5", d / "s.zarr")
    return store, m


def _read_layer(store: Store):
    g = store.root["layers"][GENE_MAJOR]
    return g


@pytest.mark.parametrize("memory", [40_000, 400_000, 10**9])
def test_build_matches_scipy(small_store, memory):
    store, m = small_store
    build_gene_major(store, memory)
    csc = m.tocsc()
    csc.sort_indices()
    got = store.read_genes(0, store.n_genes)
    assert got.shape == (5000, 300)
    assert np.array_equal(got.indptr, csc.indptr)
    assert np.array_equal(got.indices, csc.indices)
    assert np.array_equal(got.data, csc.data)
    g = _read_layer(store)
    assert g.attrs["encoding-type"] == "csc_matrix"
    assert list(g.attrs["shape"]) == [5000, 300]
    assert g["data"].dtype == np.int32 and g["indices"].dtype == np.int32
    assert g["indptr"].dtype == np.int64
    # a gene range reads only its own columns
    part = store.read_genes(100, 137)
    assert (part != csc[:, 100:137]).nnz == 0



@pytest.mark.parametrize("chunk,memory,workers", [(777, 40_000, 1), (1000, 200_000, 3),
                                                  (50_000, 10**9, 2)])
def test_windows_cross_genes_and_runs(small_store, monkeypatch, chunk, memory, workers):
    """Small chunks: many windows, genes cut by window edges, every run read per window;
    the copy is the same whatever the window size and the number of worker threads."""
    store, m = small_store
    monkeypatch.setattr(gene_major, "CHUNK_NNZ", chunk)
    build_gene_major(store, memory, workers=workers)
    csc = m.tocsc()
    csc.sort_indices()
    got = Store(store.path).read_genes(0, store.n_genes)
    assert np.array_equal(got.indptr, csc.indptr)
    assert np.array_equal(got.indices, csc.indices)
    assert np.array_equal(got.data, csc.data)
    assert not scratch_dir(store.path, "gene-major").exists()

def test_slabs_respect_budget():
    indptr = np.r_[0, np.cumsum([5, 0, 7, 100, 1, 1, 1, 0, 30])]
    for max_nnz in (1, 8, 12, 50, 10**6):
        slabs = plan_slabs(indptr, max_nnz)
        assert slabs[0][0] == 0 and slabs[-1][1] == len(indptr) - 1
        assert all(a[1] == b[0] for a, b in zip(slabs, slabs[1:], strict=False))
        for g0, g1 in slabs:
            assert g1 > g0
            assert indptr[g1] - indptr[g0] <= max_nnz or g1 == g0 + 1


def test_anndata_reads_layer(small_store):
    store, m = small_store
    build_gene_major(store, 10**8)
    a = ad.read_zarr(store.path)
    layer = a.layers[GENE_MAJOR]
    assert sp.issparse(layer) and layer.format == "csc"
    assert (layer != m).nnz == 0


def test_rebuild_replaces_and_failure_leaves_old(small_store, monkeypatch):
    store, m = small_store
    build_gene_major(store, 10**8)
    before = (store.path / "layers" / GENE_MAJOR / "zarr.json").read_text()

    def boom(*args):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(gene_major, "_merge_run", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        build_gene_major(store, 10**8)
    layers = sorted(p.name for p in (store.path / "layers").iterdir())
    assert layers == [GENE_MAJOR, "zarr.json"]  # no temporary left, old copy intact
    assert not scratch_dir(store.path, "gene-major").exists()
    assert (store.path / "layers" / GENE_MAJOR / "zarr.json").read_text() == before
    assert (Store(store.path).read_genes(0, 300) != m).nnz == 0


def test_without_recorded_gene_counts(tmp_path):
    m = _counts(1500, 40, seed=3)
    write_10x_v3(tmp_path / "s.h5", m, barcodes(1500, seed=3), [f"G{i}" for i in range(40)])
    store = ingest(tmp_path / "s.h5", tmp_path / "s.zarr")
    var = store.var()
    store.write_df("var", var.drop(columns=["n_cells"]))
    build_gene_major(Store(store.path), 5_000)
    got = Store(store.path).read_genes(0, 40)
    assert (got != m).nnz == 0
    meta = json.loads((store.path / "layers" / GENE_MAJOR / "zarr.json").read_text())
    assert meta["attributes"]["encoding-type"] == "csc_matrix"
