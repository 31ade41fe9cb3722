"""The disk-backed Krylov-Schur eigensolver (stages/umap/eigen.py) against numpy's dense
eigh and scipy's ARPACK: eigenvalues, the subspaces of the eigenvectors, restarts, small
block sizes, an invariant start, no convergence, and no files left behind."""

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from cellmill.stages.umap import eigen


def normalised_adjacency(n, seed=0, groups=4):
    """D^-1/2 W D^-1/2 of a connected kNN-like graph of points in `groups` blobs (as
    UMAP's)."""
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)) + 2.0 * rng.integers(0, groups, n)[:, None]
    d, i = NearestNeighbors(n_neighbors=10).fit(x).kneighbors(x)
    w = sp.csr_matrix((np.exp(-d.ravel()), i.ravel(), np.arange(0, n * 10 + 1, 10)),
                      shape=(n, n))
    w = w.maximum(w.T)
    assert connected_components(w)[0] == 1  # else eigenvalue 1 is repeated
    inv = sp.diags(1.0 / np.sqrt(np.asarray(w.sum(axis=1)).ravel()))
    return (inv @ w @ inv).tocsr()


def angles(a, b):
    """Cosines of the principal angles between the column spaces of a and b."""
    qa, _ = np.linalg.qr(a)
    qb, _ = np.linalg.qr(b)
    return np.linalg.svd(qa.T @ qb, compute_uv=False)


@pytest.mark.parametrize("rows", [eigen.ROWS, 37])
def test_matches_dense_eigh(tmp_path, monkeypatch, rows):
    monkeypatch.setattr(eigen, "ROWS", rows)
    m = normalised_adjacency(1500)
    ref_w, ref_v = np.linalg.eigh(m.toarray())
    ref_w, ref_v = ref_w[::-1], ref_v[:, ::-1]
    w, v = eigen.largest_eigenpairs(lambda x: m @ x, 1500, 4, tmp_path, tol=1e-10)
    np.testing.assert_allclose(w, ref_w[:4], rtol=0, atol=1e-9)
    assert angles(v, ref_v[:, :4]).min() > 1 - 1e-8
    np.testing.assert_allclose(v.T @ v, np.eye(4), atol=1e-10)
    assert list(tmp_path.iterdir()) == []


def test_restarts_and_arpacks_tolerance(tmp_path):
    """A small basis (many restarts) at ARPACK's tolerance 1e-4 as the UMAP start uses it:
    the residuals of the returned pairs are within the test, and the plane of eigenvectors
    2-3 is ARPACK's (tol 1e-10) to 1e-4."""
    import scipy.sparse.linalg as sla

    m = normalised_adjacency(6000, seed=1, groups=3)
    calls = [0]

    def matvec(x):
        calls[0] += 1
        return m @ x

    w, v = eigen.largest_eigenpairs(matvec, 6000, 3, tmp_path, m=12, tol=1e-4)
    assert calls[0] > 12  # restarted
    resid = np.linalg.norm(m @ v - v * w, axis=0)
    assert (resid <= 1e-4 * np.abs(w) * 1.01).all(), resid
    ref_w, ref_v = sla.eigsh(m, 3, which="LA", tol=1e-10)
    np.testing.assert_allclose(w, np.sort(ref_w)[::-1], atol=1e-7)
    ref = ref_v[:, np.argsort(-ref_w)]
    assert angles(v[:, 1:], ref[:, 1:]).min() > 0.9999


def test_the_same_bits_for_any_block_size(tmp_path, monkeypatch):
    m = normalised_adjacency(3000, seed=2)
    monkeypatch.setattr(eigen, "ROWS", 32_768)
    a = eigen.largest_eigenpairs(lambda x: m @ x, 3000, 3, tmp_path / "a", m=10)
    monkeypatch.setattr(eigen, "ROWS", 701)
    b = eigen.largest_eigenpairs(lambda x: m @ x, 3000, 3, tmp_path / "b", m=10)
    # sums over blocks differ in their last bits; the pairs agree to rounding
    np.testing.assert_allclose(a[0], b[0], atol=1e-12)
    assert angles(a[1], b[1]).min() > 1 - 1e-10


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux /proc")
def test_basis_blocks_are_views_whose_pages_are_handed_back(tmp_path, monkeypatch):
    from test_scratch import mapped_kb

    monkeypatch.setattr(eigen, "ROWS", 4096)  # blocks of 11 x 32 kB
    n, m = 40_000, 10
    basis = eigen._Basis(tmp_path / "b.f64", n, m)
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((m + 1, n))
    for j in range(m + 1):
        basis.put(j, vecs[j])
    w = rng.standard_normal(n)
    h = sum(basis.block(blk, m + 1) @ w[a:b] for blk, (a, b) in enumerate(basis.spans))
    np.testing.assert_allclose(h, vecs @ w, rtol=1e-12)
    # all 10 blocks read (3.5 MB of basis): the process holds the last one's pages only
    assert mapped_kb(tmp_path / "b.f64") <= 8 * (m + 1) * 4096 // 1024 + 8
    basis.put(3, np.zeros(n))  # written after being mapped: the views see it
    np.testing.assert_array_equal(basis.block(9, m + 1)[3], 0.0)
    basis.close()
    assert not (tmp_path / "b.f64").exists()


def test_invariant_start_and_no_convergence(tmp_path):
    d = np.arange(1.0, 201.0)
    diag = sp.diags(d)
    # v0 within the span of 5 eigenvectors: the Krylov space closes after 5 vectors
    v0 = np.zeros(200)
    v0[-5:] = 1.0
    w, v = eigen.largest_eigenpairs(lambda x: diag @ x, 200, 3, tmp_path, v0=v0)
    np.testing.assert_allclose(w, [200.0, 199.0, 198.0])
    np.testing.assert_allclose(np.abs(v[-3:][::-1]), np.eye(3), atol=1e-12)
    with pytest.raises(eigen.ArpackLikeError, match="dimension 2 < 3"):
        eigen.largest_eigenpairs(lambda x: diag @ x, 200, 3, tmp_path, v0=v0 * (d > 198))
    with pytest.raises(eigen.ArpackLikeError, match="no convergence"):
        eigen.largest_eigenpairs(lambda x: diag @ x, 200, 3, tmp_path, m=6, tol=1e-14,
                                 max_products=10)
    assert list(tmp_path.iterdir()) == []


def test_smallest_basis_still_grows(tmp_path):
    """m = k + 1: each restart keeps k Ritz vectors and grows by one (keep < m always)."""
    d = np.concatenate([np.linspace(0.0, 1.0, 197), [3.0, 4.0, 5.0]])
    diag = sp.diags(d)
    w, v = eigen.largest_eigenpairs(lambda x: diag @ x, 200, 3, tmp_path, m=4, tol=1e-8)
    np.testing.assert_allclose(w, [5.0, 4.0, 3.0], rtol=1e-8)
    np.testing.assert_allclose(np.abs(v[-3:][::-1]), np.eye(3), atol=1e-6)
