"""Gene-wise weighted least squares (limma's lmFit with weights) as a Numba kernel.

Each gene has its own weights, so each needs its own factorisation of a small (samples x
coefficients) matrix. numpy's batched QR calls LAPACK once per gene (with its workspace
queries) and holds no fewer temporaries; here each gene is a Householder QR of a few dozen
numbers on the stack of the loop, with the GIL released (the pseudobulk contrasts run on
threads). The design must have full column rank (limma.check_design refuses the others).
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def wls_fit(design, expr, weights):
    """For each gene g (rows of expr and weights, samples in columns): the least-squares fit of
    expr[g] on design with weights[g]. Returns coefficients (genes x p), stdev_unscaled
    (genes x p: sqrt of the diagonal of (X' W X)^-1) and sigma (genes: sqrt of the weighted
    residual sum of squares over n - p)."""
    n_genes, n = expr.shape
    p = design.shape[1]
    coef = np.empty((n_genes, p))
    stdev = np.empty((n_genes, p))
    sigma = np.empty(n_genes)
    xw = np.empty((n, p))
    a = np.empty((n, p))  # factorised in place: R above the diagonal, Householder below
    yw = np.empty(n)
    qty = np.empty(n)
    rinv = np.empty((p, p))
    for g in range(n_genes):
        for i in range(n):
            s = math.sqrt(weights[g, i])
            yw[i] = expr[g, i] * s
            qty[i] = yw[i]
            for j in range(p):
                xw[i, j] = design[i, j] * s
                a[i, j] = xw[i, j]
        for k in range(p):
            norm = 0.0
            for i in range(k, n):
                norm += a[i, k] * a[i, k]
            norm = math.sqrt(norm)
            alpha = -norm if a[k, k] >= 0.0 else norm
            a[k, k] -= alpha  # v = a[k:, k]; H = I - 2 v v' / (v' v)
            vv = 0.0
            for i in range(k, n):
                vv += a[i, k] * a[i, k]
            if vv > 0.0:
                for j in range(k + 1, p):
                    dot = 0.0
                    for i in range(k, n):
                        dot += a[i, k] * a[i, j]
                    f = 2.0 * dot / vv
                    for i in range(k, n):
                        a[i, j] -= f * a[i, k]
                dot = 0.0
                for i in range(k, n):
                    dot += a[i, k] * qty[i]
                f = 2.0 * dot / vv
                for i in range(k, n):
                    qty[i] -= f * a[i, k]
            a[k, k] = alpha
        for j in range(p - 1, -1, -1):  # R coef = Q'y
            s = qty[j]
            for k in range(j + 1, p):
                s -= a[j, k] * coef[g, k]
            coef[g, j] = s / a[j, j]
        rinv[:] = 0.0
        for c in range(p):  # R^-1, upper triangular, column by column
            for j in range(c, -1, -1):
                s = 1.0 if j == c else 0.0
                for k in range(j + 1, c + 1):
                    s -= a[j, k] * rinv[k, c]
                rinv[j, c] = s / a[j, j]
        for j in range(p):
            s = 0.0
            for c in range(p):
                s += rinv[j, c] * rinv[j, c]
            stdev[g, j] = math.sqrt(s)
        rss = 0.0
        for i in range(n):
            r = yw[i]
            for j in range(p):
                r -= xw[i, j] * coef[g, j]
            rss += r * r
        sigma[g] = math.sqrt(rss / (n - p))
    return coef, stdev, sigma
