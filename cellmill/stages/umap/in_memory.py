"""UMAP helpers shared by both backends (epochs, unit rows, ARPACK's spectral vectors) and the
in-memory backend: umap-learn on our own exact 30-nearest-neighbour graph in cosine distance
(uwot's metric in Seurat's RunUMAP)."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import scipy.sparse as sp

from cellmill.io.heap import release_heap
from cellmill.stages.shared.knn import exact_knn

log = logging.getLogger("cellmill")
# ------------------------------------------------------------------ UMAP


def umap_epochs(n: int, n_epochs: int = 0) -> int:
    return n_epochs if n_epochs > 0 else (200 if n > 10_000 else 500)


def unit_rows(points: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (zero rows kept): Euclidean distance d between them gives the
    cosine distance 1 - cos = d^2 / 2."""
    x = np.asarray(points, dtype=np.float64)
    norm = np.sqrt((x * x).sum(axis=1))
    return x / np.where(norm > 0, norm, 1.0)[:, None]


def cosine_knn(points: np.ndarray, k: int, scheduler=None, progress: bool = False):
    """Exact k nearest neighbours in cosine distance 1 - cos (via unit vectors)."""
    unit = unit_rows(points)
    idx, dist = exact_knn(unit, k, scheduler=scheduler, progress=progress)
    del unit
    dist *= dist  # in place: (d * d) / 2 without two n x k temporaries
    dist /= 2.0
    return idx, dist


def spectral_init(graph: sp.coo_matrix, x: np.ndarray, dim: int,
                  random_state: np.random.RandomState) -> np.ndarray:
    """umap-learn's spectral initialisation, computed with a fraction of its memory.

    The eigenvectors of the smallest eigenvalues of the normalised Laplacian I - M,
    M = D^-1/2 W D^-1/2, are those of the largest of M: ARPACK on M with 32 Lanczos vectors
    instead of umap-learn's sqrt(N) on I - M (at 196k cells: 13 s and 50 MB instead of 91 s
    and 700 MB). Same v0 (ones), tolerance (1e-4) and scaling + noise (noisy_scale_coords);
    a graph of several components or a small one goes to umap-learn's own spectral_layout.
    """
    from umap.spectral import spectral_layout
    from umap.umap_ import noisy_scale_coords

    n = graph.shape[0]
    n_comp, _ = sp.csgraph.connected_components(graph)
    if n_comp > 1 or n < 2000:
        emb = spectral_layout(x, graph, dim, random_state, metric="cosine")
    else:
        sq = np.sqrt(np.asarray(graph.sum(axis=0)).ravel())
        inv = sp.diags(1.0 / sq)
        emb = spectral_vectors((inv @ graph.tocsr() @ inv).tocsr(), dim, random_state)
    return noisy_scale_coords(emb, random_state, max_coord=10, noise=0.0001)


LANCZOS_VECTORS = 32  # ARPACK's ncv (at least), as umap-learn's spectral layout


def spectral_vectors(m, dim: int, random_state: np.random.RandomState) -> np.ndarray:
    """Eigenvectors 2..dim+1 of the largest eigenvalues of the normalised adjacency `m` (a
    matrix or a LinearOperator): ARPACK with umap-learn's v0 (ones) and tolerance (1e-4) and 32
    Lanczos vectors; uniform random coordinates, as umap-learn, when it fails."""
    import scipy.sparse.linalg as sla

    n, k = m.shape[0], dim + 1
    try:
        w, v = sla.eigsh(m, k, which="LA", ncv=max(2 * k + 1, LANCZOS_VECTORS), tol=1e-4,
                         v0=np.ones(n), maxiter=n * 5)
        return v[:, np.argsort(-w)[1:k]]
    except sla.ArpackError:
        return random_start(random_state, n, dim)


def random_start(random_state: np.random.RandomState, n: int, dim: int) -> np.ndarray:
    """umap-learn's start when the spectral one fails: uniform in [-10, 10)."""
    log.warning("umap: spectral initialisation failed; random initialisation")
    return random_state.uniform(low=-10.0, high=10.0, size=(n, dim))


def umap_embedding(points: np.ndarray, n_neighbors: int = 30, min_dist: float = 0.3,
                   seed: int = 42, n_epochs: int = 0, knn=None, scheduler=None,
                   progress: bool = False) -> np.ndarray:
    """UMAP (umap-learn's fuzzy graph and optimiser) of `points` on our exact cosine kNN
    graph: what umap.UMAP(metric="cosine", min_dist, spread=1, init="spectral",
    random_state=seed, precomputed_knn=...) does, with a leaner spectral initialisation."""
    from umap.umap_ import find_ab_params, fuzzy_simplicial_set, simplicial_set_embedding

    n = points.shape[0]
    k = min(n_neighbors, n)
    if knn is None:
        knn = cosine_knn(points, k, scheduler=scheduler, progress=progress)
    knn_idx, knn_dist = knn[0], knn[1].astype(np.float32)
    del knn  # the float64 distances (when the caller keeps no reference)
    release_heap()
    x = np.asarray(points, dtype=np.float32)
    rs = np.random.RandomState(seed)
    epochs = umap_epochs(n, n_epochs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph, _, _ = fuzzy_simplicial_set(x, k, rs, "cosine", knn_indices=knn_idx,
                                           knn_dists=knn_dist)
        del knn_idx, knn_dist
        # the edges umap-learn drops before embedding (weight < max / epochs)
        graph = graph.tocoo()
        graph.sum_duplicates()
        graph.data[graph.data < graph.data.max() / float(epochs)] = 0.0
        graph.eliminate_zeros()
        release_heap()  # scipy's temporaries of the fuzzy union
        init = spectral_init(graph, x, 2, rs)
        release_heap()
        a, b = find_ab_params(1.0, min_dist)
        emb, _ = simplicial_set_embedding(x, graph, 2, 1.0, a, b, 1.0, 5, epochs, init, rs,
                                          "cosine", {}, False, {}, False, parallel=False)
    return np.asarray(emb, dtype=np.float64)


