"""UMAP with the graph on disk (`umap.backend = "streamed"`, the default).

umap-learn holds the kNN lists, the fuzzy graph (built with scipy temporaries) and ~50 bytes
per edge of optimiser state: ~1.3 GB at 400k cells, growing with the cells. Here only
O(cells) arrays stay in memory (the search index while the kNN search runs, sigma/rho of a
block, degrees and a few vectors of the eigensolver, the 2-D embedding); the O(cells x k)
parts go through raw scratch files beside the store, one block of rows at a time (the
finished graph alone may be held, step 4):

1. the 30-NN lists in cosine distance (exact search, or NN-descent past neighbors.method's
   crossover: stages/shared/knn.py) are bucketed by row block as the search returns them;
2. per block, umap-learn's sigma/rho and membership strengths; each edge i -> j goes to the
   bucket of i and, transposed, to the bucket of j;
3. per bucket, the fuzzy union a + b - a*b of the two directions: umap-learn's symmetric
   graph, written as CSR (row order);
4. edges below max / epochs dropped (as umap-learn does), then the spectral initialisation:
   the largest eigenvectors of D^-1/2 W D^-1/2 with the Krylov basis on disk too
   (stages/umap/eigen.py), the graph streamed for every product (or read into memory once
   when it fits a quarter of compute.memory: the same blocks either way);
5. the layout, an epoch at a time over the blocks: by default the batch optimiser on all
   threads (kernels/layout_batch.py), or umap-learn's sequential one (kernels/layout.py).
"""

from __future__ import annotations

import logging
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numba
import numpy as np

from cellmill.engine.schedulers import n_workers
from cellmill.io.heap import release_heap
from cellmill.io.progress import bar
from cellmill.io.scratch import Buckets, DiskGraph
from cellmill.kernels import layout as kern
from cellmill.kernels import layout_batch as batch
from cellmill.stages.shared.knn import load_points

log = logging.getLogger("cellmill")

ROWS = 16_384  # rows per block: fixed, so the result does not depend on the memory budget
NEG_RATE = 5.0  # umap-learn's negative_sample_rate
GAMMA = 1.0  # umap-learn's repulsion_strength
ADAM_BETA1, ADAM_BETA2, ADAM_EPS = 0.5, 0.9, 1e-7  # uwot's batch-mode Adam
# Adam moves a vertex ~ the learning rate per epoch whatever its gradient: at 1 (uwot's) the
# layouts came out compressed, the groups less apart than umap-learn's (silhouette 0.74 vs
# 0.84 on a 50k-cell simulated study); at 5 scale, trustworthiness and separation match
# umap-learn's on that study and on Gaussian mixtures of 3k-12k points
BATCH_LEARNING_RATE = 5.0
# graph entries per block the batch optimiser reads (8 MB): up to three blocks are alive while
# the next streams in; at 1M cells the epochs' peak was 538 MB with 32 MB blocks, 481 MB with
# these, and an epoch no slower (0.59 s against 0.71 s)
BATCH_ENTRIES = 1_000_000


def _knn_to_buckets(points, k, root: Path, scheduler, progress, method: str = "exact",
                    info: dict | None = None, n: int | None = None,
                    point_blocks=None) -> tuple[Buckets, float]:
    """Step 1: the cosine kNN lists, bucketed by row block: exact search, or NN-descent when
    neighbors.method = `method` says so for this many cells (stages/shared/knn.py; Euclidean
    on unit rows orders as cosine does). Returns (buckets, mean distance); what was done goes
    into `info` when given. Exact search's index is made from the unit rows a block at a
    time (through a file under root/index), from `point_blocks()` ((a, b, rows a..b) in
    order) when given, else from the points."""
    from cellmill.stages.shared import knn as shared_knn
    from cellmill.stages.umap.in_memory import unit_rows

    if n is None:  # (the caller may know it: a loader's points are not loaded to count them)
        n = len(load_points(points))
    info = {} if info is None else info
    info.update(setting=method, exact_up_to=shared_knn.EXACT_UP_TO, cells=int(n))
    if shared_knn.knn_method(method, n) == "nndescent":
        # a loader: the unit rows are made when needed, not held while NN-descent runs
        all_idx, all_dist, done = shared_knn.approximate_knn(
            lambda: unit_rows(load_points(points)), k, scheduler=scheduler,
            progress=progress)
        info.update(done)
        chunks = ((np.arange(a, min(a + ROWS, n)), all_idx[a:a + ROWS], all_dist[a:a + ROWS])
                  for a in range(0, n, ROWS))
    else:
        # the unit rows dimension-major become the index's own points (no second copy)
        blocks = (point_blocks() if point_blocks is not None
                  else shared_knn.row_blocks(load_points(points)))
        index = shared_knn.knn_index_from_blocks(
            ((a, b, unit_rows(p)) for a, b, p in blocks), n, root / "index")
        info["method"] = "exact"
        chunks = shared_knn.knn_chunks(index, k, scheduler, progress=progress,
                                       desc="umap knn")
    out = Buckets(root, "knn", -(-n // ROWS), {"row": (np.int32, 1), "idx": (np.int32, k),
                                                "dist": (np.float32, k)})
    total = 0.0
    for rows, idx, dist in chunks:
        dist *= dist  # Euclidean between unit vectors -> 1 - cos
        dist /= 2.0
        d32 = dist.astype(np.float32)
        total += float(d32.sum(dtype=np.float64))
        out.append(rows // ROWS, row=rows.astype(np.int32), idx=idx.astype(np.int32),
                   dist=d32)
    out.close()
    shutil.rmtree(root / "index", ignore_errors=True)
    return out, total / max(n * k, 1)


def fuzzy_graph(knn: Buckets, n: int, n_neighbors: int, mean_dist: float, root: Path,
                progress: bool = False) -> DiskGraph:
    """Steps 2-3: umap-learn's fuzzy_simplicial_set of the bucketed kNN lists, on disk."""
    edges = Buckets(root, "edge", knn.n, {"row": (np.int32, 1), "col": (np.int32, 1),
                                          "val": (np.float32, 1)})
    for b in bar(range(knn.n), desc="umap memberships", enabled=progress):
        part = knn.read(b)
        order = np.argsort(part["row"], kind="stable")
        rows, idx, dist = part["row"][order], part["idx"][order], part["dist"][order]
        del part
        sigma = np.empty(len(rows), dtype=np.float32)
        rho = np.empty(len(rows), dtype=np.float32)
        dist, idx = np.ascontiguousarray(dist), np.ascontiguousarray(idx)
        kern.smooth_knn(dist, float(n_neighbors), mean_dist, sigma, rho)
        w = np.empty(idx.shape, dtype=np.float32)
        kern.memberships(rows, idx, dist, sigma, rho, w)
        keep = (w != 0.0) & (idx >= 0)
        i = np.broadcast_to(rows[:, None], idx.shape)[keep]
        j, v = idx[keep], w[keep]
        edges.append(np.concatenate([i // ROWS, j // ROWS]), row=np.concatenate([i, j]),
                     col=np.concatenate([j, i]), val=np.concatenate([v, v]))
    edges.close()

    def merged():
        for b in bar(range(edges.n), desc="umap fuzzy union", enabled=progress):
            part = edges.read(b)
            r0, r1 = b * ROWS, min((b + 1) * ROWS, n)
            # by (row, col) as one int64 key (5x faster than lexsort); a pair's two entries
            # may come in either order: a + b - a * b is symmetric
            order = np.argsort((part["row"] - r0).astype(np.int64) * n + part["col"])
            ptr = np.empty(r1 - r0 + 1, dtype=np.int64)
            cols = np.empty(len(order), dtype=np.int32)
            vals = np.empty(len(order), dtype=np.float32)
            q = kern.fuzzy_union(part["row"][order], part["col"][order], part["val"][order],
                                 r0, r1 - r0, ptr, cols, vals)
            yield r0, ptr, cols[:q], vals[:q]

    graph = DiskGraph(root, n, ROWS)
    graph.write(merged())
    return graph


def pruned(graph: DiskGraph, keep_from: float):
    """The graph in memory without the weights below keep_from (COO, as umap-learn takes it)."""
    g = graph.to_csr()
    g.data[g.data < keep_from] = 0.0
    g.eliminate_zeros()
    return g.tocoo()


def _components_and_degrees(graph: DiskGraph, keep_from: float) -> tuple[int, np.ndarray]:
    """Connected components and weighted degrees of the kept edges, in one pass."""
    parent = np.arange(graph.n, dtype=np.int64)
    deg = np.zeros(graph.n)
    for r0, ptr, cols, vals, _ in graph.blocks():
        kern.union_rows(ptr, cols, vals, keep_from, r0, parent)
        kern.row_sums(ptr, vals, keep_from, deg[r0:r0 + len(ptr) - 1])
    return int(kern.count_roots(parent)), deg


def spectral_init(graph: DiskGraph, keep_from: float, points, rs, progress=False,
                  threads: int = 1, root: Path | None = None):
    """umap-learn's spectral initialisation (as graph.spectral_init) with the graph streamed:
    eigenvectors 2..3 of the largest eigenvalues of D^-1/2 W D^-1/2 (a Krylov basis of 32
    vectors as files under `root`, tol 1e-4, v0 ones: stages/umap/eigen.py), scaled to +-10
    with umap-learn's noise. A graph of several components or under 2,000 cells goes to
    umap-learn's spectral_layout in memory."""
    import tempfile

    from threadpoolctl import threadpool_limits
    from umap.umap_ import noisy_scale_coords

    from cellmill.stages.umap.eigen import ArpackLikeError, largest_eigenpairs
    from cellmill.stages.umap.in_memory import LANCZOS_VECTORS, random_start

    n, dim = graph.n, 2
    n_comp, deg = _components_and_degrees(graph, keep_from)
    if n < 2000 or n_comp > 1:
        from umap.spectral import spectral_layout

        log.info("umap: graph of several components or few cells: spectral layout in memory")
        emb = spectral_layout(np.asarray(load_points(points), dtype=np.float32),
                              pruned(graph, keep_from),
                              dim, rs, metric="cosine")
        return noisy_scale_coords(emb, rs, max_coord=10, noise=0.0001)
    inv_sq = 1.0 / np.sqrt(deg)
    del deg

    calls = [0]

    def matvec(v):
        x = inv_sq * np.asarray(v, dtype=np.float64).ravel()
        y = np.empty(n)
        # the graph's own blocks (~6 MB at 1M cells streamed, two in memory at a time),
        # not the optimiser's 8 MB ones: a row's sum does not depend on them
        for r0, ptr, cols, vals, _ in graph.blocks():
            kern.spmv_rows(ptr, cols, vals, keep_from, x, y[r0:r0 + len(ptr) - 1])
        calls[0] += 1
        return inv_sq * y

    # BLAS on one thread: OpenBLAS's threads spin between its calls and would take the
    # cores from the products (measured: 15 -> 7 ms a product on 2 cores), and its sums
    # then do not depend on the core count
    with (numba_threads(threads), threadpool_limits(1),
          tempfile.TemporaryDirectory(prefix="krylov-", dir=root) as tmp):
        try:
            _, vecs = largest_eigenpairs(matvec, n, dim + 1, Path(tmp), m=LANCZOS_VECTORS,
                                         tol=1e-4, v0=np.ones(n), max_products=n * 5)
            emb = vecs[:, 1:]
        except ArpackLikeError:
            emb = random_start(rs, n, dim)
    log.info("umap: spectral initialisation in %d graph products", calls[0])
    return noisy_scale_coords(emb, rs, max_coord=10, noise=0.0001)


def _start(init: np.ndarray) -> np.ndarray:
    """The start as simplicial_set_embedding takes it: rescaled to [0, 10], float32."""
    lo, hi = init.min(axis=0), init.max(axis=0)
    return np.ascontiguousarray((10.0 * (init - lo) / (hi - lo)).astype(np.float32))


def optimize(graph: DiskGraph, init: np.ndarray, epochs: int, a: float, b: float,
             keep_from: float, seed: int, progress: bool = False) -> np.ndarray:
    """umap-learn's optimize_layout_euclidean (as simplicial_set_embedding calls it: the
    start rescaled to [0, 10], learning rate 1 falling linearly) with the graph streamed once
    per epoch, on one thread (`umap.optimizer = "sequential"`)."""
    emb = _start(init)
    alpha = 1.0
    for n in bar(range(epochs), desc="umap epochs", unit="epoch", enabled=progress):
        for r0, ptr, cols, vals, pos0 in graph.blocks():
            kern.layout_rows(ptr, cols, vals, r0, pos0, emb, n, alpha, a, b, GAMMA,
                             NEG_RATE, graph.w_max, keep_from, seed)
        alpha = 1.0 - n / epochs
    return emb


def optimize_batch(graph: DiskGraph, init: np.ndarray, epochs: int, a: float, b: float,
                   keep_from: float, seed: int, threads: int = 1,
                   progress: bool = False) -> np.ndarray:
    """The batch optimiser (kernels/layout_batch.py) on `threads` Numba threads: per epoch,
    every vertex's gradient at the epoch's start positions, block by block as the graph
    streams past, then one Adam step of all vertices (the learning rate falling linearly to 0
    as umap-learn's). The same bits for any thread count and block size."""
    emb = _start(init)
    grad = np.zeros(emb.shape)
    m, v = np.zeros(emb.shape), np.zeros(emb.shape)
    bias1 = bias2 = 1.0
    rows = _batch_rows(graph)
    with numba_threads(threads):
        for n in bar(range(epochs), desc="umap epochs", unit="epoch", enabled=progress):
            for r0, ptr, cols, vals, pos0 in graph.blocks(rows):
                batch.batch_gradients(ptr, cols, vals, r0, pos0, emb, n, a, b, GAMMA, NEG_RATE,
                                      graph.w_max, keep_from, seed, grad)
            bias1 *= ADAM_BETA1
            bias2 *= ADAM_BETA2
            # umap-learn's decay: x 1, 1, 1 - 1/epochs, 1 - 2/epochs, ...
            alpha = BATCH_LEARNING_RATE * (1.0 - max(n - 1, 0) / epochs)
            batch.adam_step(emb, grad, m, v, alpha, ADAM_BETA1, ADAM_BETA2, 1.0 - bias1,
                            1.0 - bias2, ADAM_EPS)
    return emb


def _batch_rows(graph: DiskGraph) -> int:
    """Rows per block for the parallel kernels: ~BATCH_ENTRIES entries (not the graph's own
    blocks: the threads meet at fewer barriers, one slow thread holding the rest at each).
    Results do not depend on it."""
    return max(graph.rows, int(BATCH_ENTRIES * graph.n / max(int(graph.indptr[-1]), 1)))


@contextmanager
def numba_threads(threads: int):
    """Numba's parallel kernels on `threads` threads (at most what Numba started) inside."""
    before = numba.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(before)


def umap_streamed(points, n_neighbors: int = 30, min_dist: float = 0.3,
                  seed: int = 42, n_epochs: int = 0, scratch: Path | None = None,
                  scheduler=None, progress: bool = False, optimizer: str = "batch",
                  knn_method: str = "exact", record: dict | None = None,
                  memory_bytes: int | None = None, n: int | None = None,
                  point_blocks=None) -> np.ndarray:
    """UMAP of `points` (an array, or a loader: see load_points) as graph.umap_embedding computes
    it, with the graph on disk under `scratch` (made, then removed). `optimizer`: "batch" (on
    as many threads as the scheduler has workers) or "sequential" (umap-learn's in-place
    updates, one thread). The kNN search is the one neighbors.method = `knn_method` means
    for this many points; what was done goes into `record["knn"]` when given, the seconds
    per step into `record["seconds"]`. A graph of at most a quarter of `memory_bytes` is held in
    memory for the spectral products and the epochs (the same numbers as streamed from disk;
    faster). `n`: the number of points, when known (a loader is then not called to count
    them); `point_blocks`: a loader of them in blocks of rows for the exact search (see
    _knn_to_buckets)."""
    import tempfile

    from umap.umap_ import find_ab_params

    from cellmill.stages.umap.in_memory import umap_epochs

    if n is None:
        n = len(load_points(points))
    k = min(n_neighbors, n)
    epochs = umap_epochs(n, n_epochs)
    if scratch is None:
        root = Path(tempfile.mkdtemp(prefix="cellmill-umap-"))
    else:  # a scratch left by a killed run is replaced
        root = Path(scratch)
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        knn_info = {}
        if record is not None:
            record["knn"] = knn_info
        knn, mean_dist = _knn_to_buckets(points, k, root, scheduler, progress, knn_method,
                                         knn_info, n=n, point_blocks=point_blocks)
        t1 = time.perf_counter()
        graph = fuzzy_graph(knn, n, k, mean_dist, root, progress)
        release_heap()
        t2 = time.perf_counter()
        # umap-learn drops weights below max / epochs, compared in float32
        keep_from = float(np.float32(graph.w_max / float(epochs)))
        # held when it fits in a quarter of the budget (a cache, for speed: the same
        # numbers either way): at 196k cells 75 MB, held; at 1M 384 MB, streamed from disk
        # (the page cache), so the stage's memory does not grow with the cells
        if memory_bytes and graph.hold(memory_bytes // 4):
            log.info("umap: graph held in memory (%.0f MB)", graph.nbytes() / 2**20)
        rs = np.random.RandomState(seed)
        init = spectral_init(graph, keep_from, points, rs, progress, n_workers(scheduler),
                             root)
        release_heap()
        t3 = time.perf_counter()
        a, b = find_ab_params(1.0, min_dist)
        if optimizer == "sequential":
            emb = optimize(graph, init, epochs, a, b, keep_from, seed, progress)
        else:
            emb = optimize_batch(graph, init, epochs, a, b, keep_from, seed,
                                 n_workers(scheduler), progress)
        steps = {"knn": t1 - t0, "fuzzy graph": t2 - t1, "spectral init": t3 - t2,
                 "epochs": time.perf_counter() - t3}
        if record is not None:  # the bench reports them
            record["seconds"] = {k: round(v, 2) for k, v in steps.items()}
        log.info("umap: %d cells, %d graph entries; knn %.1f s, fuzzy graph %.1f s, spectral "
                 "init %.1f s, %d %s epochs %.1f s", n, int(graph.indptr[-1]), steps["knn"],
                 steps["fuzzy graph"], steps["spectral init"], epochs, optimizer,
                 steps["epochs"])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return emb.astype(np.float64)
