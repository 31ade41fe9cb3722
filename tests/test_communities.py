"""Leiden with the graph streamed from the store (stages/clustering/streamed.py), checked
against brute force (modularity, local optimality) and against igraph's Leiden on the whole
graph."""

import numpy as np
import pytest
from make_10x import barcodes, random_counts, write_10x_v3
from sklearn.metrics import adjusted_rand_score

import cellmill.stages.clustering.streamed as comm
from cellmill.io.ingest import ingest
from cellmill.stages.clustering.in_memory import cluster_labels, modularity_clusters
from cellmill.stages.neighbors import snn_graph, write_snn_graph
from cellmill.stages.shared.knn import exact_knn


def modularity(a: np.ndarray, labels: np.ndarray, gamma: float) -> float:
    """Newman's modularity with resolution of a dense symmetric graph without its diagonal."""
    a = a.copy()
    np.fill_diagonal(a, 0.0)
    k = a.sum(axis=1)
    two_m = k.sum()
    same = labels[:, None] == labels[None, :]
    return float(((a - gamma * np.outer(k, k) / two_m) * same).sum() / two_m)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """An SNN graph of 1,500 points in 6 blobs, 400 more cells failing QC, in a store."""
    tmp = tmp_path_factory.mktemp("communities")
    n_all, n = 1900, 1500
    write_10x_v3(tmp / "a.h5", random_counts(n_all, 20, seed=2), barcodes(n_all, seed=2),
                 [f"G{i}" for i in range(20)])
    store = ingest(tmp / "a.h5", tmp / "s.zarr")
    rng = np.random.default_rng(7)
    centers = rng.normal(0, 5, (6, 15))
    truth = rng.integers(0, 6, n)
    pts = centers[truth] + rng.normal(0, 1, (n, 15))
    cells = np.sort(rng.choice(n_all, n, replace=False))
    knn, _ = exact_knn(pts, 20)
    write_snn_graph(store, "obsp", "snn", knn, 1 / 15, cells=cells, n_cells=n_all)
    return store, cells, snn_graph(knn, 1 / 15), truth


def test_local_moving_reaches_a_local_optimum(planted, monkeypatch):
    store, cells, snn, _ = planted
    monkeypatch.setattr(comm, "ROWS", 97)  # blocks that end mid-cluster
    monkeypatch.setattr(comm, "MOVE_TOL", 0.0)  # sweep until no node is left to visit
    rows = comm.GraphRows(store, cells)
    labels, k = comm.local_moving(rows, 0.3)
    a = snn.toarray()
    np.fill_diagonal(a, 0.0)
    np.testing.assert_allclose(k, a.sum(axis=1), rtol=1e-12)
    q = modularity(a, labels, 0.3)
    # no single node can raise the modularity by moving to a neighbour's community
    rng = np.random.default_rng(0)
    for i in rng.choice(len(labels), 60, replace=False):
        for c in np.unique(labels[a[i] > 0]):
            moved = labels.copy()
            moved[i] = c
            assert modularity(a, moved, 0.3) <= q + 1e-12


@pytest.mark.parametrize("dense_pairs", [0, 1 << 22])  # the sparse and the dense sums
def test_aggregated_graph_keeps_the_modularity(planted, monkeypatch, dense_pairs):
    store, cells, snn, _ = planted
    monkeypatch.setattr(comm, "DENSE_PAIRS", dense_pairs)
    monkeypatch.setattr(comm, "ROWS", 200)
    rows = comm.GraphRows(store, cells)
    labels, _ = comm.local_moving(rows, 0.3)
    n_comm, edges, weights = comm.aggregate(rows, labels)
    assert n_comm == labels.max() + 1 and (edges[:, 0] <= edges[:, 1]).all()
    from cellmill.stages.clustering.in_memory import _igraph

    g = _igraph(n_comm, edges)
    a = snn.toarray()
    # any partition of the communities: the same modularity as that partition of the cells
    top = np.random.default_rng(1).integers(0, 4, n_comm)
    q_agg = g.modularity(list(top), weights=weights, resolution=0.3)
    assert q_agg == pytest.approx(modularity(a, top[labels], 0.3), abs=1e-12)
    assert weights.sum() == pytest.approx(np.triu(a, 1).sum(), rel=1e-12)


def test_streamed_leiden_matches_igraph_on_the_whole_graph(planted, monkeypatch):
    store, cells, snn, truth = planted
    ours = comm.streamed_cluster_labels(store, cells, 0.3, seed=0)
    whole = cluster_labels(snn, "leiden", 0.3, 0, -1, "igraph")
    assert adjusted_rand_score(whole, ours) > 0.99
    assert adjusted_rand_score(truth, ours) > 0.99
    rows = comm.GraphRows(store, cells)
    _, q_ours = comm.streamed_leiden(rows, 0.3, 0)
    _, q_whole = modularity_clusters(snn, "leiden", 0.3, 0)
    assert q_ours == pytest.approx(modularity(snn.toarray(), ours, 0.3), abs=1e-9)
    assert q_ours >= q_whole - 1e-3
    # the block size is I/O only: the same labels
    monkeypatch.setattr(comm, "ROWS", 61)
    np.testing.assert_array_equal(comm.streamed_cluster_labels(store, cells, 0.3, seed=0), ours)


def test_spilled_graph_gives_the_same_blocks_and_labels(planted, tmp_path, monkeypatch):
    store, cells, snn, _ = planted
    streamed, spilled = comm.GraphRows(store, cells), comm.GraphRows(store, cells)
    monkeypatch.setattr(comm, "ROWS", 97)  # spilled in several pieces, by 3 threads
    spilled.spill(tmp_path / "g", threads=3)
    for (a, b) in [(0, 1500), (97, 311), (1499, 1500)]:
        for x, y in zip(streamed.read(a, b), spilled.read(a, b), strict=True):
            np.testing.assert_array_equal(x, y)
    _, ip, idx, w = spilled.read(0, 1500)  # the SNN graph among the QC-passed cells, renumbered
    np.testing.assert_array_equal(ip, snn.indptr)
    np.testing.assert_array_equal(idx, snn.indices)
    np.testing.assert_allclose(w, snn.data, rtol=1e-15)
    assert sum(len(blk[2]) for blk in spilled.blocks()) == snn.nnz
    monkeypatch.setattr(comm, "ROWS", 32_768)
    ours = comm.streamed_cluster_labels(store, cells, 0.3, seed=0)
    scratch = tmp_path / "scratch"
    np.testing.assert_array_equal(
        comm.streamed_cluster_labels(store, cells, 0.3, seed=0, scratch=scratch, threads=2),
        ours)
    assert not scratch.exists()


def test_singletons_read_only_their_rows(planted):
    store, cells, snn, _ = planted
    rows = comm.GraphRows(store, cells)
    few = [3, 700, 1499]
    m = comm.rows_of(rows, few)
    dense = snn.toarray()
    for i in few:
        np.testing.assert_array_equal(m[i].toarray().ravel(), dense[i])
    assert m.nnz == sum((dense[i] != 0).sum() for i in few)
    assert comm.rows_of(rows, []).nnz == 0


def test_local_moving_without_edges():
    # nodes with no edges stay in their own communities
    ip = np.zeros(4, dtype=np.int64)
    labels = np.arange(3, dtype=np.int64)
    moved = comm.move_rows(ip, np.empty(0, np.int32), np.empty(0), 0, labels, np.zeros(3),
                           np.zeros(3), 1.0, np.ones(3, bool), np.zeros(3),
                           np.empty(3, np.int64))
    assert moved == 0 and labels.tolist() == [0, 1, 2]

