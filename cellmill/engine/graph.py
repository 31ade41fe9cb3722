"""Stages `neighbors`, `cluster` and `umap`: Seurat's FindNeighbors, FindClusters and RunUMAP.

- neighbors: k nearest neighbours (self included, first) of the QC-passed cells on PCs
  1..n_pcs: exact blocked brute force with bounding-box pruning (kernels/knn.py) over Dask
  chunks of query cells, or pynndescent; then Seurat's pruned Jaccard SNN graph (kernels/snn.py).
  Stored: obsm/knn_index (absolute cell indices, -1 rows for QC-failed cells),
  obsm/knn_distance (Euclidean, NaN rows), obsp/snn (all cells; rows of failed cells empty).
- cluster: modularity with resolution (the objective of leidenalg's
  RBConfigurationVertexPartition) on the SNN graph without its diagonal. `leiden`: by default
  with the graph streamed from the store (engine/communities.py: local moving block by block,
  then leidenalg on the graph of those communities); `cluster.leiden_backend = "igraph"` or
  `"leidenalg"` run on the whole graph in memory (igraph's ~9x faster than leidenalg).
  `louvain`: Seurat's Louvain itself (its ModularityOptimizer re-implemented step for step
  with java.util.Random's numbers: 10 starts, n.iter 10, seed; on Seurat's graph it gives
  Seurat's clusters exactly).
  Labels are renumbered by size (0 = largest; equal sizes in raw label order, a stable sort
  as Seurat's), then singletons join the
  cluster with the highest mean SNN weight to them (Seurat's GroupSingletons, including its
  tie-break: R's sample() after set.seed(1)). Stored: obs/cluster (categorical "0".."K-1", NaN
  for failed cells) and tables/clusters.csv (cell, cluster) for QC-passed cells.
- umap: umap-learn's method on our own exact 30-nearest-neighbour graph in cosine distance
  (uwot's metric in Seurat's RunUMAP) on the same PCs; spectral init, min_dist 0.3, 200 epochs
  when N > 10,000 else 500, seeded. By default with the graph on disk (engine/layout.py);
  `umap.backend = "umap-learn"` runs umap-learn in memory. Stored: obsm/X_umap (NaN rows for
  failed cells).

Memory: the stages hold the O(cells x k) arrays and the graph, not copies of them: PCs read
chunk by chunk (only the passed rows and the used columns), int32 neighbour indices, results
of parallel tasks copied wave by wave into preallocated arrays, the SNN graph filled straight
into its all-cells CSR, full-size outputs made and written one at a time, the graph handed to
igraph as one int64 edge array after the CSR is freed, freed heap trimmed between steps.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellmill.engine.cluster import in_waves
from cellmill.engine.stages import Context, stage
from cellmill.heap import release_heap

log = logging.getLogger("cellmill")

N_STARTS = 10  # Seurat's FindClusters n.start
SEURAT_N_ITER = 10  # Seurat's FindClusters n.iter
NN_SEED = 42  # pynndescent's random state


# ------------------------------------------------------------------ nearest neighbours


def index_dtype(n: int):
    """int32 indices when they fit (half the memory of int64)."""
    return np.int32 if n < 2**31 else np.int64


def _knn_chunk(ref_t, orig, lo, hi, leaf, q0, q1, k):
    from cellmill.kernels.knn import knn_self

    idx = np.empty((q1 - q0, k), dtype=index_dtype(ref_t.shape[1]))
    dist = np.empty((q1 - q0, k))
    knn_self(ref_t, orig, lo, hi, leaf, q0, q1, k, idx, dist)
    return idx, dist


def exact_knn(points: np.ndarray, k: int, scheduler=None, chunk: int | None = None,
              progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of every row of `points` among all rows (self first).

    Ties are broken by the smaller index; the result does not depend on `chunk` or the
    scheduler. Returns (indices, int32 when n < 2^31 else int64; Euclidean distances float64),
    n x k.
    """
    return knn_search(knn_index(points), k, scheduler, chunk, progress)


def knn_index(points: np.ndarray):
    """The search structure of exact_knn: (tree permutation, points in tree order dimension-
    major, leaf boxes). It holds its own copy, so the caller may free `points` before the
    search (the neighbors stage does: one copy of the PCs instead of two)."""
    from cellmill.kernels.knn import LEAF, block_boxes, tree_order

    x = np.asarray(points, dtype=np.float64)
    perm = tree_order(x, LEAF)
    ref_t = np.empty((x.shape[1], x.shape[0]))
    # points in tree order, dimension-major; mode="clip" (perm is in range anyway) because
    # numpy buffers `out` in a temporary of the same size under the default mode="raise"
    np.take(x.T, perm, axis=1, out=ref_t, mode="clip")
    lo, hi = block_boxes(ref_t, LEAF)
    return perm, ref_t, lo, hi


def knn_chunks(index, k: int, scheduler=None, chunk: int | None = None,
               progress: bool = False, desc: str = "knn"):
    """The search of exact_knn on a knn_index, chunk by chunk as the tasks finish:
    (rows, indices, Euclidean distances) for the points `rows` (tree order, not ascending)."""
    import dask

    from cellmill.engine.cluster import n_workers
    from cellmill.kernels.knn import LEAF

    perm, ref_t, lo, hi = index
    n = ref_t.shape[1]
    if n == 0:
        return
    if chunk is None:
        chunk = min(8192, max(256, -(-n // (8 * n_workers(scheduler)))))
    shared = [dask.delayed(a, pure=True) for a in (ref_t, perm, lo, hi)]
    starts = range(0, n, chunk)
    tasks = [dask.delayed(_knn_chunk, pure=True)(*shared, LEAF, a, min(a + chunk, n), k)
             for a in starts]
    for a, (p_idx, p_dist) in zip(starts, in_waves(tasks, scheduler, desc, progress),
                                  strict=True):
        yield perm[a:a + len(p_idx)], p_idx, p_dist


def knn_search(index, k: int, scheduler=None, chunk: int | None = None,
               progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """exact_knn on a knn_index."""
    n = index[1].shape[1]
    idx = np.empty((n, k), dtype=index_dtype(n))
    dist = np.empty((n, k))
    for rows, p_idx, p_dist in knn_chunks(index, k, scheduler, chunk, progress):
        idx[rows] = p_idx
        dist[rows] = p_dist
    return idx, dist


def self_first(idx: np.ndarray, dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Make every row start with the point itself at distance 0 (as Seurat's lists do)."""
    idx, dist = idx.copy(), dist.copy()
    rows = np.arange(idx.shape[0])
    for i in np.flatnonzero(idx[:, 0] != rows):
        row = list(idx[i])
        drow = list(dist[i])
        if i in row:
            p = row.index(i)
            del row[p], drow[p]
        else:
            row.pop()
            drow.pop()
        idx[i] = [i] + row
        dist[i] = [0.0] + drow
    return idx, dist


def nndescent_knn(points: np.ndarray, k: int, seed: int = NN_SEED,
                  workers: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Approximate k nearest neighbours by pynndescent (self first)."""
    from pynndescent import NNDescent

    index = NNDescent(np.asarray(points, dtype=np.float32), n_neighbors=k, metric="euclidean",
                      random_state=seed, n_jobs=workers, low_memory=True, verbose=False)
    idx, dist = index.neighbor_graph
    return self_first(idx.astype(np.int64), dist.astype(np.float64))


def recall(approx: np.ndarray, exact: np.ndarray) -> float:
    """Fraction of the exact neighbours (per row, as sets) that the approximate lists hold."""
    hit = 0
    for a, e in zip(approx, exact, strict=True):
        hit += len(np.intersect1d(a, e, assume_unique=True))
    return hit / exact.size


# ------------------------------------------------------------------ SNN graph


def _snn_counts(knn, ptr, idx, r0, r1, prune):
    from cellmill.kernels.snn import snn_row_counts

    return snn_row_counts(knn, ptr, idx, r0, r1, prune)


def _snn_fill(knn, ptr, idx, r0, r1, prune, counts, col):
    from cellmill.kernels.snn import snn_fill_rows

    return snn_fill_rows(knn, ptr, idx, r0, r1, prune, counts, col)


def _snn_inputs(knn: np.ndarray, cells: np.ndarray | None, n_cells: int | None):
    """(Dask-shared knn, reverse-list pointers and indices), n, the output size and the column
    of each of the n points."""
    import dask

    from cellmill.kernels.snn import reverse_lists

    knn = np.ascontiguousarray(knn)
    if knn.dtype not in (np.int32, np.int64):
        knn = knn.astype(np.int64)
    n = knn.shape[0]
    n_out = n if cells is None else int(n_cells)
    if n_out >= 2**31:
        raise ValueError("SNN graph: more than 2^31 cells")
    col = np.arange(n, dtype=np.int32) if cells is None else np.asarray(cells, dtype=np.int32)
    ptr, idx = reverse_lists(knn, n)
    shared = [dask.delayed(a, pure=True) for a in (knn, ptr, idx)]
    return shared, n, n_out, dask.delayed(col, pure=True)


def _snn_indptr(counts: np.ndarray, cells: np.ndarray | None, n_out: int) -> np.ndarray:
    """The graph's indptr among the n_out cells from the entries per row of the n points."""
    indptr = np.zeros(n_out + 1, dtype=np.int64)
    if cells is None:
        np.cumsum(counts, out=indptr[1:])
    else:
        indptr[np.asarray(cells) + 1] = counts
        np.cumsum(indptr, out=indptr)
    return indptr


def _snn_plan(knn: np.ndarray, prune: float, scheduler, chunk: int, progress: bool,
              cells: np.ndarray | None, n_cells: int | None):
    """The SNN graph's shape, indptr (first sweep: kept entries per row) and the fill tasks of
    the second sweep, one per `chunk` rows, whose results come in row order."""
    import dask

    from cellmill.engine.cluster import compute

    shared, n, n_out, d_col = _snn_inputs(knn, cells, n_cells)
    starts = range(0, n, chunk)
    counts = compute([dask.delayed(_snn_counts, pure=True)(*shared, a, min(a + chunk, n),
                                                           float(prune)) for a in starts],
                     scheduler=scheduler, desc="snn count", progress=progress)
    counts = np.concatenate(counts) if counts else np.empty(0, np.int64)
    indptr = _snn_indptr(counts, cells, n_out)
    tasks = [dask.delayed(_snn_fill, pure=True)(*shared, a, min(a + chunk, n), float(prune),
                                                counts[a:a + chunk], d_col)
             for a in starts]
    return n_out, indptr, tasks


def snn_graph(knn: np.ndarray, prune: float = 1.0 / 15.0, scheduler=None, chunk: int = 4096,
              progress: bool = False, cells: np.ndarray | None = None,
              n_cells: int | None = None) -> sp.csr_matrix:
    """Seurat's SNN graph (n x n CSR, float64, int32 indices, diagonal 1) from n x k neighbour
    lists (indices into the same n points).

    With `cells` (ascending indices of the n points among n_cells) the graph is returned as
    n_cells x n_cells, the other rows empty, without building the n x n one first. The rows are
    counted first, then filled straight into the final arrays (no second copy of the graph).
    """
    n_out, indptr, tasks = _snn_plan(knn, prune, scheduler, chunk, progress, cells, n_cells)
    indices = np.empty(indptr[-1], dtype=np.int32)
    data = np.empty(indptr[-1])
    pos = 0
    for p_idx, p_data in in_waves(tasks, scheduler, "snn", progress):
        indices[pos:pos + len(p_idx)] = p_idx
        data[pos:pos + len(p_idx)] = p_data
        pos += len(p_idx)
    return sp.csr_matrix((data, indices, indptr), shape=(n_out, n_out))


def _snn_rows(knn, ptr, idx, r0, r1, prune, col):
    from cellmill.kernels.snn import snn_rows

    return snn_rows(knn, ptr, idx, r0, r1, prune, col)


def write_snn_graph(store, slot: str, name: str, knn: np.ndarray, prune: float = 1.0 / 15.0,
                    scheduler=None, chunk: int = 4096, progress: bool = False,
                    cells: np.ndarray | None = None, n_cells: int | None = None) -> int:
    """snn_graph written into the store as it is made (rows in order, a wave of row blocks
    at a time): the graph, O(cells x k) entries, is never whole in memory. One sweep over the
    rows (the writer needs the row lengths only at the end). Returns its nnz."""
    import dask

    shared, n, n_out, d_col = _snn_inputs(knn, cells, n_cells)
    tasks = [dask.delayed(_snn_rows, pure=True)(*shared, a, min(a + chunk, n), float(prune),
                                                d_col)
             for a in range(0, n, chunk)]
    out = store.sparse_writer(slot, name, (n_out, n_out))
    counts = np.zeros(n, dtype=np.int64)
    pos = 0
    for p_counts, p_idx, p_data in in_waves(tasks, scheduler, "snn", progress):
        counts[pos:pos + len(p_counts)] = p_counts
        pos += len(p_counts)
        out.append(p_idx, p_data)
    indptr = _snn_indptr(counts, cells, n_out)
    out.commit(indptr)
    return int(indptr[-1])


# ------------------------------------------------------------------ clustering


def upper_triangle(snn: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """The edges of the SNN graph without its diagonal (E x 2 int64, the entries above it in
    storage order, as sp.triu(snn, 1) lists them) and their weights, in one kernel pass."""
    from cellmill.kernels.snn import upper_edges

    snn = sp.csr_matrix(snn)
    return upper_edges(snn.indptr, snn.indices, snn.data)


def _igraph(n: int, edges: np.ndarray):
    """Undirected igraph on n vertices. The weights stay a numpy array beside it (as an edge
    attribute they would be a Python list of floats, ~4x the memory)."""
    import igraph as ig

    g = ig.Graph(n=n, directed=False)
    # the same graph as Graph(n, edges): at 4M edges 3 s and +100 MB instead of 10 s, +550 MB
    g.add_edges(edges)
    return g


@contextlib.contextmanager
def _igraph_seed(seed: int):
    """igraph draws from a dedicated, seeded random.Random (not Python's global one)."""
    import igraph as ig

    ig.set_random_number_generator(random.Random(seed))
    try:
        yield
    finally:
        ig.set_random_number_generator(random)


def modularity_clusters(snn: sp.csr_matrix, algorithm: str = "leiden", resolution: float = 0.3,
                        seed: int = 0, n_iterations: int = -1, n_starts: int = N_STARTS,
                        leiden_backend: str = "igraph") -> tuple[np.ndarray, float]:
    """Raw community membership (0..K-1) and its modularity with resolution.

    Leiden: igraph's C implementation with the modularity objective (by default) or
    leidenalg's RBConfigurationVertexPartition (`leiden_backend="leidenalg"`): the same
    objective (RBConfiguration = 2m x modularity with resolution); igraph's is ~9x faster and
    smaller at 196k cells (measured: 9 s vs 80 s CPU). Louvain: Seurat's own algorithm
    (kernels/louvain.py), `n_starts` starts from one java.util.Random(seed), each iterated up
    to n_iterations times (Seurat's n.iter = 10 when n_iterations < 0).
    """
    if algorithm == "louvain":
        from cellmill.kernels.louvain import seurat_louvain

        m = sp.csr_matrix(snn, dtype=np.float64, copy=True)
        del snn  # when the caller passed its last reference, one copy less
        m.setdiag(0.0)
        m.eliminate_zeros()
        m.sort_indices()
        n_iter = int(n_iterations) if n_iterations > 0 else SEURAT_N_ITER
        labels, q = seurat_louvain(m.indptr.astype(np.int64), m.indices.astype(np.int64),
                                   m.data, float(resolution), int(n_starts), n_iter, int(seed))
        return labels.astype(np.int64), float(q)  # Seurat's quality = modularity(resolution)
    if algorithm != "leiden":
        raise ValueError(f"unknown clustering algorithm {algorithm!r}")
    n = snn.shape[0]
    edges, weights = upper_triangle(snn)
    del snn  # the caller's may be the last reference: freed before igraph copies the edges
    g = _igraph(n, edges)
    del edges
    release_heap()
    if leiden_backend == "leidenalg":
        import leidenalg as la

        part = la.find_partition(g, la.RBConfigurationVertexPartition, weights=weights,
                                 resolution_parameter=resolution, n_iterations=n_iterations,
                                 seed=seed)
        m = np.asarray(part.membership, dtype=np.int64)
    elif leiden_backend == "igraph":
        with _igraph_seed(seed):
            c = g.community_leiden(objective_function="modularity", weights=weights,
                                   resolution=resolution, n_iterations=n_iterations)
        m = np.asarray(c.membership, dtype=np.int64)
    else:
        raise ValueError(f"unknown Leiden backend {leiden_backend!r}")
    return m, g.modularity(list(m), weights=weights, resolution=resolution)


def order_by_size(labels: np.ndarray) -> np.ndarray:
    """Renumber labels 0..K-1 by size, descending; equal sizes keep the order of the raw labels
    (a stable sort, as Seurat's orderClustersByNNodes)."""
    _, inv, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    rank = np.argsort(-sizes, kind="stable")
    new = np.empty(len(rank), dtype=np.int64)
    new[rank] = np.arange(len(rank))
    return new[inv.ravel()]


def _r_seed1_uniforms(count: int) -> np.ndarray:
    """R's runif(count) right after set.seed(1) (Mersenne-Twister, R's seed scrambling)."""
    s = 1
    for _ in range(50):
        s = (69069 * s + 1) & 0xFFFFFFFF
    key = []
    for _ in range(625):
        s = (69069 * s + 1) & 0xFFFFFFFF
        key.append(s)
    bg = np.random.MT19937()
    bg.state = {"bit_generator": "MT19937",
                "state": {"key": np.array(key[1:], dtype=np.uint32), "pos": 624}}
    return bg.random_raw(count).astype(np.float64) * 2.3283064365386963e-10


def r_sample_seed1(n: int) -> int:
    """0-based index that R's sample(x, 1) picks from n items after set.seed(1) (R >= 3.6
    rejection sampling)."""
    u = iter(_r_seed1_uniforms(256))
    bits = math.ceil(math.log2(n)) if n > 1 else 0
    while True:
        v = 0
        for _ in range(0, bits + 1, 16):
            v = 65536 * v + int(math.floor(next(u) * 65536))
        v &= (1 << bits) - 1
        if v < n:
            return v


def group_singletons(labels: np.ndarray, snn) -> np.ndarray:
    """Seurat's GroupSingletons: each cluster of one cell joins the (non-singleton) cluster
    with the highest mean SNN weight to it; the labels are then made contiguous (singleton
    labels are the largest numbers after order_by_size, so the others keep theirs).
    `snn`: the graph, or a function returning it (called only when there are singletons)."""
    labels = np.asarray(labels, dtype=np.int64).copy()
    uniq, first, sizes = np.unique(labels, return_index=True, return_counts=True)
    in_order = uniq[np.argsort(first, kind="stable")]  # R's unique(ids)
    single = set(uniq[sizes == 1].tolist())
    if not single or len(single) == len(uniq):
        return labels
    names = np.array([c for c in in_order if c not in single])
    snn = sp.csr_matrix(snn() if callable(snn) else snn)
    for c in [c for c in in_order if c in single]:
        i = int(np.flatnonzero(labels == c)[0])
        row = snn.indices[snn.indptr[i]: snn.indptr[i + 1]]
        w = snn.data[snn.indptr[i]: snn.indptr[i + 1]]
        top = int(labels.max()) + 1
        sums = np.bincount(labels[row], weights=w, minlength=top)
        counts = np.bincount(labels, minlength=top)
        conn = sums[names] / counts[names]
        ties = names[conn == conn.max()]
        labels[i] = ties[r_sample_seed1(len(ties))]
    _, inv = np.unique(labels, return_inverse=True)
    return inv.ravel().astype(np.int64)


def cluster_labels(snn, algorithm: str = "leiden", resolution: float = 0.3,
                   seed: int = 0, n_iterations: int = -1,
                   leiden_backend: str = "igraph") -> np.ndarray:
    """Final labels 0..K-1 (0 = largest) of the cells of an SNN graph (with its diagonal).

    `snn` may be a function returning the graph: then no copy of it is kept while the
    algorithm runs on its own (igraph's) copy, and it is read again only for singletons."""
    load = snn if callable(snn) else lambda: snn
    raw, _ = modularity_clusters(load(), algorithm, resolution, seed, n_iterations,
                                 leiden_backend=leiden_backend)
    return group_singletons(order_by_size(raw), load)


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


def spectral_vectors(m, dim: int, random_state: np.random.RandomState) -> np.ndarray:
    """Eigenvectors 2..dim+1 of the largest eigenvalues of the normalised adjacency `m` (a
    matrix or a LinearOperator): ARPACK with umap-learn's v0 (ones) and tolerance (1e-4) and 32
    Lanczos vectors; uniform random coordinates, as umap-learn, when it fails."""
    import scipy.sparse.linalg as sla

    n, k = m.shape[0], dim + 1
    try:
        w, v = sla.eigsh(m, k, which="LA", ncv=max(2 * k + 1, 32), tol=1e-4, v0=np.ones(n),
                         maxiter=n * 5)
        return v[:, np.argsort(-w)[1:k]]
    except sla.ArpackError:
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


# ------------------------------------------------------------------ stages


def obsm_rows(store, name: str, cells: np.ndarray, n_cols: int) -> np.ndarray:
    """Rows `cells` (ascending) and the first n_cols columns of obsm/name, read one storage
    chunk at a time: the whole n_cells x 50 float64 X_pca is never in memory."""
    arr = store.root["obsm"][name]
    n, n_cols = arr.shape[0], min(n_cols, arr.shape[1])
    out = np.empty((len(cells), n_cols), dtype=arr.dtype)
    step = arr.chunks[0]
    for r0 in range(0, n, step):
        a, b = np.searchsorted(cells, [r0, r0 + step])
        if b > a:
            out[a:b] = arr[r0:min(r0 + step, n), :n_cols][cells[a:b] - r0]
    return out


def _passed_pcs(ctx: Context) -> tuple[np.ndarray, np.ndarray]:
    from cellmill.engine.stage_ingest import qc_passed

    cells = np.flatnonzero(qc_passed(ctx.store))
    return cells, obsm_rows(ctx.store, "X_pca", cells, ctx.cfg.neighbors.n_pcs)


def all_cells(rows: np.ndarray, cells: np.ndarray, n_cells: int, fill,
              lookup: np.ndarray | None = None, block: int = 65536) -> np.ndarray:
    """An n_cells x ... array with `rows` (mapped through `lookup` when given) at `cells` and
    `fill` elsewhere, copied in blocks (no full-size temporary)."""
    dtype = rows.dtype if lookup is None else lookup.dtype
    out = np.full((n_cells,) + rows.shape[1:], fill, dtype=dtype)
    for a in range(0, len(cells), block):
        part = rows[a:a + block]
        out[cells[a:a + block]] = part if lookup is None else lookup[part]
    return out


def write_all_cells(store, slot: str, name: str, rows: np.ndarray, cells: np.ndarray, fill,
                    lookup: np.ndarray | None = None, block: int = 65536) -> None:
    """all_cells(...) written into slot/name a block of cells at a time: the n_cells x ...
    array is never whole in memory."""
    import zarr

    n_cells = store.n_cells
    dtype = rows.dtype if lookup is None else lookup.dtype  # as all_cells makes it
    path = store.begin_array(slot, name, (n_cells,) + rows.shape[1:], dtype, block,
                             fill_value=fill)
    arr = zarr.open_array(path, mode="r+")
    for r0 in range(0, n_cells, block):
        r1 = min(r0 + block, n_cells)
        a, b = np.searchsorted(cells, [r0, r1])
        arr[r0:r1] = all_cells(rows[a:b], cells[a:b] - r0, r1 - r0, fill, lookup)
    store.commit_array(slot, name)


def _neighbors_params(cfg):
    n = cfg.neighbors
    return {"n_pcs": n.n_pcs, "k": n.k, "prune": n.prune, "method": n.method}


@stage("neighbors", after=("pca",), params=_neighbors_params)
def run_neighbors(ctx: Context) -> None:
    cfg, store = ctx.cfg.neighbors, ctx.store
    cells, pcs = _passed_pcs(ctx)
    k, n_pcs = min(cfg.k, len(cells)), pcs.shape[1]
    if cfg.method == "pynndescent":
        idx, dist = nndescent_knn(pcs, k, workers=ctx.cfg.compute.workers)
        del pcs
    else:
        index = knn_index(pcs)
        del pcs  # the index holds its own copy
        idx, dist = knn_search(index, k, scheduler=ctx.scheduler(), progress=ctx.progress)
        del index
    # one full-size array at a time: each is written and freed before the next is made
    release_heap()
    write_all_cells(store, "obsm", "knn_distance", dist, cells, np.nan)
    del dist
    write_all_cells(store, "obsm", "knn_index", idx, cells, -1,
                    lookup=cells.astype(np.int64))
    nnz = write_snn_graph(store, "obsp", "snn", idx, cfg.prune, scheduler=ctx.scheduler(),
                          progress=ctx.progress, cells=cells, n_cells=store.n_cells)
    log.info("neighbors: %s k=%d on %d PCs, %d cells; SNN %d entries", cfg.method, k,
             n_pcs, len(cells), nnz)
    del idx
    release_heap()


def _cluster_params(cfg):
    c = cfg.cluster
    return {"algorithm": c.algorithm, "resolution": c.resolution, "seed": c.seed,
            "n_iterations": c.n_iterations, "n_starts": N_STARTS,
            "leiden_backend": c.leiden_backend}


def passed_snn(store, cells: np.ndarray) -> sp.csr_matrix:
    """obsp/snn among the QC-passed `cells` (ascending): what snn[cells][:, cells] gives, made
    in place. The neighbors stage leaves the rows of the other cells empty and never points
    to them, so the rows are the cells' and the columns are only renumbered."""
    snn = store.read_sparse("obsp", "snn").tocsr()
    if len(cells) == snn.shape[0]:
        return snn
    indptr = snn.indptr
    rank = np.full(snn.shape[0], -1, dtype=snn.indices.dtype)
    rank[cells] = np.arange(len(cells))
    if (indptr[cells + 1] - indptr[cells]).sum() == snn.nnz:
        np.take(rank, snn.indices, out=snn.indices)
        if snn.nnz == 0 or snn.indices.min() >= 0:
            return sp.csr_matrix((snn.data, snn.indices, np.append(indptr[cells], snn.nnz)),
                                 shape=(len(cells), len(cells)))
    # a graph with entries of other cells (not written by this stage): slice a fresh copy
    return store.read_sparse("obsp", "snn").tocsr()[cells][:, cells]


@stage("cluster", after=("neighbors",), params=_cluster_params)
def run_cluster(ctx: Context) -> None:
    from cellmill.engine.stage_ingest import qc_passed, write_cell_table

    cfg, store = ctx.cfg.cluster, ctx.store
    cells = np.flatnonzero(qc_passed(store))
    if cfg.algorithm == "leiden" and cfg.leiden_backend == "streamed":
        from cellmill.engine.communities import streamed_cluster_labels

        labels = streamed_cluster_labels(store, cells, cfg.resolution, cfg.seed,
                                         cfg.n_iterations, ctx.progress)
    else:
        labels = cluster_labels(lambda: passed_snn(store, cells), cfg.algorithm,
                                cfg.resolution, cfg.seed, cfg.n_iterations, cfg.leiden_backend)
    k = int(labels.max()) + 1
    cats = [str(i) for i in range(k)]
    codes = np.full(store.n_cells, -1, dtype=np.int64)
    codes[cells] = labels
    col = pd.Categorical.from_codes(codes, categories=cats)
    store.update_obs(cluster=col)
    write_cell_table(store, ctx.tables / "clusters.csv", {"cluster": labels}, cells)
    log.info("cluster: %s resolution %g: %d clusters, sizes %s", cfg.algorithm,
             cfg.resolution, k, np.bincount(labels).tolist())
    release_heap()


def _umap_params(cfg):
    u = cfg.umap
    return {"n_neighbors": u.n_neighbors, "min_dist": u.min_dist, "seed": u.seed,
            "n_epochs": u.n_epochs, "n_pcs": cfg.neighbors.n_pcs, "metric": "cosine",
            "backend": u.backend}


@stage("umap", after=("pca",), params=_umap_params)
def run_umap(ctx: Context) -> None:
    u, store = ctx.cfg.umap, ctx.store
    cells, pcs = _passed_pcs(ctx)
    if u.backend == "streamed":
        from cellmill.engine.layout import umap_streamed
        from cellmill.io.scratch import scratch_dir

        emb = umap_streamed(pcs, u.n_neighbors, u.min_dist, u.seed, u.n_epochs,
                            scratch=scratch_dir(store.path, "umap"), scheduler=ctx.scheduler(),
                            progress=ctx.progress)
    else:
        emb = umap_embedding(pcs, u.n_neighbors, u.min_dist, u.seed, u.n_epochs,
                             scheduler=ctx.scheduler(), progress=ctx.progress)
    del pcs
    write_all_cells(store, "obsm", "X_umap", emb, cells, np.nan)
    release_heap()
