"""Streamed UMAP (stages/umap/streamed.py): umap-learn's fuzzy graph bit for bit, its sampling
schedule against a brute-force replay of its bookkeeping, the streamed spectral init against
ARPACK in memory, and the embedding against umap-learn's on the same data."""

import numpy as np
import pytest
import scipy.sparse as sp

from cellmill.kernels.layout import sample_counts
from cellmill.stages.umap import streamed as layout
from cellmill.stages.umap.in_memory import cosine_knn, umap_embedding


def mixture(n, dim=15, groups=6, seed=0, spread=3.0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(groups, dim)) * spread
    labels = rng.integers(0, groups, n)
    return centers[labels] + rng.normal(size=(n, dim)), labels


def disk_graph(x, k, root, rows):
    old = layout.ROWS
    layout.ROWS = rows
    try:
        buckets, mean = layout._knn_to_buckets(x, k, root, None, False)
        return layout.fuzzy_graph(buckets, len(x), k, mean, root)
    finally:
        layout.ROWS = old


@pytest.mark.parametrize("rows", [997, 16_384])
def test_fuzzy_graph_is_umap_learns(tmp_path, rows):
    from umap.umap_ import fuzzy_simplicial_set

    x, _ = mixture(5000)
    x[7] = x[3]  # a duplicate point: a zero distance that is not the point itself
    g = disk_graph(x, 30, tmp_path, rows)
    idx, dist = cosine_knn(x, 30)
    ref, _, _ = fuzzy_simplicial_set(x.astype(np.float32), 30, np.random.RandomState(0),
                                     "cosine", knn_indices=idx,
                                     knn_dists=dist.astype(np.float32))
    ref = ref.tocsr()
    ref.sort_indices()
    got = layout.pruned(g, 0.0).tocsr()
    got.sort_indices()
    np.testing.assert_array_equal(got.indptr, ref.indptr)
    np.testing.assert_array_equal(got.indices, ref.indices)
    np.testing.assert_array_equal(got.data, ref.data)
    assert g.w_max == ref.data.max()
    assert not list(tmp_path.glob("knn*")) and not list(tmp_path.glob("edge*"))


def test_sampling_schedule_replays_umap_learns_bookkeeping():
    """umap-learn keeps epoch_of_next_sample and epoch_of_next_negative_sample per edge;
    the closed form must take the same samples in the same epochs."""
    rng = np.random.default_rng(1)
    eps = np.concatenate([[1.0, 2.0, 3.0, 7.5, 199.0, 200.0], 1.0 / rng.uniform(0.005, 1, 400)])
    epochs, rate = 200, 5.0
    for e in eps:
        nxt, neg_step = e, e / rate
        nxt_neg = neg_step
        for n in range(epochs):
            want, want_neg = False, 0
            if nxt <= n:
                want = True
                nxt += e
                want_neg = int((n - nxt_neg) / neg_step)
                nxt_neg += want_neg * neg_step
            got, got_neg = sample_counts(n, e, rate)
            assert (got, got_neg) == (want, want_neg), (e, n)


def test_streamed_spectral_init_is_arpack_in_memory(tmp_path):
    import scipy.sparse.linalg as sla

    x, _ = mixture(6000, groups=3, spread=1.0)
    g = disk_graph(x, 30, tmp_path, 1000)
    keep = float(np.float32(g.w_max / 200.0))
    assert layout._components_and_degrees(g, keep)[0] == 1  # else umap-learn's layout
    emb = layout.spectral_init(g, keep, x, np.random.RandomState(0))
    w = layout.pruned(g, keep).tocsr().astype(np.float64)
    inv = sp.diags(1.0 / np.sqrt(np.asarray(w.sum(axis=1)).ravel()))
    vals, vecs = sla.eigsh(inv @ w @ inv, 3, which="LA", tol=1e-10)
    ref = vecs[:, np.argsort(-vals)[1:3]]
    # eigenvalues 2 and 3 may be close: compare the plane the two span (cosines of its
    # principal angles with ARPACK's; the noise added is 1e-4 of the scale)
    q, _ = np.linalg.qr(emb)
    cosines = np.linalg.svd(q.T @ ref, compute_uv=False)
    assert cosines.min() > 0.9999, cosines


def test_streamed_umap_does_not_depend_on_block_size(tmp_path):
    x, _ = mixture(3000)
    old = layout.ROWS
    try:
        layout.ROWS = 16_384
        a = layout.umap_streamed(x, n_epochs=50, scratch=tmp_path / "a")
        layout.ROWS = 701
        b = layout.umap_streamed(x, n_epochs=50, scratch=tmp_path / "b")
    finally:
        layout.ROWS = old
    np.testing.assert_array_equal(a, b)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_streamed_umap_as_good_as_umap_learn():
    """Not the same numbers (different random negatives), the same quality: trustworthiness
    of the 15-NN and separation of the groups within a hair of umap-learn's."""
    from sklearn.manifold import trustworthiness
    from sklearn.metrics import silhouette_score

    x, labels = mixture(12_000, groups=8, seed=2)
    mine = layout.umap_streamed(x)
    ref = umap_embedding(x)
    sub = np.random.default_rng(0).choice(len(x), 3000, replace=False)
    t_mine = trustworthiness(x[sub], mine[sub], n_neighbors=15)
    t_ref = trustworthiness(x[sub], ref[sub], n_neighbors=15)
    s_mine = silhouette_score(mine[sub], labels[sub])
    s_ref = silhouette_score(ref[sub], labels[sub])
    assert t_mine > t_ref - 0.01 and s_mine > s_ref - 0.05, (t_mine, t_ref, s_mine, s_ref)


def test_several_components_use_umap_learns_spectral_layout(tmp_path):
    x, labels = mixture(2500, groups=2, seed=3)
    x[labels == 1] += 1000.0  # cosine: far apart in angle too
    x[labels == 1, 0] *= -1
    emb = layout.umap_streamed(x, n_epochs=30, scratch=tmp_path / "s")
    assert np.isfinite(emb).all() and emb.shape == (2500, 2)


def test_umap_backend_config():
    from cellmill.config import ConfigError, load_config

    assert load_config(None, []).umap.backend == "streamed"
    assert load_config(None, ["umap.backend=umap-learn"]).umap.backend == "umap-learn"
    with pytest.raises(ConfigError, match="umap.backend"):
        load_config(None, ["umap.backend=uwot"])
