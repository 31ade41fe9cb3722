"""Numba kernels for preranked GSEA (fgsea 1.24.0 algorithm, own implementation).

Conventions: `w` holds the gene weights |stat|^gseaParam in decreasing-stat order,
positions are 0-based indexes into `w`, gene sets are sorted position arrays.
score_type codes: 0 = "std", 1 = "pos", 2 = "neg".
"""

import math

import numba
import numpy as np

STD, POS, NEG = 0, 1, 2


# ---------------------------------------------------------------- random numbers
# SplitMix64 streams with explicit state: one stream per permutation / per sampled
# set, so results depend only on the seed, not on the number of threads.

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


@numba.njit(nogil=True, cache=True)
def _mix(z):
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@numba.njit(nogil=True, cache=True)
def _rand_below(state, i, n):
    """Uniform integer in [0, n) from stream state[i]."""
    state[i] += _GAMMA
    u = (_mix(state[i]) >> np.uint64(11)) * (1.0 / 9007199254740992.0)
    return np.int64(u * n)


@numba.njit(nogil=True, cache=True)
def new_streams(seed, count):
    """`count` independent stream states derived from `seed`."""
    state = np.empty(count, dtype=np.uint64)
    base = _mix(np.uint64(seed) * _GAMMA + np.uint64(0x5851F42D4C957F2D))
    for i in range(count):
        state[i] = _mix(base + np.uint64(i + 1) * _GAMMA)
    return state


@numba.njit(nogil=True, cache=True)
def _draw_distinct(state, i, n, k, out, mark):
    """Fill out[:k] with k distinct uniform positions in [0, n), in draw order."""
    c = 0
    while c < k:
        x = _rand_below(state, i, n)
        if not mark[x]:
            mark[x] = True
            out[c] = x
            c += 1
    for c in range(k):
        mark[out[c]] = False


_GAPS = np.array([1, 4, 10, 23, 57, 132, 301, 701, 1750, 4376, 10941, 27353, 68383])


@numba.njit(nogil=True, cache=True)
def _sort_ints(a):
    """Shell sort of an int array in place (much cheaper to compile than np.sort)."""
    n = a.shape[0]
    g = 0
    while g + 1 < _GAPS.shape[0] and _GAPS[g + 1] < n:
        g += 1
    while g >= 0:
        gap = _GAPS[g]
        for i in range(gap, n):
            v = a[i]
            j = i
            while j >= gap and a[j - gap] > v:
                a[j] = a[j - gap]
                j -= gap
            a[j] = v
        g -= 1


# ---------------------------------------------------------------- simple sampling


@numba.njit(nogil=True, cache=True)
def _combine(top, bot, score_type, clamp):
    if clamp:
        top = max(top, 0.0)
        bot = min(bot, 0.0)
    if score_type == POS:
        return top
    if score_type == NEG:
        return bot
    if top == -bot:
        return 0.0
    return top if top > -bot else bot


@numba.njit(nogil=True, cache=True)
def random_prefix_es(w, sizes, nperm, seed, score_type, clamp):
    """ES of random gene sets: row p, column j = ES of the first sizes[j] genes of
    random draw p (draws of max(sizes) distinct genes; like fgsea, one draw serves
    every size). `clamp` bounds the positive/negative deviations below by 0, as
    fgsea's cumulative calculation does when several pathways are tested.
    """
    n = w.shape[0]
    ns = sizes.shape[0]
    kmax = 0
    for j in range(ns):
        kmax = max(kmax, sizes[j])
    out = np.empty((nperm, ns))
    state = new_streams(seed, nperm)
    for p in range(nperm):
        mark = np.zeros(n, dtype=np.bool_)
        samp = np.empty(kmax, dtype=np.int64)
        _draw_distinct(state, p, n, kmax, samp, mark)
        # sort (position, draw index) pairs packed in one integer
        key = np.empty(kmax, dtype=np.int64)
        cw = np.zeros(kmax + 1)  # cw[m] = total weight of the first m draws
        for i in range(kmax):
            key[i] = samp[i] * kmax + i
            cw[i + 1] = cw[i] + w[samp[i]]
        _sort_ints(key)
        spos = key // kmax  # drawn positions, ascending
        order = key - spos * kmax  # their draw indexes
        for j in range(ns):
            m = sizes[j]
            nr = cw[m]
            q1 = 1.0 / (n - m)
            top = -np.inf
            bot = np.inf
            cum = 0.0
            hit = 0
            for i in range(kmax):
                if order[i] < m:
                    pos = spos[i]
                    wi = w[pos] / nr if nr > 0 else 1.0 / m
                    cum += wi
                    # running sum at this hit: hits so far minus misses before it
                    t = cum - q1 * (pos - hit)
                    hit += 1
                    top = max(top, t)
                    bot = min(bot, t - wi)
            out[p, j] = _combine(top, bot, score_type, clamp)
    return out


# ---------------------------------------------------------------- multilevel splitting


@numba.njit(nogil=True, cache=True)
def _pos_es(w, a, n):
    """max(0, max running sum) of sorted set `a` (fgsea calcPositiveES)."""
    k = a.shape[0]
    ns = 0.0
    for pos in a:
        ns += w[pos]
    if ns <= 0:
        return 0.0
    q1 = 1.0 / (n - k)
    q2 = 1.0 / ns
    cur = 0.0
    res = 0.0
    last = -1
    for pos in a:
        cur += q2 * w[pos] - q1 * (pos - last - 1)
        res = max(res, cur)
        last = pos
    return res


@numba.njit(nogil=True, cache=True)
def _signed_es(w, a, n):
    """The running-sum value of largest magnitude, first one on ties (fgsea calcES)."""
    k = a.shape[0]
    ns = 0.0
    for pos in a:
        ns += w[pos]
    if ns <= 0:
        return 0.0
    q1 = 1.0 / (n - k)
    q2 = 1.0 / ns
    cur = 0.0
    res = 0.0
    last = -1
    for pos in a:
        cur -= q1 * (pos - last - 1)
        if abs(cur) > abs(res):
            res = cur
        cur += q2 * w[pos]
        if abs(cur) > abs(res):
            res = cur
        last = pos
    return res


@numba.njit(nogil=True, cache=True)
def _exceeds(w, a, n, ns, bounds, csum, ccnt, bound):
    """Does the running sum of sorted set `a` go above `bound`? Chunks whose weight
    cannot lift it above `bound` are skipped whole. Returns (found, position,
    misses before it, summed weight up to it) for the first point found.
    """
    k = a.shape[0]
    q1 = 1.0 / (n - k)
    q2 = 1.0 / ns
    y = 0.0
    x = 0
    idx = 0
    start = 0
    for c in range(bounds.shape[0]):
        end = bounds[c]
        cnt = ccnt[c]
        if q2 * (y + csum[c]) - q1 * x <= bound:
            y += csum[c]
            x += end - start - cnt
        else:
            last = start - 1
            for j in range(idx, idx + cnt):
                pos = a[j]
                y += w[pos]
                x += pos - last - 1
                if q2 * y - q1 * x > bound:
                    return True, pos, x, y
                last = pos
            x += end - 1 - last
        idx += cnt
        start = end
    return False, -1, 0, 0.0


@numba.njit(nogil=True, cache=True)
def _lower_bound(a, v):
    """First index i with a[i] >= v (a sorted)."""
    lo = 0
    hi = a.shape[0]
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid] < v:
            lo = mid + 1
        else:
            hi = mid
    return lo


@numba.njit(nogil=True, cache=True)
def _chunk_of(bounds, v):
    c = 0
    while bounds[c] <= v:
        c += 1
    return c


@numba.njit(nogil=True, cache=True)
def _move(a, i, j, val):
    """Remove a[i] and put val at index j of the result, shifting what lies between."""
    if j > i:
        for t in range(i, j):
            a[t] = a[t + 1]
    else:
        for t in range(i, j, -1):
            a[t] = a[t - 1]
    a[j] = val


@numba.njit(nogil=True, cache=True)
def _perturb(w, a, n, bounds, csum, ccnt, bound, state, si):
    """fgsea's MCMC step: k/10 proposals swapping a random member for a random gene,
    kept only if the set's running sum still goes above `bound`. Returns the number
    of accepted moves. The last point found above `bound` is remembered: while it
    stays above, a proposal is accepted without a scan.
    """
    k = a.shape[0]
    ns = 0.0
    for c in range(csum.shape[0]):
        ns += csum[c]
    q1 = 1.0 / (n - k)
    has_cand = False
    cand = -1
    cand_x = 0
    cand_y = 0.0
    moves = 0
    for _ in range(max(1, int(k * 0.1))):
        old_i = _rand_below(state, si, k)
        old = a[old_i]
        new = _rand_below(state, si, n)
        ins = _lower_bound(a, new)
        if ins < k and a[ins] == new:
            if new == old:
                moves += 1
            continue
        oc = _chunk_of(bounds, old)
        nc = _chunk_of(bounds, new)
        new_i = ins - 1 if ins > old_i else ins
        _move(a, old_i, new_i, new)
        csum[oc] -= w[old]
        ccnt[oc] -= 1
        csum[nc] += w[new]
        ccnt[nc] += 1
        ns += w[new] - w[old]
        if has_cand and old == cand:
            has_cand = False
        if has_cand:
            if old < cand:
                cand_x += 1
                cand_y -= w[old]
            if new < cand:
                cand_x -= 1
                cand_y += w[new]
            if ns > 0 and cand_y / ns - q1 * cand_x > bound:
                moves += 1
                continue
        ok = False
        if ns > 0:
            ok, pos, x, y = _exceeds(w, a, n, ns, bounds, csum, ccnt, bound)
        if ok:
            has_cand, cand, cand_x, cand_y = True, pos, x, y
            moves += 1
            continue
        # reject: undo the swap
        _move(a, new_i, old_i, old)
        csum[oc] += w[old]
        ccnt[oc] += 1
        csum[nc] -= w[new]
        ccnt[nc] -= 1
        ns += w[old] - w[new]
        if has_cand:
            if old < cand:
                cand_x -= 1
                cand_y += w[old]
            if new < cand:
                cand_x += 1
                cand_y -= w[new]
    return moves


@numba.njit(nogil=True, cache=True)
def _stable_argsort(x):
    """Indexes sorting x ascending, ties in index order (fgsea sorts (ES, id) pairs)."""
    order = np.arange(x.shape[0])
    for i in range(1, x.shape[0]):
        o = order[i]
        j = i - 1
        while j >= 0 and x[order[j]] > x[o]:
            order[j + 1] = order[j]
            j -= 1
        order[j + 1] = o
    return order


@numba.njit(nogil=True, cache=True)
def _split_level(w, samples, n, scores, corr, nsc):
    """Record the lower half of the sample's positive ES (and how many of the rest
    have a positive signed ES), then replace it by copies of the upper half."""
    ss = samples.shape[0]
    pes = np.empty(ss)
    positive = np.empty(ss, dtype=np.bool_)
    npos = 0
    for s in range(ss):
        pes[s] = _pos_es(w, samples[s], n)
        positive[s] = _signed_es(w, samples[s], n) > 0
        npos += positive[s]
    order = _stable_argsort(pes)
    for i in range((ss + 1) // 2):
        if positive[order[i]]:
            npos -= 1
        scores[nsc] = pes[order[i]]
        corr[nsc] = npos
        nsc += 1
    k = samples.shape[1]
    new = np.empty((ss, k), dtype=np.int64)
    for r in range(ss):
        # rows 2i, 2i+1 <- i-th best; the last row <- the median set
        src = order[ss - 1 - r // 2] if r < ss - 1 else order[ss // 2]
        for j in range(k):
            new[r, j] = samples[src, j]
    return new, nsc


@numba.njit(nogil=True, cache=True)
def es_ruler(w, k, sample_size, target, seed, eps, max_levels):
    """Adaptive multilevel splitting for random sets of size k (fgsea EsRuler).

    Starts from `sample_size` uniform random sets and keeps splitting until the
    median positive ES reaches `target` (or the levels needed for `eps` are done).
    Returns (scores, corr, stuck): the lower-half positive ES of each level
    (ascending); for each, how many sets above it have a positive signed ES; and
    whether it stopped early because no set could move above the level's bound
    (then p-values beyond the last level are overestimated). `sample_size` must be odd.
    """
    n = w.shape[0]
    ss = sample_size
    half = (ss + 1) // 2
    state = new_streams(seed, ss)
    samples = np.empty((ss, k), dtype=np.int64)
    mark = np.zeros(n, dtype=np.bool_)
    buf = np.empty(k, dtype=np.int64)
    for s in range(ss):
        _draw_distinct(state, s, n, k, buf, mark)
        _sort_ints(buf)
        for j in range(k):
            samples[s, j] = buf[j]
    stop_levels = np.inf
    if eps != 0:
        stop_levels = -math.log2(0.5 * eps)

    scores = np.empty(max_levels * half)
    corr = np.empty(max_levels * half, dtype=np.int64)
    samples, nsc = _split_level(w, samples, n, scores, corr, 0)

    nch = max(1, int(math.sqrt(k)))
    bounds = np.empty(nch, dtype=np.int64)
    csum = np.zeros((ss, nch))
    ccnt = np.zeros((ss, nch), dtype=np.int64)
    col = np.empty(ss, dtype=np.int64)
    done = np.zeros(ss, dtype=np.int64)
    while scores[nsc - 1] <= target - 1e-10 and nsc // half < max_levels:
        # chunk borders: medians of evenly spaced order statistics of the sets
        p = 0
        for i in range(nch - 1):
            p += (k + i) // nch
            for s in range(ss):
                col[s] = samples[s, p]
            _sort_ints(col)
            bounds[i] = col[ss // 2]
        bounds[nch - 1] = n
        for s in range(ss):
            c = 0
            for j in range(nch):
                csum[s, j] = 0.0
                ccnt[s, j] = 0
            for pos in samples[s]:
                while bounds[c] <= pos:
                    c += 1
                csum[s, c] += w[pos]
                ccnt[s, c] += 1
        bound = scores[nsc - 1]
        moves = 0
        while moves < ss * k:  # rounds of one _perturb call per set, as fgsea
            for s in range(ss):
                done[s] = _perturb(w, samples[s], n, bounds, csum[s], ccnt[s], bound, state, s)
            if done.sum() == 0:  # no set can move above the bound: the ruler is stuck
                return scores[:nsc].copy(), corr[:nsc].copy(), True
            moves += done.sum()
        samples, nsc = _split_level(w, samples, n, scores, corr, nsc)
        if nsc // half > stop_levels:
            break
    return scores[:nsc].copy(), corr[:nsc].copy(), False
