"""neighbors.method: exact search below the crossover, NN-descent (pynndescent) above it with
its recall@k checked against brute force on a sample of cells; the choice in the stage's
record, run.json and the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from cellmill.config import Config, ConfigError, load_config
from cellmill.stages.shared import knn as shared_knn
from cellmill.stages.shared.knn import (
    approximate_knn,
    exact_knn,
    exact_of_queries,
    knn_method,
    recall,
    sample_queries,
)


def clustered(n: int, d: int = 15, n_clusters: int = 12, seed: int = 0) -> np.ndarray:
    """PC-like data: 12 clusters of unequal size and spread, spread falling with the PC."""
    rng = np.random.default_rng(seed)
    scale = 6.0 * 0.85 ** np.arange(d)
    centers = rng.normal(size=(n_clusters, d)) * scale
    lab = rng.choice(n_clusters, n, p=rng.dirichlet(np.full(n_clusters, 2.0)))
    within = rng.uniform(0.5, 1.5, (n_clusters, 1)) * (1.5 * 0.9 ** np.arange(d))
    return centers[lab] + rng.normal(size=(n, d)) * within[lab]


def brute_rows(x: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Self first, then the others by (squared distance, index): scipy's cdist."""
    d = cdist(x[rows], x, "sqeuclidean")
    out = np.empty((len(rows), k), dtype=np.int64)
    for r, i in enumerate(rows):
        order = np.lexsort((np.arange(len(x)), d[r]))
        out[r] = np.concatenate([[i], order[order != i][: k - 1]])
    return out


def set_recall(approx: np.ndarray, exact: np.ndarray) -> float:
    return sum(len(set(a) & set(e)) for a, e in zip(approx, exact, strict=True)) / exact.size


# ------------------------------------------------------------------ the recall check


@pytest.mark.parametrize("scheduler", [("sync", 1), ("threads", 2)])
def test_exact_of_queries_is_brute_force(scheduler):
    x = clustered(3000, seed=1)
    q = sample_queries(len(x), 300, seed=5)
    assert len(np.unique(q)) == 300 and (np.diff(q) > 0).all()
    np.testing.assert_array_equal(exact_of_queries(x, q, 20, scheduler), brute_rows(x, q, 20))
    # ties and duplicated points: the order is still (distance, index), self first
    z = np.random.default_rng(2).integers(0, 3, size=(500, 4)).astype(np.float64)
    qz = sample_queries(len(z), 100)
    np.testing.assert_array_equal(exact_of_queries(z, qz, 12, scheduler), brute_rows(z, qz, 12))


def test_recall_counts_shared_neighbours():
    x = clustered(2000, seed=3)
    q = sample_queries(len(x), 200)
    exact = brute_rows(x, q, 10)
    rng = np.random.default_rng(0)
    approx = exact.copy()
    lose = rng.random(approx.shape) < 0.1
    lose[:, 0] = False
    approx[lose] = -5 - np.arange(lose.sum())  # indices that are no one's neighbours
    assert recall(approx, exact) == pytest.approx(1 - lose.sum() / exact.size, abs=1e-12)
    assert recall(approx, exact) == set_recall(approx, exact)
    assert recall(exact[:, ::-1], exact) == 1.0  # sets: the order does not count


# ------------------------------------------------------------------ the choice


def test_method_by_size(monkeypatch):
    monkeypatch.setattr(shared_knn, "EXACT_UP_TO", 5000)
    assert knn_method("auto", 5000) == "exact"
    assert knn_method("auto", 5001) == "nndescent"
    assert knn_method("exact", 10**8) == "exact"
    assert knn_method("nndescent", 10) == "nndescent"
    assert knn_method("pynndescent", 10) == "nndescent"  # the old name
    assert Config().neighbors.method == "auto"
    with pytest.raises(ConfigError, match="neighbors.method"):
        load_config(None, ['neighbors.method="annoy"'])


# ------------------------------------------------------------------ NN-descent


@pytest.fixture(scope="module")
def approx20k():
    x = clustered(20000, seed=4)
    return x, approximate_knn(x, 20, scheduler=("threads", 2))


def test_nndescent_recall_against_brute_force(approx20k):
    x, (idx, dist, info) = approx20k
    assert info["method"] == "nndescent" and info["recall_sample"] == 1000
    assert info["recall"] >= 0.98
    # the stored recall is the one brute force (scipy) gives on the same cells
    q = sample_queries(len(x))
    ref = brute_rows(x, q, 20)
    assert info["recall"] == pytest.approx(set_recall(idx[q], ref), abs=1e-5)
    # and on other cells too
    q2 = np.random.default_rng(11).choice(len(x), 500, replace=False)
    assert set_recall(idx[q2], brute_rows(x, q2, 20)) >= 0.98
    # the lists as exact search orders them: self first, then by float64 distance
    assert (idx[:, 0] == np.arange(len(x))).all() and (dist[:, 0] == 0).all()
    ref_d = np.sqrt(((x[idx] - x[:, None, :]) ** 2).sum(-1))
    np.testing.assert_allclose(dist, ref_d, rtol=1e-12, atol=1e-12)
    assert (np.diff(dist, axis=1) >= 0).all()
    assert all(len(set(r)) == 20 for r in idx[:2000])


def test_nndescent_is_reproducible(approx20k):
    # same seed: the same lists, whatever the scheduler of the recall check (pynndescent
    # itself always runs on one thread: its result depends on its thread count)
    x, (idx, dist, info) = approx20k
    idx2, dist2, info2 = approximate_knn(x, 20, scheduler=("sync", 1))
    np.testing.assert_array_equal(idx2, idx)
    np.testing.assert_array_equal(dist2, dist)
    assert info2 == info
    # given a loader instead of the array (the stages do, to hold no copy during the search)
    calls = []

    def load():
        calls.append(1)
        return x.copy()

    idx3, dist3, info3 = approximate_knn(load, 20)
    np.testing.assert_array_equal(idx3, idx)
    np.testing.assert_array_equal(dist3, dist)
    assert info3 == info and len(calls) >= 3


def test_low_recall_falls_back_to_exact(monkeypatch, caplog):
    monkeypatch.setattr(shared_knn, "RECALL_MIN", 1.01)  # never reached
    x = clustered(1500, seed=6)
    idx, dist, info = approximate_knn(x, 10)
    assert info["method"] == "exact" and info["nndescent_recall"] <= 1.0
    ref_idx, ref_dist = exact_knn(x, 10)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(dist, ref_dist)
    assert "exact search" in caplog.text


# ------------------------------------------------------------------ run.json and the report


@pytest.mark.parametrize("crossover,method", [(10**9, "exact"), (100, "nndescent")])
def test_choice_in_run_json_and_report(tmp_path, monkeypatch, crossover, method):
    from cellmill.engine.workflow import run_workflow
    from cellmill.report.stage import knn_sentence
    from cellmill.simulate import simulate_study

    monkeypatch.setattr(shared_knn, "EXACT_UP_TO", crossover)
    sim = tmp_path / "sim"
    simulate_study(sim, n_cells=600, seed=3, n_genes=5000)
    cfg = load_config(None, [f'input.manifest="{sim / "manifest.csv"}"',
                             f'gsea.gmt="{sim / "planted.gmt"}"', "compute.progress=false"])
    ctx = run_workflow(cfg, tmp_path / "out", until="neighbors")
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    info = run["stages"]["neighbors"]["info"]["knn"]
    assert info["method"] == method and info["setting"] == "auto"
    assert info["exact_up_to"] == crossover
    n = info["cells"]
    assert 0 < n <= 600
    text = knn_sentence(ctx)
    if method == "nndescent":
        assert info["recall"] >= 0.98 and info["recall_sample"] == n  # < 1000 cells: all
        assert "NN-descent" in text and f"{info['recall']:.4f}" in text
    else:
        assert "recall" not in info and text.startswith(" kNN search: exact on")


# ------------------------------------------------------------------ UMAP's kNN


def test_umap_knn_follows_the_method(tmp_path, monkeypatch):
    # the streamed UMAP's cosine lists by NN-descent past the crossover: recall >= 0.98
    # against scipy's cosine distances on every cell, distances 1 - cos, and the record
    from cellmill.stages.umap import streamed

    monkeypatch.setattr(shared_knn, "EXACT_UP_TO", 1000)
    monkeypatch.setattr(streamed, "ROWS", 997)
    x = clustered(4000, seed=8)
    info: dict = {}
    buckets, mean = streamed._knn_to_buckets(x, 15, tmp_path, None, False, "auto", info)
    parts = [buckets.read(b) for b in range(buckets.n)]
    rows = np.concatenate([p["row"] for p in parts])
    idx = np.concatenate([p["idx"] for p in parts])[np.argsort(rows)]
    dist = np.concatenate([p["dist"] for p in parts])[np.argsort(rows)]
    assert (np.sort(rows) == np.arange(4000)).all()
    cos = cdist(x, x, "cosine")
    ref = np.array([np.concatenate([[i], [j for j in np.argsort(c, kind="stable")
                                          if j != i][:14]]) for i, c in enumerate(cos)])
    assert set_recall(idx, ref) >= 0.98
    np.testing.assert_allclose(dist, np.take_along_axis(cos, idx.astype(np.int64), 1),
                               rtol=1e-5, atol=1e-6)
    assert mean == pytest.approx(float(dist.astype(np.float64).mean()), rel=1e-6)
    assert info["method"] == "nndescent" and info["recall"] >= 0.98
    assert info["setting"] == "auto" and info["cells"] == 4000


def test_nndescent_on_a_handful_of_points_is_exact():
    x = clustered(150, seed=9)
    idx, dist, info = approximate_knn(x, 20)
    assert info["method"] == "exact"
    np.testing.assert_array_equal(idx, brute_rows(x, np.arange(150), 20))
