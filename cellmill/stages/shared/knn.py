"""k nearest neighbours, shared by the neighbors and umap stages: exact blocked brute force with
bounding-box pruning (kernels/knn.py) over chunks of query cells, run where passes run, its
index in memory (knn_index) or on disk, read a block at a time (knn_index_from_blocks); or
pynndescent, its recall checked against exact search."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cellmill.engine.schedulers import in_waves, on_a_thread
from cellmill.io.buffers import ThreadBuffers

log = logging.getLogger("cellmill")

NN_SEED = 42  # pynndescent's random state

# ------------------------------------------------------------------ nearest neighbours


def index_dtype(n: int):
    """int32 indices when they fit (half the memory of int64)."""
    return np.int32 if n < 2**31 else np.int64


def _knn_chunk(ref_t, ref32, slack, orig, lo, hi, leaf, q0, q1, k):
    from cellmill.kernels.knn import knn_self

    idx = np.empty((q1 - q0, k), dtype=index_dtype(ref_t.shape[1]))
    dist = np.empty((q1 - q0, k))
    knn_self(ref_t, ref32, slack, orig, lo, hi, leaf, q0, q1, k, idx, dist)
    return idx, dist


def row_blocks(points: np.ndarray, rows: int = 65536):
    """(a, b, rows a..b as float64) of an n x d array: what knn_index_from_blocks takes."""
    x = np.asarray(points)
    for a in range(0, x.shape[0], rows):
        yield a, min(a + rows, x.shape[0]), np.asarray(x[a:a + rows], dtype=np.float64)


INDEX_ROWS = 32768  # at most this many points per block of an index on disk
# queries per search task on an index on disk: a task holds their lists while it reads every
# block it cannot rule out (at 1M cells on 15 PCs, all 32 of them: ~3% of its time), so the
# chunk is a size, not a fraction of the cells, and the memory in flight does not grow with n
DISK_CHUNK = 8192
# search results computed and not yet taken, per worker (the default of 8 held ~70 MB more at
# 1M cells than at 196k)
WAVE = 2


class DiskPoints(NamedTuple):
    """An index's points on disk, in tree order, by blocks (subtrees of the tree, `bounds`:
    their starts and n), each block d x w float64 in `f64` and float32 in `f32` (dimension-
    major within the block)."""

    f64: Path
    f32: Path
    d: int
    n: int
    bounds: np.ndarray

    def span(self, b: int) -> tuple[int, int]:
        return int(self.bounds[b]), int(self.bounds[b + 1])

    def block_of(self, p: int) -> int:
        return int(np.searchsorted(self.bounds, p, side="right")) - 1

    def read(self, b: int, buffers=None, tag: str = "") -> tuple[np.ndarray, np.ndarray]:
        """Block b's points (float64, float32), in this thread's arrays `tag` of `buffers`
        (a ThreadBuffers) when given: blocks of several MB would otherwise be fresh pages at
        every read."""
        from cellmill.io.scratch import read_raw_into

        a, e = self.span(b)
        count = self.d * (e - a)
        out = []
        for path, dtype in ((self.f64, np.float64), (self.f32, np.float32)):
            arr = (np.empty(count, dtype) if buffers is None
                   else buffers.get(f"{tag}{dtype.__name__}", count, dtype))
            read_raw_into(path, arr, np.dtype(dtype).itemsize * self.d * a)
            out.append(arr.reshape(self.d, e - a))
        return out[0], out[1]


class KnnIndex(NamedTuple):
    """The search structure of exact_knn: the tree permutation (perm[p] = original index of
    position p), the points in tree order dimension-major (d x n float64), the leaves' boxes
    (d x n_leaves), the points in float32 for the screen and the screen's slack. An index on
    disk (knn_index_from_blocks) has `disk` instead of the two point arrays, and the boxes of
    its blocks."""

    perm: np.ndarray
    ref_t: np.ndarray | None
    lo: np.ndarray
    hi: np.ndarray
    ref32: np.ndarray | None
    slack: float
    disk: DiskPoints | None = None
    block_lo: np.ndarray | None = None
    block_hi: np.ndarray | None = None


def knn_index_from_blocks(blocks, n: int, root: Path, rows: int = INDEX_ROWS) -> KnnIndex:
    """knn_index of the points that `blocks` gives ((a, b, rows a..b float64) in order), kept
    on disk: the points go to raw files under `root` (the caller removes it) as they come, the
    tree is built on the float32 copy, and both files are rewritten in tree order, by blocks
    (the tree's subtrees of at most `rows` points). The search reads them a block at a time
    (knn_chunks), so the process holds the permutation and the boxes, not the points (at 1M
    cells and 15 PCs: 12 MB instead of 180), and gives the same lists and distances, bit for
    bit, as on knn_index's arrays."""
    from cellmill.io.scratch import read_raw, write_raw
    from cellmill.kernels.knn import LEAF, slack_of_max, tree_blocks, tree_order

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    raw64 = root / "points.f64"
    d = 0
    peaks = [0.0]  # max |x| per block (NaN stays NaN: no screen)
    ref32 = np.empty((0, n), dtype=np.float32)
    for a, b, part in blocks:  # dimension-major on disk: row j of the d x n array
        if a == 0:
            d = part.shape[1]
            ref32 = np.empty((d, n), dtype=np.float32)
        part_t = np.ascontiguousarray(part.T, dtype=np.float64)
        for j in range(d):
            write_raw(raw64, part_t[j], 8 * (j * n + a))
        ref32[:, a:b] = part_t
        if part.size:
            peaks.append(float(np.maximum(part_t.max(), -part_t.min())))
    if n == 0 or d == 0:
        return knn_index(np.empty((n, d)))
    perm = tree_order(ref32, LEAF)
    disk = DiskPoints(root / "tree.f64", root / "tree.f32", d, n, tree_blocks(n, rows))
    starts = np.arange(0, n, LEAF)
    lo, hi = np.empty((d, len(starts))), np.empty((d, len(starts)))
    spans = [disk.span(b) for b in range(len(disk.bounds) - 1)]
    for j in range(d):  # a dimension at a time, into tree order, then into the blocks
        row = np.take(read_raw(raw64, np.float64, n, 8 * j * n), perm)
        lo[j], hi[j] = np.minimum.reduceat(row, starts), np.maximum.reduceat(row, starts)
        row32 = np.take(ref32[j], perm)
        for a, e in spans:
            write_raw(disk.f64, row[a:e], 8 * (d * a + j * (e - a)))
            write_raw(disk.f32, row32[a:e], 4 * (d * a + j * (e - a)))
    del ref32
    raw64.unlink()
    leaves = [(a // LEAF, -(-e // LEAF)) for a, e in spans]
    block_lo = np.stack([lo[:, a:e].min(axis=1) for a, e in leaves], axis=1)
    block_hi = np.stack([hi[:, a:e].max(axis=1) for a, e in leaves], axis=1)
    return KnnIndex(perm, None, lo, hi, None, slack_of_max(float(np.max(peaks)), d), disk,
                    block_lo, block_hi)


def exact_knn(points: np.ndarray, k: int, scheduler=None, chunk: int | None = None,
              progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of every row of `points` among all rows (self first).

    Ties are broken by the smaller index; the result does not depend on `chunk` or the
    scheduler. Returns (indices, int32 when n < 2^31 else int64; Euclidean distances float64),
    n x k.
    """
    return knn_search(knn_index(points), k, scheduler, chunk, progress)


def knn_index(points: np.ndarray) -> KnnIndex:
    """The KnnIndex of `points`, in memory. It holds its own copy, so the caller may free
    `points` before the search. knn_index_from_blocks makes the same structure on disk."""
    from cellmill.kernels.knn import LEAF, block_boxes, screen_slack, tree_order

    ref_t = np.array(np.asarray(points, dtype=np.float64).T, order="C")
    perm = tree_order(ref_t, LEAF)
    for j in range(ref_t.shape[0]):  # into tree order, a dimension at a time
        ref_t[j] = ref_t[j, perm]
    lo, hi = block_boxes(ref_t, LEAF)
    return KnnIndex(perm, ref_t, lo, hi, ref_t.astype(np.float32), screen_slack(ref_t))


# the blocks a search task reads, one set per worker thread (cleared after each search)
_BUFFERS = ThreadBuffers()


def _join_chunk(disk, perm, lo, hi, block_lo, block_hi, slack, q0, q1, k):
    """Exact search of the points q0..q1 (within one block) of an index on disk: their own
    block first, then the others nearest first, skipping those whose box is farther than
    every query's k-th distance."""
    from cellmill.kernels.knn import LEAF, MARGIN, _gap2, knn_join, knn_start

    own = disk.block_of(q0)
    a0 = disk.span(own)[0]
    ref_t, ref32 = own_t, own32 = disk.read(own, _BUFFERS, "own")
    q_t = np.ascontiguousarray(ref_t[:, q0 - a0:q1 - a0])  # (a strided view: no SIMD)
    q_orig = perm[q0:q1]
    bd = np.empty((q1 - q0, k))
    bi = np.empty((q1 - q0, k), dtype=np.int64)
    knn_start(q_orig, k, bd, bi)
    q_lo, q_hi = q_t.min(axis=1), q_t.max(axis=1)
    gaps = [_gap2(q_lo, q_hi, block_lo[:, b], block_hi[:, b]) for b in range(block_lo.shape[1])]
    order = [own] + [int(b) for b in np.argsort(gaps, kind="stable") if b != own]
    for b in order:
        if b != own:
            if gaps[b] > float(bd[:, k - 1].max()) * (1.0 + MARGIN):
                break  # every later block is at least this far
            ref_t, ref32 = disk.read(b, _BUFFERS, "ref")
        else:
            ref_t, ref32 = own_t, own32
        a, e = disk.span(b)
        l0, l1 = a // LEAF, -(-e // LEAF)
        knn_join(q_t, q_orig, ref_t, ref32, perm[a:e], np.ascontiguousarray(lo[:, l0:l1]),
                 np.ascontiguousarray(hi[:, l0:l1]), slack, LEAF, bd, bi)
    return bi.astype(index_dtype(disk.n)), np.sqrt(bd)


def _disk_chunks(disk: DiskPoints, workers: int, chunk: int | None) -> list[tuple[int, int]]:
    """The query ranges of the tasks on an index on disk: each block cut into pieces of at
    most `chunk` points (by default DISK_CHUNK, halved down to a tile while there are fewer
    than 8 tasks per worker)."""
    from cellmill.kernels.knn import TILE

    spans = [disk.span(b) for b in range(len(disk.bounds) - 1)]
    if chunk is None:
        chunk = min(DISK_CHUNK, max(e - a for a, e in spans))
        while chunk > TILE and sum(-(-(e - a) // chunk) for a, e in spans) < 8 * workers:
            chunk //= 2
    return [(q, min(q + chunk, e)) for a, e in spans for q in range(a, e, chunk)]


def knn_chunks(index: KnnIndex, k: int, scheduler=None, chunk: int | None = None,
               progress: bool = False, desc: str = "knn"):
    """The search of exact_knn on a knn_index, chunk by chunk as the tasks finish:
    (rows, indices, Euclidean distances) for the points `rows` (tree order, not ascending).
    An index on disk is searched by chunks within its blocks."""
    import dask

    from cellmill.engine.schedulers import n_workers
    from cellmill.kernels.knn import LEAF

    n = len(index.perm)
    if n == 0:
        return
    shared = (dask.delayed(a, pure=True) for a in (index.perm, index.lo, index.hi))
    d_perm, d_lo, d_hi = shared
    if index.disk is not None:
        ranges = _disk_chunks(index.disk, n_workers(scheduler), chunk)
        d_blo, d_bhi = (dask.delayed(a, pure=True) for a in (index.block_lo, index.block_hi))
        starts = [a for a, _ in ranges]
        tasks = [dask.delayed(_join_chunk, pure=True)(index.disk, d_perm, d_lo, d_hi, d_blo,
                                                      d_bhi, index.slack, a, e, k)
                 for a, e in ranges]
    else:
        if chunk is None:
            chunk = min(8192, max(256, -(-n // (8 * n_workers(scheduler)))))
        d_ref, d_ref32 = (dask.delayed(a, pure=True) for a in (index.ref_t, index.ref32))
        starts = range(0, n, chunk)
        tasks = [dask.delayed(_knn_chunk, pure=True)(d_ref, d_ref32, index.slack, d_perm, d_lo,
                                                     d_hi, LEAF, a, min(a + chunk, n), k)
                 for a in starts]
    try:
        waves = in_waves(tasks, scheduler, desc, progress, per_worker=WAVE)
        for a, (p_idx, p_dist) in zip(starts, waves, strict=True):
            yield index.perm[a:a + len(p_idx)], p_idx, p_dist
    finally:
        _BUFFERS.clear()


def knn_search(index, k: int, scheduler=None, chunk: int | None = None,
               progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """exact_knn on a knn_index."""
    n = len(index.perm)
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


# ------------------------------------------------------------------ approximate search

# "auto" searches exactly up to this many cells and with NN-descent above. Around 1M cells the
# two take about the same time on the 2-core development machine (benchmarks/bench_knn.py;
# the table in the README: exact on two threads, pynndescent on one with its ~20 s of Numba
# compiling in every process, k = 20): at 1M exact is ~20% slower on draws from a Gaussian
# mixture and ~15% faster on the simulated study's own PCs, and it holds ~40% less memory;
# past 1M NN-descent pulls ahead (1.5M, mixture: 124 s against ~90). A size, not a time: the
# choice must not depend on the worker count (with more cores exact search stays faster
# for longer)
EXACT_UP_TO = 1_000_000
RECALL_MIN = 0.98  # recall@k against exact search the approximate lists must reach
RECALL_SAMPLE = 1000  # query cells of the recall check
RECALL_SEED = 7  # which cells those are
# pynndescent's lists depend on its thread count (its candidate sampling is split per
# thread), so it always runs on one: the result is the same whatever compute.workers is
NN_JOBS = 1
# pynndescent settings tried in turn until the recall holds: more neighbours kept while
# searching (the first k are used), then more iterations
# NN-descent's effort, raised while the recall check fails. The first level keeps 15 candidates
# per point and iteration for k >= 30 (pynndescent: min(60, k)): at 1M cells, k = 30 (UMAP),
# 320 MB less (+913 against +1,231 MB) for recall 0.991 against 0.998. At k = 20 (neighbors)
# the saving is small and recall fell to 0.981: pynndescent's default there
CANDIDATES_FROM_K = 30
EFFORT = ({"extra": 0, "iters": 1, "candidates": 15}, {"extra": 10, "iters": 1},
          {"extra": 20, "iters": 2})


def knn_method(setting: str, n: int) -> str:
    """The search neighbors.method = `setting` ("auto", "exact", "nndescent") means for n
    points: "exact" or "nndescent"."""
    if setting == "auto":
        return "exact" if n <= EXACT_UP_TO else "nndescent"
    return "nndescent" if setting in ("nndescent", "pynndescent") else "exact"


def _sample_chunk(ref_t, queries, k):
    from cellmill.kernels.knn import knn_of_queries

    idx = np.empty((len(queries), k), dtype=np.int64)
    dist = np.empty((len(queries), k))
    knn_of_queries(ref_t, queries, k, idx, dist)
    return idx, dist


def sample_queries(n: int, size: int = RECALL_SAMPLE, seed: int = RECALL_SEED) -> np.ndarray:
    """The query cells of the recall check: `size` of the n, seeded, ascending."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, min(size, n), replace=False))


def exact_of_queries(points: np.ndarray, queries: np.ndarray, k: int,
                     scheduler=None) -> np.ndarray:
    """Exact neighbour lists (self first, ties by index) of the rows `queries` among all rows
    of `points`, by brute force (kernels/knn.py knn_of_queries), in parallel tasks."""
    import dask

    from cellmill.engine.schedulers import compute, n_workers

    ref_t = np.ascontiguousarray(np.asarray(points, dtype=np.float64).T)
    shared = dask.delayed(ref_t, pure=True)
    step = max(1, -(-len(queries) // (4 * n_workers(scheduler))))
    tasks = [dask.delayed(_sample_chunk, pure=True)(shared, queries[a:a + step], k)
             for a in range(0, len(queries), step)]
    parts = compute(tasks, scheduler=scheduler, desc="knn recall", progress=False)
    return np.concatenate([p[0] for p in parts]) if parts else np.empty((0, k), np.int64)


def recall(approx: np.ndarray, exact: np.ndarray) -> float:
    """Fraction of the exact neighbours (per row, as sets) that the approximate lists hold."""
    hit = 0
    for a, e in zip(approx, exact, strict=True):
        hit += len(np.intersect1d(a, e))
    return hit / exact.size


def _by_distance(points: np.ndarray, idx: np.ndarray, k: int,
                 rows: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Lists of candidates (n x m, m >= k) cut to the k nearest, self first then by float64
    Euclidean distance and index (as exact search orders them); a list without the point
    itself loses its farthest candidate to it."""
    n = idx.shape[0]
    out_i = np.empty((n, k), dtype=index_dtype(n))
    out_d = np.empty((n, k))
    for a in range(0, n, rows):
        b = min(a + rows, n)
        cand = idx[a:b].astype(np.int64)
        me = np.arange(a, b)
        has = (cand == me[:, None]).any(axis=1)
        cand[~has, -1] = me[~has]
        diff = points[cand] - points[a:b, None, :]
        d2 = np.einsum("rkd,rkd->rk", diff, diff)
        d2[cand == me[:, None]] = -1.0  # self first
        order = np.lexsort((cand, d2), axis=-1)[:, :k]
        out_i[a:b] = np.take_along_axis(cand, order, axis=1)
        out_d[a:b] = np.sqrt(np.maximum(np.take_along_axis(d2, order, axis=1), 0.0))
    return out_i, out_d


def load_points(points) -> np.ndarray:
    """The points as float64: `points` itself, or what it returns when it is a loader (a
    function giving the same array at every call, so the caller need hold no copy)."""
    return np.asarray(points() if callable(points) else points, dtype=np.float64)


def nndescent_knn(points, k: int, seed: int = NN_SEED, extra: int = 0, iters: int = 1,
                  candidates: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Approximate k nearest neighbours by pynndescent (self first, then by distance): k +
    `extra` neighbours searched, `iters` times pynndescent's default iterations, `candidates`
    its max_candidates (None: its default). `points`: an array, or a loader (a function
    returning the same array each call): then no float64 copy is alive while NN-descent runs
    (120 MB at 1M cells on 15 PCs) and the points are loaded again to order the lists."""
    from pynndescent import NNDescent

    x32 = load_points(points).astype(np.float32)
    n = x32.shape[0]
    m = min(k + extra, n)
    n_iters = iters * max(5, int(round(np.log2(max(n, 2)))))
    if m < CANDIDATES_FROM_K:
        candidates = None
    index = NNDescent(x32, n_neighbors=m, metric="euclidean", random_state=seed,
                      n_jobs=NN_JOBS, n_iters=n_iters, low_memory=True,
                      max_candidates=candidates, verbose=False)
    idx = index.neighbor_graph[0]
    del index, x32
    if (idx < 0).any():  # unfilled lists: cannot happen with n > m, but never trusted
        idx = np.where(idx < 0, np.arange(n)[:, None], idx)
    return _by_distance(load_points(points), idx, k)


def approximate_knn(points, k: int, seed: int = NN_SEED, scheduler=None,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray, dict]:
    """NN-descent with its recall@k checked against exact search on RECALL_SAMPLE seeded
    query cells; more effort while it is below RECALL_MIN, then exact search (with a warning).
    `points`: an array or a loader (see nndescent_knn). Returns (indices, distances, what was
    done: method, recall, sample size, effort)."""
    x = load_points(points)
    n = x.shape[0]
    if n <= 4 * (k + EFFORT[-1]["extra"]):  # too few points for NN-descent's lists: exact
        idx, dist = exact_knn(x, k, scheduler, progress=progress)
        return idx, dist, {"method": "exact", "recall": 1.0, "recall_sample": 0}
    queries = sample_queries(n)
    # the sample's exact lists are searched on a thread while NN-descent starts: its first
    # call in a process compiles for ~24 s (pynndescent passes the distance as a function
    # argument, so Numba cannot cache it), and the search (~5 s at 1M cells) then costs no
    # wall time. The points are not held once the search is done
    truth = on_a_thread(exact_of_queries, x, queries, k, scheduler)
    del x
    info = {"method": "nndescent", "recall_sample": int(len(queries)),
            "recall_min": RECALL_MIN, "seed": seed}
    for level, kw in enumerate(EFFORT):
        idx, dist = nndescent_knn(points, k, seed, **kw)
        r = recall(idx[queries], truth())
        log.info("knn: nndescent (effort %d) recall@%d %.4f on %d cells", level, k, r,
                 len(queries))
        if r >= RECALL_MIN:
            return idx, dist, {**info, "recall": round(r, 5), "effort": level}
        del idx, dist
    log.warning("knn: nndescent recall %.4f < %.2f at the highest effort: exact search", r,
                RECALL_MIN)
    idx, dist = exact_knn(load_points(points), k, scheduler, progress=progress)
    return idx, dist, {**info, "method": "exact", "recall": 1.0, "nndescent_recall": round(r, 5),
                       "effort": None}
