"""Stages `neighbors`, `cluster`, `umap`: exact kNN against brute force, Seurat's SNN graph
(dense numpy and Seurat's own graph), label conventions, and clusters against Seurat on pbmc_1k.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.spatial.distance import cdist
from sklearn.metrics import adjusted_rand_score, silhouette_score

from cellmill.config import Config
from cellmill.engine.cells import all_cells, obsm_rows
from cellmill.engine.registry import Context
from cellmill.io.ingest import ingest
from cellmill.io.store import Store
from cellmill.kernels.louvain import java_next_int, java_seed, random_permutation
from cellmill.stages.clustering.in_memory import (
    _igraph,
    cluster_labels,
    group_singletons,
    modularity_clusters,
    order_by_size,
    r_sample_seed1,
    upper_triangle,
)
from cellmill.stages.clustering.stage import passed_snn, run_cluster
from cellmill.stages.neighbors import run_neighbors, snn_graph
from cellmill.stages.shared.knn import exact_knn, recall, self_first
from cellmill.stages.umap.stage import run_umap

# ------------------------------------------------------------------ kNN


def brute_knn(x: np.ndarray, k: int):
    """Self first, then the others by (distance, index): scipy's cdist and a stable sort."""
    d = cdist(x, x, "sqeuclidean")
    n = len(x)
    idx = np.empty((n, k), dtype=np.int64)
    for i in range(n):
        others = np.lexsort((np.arange(n), d[i]))
        others = others[others != i]
        idx[i] = np.concatenate([[i], others[: k - 1]])
    return idx, np.sqrt(np.take_along_axis(d, idx, axis=1))


def mixture(n: int, d: int = 15, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=4.0, size=(6, d))
    return centers[rng.integers(0, 6, n)] + rng.normal(size=(n, d))


@pytest.mark.parametrize("chunk,scheduler", [(None, ("threads", 2)), (37, ("sync", 1)),
                                             (256, ("threads", 2))])
def test_exact_knn_matches_brute_force(chunk, scheduler):
    x = mixture(700)
    idx, dist = exact_knn(x, 20, scheduler=scheduler, chunk=chunk)
    ref_idx, ref_dist = brute_knn(x, 20)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-12, atol=1e-12)


def test_exact_knn_ties_and_duplicates():
    # small integer coordinates: many exactly equal distances and duplicated points; the
    # order must be (distance, index) with the point itself first
    rng = np.random.default_rng(1)
    x = rng.integers(0, 3, size=(400, 5)).astype(np.float64)
    idx, dist = exact_knn(x, 12, chunk=50)
    ref_idx, ref_dist = brute_knn(x, 12)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(dist, ref_dist)
    assert (idx[:, 0] == np.arange(400)).all()


@pytest.mark.parametrize("offset,spread", [(0.0, 1.0), (1e4, 1e-3), (-3e2, 1e-5)])
def test_exact_knn_float32_screen_never_drops_a_neighbour(offset, spread):
    # far from the origin, float32 cannot tell these points apart (its coordinate rounding
    # is about the size of their distances): the screen's slack must let every true
    # neighbour through to the float64 distances
    x = offset + spread * mixture(600, d=7, seed=11)
    idx, dist = exact_knn(x, 15, chunk=64)
    ref_idx, ref_dist = brute_knn(x, 15)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-9)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 50.0, 1e5])
def test_float32_distance_within_the_screen_bound(scale):
    from cellmill.kernels.knn import U32, _sq_dist, screen_slack

    rng = np.random.default_rng(3)
    d = 15
    ref = scale * rng.normal(size=(d, 128))
    ref[:, 64:] = ref[:, :64] + scale * 1e-6 * rng.normal(size=(d, 64))  # near pairs too
    slack = screen_slack(ref)
    grow = (1.0 + 2.0 * (d + 2) * U32) * (1.0 + 4.0 * U32)
    buf = np.empty(128, dtype=np.float32)
    for me in range(0, 128, 9):
        _sq_dist(ref.astype(np.float32), me, 0, 128, buf)
        true = np.sqrt(((ref - ref[:, [me]]) ** 2).sum(axis=0))
        assert (buf.astype(np.float64) <= (true + slack) ** 2 * grow).all()


@pytest.mark.parametrize("rows,scheduler,block,chunk", [
    (97, ("threads", 2), 128, 64), (5000, ("sync", 1), 256, None),
    (333, ("threads", 2), 65536, None)])
def test_knn_index_from_blocks_gives_exact_searchs_bits(tmp_path, rows, scheduler, block,
                                                         chunk):
    """The index on disk (made from blocks of rows through files, the tree built on a float32
    copy, searched a block of points at a time): brute force's lists and the in-memory
    index's distances bit for bit, on integer points (ties, duplicates) and far from the
    origin (the float32 screen), whatever its blocks and the queries per task; only its two
    tree-order files are left."""
    from cellmill.stages.shared.knn import (
        knn_index,
        knn_index_from_blocks,
        knn_search,
        row_blocks,
    )

    rng = np.random.default_rng(1)
    for i, x in enumerate([rng.integers(0, 3, size=(400, 5)).astype(np.float64),
                           1e4 + 1e-3 * mixture(600, d=7, seed=11),
                           mixture(1500, d=15, seed=3)]):
        index = knn_index_from_blocks(row_blocks(x, rows), len(x), tmp_path / str(i), block)
        idx, dist = knn_search(index, 12, scheduler=scheduler, chunk=chunk)
        np.testing.assert_array_equal(idx, brute_knn(x, 12)[0])
        ref = knn_index(x)
        assert index.slack == ref.slack  # the screen's
        np.testing.assert_array_equal(np.sort(index.perm), np.arange(len(x)))
        assert index.disk.bounds[0] == 0 and index.disk.bounds[-1] == len(x)
        assert (np.diff(index.disk.bounds) <= max(block, 128)).all()
        for b in range(len(index.disk.bounds) - 1):  # the points in tree order, by blocks
            a, e = index.disk.span(b)
            p64, p32 = index.disk.read(b)
            np.testing.assert_array_equal(p64, x[index.perm[a:e]].T)
            np.testing.assert_array_equal(p32, x[index.perm[a:e]].T.astype(np.float32))
        ref_idx, ref_dist = knn_search(ref, 12)
        np.testing.assert_array_equal(idx, ref_idx)
        np.testing.assert_array_equal(dist, ref_dist)
        assert sorted(p.name for p in (tmp_path / str(i)).iterdir()) == ["tree.f32", "tree.f64"]


def test_self_first_for_approximate_lists():
    # pynndescent's lists (the neighbors.method = "pynndescent" option) may miss the point
    # itself or hold it later: it is put first at distance 0, the last neighbour dropped
    idx = np.array([[0, 5, 6], [2, 1, 7], [3, 4, 8]])
    dist = np.array([[0.0, 1, 2], [0.5, 0, 1], [1.0, 2, 3]])
    i2, d2 = self_first(idx, dist)
    np.testing.assert_array_equal(i2, [[0, 5, 6], [1, 2, 7], [2, 3, 4]])
    np.testing.assert_array_equal(d2, [[0, 1, 2], [0, 0.5, 1], [0, 1, 2]])
    assert recall(i2, idx) == 8 / 9


# ------------------------------------------------------------------ SNN


def dense_snn(knn: np.ndarray, prune: float) -> np.ndarray:
    n, k = knn.shape
    a = np.zeros((n, n))
    a[np.repeat(np.arange(n), k), knn.ravel()] = 1.0
    s = a @ a.T
    j = s / (2 * k - s)
    j[j < prune] = 0.0
    return j


def test_snn_matches_dense_numpy():
    x = mixture(600, seed=3)
    knn, _ = exact_knn(x, 20)
    g = snn_graph(knn, 1 / 15, chunk=97)
    ref = dense_snn(knn, 1 / 15)
    np.testing.assert_array_equal(g.toarray(), ref)
    assert g.has_sorted_indices and (g.diagonal() == 1).all()
    assert (g != g.T).nnz == 0
    # pruning is strict: with k = 20, 2 shared neighbours (2/38 < 1/15) go, 3 (3/37) stay
    assert g.data.min() == 3 / 37
    g0 = snn_graph(knn, 0.0)
    np.testing.assert_array_equal(g0.toarray(), dense_snn(knn, 0.0))


class _ArrayStore:
    """Just what the graph stages' readers use of a Store: `root` and `read_sparse`."""

    def __init__(self, snn=None, pcs=None):
        import zarr

        self.snn = snn
        self.root = {"obsm": {"X_pca": zarr.array(pcs, chunks=(37, pcs.shape[1]))}
                     if pcs is not None else {}}

    def read_sparse(self, slot, name):
        return self.snn.copy()


def test_graph_among_all_cells_and_back():
    # neighbors builds the graph of the passed cells straight among all cells, cluster takes
    # it back out in place; both must be what scipy's indexing gives
    rng = np.random.default_rng(2)
    x = mixture(500, seed=5)
    cells = np.sort(rng.choice(800, 500, replace=False))
    knn, dist = exact_knn(x, 20)
    big = snn_graph(knn, 1 / 15, chunk=61, cells=cells, n_cells=800)
    ref = np.zeros((800, 800))
    ref[np.ix_(cells, cells)] = dense_snn(knn, 1 / 15)
    np.testing.assert_array_equal(big.toarray(), ref)
    assert big.has_sorted_indices and big.indices.dtype == np.int32
    back = passed_snn(_ArrayStore(snn=big), cells)
    sliced = big[cells][:, cells]
    for a in ("indices", "data"):
        np.testing.assert_array_equal(getattr(back, a), getattr(sliced, a))
    np.testing.assert_array_equal(back.indptr, sliced.indptr)
    # a graph with entries of other cells is sliced as scipy does
    other = big.tolil()
    other[cells[0], 3 if 3 not in cells else 4] = 0.5
    other = other.tocsr()
    assert (passed_snn(_ArrayStore(snn=other), cells) != other[cells][:, cells]).nnz == 0
    # the other rows: fill values; rows of the passed cells: their lists, mapped
    full = all_cells(knn, cells, 800, -1, lookup=cells.astype(np.int64), block=33)
    assert full.dtype == np.int64 and (full[np.setdiff1d(np.arange(800), cells)] == -1).all()
    np.testing.assert_array_equal(full[cells], cells[knn])
    np.testing.assert_array_equal(all_cells(dist, cells, 800, np.nan, block=33)[cells], dist)


def test_obsm_rows_reads_the_passed_rows():
    x = np.random.default_rng(3).normal(size=(300, 50))
    cells = np.flatnonzero(np.random.default_rng(4).random(300) < 0.7)
    np.testing.assert_array_equal(obsm_rows(_ArrayStore(pcs=x), "X_pca", cells, 15),
                                  x[cells, :15])


def test_obsm_row_blocks_are_the_passed_rows_in_order():
    from cellmill.engine.cells import obsm_row_blocks

    x = np.random.default_rng(3).normal(size=(3000, 50))
    cells = np.flatnonzero(np.random.default_rng(4).random(3000) < 0.7)
    store = _ArrayStore(pcs=x)
    for rows in (1, 500, 10**6):
        blocks = list(obsm_row_blocks(store, "X_pca", cells, 15, rows=rows))
        assert [a for a, _, _ in blocks] == [0] + [b for _, b, _ in blocks[:-1]]
        assert blocks[-1][1] == len(cells)
        np.testing.assert_array_equal(np.concatenate([p for _, _, p in blocks]), x[cells, :15])
    assert list(obsm_row_blocks(store, "X_pca", cells[:0], 15)) == []


def test_igraph_edges_are_the_upper_triangle():
    knn, _ = exact_knn(mixture(300, seed=6), 20)
    g = snn_graph(knn)
    edges, w = upper_triangle(g)
    graph = _igraph(g.shape[0], edges)
    up = sp.triu(g, k=1).tocoo()
    assert graph.get_edgelist() == list(zip(up.row.tolist(), up.col.tolist(), strict=True))
    np.testing.assert_array_equal(w, up.data)


# ------------------------------------------------------------------ label conventions


def test_order_by_size():
    labels = np.array([9, 9, 9, 2, 2, 2, 5, 7, 7])
    # sizes 3 (2), 3 (9), 2 (7), 1 (5); equal sizes in raw label order (a stable sort)
    np.testing.assert_array_equal(order_by_size(labels), [1, 1, 1, 0, 0, 0, 3, 2, 2])


def test_java_random():
    # jshell: new java.util.Random(seed), nextInt(bound) five times; and the shuffle of
    # ModularityOptimizer's generateRandomPermutation(10) with Random(0)
    expected = {(42, 100): [30, 63, 48, 84, 70], (0, 100): [60, 48, 29, 47, 15],
                (7, 821): [72, 186, 348, 338, 89], (3, 1024): [748, 575, 72, 824, 68]}
    for (seed, bound), values in expected.items():
        st = java_seed(seed)
        assert [java_next_int(st, bound) for _ in range(5)] == values
    np.testing.assert_array_equal(random_permutation(10, java_seed(0)),
                                  [0, 3, 9, 4, 1, 7, 8, 6, 2, 5])


def test_r_sample_after_set_seed_1():
    # R 4.2.2: for (n in ...) { set.seed(1); cat(sample(seq_len(n), 1)) }
    expected = {1: 1, 2: 1, 5: 1, 8: 1, 9: 9, 12: 9, 17: 4, 40000: 24388, 70000: 24388}
    for n, r in expected.items():
        assert r_sample_seed1(n) + 1 == r


def _graph(n: int, edges: list[tuple[int, int, float]]) -> sp.csr_matrix:
    rows = [i for i, j, w in edges] + [j for i, j, w in edges] + list(range(n))
    cols = [j for i, j, w in edges] + [i for i, j, w in edges] + list(range(n))
    data = [w for *_, w in edges] * 2 + [1.0] * n
    return sp.csr_matrix((data, (rows, cols)), shape=(n, n))


def test_singletons_join_highest_mean_connectivity():
    # cluster 0 = cells 0-2, cluster 1 = cells 3-4, cell 5 alone (label 2)
    labels = np.array([0, 0, 0, 1, 1, 2])
    # cell 5: to cluster 0 total 0.8 over 3 cells (0.267); to cluster 1 total 0.6 over 2 (0.3)
    g = _graph(6, [(0, 1, 0.5), (1, 2, 0.5), (3, 4, 0.5),
                   (5, 0, 0.7), (5, 1, 0.1), (5, 3, 0.6)])
    np.testing.assert_array_equal(group_singletons(labels, g), [0, 0, 0, 1, 1, 1])


def test_isolated_singleton_follows_r_sample():
    # nine clusters of two cells (first appearance order 0..8) and an isolated cell: all
    # mean connectivities are 0 and Seurat picks sample(names, 1) after set.seed(1) = 9th
    labels = np.concatenate([np.repeat(np.arange(9), 2), [9]])
    edges = [(2 * c, 2 * c + 1, 0.5) for c in range(9)]
    out = group_singletons(labels, _graph(19, edges))
    assert out[18] == 8 and out.max() == 8


def test_cluster_labels_deterministic_and_ordered():
    x = mixture(1500, seed=4)
    knn, _ = exact_knn(x, 20)
    g = snn_graph(knn)
    for alg in ("leiden", "louvain"):
        a = cluster_labels(g, alg, 0.3, seed=0)
        b = cluster_labels(lambda: g.copy(), alg, 0.3, seed=0)  # as run_cluster passes it
        np.testing.assert_array_equal(a, b)
        sizes = np.bincount(a)
        assert (np.diff(sizes) <= 0).all() and sizes.min() > 1


# ------------------------------------------------------------------ Seurat 4.3.0 on pbmc_1k


def read_ref(path, **kw) -> pd.DataFrame:
    return pd.read_csv(path, float_precision="round_trip", **kw)


@pytest.fixture(scope="module")
def ref(seurat_reference):
    r = seurat_reference / "pbmc1k"
    if not (r / "snn.csv.gz").exists():
        pytest.skip("pbmc1k Seurat references not generated")
    return r


def test_snn_identical_to_seurat(ref):
    nn = read_ref(ref / "nn_idx.csv.gz", index_col=0).to_numpy() - 1
    trip = read_ref(ref / "snn.csv.gz")
    n = nn.shape[0]
    seurat = sp.csr_matrix((trip["x"].to_numpy(), (trip["i"].to_numpy() - 1,
                                                   trip["j"].to_numpy() - 1)), shape=(n, n))
    seurat.sort_indices()
    ours = snn_graph(nn, 1 / 15)
    np.testing.assert_array_equal(ours.indptr, seurat.indptr)
    np.testing.assert_array_equal(ours.indices, seurat.indices)
    np.testing.assert_array_equal(ours.data, seurat.data)  # bit-identical weights


def test_clusters_agree_with_seurat(ref):
    emb = read_ref(ref / "pca_embeddings.csv.gz", index_col=0).to_numpy()[:, :15]
    seurat = read_ref(ref / "clusters.csv")["seurat_clusters"].to_numpy()
    knn, _ = exact_knn(emb, 20)
    ours = snn_graph(knn, 1 / 15)
    louvain = cluster_labels(ours, "louvain", 0.3, seed=0)
    leiden = cluster_labels(ours, "leiden", 0.3, seed=0)
    assert adjusted_rand_score(seurat, louvain) >= 0.95
    assert adjusted_rand_score(seurat, leiden) >= 0.9
    if (ref / "clusters_leiden.csv").exists():  # Seurat's algorithm = 4 (leidenalg)
        seurat_leiden = read_ref(ref / "clusters_leiden.csv")["seurat_clusters"].to_numpy()
        assert adjusted_rand_score(seurat_leiden, leiden) >= 0.9
    # leidenalg's RBConfigurationVertexPartition optimises the same objective
    raw, q = modularity_clusters(ours, "leiden", 0.3, 0, leiden_backend="leidenalg")
    assert adjusted_rand_score(seurat, raw) >= 0.9
    assert q == pytest.approx(modularity_clusters(ours, "leiden", 0.3, 0)[1], rel=1e-3)


def test_louvain_on_seurats_graph_gives_seurats_clusters(ref):
    # Seurat's own algorithm and random numbers: the same clusters, label for label
    nn = read_ref(ref / "nn_idx.csv.gz", index_col=0).to_numpy() - 1
    seurat = read_ref(ref / "clusters.csv")["seurat_clusters"].to_numpy()
    labels = cluster_labels(snn_graph(nn, 1 / 15), "louvain", 0.3, seed=0)
    np.testing.assert_array_equal(labels, seurat)


@pytest.fixture(scope="module")
def pbmc_store(shared_data, ref, tmp_path_factory):
    d = tmp_path_factory.mktemp("graph")
    store = ingest(shared_data / "10x" / "pbmc_1k_citeseq_v3.h5", d / "pbmc.zarr")
    nf = store.obs()["n_features"].to_numpy()
    qc = (nf > 500) & (nf < 4000)
    emb = read_ref(ref / "pca_embeddings.csv.gz", index_col=0)
    assert (store.obs().index.to_numpy()[qc] == emb.index.to_numpy()).all()
    x = np.full((store.n_cells, emb.shape[1]), np.nan)
    x[qc] = emb.to_numpy()
    store.update_obs(qc_pass=qc)
    store.write_array("obsm", "X_pca", x)  # Seurat's PCA: the graph stages on their own
    return store, qc, d


def test_graph_stages_on_pbmc(pbmc_store, ref):
    store, qc, d = pbmc_store
    cells = np.flatnonzero(qc)
    cfg = Config()
    cfg.cluster.algorithm = "louvain"
    ctx = Context(cfg=cfg, outdir=d / "out", store=store, progress=False)
    run_neighbors(ctx)
    idx = store.read_array("obsm", "knn_index")
    dist = store.read_array("obsm", "knn_distance")
    assert idx.shape == (store.n_cells, 20)
    assert (idx[~qc] == -1).all() and np.isnan(dist[~qc]).all()
    assert (idx[qc, 0] == cells).all() and np.isin(idx[qc], cells).all()
    snn = store.read_sparse("obsp", "snn")
    assert snn.shape == (store.n_cells, store.n_cells)
    assert (np.diff(snn.indptr)[~qc] == 0).all() and (snn.diagonal()[qc] == 1).all()

    run_cluster(ctx)
    obs = store.obs()
    col = obs["cluster"]
    assert isinstance(col.dtype, pd.CategoricalDtype)
    k = len(col.cat.categories)
    assert list(col.cat.categories) == [str(i) for i in range(k)]
    assert col[~qc].isna().all() and col[qc].notna().all()
    sizes = col[qc].value_counts().reindex(col.cat.categories).to_numpy()
    assert (np.diff(sizes) <= 0).all()
    table = pd.read_csv(d / "out" / "tables" / "clusters.csv", dtype=str)
    assert list(table.columns) == ["cell", "cluster"]
    assert (table["cell"].to_numpy() == obs.index.to_numpy()[qc]).all()
    seurat = read_ref(ref / "clusters.csv")
    assert (seurat["cell"].to_numpy() == table["cell"].to_numpy()).all()
    assert adjusted_rand_score(seurat["seurat_clusters"], table["cluster"]) >= 0.9

    run_umap(ctx)
    u = store.read_array("obsm", "X_umap")
    assert np.isnan(u[~qc]).all() and np.isfinite(u[qc]).all()
    # UMAP is not reproducible across implementations: judge the separation of Seurat's
    # clusters in it
    assert silhouette_score(u[qc], seurat["seurat_clusters"]) > 0.3


def test_snn_written_as_made_equals_the_graph(tmp_path, monkeypatch):
    """The neighbors stage streams the graph into the store (tiny chunks here, so rows cross
    chunk boundaries): what is read back is snn_graph's matrix, bit for bit."""
    from make_10x import barcodes, random_counts, write_10x_v3

    import cellmill.io.store as store_mod
    from cellmill.stages.neighbors import write_snn_graph

    write_10x_v3(tmp_path / "a.h5", random_counts(800, 30, seed=1), barcodes(800, seed=1),
                 [f"G{i}" for i in range(30)])
    store = ingest(tmp_path / "a.h5", tmp_path / "s.zarr")
    cells = np.sort(np.random.default_rng(3).choice(800, 500, replace=False))
    knn, _ = exact_knn(mixture(500, seed=5), 20)
    ref = snn_graph(knn, 1 / 15, chunk=61, cells=cells, n_cells=800)
    monkeypatch.setattr(store_mod, "CHUNK_NNZ", 101)
    nnz = write_snn_graph(store, "obsp", "snn", knn, 1 / 15, chunk=61, cells=cells,
                          n_cells=800)
    got = Store(store.path).read_sparse("obsp", "snn")
    assert nnz == ref.nnz and got.shape == ref.shape
    for a in ("indptr", "indices", "data"):
        np.testing.assert_array_equal(getattr(got, a), getattr(ref, a))
    assert store.root["obsp"]["snn"]["data"].chunks == (101,)
    assert not list(store.path.glob("obsp/*.__new__"))
    # the kNN lists among all cells, written a block of cells at a time
    from cellmill.engine.cells import write_all_cells

    write_all_cells(store, "obsm", "knn_index", knn, cells, -1, lookup=cells.astype(np.int64),
                    block=33)
    np.testing.assert_array_equal(Store(store.path).read_array("obsm", "knn_index"),
                                  all_cells(knn, cells, 800, -1, lookup=cells.astype(np.int64)))


def test_neighbors_stage_spills_distances_and_matches_brute_force(tmp_path, monkeypatch):
    """The exact search's distances go through scratch files (blocks of 64 cells here, so
    many) and come back as the stage's obsm arrays: brute force's lists and distances for the
    QC-passed cells, -1 / NaN for the others, and no scratch left behind."""
    from make_10x import barcodes, random_counts, write_10x_v3

    from cellmill.stages import neighbors

    write_10x_v3(tmp_path / "a.h5", random_counts(700, 30, seed=2), barcodes(700, seed=2),
                 [f"G{i}" for i in range(30)])
    store = ingest(tmp_path / "a.h5", tmp_path / "s.zarr")
    qc = np.random.default_rng(4).random(700) < 0.8
    qc[:70] = False  # a whole first block without a passed cell
    cells = np.flatnonzero(qc)
    x = np.full((700, 15), np.nan)
    x[qc] = mixture(len(cells), seed=6)
    store.update_obs(qc_pass=qc)
    store.write_array("obsm", "X_pca", x)
    monkeypatch.setattr(neighbors, "SPILL_BLOCK", 64)
    cfg = Config()
    cfg.neighbors.method = "exact"
    run_neighbors(Context(cfg=cfg, outdir=tmp_path / "out", store=store, progress=False))
    idx, dist = brute_knn(x[qc], 20)
    got_i = store.read_array("obsm", "knn_index")
    got_d = store.read_array("obsm", "knn_distance")
    np.testing.assert_array_equal(got_i[qc], cells[idx])
    np.testing.assert_allclose(got_d[qc], dist, rtol=1e-12, atol=1e-12)
    assert (got_i[~qc] == -1).all() and np.isnan(got_d[~qc]).all()
    assert not list(tmp_path.glob("*scratch*"))


def test_streamed_leiden_stage_on_pbmc(pbmc_store, ref):
    # the default backend, graph read from the store block by block: Seurat's clusters again
    store, qc, d = pbmc_store
    ctx = Context(cfg=Config(), outdir=d / "out_streamed", store=store, progress=False)
    assert ctx.cfg.cluster.leiden_backend == "streamed"
    run_neighbors(ctx)
    run_cluster(ctx)
    ours = store.obs()["cluster"][qc].astype(int).to_numpy()
    seurat = read_ref(ref / "clusters.csv")["seurat_clusters"].to_numpy()
    assert adjusted_rand_score(seurat, ours) >= 0.9
    whole = cluster_labels(store.read_sparse("obsp", "snn")[qc][:, qc], "leiden", 0.3, 0)
    assert adjusted_rand_score(whole, ours) >= 0.95
    if (ref / "clusters_leiden.csv").exists():  # Seurat's algorithm = 4 (leidenalg)
        seurat_leiden = read_ref(ref / "clusters_leiden.csv")["seurat_clusters"].to_numpy()
        assert adjusted_rand_score(seurat_leiden, ours) >= 0.9


def test_snn_rows_in_one_sweep_equal_the_two_sweeps():
    # the streaming writer's one-sweep kernel (its buffers grow from a small start) against
    # the count-then-fill kernels, row block by row block
    from cellmill.kernels.snn import reverse_lists, snn_fill_rows, snn_row_counts, snn_rows

    knn, _ = exact_knn(mixture(400, seed=9), 20)
    ptr, idx = reverse_lists(knn, 400)
    col = np.arange(400, dtype=np.int32)
    for r0, r1 in [(0, 1), (1, 7), (7, 400)]:
        counts = snn_row_counts(knn, ptr, idx, r0, r1, 1 / 15)
        ref_i, ref_d = snn_fill_rows(knn, ptr, idx, r0, r1, 1 / 15, counts, col)
        got_c, got_i, got_d = snn_rows(knn, ptr, idx, r0, r1, 1 / 15, col)
        np.testing.assert_array_equal(got_c, counts)
        np.testing.assert_array_equal(got_i, ref_i)
        np.testing.assert_array_equal(got_d, ref_d)
    assert counts.max() > 2 * 20  # rows longer than the first buffer's share


def test_snn_rows_from_gathered_reverse_lists_equal_snn_rows():
    # the kernel on a block's gathered reverse lists (columns as cells, in any order)
    # against the counting kernel on the whole reverse lists, with missing neighbours
    from cellmill.kernels.snn import gather_lists, reverse_lists, snn_rows, snn_rows_local

    n, k = 300, 12
    knn, _ = exact_knn(mixture(n, seed=3), k)
    knn = knn.astype(np.int32)
    knn[5, 3:] = -1
    knn[17, -1] = -1
    ptr, idx = reverse_lists(knn, n)
    rng = np.random.default_rng(1)
    col = np.sort(rng.choice(5 * n, n, replace=False)).astype(np.int32)[rng.permutation(n)]
    rev_cells = col[idx]
    for a, e in [(0, 1), (3, 40), (40, 300)]:
        ms, inv = np.unique(knn[a:e], return_inverse=True)
        local = inv.reshape(e - a, k).astype(np.int32)
        if ms[0] < 0:
            ms, local = ms[1:], local - 1
        lptr = np.zeros(len(ms) + 1, dtype=np.int64)
        np.cumsum(ptr[ms + 1] - ptr[ms], out=lptr[1:])
        lrev = np.empty(lptr[-1], dtype=np.int32)
        gather_lists(ptr, rev_cells, ms, lptr, lrev)
        for u in range(len(ms)):  # a list's order does not matter
            rng.shuffle(lrev[lptr[u]:lptr[u + 1]])
        got = snn_rows_local(local, lptr, lrev, 1 / 15, np.zeros(5 * n, np.int32))
        ref = snn_rows(knn, ptr, idx, a, e, 1 / 15, col)
        for g, r in zip(got, ref, strict=True):
            np.testing.assert_array_equal(g, r)
    assert (got[0] > 0).all()


@pytest.mark.parametrize("rows,chunk,slab", [(256, 64, 4096), (128, 333, 1 << 20)])
def test_neighbors_on_disk_writes_brute_forces_lists_and_dense_snn(tmp_path, monkeypatch, rows,
                                                                    chunk, slab):
    """The exact path of the neighbors stage with nothing O(cells x k) in memory (index on
    disk, lists spilled, the SNN graph built in tree order from mapped lists and written by
    blocks of cells): obsm lists as brute force gives them among all cells, obsp/snn as the
    dense A A^T, whatever the index blocks and the SNN's row ranges; scratch files left only
    in the scratch folder."""
    from make_10x import barcodes, random_counts, write_10x_v3

    import cellmill.stages.neighbors as nb
    from cellmill.io.ingest import ingest
    from cellmill.stages.shared.knn import knn_index_from_blocks, row_blocks

    n_all, n, k = 1400, 900, 15
    write_10x_v3(tmp_path / "a.h5", random_counts(n_all, 20, seed=2), barcodes(n_all, seed=2),
                 [f"G{i}" for i in range(20)])
    store = ingest(tmp_path / "a.h5", tmp_path / "s.zarr")
    rng = np.random.default_rng(4)
    cells = np.sort(rng.choice(n_all, n, replace=False))
    x = mixture(n, d=9, seed=8)
    root = tmp_path / "scratch"
    root.mkdir()
    index = knn_index_from_blocks(row_blocks(x, 100), n, root / "index", rows)

    class Ctx:
        progress = False

        def scheduler(self):
            return ("threads", 2)

    spilled = nb._search_to_disk(index, k, cells, root, Ctx(), block=512)
    nb.write_all_cells(store, "obsm", "knn_distance", spilled.field("dist"), cells, np.nan,
                       block=512)
    nb.write_all_cells(store, "obsm", "knn_index", spilled.field("idx"), cells, -1,
                       lookup=cells.astype(np.int64), block=512)
    monkeypatch.setattr(nb, "SNN_SLAB", slab)  # reverse lists copied out in slabs this size
    nnz = nb.write_snn_from_disk(store, root, n, k, cells[index.perm].astype(np.int32), 1 / 15,
                                 scheduler=("threads", 2), chunk=chunk)
    b_idx, b_dist = brute_knn(x, k)
    knn_index = store.read_array("obsm", "knn_index")
    np.testing.assert_array_equal(knn_index[cells], cells[b_idx])
    assert (knn_index[np.setdiff1d(np.arange(n_all), cells)] == -1).all()
    np.testing.assert_allclose(store.read_array("obsm", "knn_distance")[cells], b_dist,
                               rtol=1e-12)
    g = store.read_sparse("obsp", "snn")
    ref = np.zeros((n_all, n_all))
    ref[np.ix_(cells, cells)] = dense_snn(b_idx, 1 / 15)
    np.testing.assert_array_equal(g.toarray(), ref)
    assert g.has_sorted_indices and nnz == g.nnz
