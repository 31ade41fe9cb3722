"""Exact k-nearest neighbours (Euclidean, self-join) by blocked brute force with box pruning.

The points come in a locality order (`tree_order`: median splits along the widest dimension
down to blocks of LEAF points), dimension-major (`ref_t`, d x n, C-contiguous), so the inner loop
runs over contiguous reference points and vectorises. Every block has a bounding box. A tile of
TILE consecutive queries visits the blocks in increasing order of the box-to-box lower bound and
stops when that bound exceeds the k-th distance of every query in the tile; within a visited
block a query also skips it when its own point-to-box bound exceeds its k-th distance. Bounds
get a relative margin, so pruning never drops a candidate (the search is exact).

A block a query does not skip is first screened in float32 (twice the SIMD lanes): the float32
squared distances are compared with the query's k-th distance widened by a bound on float32's
error (`screen_slack`), and only a block with a point under it gets the float64 distances that
decide. A screen can only let too much through, so the result is that of float64 alone
(196k cells, 15 PCs: 15-22% less time).

Each query keeps its k best sorted by (squared distance, original index): ties are broken by the
smaller index whatever the visiting order, chunking or tiling. The query itself is always
neighbour 0 (distance 0), as in Seurat. Squared distances are sums of squared coordinate
differences in float64 in a fixed order (no |a|^2 + |b|^2 - 2ab cancellation), identical for
(i, j) and (j, i).
"""

import numba
import numpy as np

TILE = 256  # queries per tile (one fetch of a block serves them all)
LEAF = 128  # points per block (d x LEAF doubles stay in L1)
MARGIN = 1e-9  # relative slack on the lower bounds (rounding is ~1e-15)
U32 = 2.0 ** -24  # float32's unit roundoff


def screen_slack(ref_t: np.ndarray) -> float:
    """Bound on the error of a float32 distance, for the screen: with M the largest |coordinate|,
    each float32 coordinate difference is within 4.1 u M of the float64 one (two roundings of
    the coordinates, one of the difference; u = 2^-24), so the float32 distance (before its
    own rounding, bounded in knn_self) exceeds the true one by at most 4.1 u M sqrt(d)
    (triangle inequality). 5 u M sqrt(d) is returned; inf (no screen) for coordinates
    float32 cannot hold."""
    # max |x| without np.abs's copy of the points (120 MB at 1M cells); NaN stays NaN
    m = float(np.maximum(ref_t.max(), -ref_t.min())) if ref_t.size else 0.0
    return slack_of_max(m, ref_t.shape[0])


def slack_of_max(m: float, d: int) -> float:
    """screen_slack given M, the largest |coordinate| (NaN: no screen)."""
    if not m < 1e30:
        return np.inf
    return 5.0 * U32 * m * float(np.sqrt(d))


def tree_order(points_t: np.ndarray, leaf: int = LEAF) -> np.ndarray:
    """A permutation putting nearby points together: recursive median splits along the widest
    dimension, at multiples of `leaf`, so every block of `leaf` consecutive points (the last
    one may be smaller) is one leaf of the tree. `points_t`: the points dimension-major
    (d x n)."""
    d, n = points_t.shape
    perm = np.arange(n, dtype=np.int64)
    stack = [(0, n)]
    while stack:
        a, b = stack.pop()
        if b - a <= leaf:
            continue
        rows = perm[a:b]
        # one dimension at a time: a copy of the whole segment would double the points' memory
        spread = [np.ptp(points_t[j, rows]) for j in range(d)]
        dim = int(np.argmax(spread))
        n_leaves = -(-(b - a) // leaf)
        mid = leaf * ((n_leaves + 1) // 2)
        part = np.argpartition(points_t[dim, rows], mid, kind="introselect")
        perm[a:b] = perm[a:b][part]
        stack.append((a, a + mid))
        stack.append((a + mid, b))
    return perm


def tree_blocks(n: int, rows: int, leaf: int = LEAF) -> np.ndarray:
    """Bounds (starts and n) of the subtrees of tree_order's tree with at most `rows` points:
    its splits depend only on n and leaf, so a block of consecutive points in tree order that
    is a subtree has a tight box (blocks cut every `rows` points would straddle subtrees)."""
    bounds, stack = [n], [(0, n)]
    while stack:
        a, b = stack.pop()
        if b - a <= max(rows, leaf):
            bounds.append(a)
            continue
        mid = leaf * ((-(-(b - a) // leaf) + 1) // 2)
        stack.append((a, a + mid))
        stack.append((a + mid, b))
    return np.array(sorted(bounds), dtype=np.int64)


@numba.njit(nogil=True, cache=True)
def block_boxes(ref_t, leaf):
    """Per block of `leaf` consecutive points: lower and upper corner (d x n_blocks)."""
    d, n = ref_t.shape
    nb = (n + leaf - 1) // leaf
    lo = np.empty((d, nb))
    hi = np.empty((d, nb))
    for b in range(nb):
        a, e = b * leaf, min(n, (b + 1) * leaf)
        for dd in range(d):
            x = ref_t[dd, a:e]
            lo[dd, b] = x.min()
            hi[dd, b] = x.max()
    return lo, hi


@numba.njit(nogil=True, cache=True)
def _insert(bd, bi, k, d, j):
    """Insert (d, j) into the sorted top-k (bd, bi) after position 0 (the query itself)."""
    p = k - 1
    while p > 1 and (bd[p - 1] > d or (bd[p - 1] == d and bi[p - 1] > j)):
        bd[p] = bd[p - 1]
        bi[p] = bi[p - 1]
        p -= 1
    bd[p] = d
    bi[p] = j


@numba.njit(nogil=True, cache=True)
def _sq_dist(ref_t, me, c0, w, b):
    """b[j] = squared distance between point `me` and point c0 + j, j < w, in the arrays'
    precision (float64 for results, float32 for the screen).

    Four dimensions per sweep keep the buffer traffic low; the order of the additions is fixed
    (and symmetric in the two points), so the value never depends on the tiling.
    """
    d = ref_t.shape[0]
    b[:] = 0.0
    dd = 0
    while dd + 4 <= d:
        r0 = ref_t[dd, c0:c0 + w]
        r1 = ref_t[dd + 1, c0:c0 + w]
        r2 = ref_t[dd + 2, c0:c0 + w]
        r3 = ref_t[dd + 3, c0:c0 + w]
        a0 = ref_t[dd, me]
        a1 = ref_t[dd + 1, me]
        a2 = ref_t[dd + 2, me]
        a3 = ref_t[dd + 3, me]
        for j in range(w):
            x0 = a0 - r0[j]
            x1 = a1 - r1[j]
            x2 = a2 - r2[j]
            x3 = a3 - r3[j]
            b[j] += (x0 * x0 + x1 * x1) + (x2 * x2 + x3 * x3)
        dd += 4
    while dd < d:
        r0 = ref_t[dd, c0:c0 + w]
        a0 = ref_t[dd, me]
        for j in range(w):
            x0 = a0 - r0[j]
            b[j] += x0 * x0
        dd += 1


@numba.njit(nogil=True, cache=True)
def _any_at_most(b, w, thr):
    """Whether any of b[:w] is <= thr: a count without branches (it vectorises), so the
    scan with its branches runs only for the few blocks that hold a candidate."""
    c = 0
    for j in range(w):
        c += b[j] <= thr
    return c > 0


@numba.njit(nogil=True, cache=True)
def _gap2(lo_a, hi_a, lo_b, hi_b):
    """Squared distance between two boxes (0 when they overlap)."""
    s = 0.0
    for dd in range(lo_a.shape[0]):
        g = max(lo_b[dd] - hi_a[dd], lo_a[dd] - hi_b[dd], 0.0)
        s += g * g
    return s


@numba.njit(nogil=True, cache=True)
def _point_gaps(ref_t, t0, nt, lo, hi, b, out):
    """out[t] = squared distance from point t0 + t to box b, t < nt (as _gap2 of a point), for
    the tile's points at once: a loop over contiguous points that vectorises (taken one
    point at a time, they cost 10-15% of the search)."""
    out[:nt] = 0.0
    for dd in range(ref_t.shape[0]):
        lo_d = lo[dd, b]
        hi_d = hi[dd, b]
        row = ref_t[dd, t0:t0 + nt]
        for t in range(nt):
            g = max(lo_d - row[t], row[t] - hi_d, 0.0)
            out[t] += g * g


@numba.njit(nogil=True, cache=True)
def knn_self(ref_t, ref32, slack, orig, lo, hi, leaf, q0, q1, k, out_idx, out_dist):
    """k nearest neighbours (incl. self first) of points q0..q1 (positions in ref_t) among all
    n points of ref_t.

    ref_t: d x n points in tree order; ref32: the same in float32 and slack =
    screen_slack(ref_t), for the screen; orig[p]: original index of position p (the tie-break
    and the returned indices); lo, hi = block_boxes(ref_t, leaf). out_idx (q1 - q0, k) int64
    original indices, out_dist (q1 - q0, k) float64 Euclidean distances; when n < k the missing
    neighbours get index -1 and distance inf.
    """
    d, n = ref_t.shape
    nb = lo.shape[1]
    buf = np.empty(leaf)
    buf32 = np.empty(leaf, dtype=np.float32)
    # a sum of d + 1 rounded nonnegative terms (squares, then sums) is within (d + 2) u of
    # the exact sum: doubled, plus a step for the threshold's own rounding to float32
    grow = (1.0 + 2.0 * (d + 2) * U32) * (1.0 + 4.0 * U32)
    bd = np.empty((TILE, k))
    bi = np.empty((TILE, k), dtype=np.int64)
    tlo = np.empty(d)
    thi = np.empty(d)
    qg = np.empty(TILE)
    lb = np.empty(nb)
    for t0 in range(q0, q1, TILE):
        nt = min(TILE, q1 - t0)
        for dd in range(d):
            tlo[dd] = ref_t[dd, t0:t0 + nt].min()
            thi[dd] = ref_t[dd, t0:t0 + nt].max()
        for b in range(nb):
            lb[b] = _gap2(tlo, thi, lo[:, b], hi[:, b])
        visit = np.argsort(lb)
        for t in range(nt):
            bd[t, 0] = 0.0
            bi[t, 0] = orig[t0 + t]
            for p in range(1, k):
                bd[t, p] = np.inf
                bi[t, p] = -1
        tile_thr = np.inf if k > 1 else 0.0
        for v in range(nb):
            b = visit[v]
            if lb[b] > tile_thr * (1.0 + MARGIN):
                break
            c0 = b * leaf
            w = min(leaf, n - c0)
            if k == 1:
                continue
            _point_gaps(ref_t, t0, nt, lo, hi, b, qg)
            for t in range(nt):
                me = t0 + t
                thr = bd[t, k - 1]
                if qg[t] > thr * (1.0 + MARGIN):
                    continue
                if thr < np.inf and slack < np.inf:  # the float32 screen
                    r = np.sqrt(thr) + slack
                    _sq_dist(ref32, me, c0, w, buf32[:w])
                    if not _any_at_most(buf32, w, np.float32(r * r * grow)):
                        continue
                _sq_dist(ref_t, me, c0, w, buf[:w])
                if not _any_at_most(buf, w, thr):  # most blocks: nothing to insert
                    continue
                last = bi[t, k - 1]
                for j in range(w):
                    x = buf[j]
                    if x < thr or (x == thr and orig[c0 + j] < last):
                        if c0 + j != me:
                            _insert(bd[t], bi[t], k, x, orig[c0 + j])
                            thr = bd[t, k - 1]
                            last = bi[t, k - 1]
            tile_thr = 0.0
            for t in range(nt):
                tile_thr = max(tile_thr, bd[t, k - 1])
        for t in range(nt):
            r = t0 + t - q0
            for p in range(k):
                out_idx[r, p] = bi[t, p]
                out_dist[r, p] = np.sqrt(bd[t, p])


@numba.njit(nogil=True, cache=True)
def knn_of_queries(ref_t, queries, k, out_idx, out_dist):
    """Exact k nearest neighbours (self first) of the points `queries` among all n points of
    ref_t (d x n, C-contiguous), by brute force: every distance is computed (the reference of
    the recall check of approximate search, independent of the tree search above). Ties are
    broken by the smaller index. out_idx, out_dist: len(queries) x k (Euclidean)."""
    d, n = ref_t.shape
    buf = np.empty(n)
    bd = np.empty(k)
    bi = np.empty(k, dtype=np.int64)
    for r in range(queries.shape[0]):
        q = queries[r]
        buf[:] = 0.0
        for dd in range(d):  # dimension by dimension: the inner loop vectorises
            a = ref_t[dd, q]
            row = ref_t[dd]
            for j in range(n):
                x = a - row[j]
                buf[j] += x * x
        bd[0] = 0.0
        bi[0] = q
        for p in range(1, k):
            bd[p] = np.inf
            bi[p] = -1
        if k > 1:
            for j in range(n):
                s = buf[j]
                if j != q and (s < bd[k - 1] or (s == bd[k - 1] and j < bi[k - 1])):
                    _insert(bd, bi, k, s, j)
        for p in range(k):
            out_idx[r, p] = bi[p]
            out_dist[r, p] = np.sqrt(bd[p])


@numba.njit(nogil=True, cache=True)
def _sq_dist_to(ref, q, c0, w, b):
    """_sq_dist with the query's coordinates given apart (q, length d, in ref's precision):
    the same operations in the same order, so the same bits."""
    d = ref.shape[0]
    b[:] = 0.0
    dd = 0
    while dd + 4 <= d:
        r0 = ref[dd, c0:c0 + w]
        r1 = ref[dd + 1, c0:c0 + w]
        r2 = ref[dd + 2, c0:c0 + w]
        r3 = ref[dd + 3, c0:c0 + w]
        a0 = q[dd]
        a1 = q[dd + 1]
        a2 = q[dd + 2]
        a3 = q[dd + 3]
        for j in range(w):
            x0 = a0 - r0[j]
            x1 = a1 - r1[j]
            x2 = a2 - r2[j]
            x3 = a3 - r3[j]
            b[j] += (x0 * x0 + x1 * x1) + (x2 * x2 + x3 * x3)
        dd += 4
    while dd < d:
        r0 = ref[dd, c0:c0 + w]
        a0 = q[dd]
        for j in range(w):
            x0 = a0 - r0[j]
            b[j] += x0 * x0
        dd += 1


@numba.njit(nogil=True, cache=True)
def knn_start(q_orig, k, bd, bi):
    """The running lists of knn_join before any reference block: the query itself first
    (distance 0), the other places empty (inf, -1)."""
    for t in range(q_orig.shape[0]):
        bd[t, 0] = 0.0
        bi[t, 0] = q_orig[t]
        for p in range(1, k):
            bd[t, p] = np.inf
            bi[t, p] = -1


@numba.njit(nogil=True, cache=True)
def knn_join(q_t, q_orig, ref_t, ref32, r_orig, lo, hi, slack, leaf, bd, bi):
    """knn_self's search of one block of reference points for a chunk of queries, the k best
    so far carried in (bd: squared distances, bi: original indices, one row per query; start
    them with knn_start): a search that reads the points a block at a time. The k best of
    all blocks, whatever their order, are knn_self's lists, bit for bit (the same distances,
    the same tie-break by original index).

    q_t: the queries' points (d x nq float64, tree order), q_orig their original indices;
    ref_t / ref32 (d x w float64 / float32), r_orig, lo / hi: the block's points, original
    indices and leaf boxes (leaves of `leaf` points from its start)."""
    d, n = ref_t.shape
    nq = q_t.shape[1]
    k = bd.shape[1]
    if k == 1 or n == 0:
        return
    nb = lo.shape[1]
    buf = np.empty(leaf)
    buf32 = np.empty(leaf, dtype=np.float32)
    grow = (1.0 + 2.0 * (d + 2) * U32) * (1.0 + 4.0 * U32)  # as in knn_self
    tlo = np.empty(d)
    thi = np.empty(d)
    qg = np.empty(TILE)
    lb = np.empty(nb)
    q64 = np.empty(d)
    q32 = np.empty(d, dtype=np.float32)
    for t0 in range(0, nq, TILE):
        nt = min(TILE, nq - t0)
        for dd in range(d):
            tlo[dd] = q_t[dd, t0:t0 + nt].min()
            thi[dd] = q_t[dd, t0:t0 + nt].max()
        for b in range(nb):
            lb[b] = _gap2(tlo, thi, lo[:, b], hi[:, b])
        visit = np.argsort(lb)
        tile_thr = 0.0
        for t in range(nt):
            tile_thr = max(tile_thr, bd[t0 + t, k - 1])
        for v in range(nb):
            b = visit[v]
            if lb[b] > tile_thr * (1.0 + MARGIN):
                break
            c0 = b * leaf
            w = min(leaf, n - c0)
            _point_gaps(q_t, t0, nt, lo, hi, b, qg)
            for t in range(nt):
                me = t0 + t
                thr = bd[me, k - 1]
                if qg[t] > thr * (1.0 + MARGIN):
                    continue
                for dd in range(d):
                    q64[dd] = q_t[dd, me]
                if thr < np.inf and slack < np.inf:  # the float32 screen
                    for dd in range(d):
                        q32[dd] = np.float32(q64[dd])
                    r = np.sqrt(thr) + slack
                    _sq_dist_to(ref32, q32, c0, w, buf32[:w])
                    if not _any_at_most(buf32, w, np.float32(r * r * grow)):
                        continue
                _sq_dist_to(ref_t, q64, c0, w, buf[:w])
                if not _any_at_most(buf, w, thr):
                    continue
                last = bi[me, k - 1]
                me_orig = q_orig[me]
                for j in range(w):
                    x = buf[j]
                    if x < thr or (x == thr and r_orig[c0 + j] < last):
                        if r_orig[c0 + j] != me_orig:
                            _insert(bd[me], bi[me], k, x, r_orig[c0 + j])
                            thr = bd[me, k - 1]
                            last = bi[me, k - 1]
            tile_thr = 0.0
            for t in range(nt):
                tile_thr = max(tile_thr, bd[t0 + t, k - 1])
