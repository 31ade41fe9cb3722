"""R's lowess smoother (stats::lowess, the clowess C routine) as a Numba kernel.

Tricube neighbourhood weights over the ns = f * n nearest points, a local weighted linear fit,
points within `delta` of the last fitted one linearly interpolated, and `nsteps` robustness
passes with bisquare weights of the residuals (6 x median |residual|). Used by limma's voom
(cellmill.stages.statistics.limma.lowess); parity with R in tests/test_pseudobulk_de.py.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def lowest(x, y, n, xs, nleft, nright, w, userw, rw):
    """Local weighted linear fit at xs over x[nleft..nright] (0-based, inclusive), extended to
    the right over ties. Returns (fitted value, ok)."""
    rng = x[n - 1] - x[0]
    h = max(xs - x[nleft], x[nright] - xs)
    h9 = 0.999 * h
    h1 = 0.001 * h
    a = 0.0
    j = nleft
    while j < n:
        w[j] = 0.0
        r = abs(x[j] - xs)
        if r <= h9:
            if r <= h1:
                w[j] = 1.0
            else:
                q = r / h
                q = 1.0 - q * q * q
                w[j] = q * q * q
            if userw:
                w[j] *= rw[j]
            a += w[j]
        elif x[j] > xs:
            break
        j += 1
    nrt = j - 1
    if a <= 0.0:
        return 0.0, False
    # loops fused where one's result does not feed the next (the same operations in the same
    # order as clowess's separate loops: the same bits, fewer passes over the window)
    if h <= 0.0:
        ys = 0.0
        for j in range(nleft, nrt + 1):
            w[j] /= a
            ys += w[j] * y[j]
        return ys, True
    total = a
    a = 0.0
    for j in range(nleft, nrt + 1):
        w[j] /= total
        a += w[j] * x[j]
    b = xs - a
    c = 0.0
    for j in range(nleft, nrt + 1):
        c += w[j] * (x[j] - a) * (x[j] - a)
    ys = 0.0
    if math.sqrt(c) > 0.001 * rng:
        b /= c
        for j in range(nleft, nrt + 1):
            w[j] *= b * (x[j] - a) + 1.0
            ys += w[j] * y[j]
    else:
        for j in range(nleft, nrt + 1):
            ys += w[j] * y[j]
    return ys, True


@numba.njit(nogil=True, cache=True)
def clowess(x, y, f, nsteps, delta):
    """R's clowess on x sorted ascending (0-based transcription of the algorithm)."""
    n = x.shape[0]
    ys = np.empty(n)
    if n < 2:
        ys[:] = y
        return ys
    rw = np.zeros(n)
    res = np.zeros(n)
    ns = max(2, min(n, int(f * n + 1e-7)))
    it = 1
    while it <= nsteps + 1:
        nleft = 0
        nright = ns - 1
        last = -1  # previous estimated point
        i = 0  # current point
        while True:
            if nright < n - 1:
                d1 = x[i] - x[nleft]
                d2 = x[nright + 1] - x[i]
                if d1 > d2:  # the window moves right while that shrinks the radius
                    nleft += 1
                    nright += 1
                    continue
            fit, ok = lowest(x, y, n, x[i], nleft, nright, res, it > 1, rw)
            ys[i] = fit if ok else y[i]
            if last < i - 1:  # skipped points: linear interpolation
                denom = x[i] - x[last]
                for j in range(last + 1, i):
                    alpha = (x[j] - x[last]) / denom
                    ys[j] = alpha * ys[i] + (1.0 - alpha) * ys[last]
            last = i
            cut = x[last] + delta
            i = last + 1
            while i < n:
                if x[i] > cut:
                    break
                if x[i] == x[last]:
                    ys[i] = ys[last]
                    last = i
                i += 1
            i = max(last + 1, i - 1)
            if last >= n - 1:
                break
        for k in range(n):
            res[k] = y[k] - ys[k]
        sc = 0.0
        for k in range(n):
            sc += abs(res[k])
        sc /= n
        if it > nsteps:
            break
        srt = np.sort(np.abs(res))
        m1 = n // 2
        if n % 2 == 0:
            cmad = 3.0 * (srt[m1] + srt[n - m1 - 1])
        else:
            cmad = 6.0 * srt[m1]
        if cmad < 1e-7 * sc:  # residuals effectively zero
            break
        c9 = 0.999 * cmad
        c1 = 0.001 * cmad
        for k in range(n):
            r = abs(res[k])
            if r <= c1:
                rw[k] = 1.0
            elif r <= c9:
                q = r / cmad
                q = 1.0 - q * q
                rw[k] = q * q
            else:
                rw[k] = 0.0
        it += 1
    return ys
