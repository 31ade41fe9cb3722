"""Streamed UMAP (stages/umap/streamed.py): umap-learn's fuzzy graph bit for bit, its sampling
schedule against a brute-force replay of its bookkeeping, the streamed spectral init against
ARPACK in memory, the batch optimiser's gradients and Adam step against plain-Python
recomputations, the same bits for any thread count, block size and scheduler, and the
embedding against umap-learn's on the same data."""

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


def test_batch_prefilter_never_drops_a_sampled_edge():
    """may_sample skips sample_counts' divisions for edges surely not sampled: every edge
    sample_counts samples, it lets through (weights on the schedule's boundaries included)."""
    from cellmill.kernels.layout_batch import may_sample

    rng = np.random.default_rng(3)
    sampled = skipped = 0
    for w_max in (1.0, 0.9999):  # 1: the usual maximum, where n w / w_max hits integers
        w = np.concatenate([w_max / np.array([1.0, 2.0, 3.0, 4.0, 7.5, 10.0, 199.0, 500.0]),
                            rng.uniform(0.002, 1.0, 200) * w_max]).astype(np.float32)
        w = np.concatenate([w, np.nextafter(w, 0), np.nextafter(w, 1)])
        for wi in w[w <= w_max].astype(np.float64):
            for n in range(501):
                hit, _ = sample_counts(n, w_max / wi, 5.0)
                keep = may_sample(n, wi, 1.0 / w_max)
                assert keep or not hit, (w_max, wi, n)
                sampled += hit
                skipped += not keep
    assert sampled > 10_000 and skipped > 50_000


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


@pytest.mark.parametrize("optimizer", ["batch", "sequential"])
def test_streamed_umap_does_not_depend_on_block_size(tmp_path, monkeypatch, optimizer):
    x, _ = mixture(3000)
    monkeypatch.setattr(layout, "ROWS", 16_384)
    a = layout.umap_streamed(x, n_epochs=50, scratch=tmp_path / "a", optimizer=optimizer)
    monkeypatch.setattr(layout, "ROWS", 701)
    monkeypatch.setattr(layout, "BATCH_ENTRIES", 1)  # the batch optimiser reads 701 rows too
    b = layout.umap_streamed(x, n_epochs=50, scratch=tmp_path / "b", optimizer=optimizer)
    np.testing.assert_array_equal(a, b)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# splitmix64 and the gradients of one epoch in plain Python integers and float64, written
# from the description in kernels/layout_batch.py, not from its code
_U64 = (1 << 64) - 1


def _splitmix(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    return z ^ (z >> 31)


def _gradients_by_hand(g, emb, epoch, a, b, w_max, keep_from, seed, rate=5.0):
    clip = lambda v: min(4.0, max(-4.0, v))  # noqa: E731
    n = len(emb)
    e = emb.astype(np.float64)
    out = np.zeros((n, 2))
    key = _splitmix((seed * 0x9E3779B97F4A7C15 + epoch) & _U64)
    for i in range(n):
        for p in range(g.indptr[i], g.indptr[i + 1]):
            w = float(g.data[p])
            if w < keep_from:
                continue
            hit, n_neg = sample_counts(epoch, w_max / w, rate)
            if not hit:
                continue
            diff = e[i] - e[g.indices[p]]
            d2 = float(diff @ diff)
            if d2 > 0:  # attraction from i -> j and from j -> i
                coeff = -2 * a * b * d2 ** (b - 1) / (a * d2 ** b + 1)
                out[i] += [2 * clip(coeff * diff[0]), 2 * clip(coeff * diff[1])]
            state = _splitmix(key ^ p)
            for _ in range(n_neg):  # negatives push i only
                state = (state + 0x9E3779B97F4A7C15) & _U64
                k = ((_splitmix(state) >> 32) * n) >> 32  # the top 32 bits scaled to [0, n)
                diff = e[i] - e[k]
                d2 = float(diff @ diff)
                if k != i and d2 > 0:
                    coeff = 2 * b / ((0.001 + d2) * (a * d2 ** b + 1))
                    out[i] += [clip(coeff * diff[0]), clip(coeff * diff[1])]
    return out


def test_batch_gradients_are_the_summed_umap_updates(tmp_path):
    from cellmill.kernels.layout_batch import batch_gradients

    x, _ = mixture(400, groups=3)
    g = disk_graph(x, 15, tmp_path, 150)
    csr = g.to_csr()
    rng = np.random.default_rng(5)
    emb = rng.uniform(0, 10, (400, 2)).astype(np.float32)
    emb[7] = emb[3]  # a zero distance: no force
    a, b, seed = 1.58, 0.9, 11
    keep = float(np.float32(g.w_max / 200.0))
    for epoch in (1, 2, 37):
        want = _gradients_by_hand(csr, emb, epoch, a, b, g.w_max, keep, seed)
        got = np.full((400, 2), np.nan)
        for r0, ptr, cols, vals, pos0 in g.blocks():  # three blocks, entries numbered on
            batch_gradients(ptr, cols, vals, r0, pos0, emb, epoch, a, b, 1.0, 5.0, g.w_max,
                            keep, seed, got)
        assert np.abs(want).sum() > 100  # many edges sampled, many negatives
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_adam_step_is_adams_formula():
    from cellmill.kernels.layout_batch import adam_step

    rng = np.random.default_rng(2)
    emb = rng.uniform(0, 10, (1000, 2)).astype(np.float32)
    want = emb.astype(np.float64)
    m, v = np.zeros((1000, 2)), np.zeros((1000, 2))
    mw, vw = np.zeros((1000, 2)), np.zeros((1000, 2))
    for t in range(1, 4):
        grad = rng.normal(size=(1000, 2)) * 3
        grad[:10] = 0.0  # no gradient yet: no step
        adam_step(emb, grad, m, v, 2.0, 0.5, 0.9, 1 - 0.5 ** t, 1 - 0.9 ** t, 1e-7)
        mw = 0.5 * mw + 0.5 * grad
        vw = 0.9 * vw + 0.1 * grad ** 2
        want = want + 2.0 * (mw / (1 - 0.5 ** t)) / (np.sqrt(vw / (1 - 0.9 ** t)) + 1e-7)
        np.testing.assert_allclose(emb, want, rtol=1e-5, atol=1e-5)
        want = emb.astype(np.float64)


def test_batch_layout_same_bits_for_any_thread_count_and_scheduler(tmp_path, monkeypatch):
    """Each thread writes only the gradients of its own vertices: 1 and 2 Numba threads, and
    the synchronous and threaded schedulers (1 and 2 threads), give the same bits."""
    import numba
    from umap.umap_ import find_ab_params

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one CPU: Numba has a single thread")
    x, _ = mixture(4000, groups=5, seed=3)
    (tmp_path / "g").mkdir()
    g = disk_graph(x, 30, tmp_path / "g", 1500)
    monkeypatch.setattr(layout, "BATCH_ENTRIES", 1)  # three blocks of 1,500 rows
    keep = float(np.float32(g.w_max / 60.0))
    init = np.random.default_rng(0).uniform(-10, 10, (4000, 2))
    a, b = find_ab_params(1.0, 0.3)
    before = numba.get_num_threads()
    one = layout.optimize_batch(g, init, 60, a, b, keep, 42, threads=1)
    two = layout.optimize_batch(g, init, 60, a, b, keep, 42, threads=2)
    assert numba.get_num_threads() == before
    np.testing.assert_array_equal(one, two)
    sync = layout.umap_streamed(x, n_epochs=40, scratch=tmp_path / "s", scheduler=("sync", 1))
    threads = layout.umap_streamed(x, n_epochs=40, scratch=tmp_path / "t",
                                   scheduler=("threads", 2))
    np.testing.assert_array_equal(sync, threads)
    assert np.isfinite(sync).all() and sync.std(axis=0).min() > 1.0


@pytest.fixture(scope="module")
def umap_learn_12k():
    x, labels = mixture(12_000, groups=8, seed=2)
    return x, labels, umap_embedding(x)


@pytest.mark.parametrize("optimizer", ["batch", "sequential"])
def test_streamed_umap_as_good_as_umap_learn(umap_learn_12k, optimizer):
    """Not the same numbers (different random negatives; the batch optimiser a different
    method), the same quality: trustworthiness of the 15-NN within 0.01 of umap-learn's and
    the separation of the groups within a hair of it."""
    from sklearn.manifold import trustworthiness
    from sklearn.metrics import silhouette_score

    x, labels, ref = umap_learn_12k
    mine = layout.umap_streamed(x, optimizer=optimizer)
    sub = np.random.default_rng(0).choice(len(x), 3000, replace=False)
    t_mine = trustworthiness(x[sub], mine[sub], n_neighbors=15)
    t_ref = trustworthiness(x[sub], ref[sub], n_neighbors=15)
    s_mine = silhouette_score(mine[sub], labels[sub])
    s_ref = silhouette_score(ref[sub], labels[sub])
    assert abs(t_mine - t_ref) < 0.01 and s_mine > s_ref - 0.05, (t_mine, t_ref, s_mine, s_ref)


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
    assert load_config(None, []).umap.optimizer == "batch"
    seq = load_config(None, ["umap.optimizer=sequential"])
    assert seq.umap.optimizer == "sequential"
    with pytest.raises(ConfigError, match="umap.optimizer"):
        load_config(None, ["umap.optimizer=adam"])


def test_umap_optimizer_is_in_the_stage_hash():
    from cellmill.config import load_config
    from cellmill.stages.umap.stage import _umap_params

    assert (_umap_params(load_config(None, []))
            != _umap_params(load_config(None, ["umap.optimizer=sequential"])))


def test_graph_held_in_memory_gives_the_same_layout(tmp_path):
    """A graph small enough for the memory budget is read once and used from memory: the same
    blocks, so the same spectral start and layout bits as streamed from disk."""
    x, _ = mixture(3000)
    a = layout.umap_streamed(x, n_epochs=50, scratch=tmp_path / "a")
    b = layout.umap_streamed(x, n_epochs=50, scratch=tmp_path / "b", memory_bytes=10**9)
    np.testing.assert_array_equal(a, b)


def test_pow_many_is_x_to_the_b_rounded_to_float32():
    """The batch optimiser's vectorised power against x ** b in float64 rounded to float32:
    never more than one ulp off and exact for >= 99% of x over fourteen decades (numpy's
    float32 power: ~79% there), and at the edges (subnormal x, powers outside the normal
    range) within an ulp too (the library's pow takes those)."""
    from cellmill.kernels.layout_batch import pow_many

    rng = np.random.default_rng(4)
    x = (10.0 ** rng.uniform(-8, 6, 20_000)).astype(np.float32)
    x[:6] = [1e-40, 1.2e-38, 1e-30, 3e30, 1.0, 2.0]
    for b in (0.5, 0.7915, 1.1122, 1.9, 2.6):
        b32 = np.float32(b)
        got, work = np.empty_like(x), np.empty_like(x)
        pow_many(x, len(x), float(b32), got, work)
        with np.errstate(over="ignore", under="ignore"):
            want = (x.astype(np.float64) ** np.float64(b32)).astype(np.float32)
        ulps = np.abs(got.view(np.int32).astype(np.int64) - want.view(np.int32))
        assert ulps.max() <= 1, (b, x[np.argmax(ulps)])
        assert (ulps == 0).mean() >= 0.99


def test_points_given_in_blocks_give_the_same_layout(tmp_path):
    """The stage's loaders (the points, and the same in blocks of rows for the exact search,
    the count given): the same bits as the points passed as one array."""
    from cellmill.stages.shared.knn import row_blocks

    x, _ = mixture(3000)
    a = layout.umap_streamed(x, n_epochs=30, scratch=tmp_path / "a")
    b = layout.umap_streamed(lambda: x.copy(), n_epochs=30, scratch=tmp_path / "b",
                             n=len(x), point_blocks=lambda: row_blocks(x, rows=777))
    np.testing.assert_array_equal(a, b)
