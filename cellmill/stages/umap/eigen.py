"""Largest eigenpairs of a symmetric operator with the Krylov basis on disk (the streamed UMAP's
spectral start).

ARPACK keeps its Lanczos basis in memory: 32 vectors of n float64, 256 MB at 1M cells, the
largest part of the UMAP stage's peak. Here the basis is a raw scratch file (written with
pwrite, read through a mapping whose pages are handed back a block at a time: the page cache
holds it, not the process), used a block of rows at a time, so memory holds a few n-vectors
whatever the basis size.

The method is the Krylov-Schur restart of a Lanczos process (Stewart 2001; for symmetric
operators the same as thick-restart Lanczos, Wu & Simon 2000): grow the basis to `m` vectors
with full reorthogonalisation (classical Gram-Schmidt, twice), take the Ritz pairs of the
projected m x m matrix, stop when the wanted ones have residual <= tol |eigenvalue| (ARPACK's
test), else keep the best `keep` Ritz vectors and the residual and grow again. Sums run over
fixed row blocks in a fixed order on one BLAS thread, so the result does not depend on the
worker count.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

ROWS = 32_768  # rows of the basis read at a time (33 vectors: 8.6 MB)
EPS23 = np.finfo(float).eps ** (2 / 3)  # ARPACK's floor on |eigenvalue| in its test


class ArpackLikeError(RuntimeError):
    """No convergence within the allowed operator products, or a start vector whose Krylov
    space has fewer than k dimensions."""


class _Basis:
    """Basis vectors 0..m laid out by row block: block b holds rows b*ROWS.. of vector 0,
    then of vector 1, ..., so a block of rows of the first vectors is one contiguous range.
    The basis is a raw float64 file, mapped (``io.scratch.Mapped``) and written at offsets
    (``write_raw``; one page cache): a block is a view of the mapping whose pages are handed
    back when the next block is taken, so the process holds one block, not the basis.
    Reading the file into a buffer instead ran at ~2 GB/s: 85 of the ~90 ms an
    orthogonalisation took at 196k cells; through the mapping a pass over the basis is ~2.5
    ms (the spectral start at 196k: 37.9 -> 11.1 s)."""

    def __init__(self, path: Path, n: int, m: int):
        from cellmill.io.scratch import Mapped, sized_raw

        self.path, self.n, self.m = Path(path), n, m
        self.rows = min(ROWS, max(n, 1))
        self.spans = [(a, min(a + self.rows, n)) for a in range(0, n, self.rows)]
        size = (m + 1) * self.rows * len(self.spans)  # values; the last block padded
        sized_raw(self.path, 8 * size)
        self.mapped = Mapped(self.path, np.float64, (size,))
        self._taken = None  # the byte range of the block last handed out

    def _at(self, blk: int, j: int) -> int:
        return 8 * self.rows * ((self.m + 1) * blk + j)

    def _put_rows(self, blk: int, j: int, values: np.ndarray) -> None:
        from cellmill.io.scratch import write_raw

        write_raw(self.path, np.asarray(values, dtype=np.float64), self._at(blk, j))

    def put(self, j: int, vec: np.ndarray) -> None:
        vec = np.ascontiguousarray(vec, dtype=np.float64)
        for blk, (a, b) in enumerate(self.spans):
            self._put_rows(blk, j, vec[a:b])

    def block(self, blk: int, cols: int) -> np.ndarray:
        """Block blk of vectors 0..cols-1 as cols x rows, a view valid until the next call
        (the pages of the previous block are handed back)."""
        a, b = self.spans[blk]
        if self._taken is not None:
            self.mapped.release(*self._taken)
        at = self._at(blk, 0)
        self._taken = (at, at + cols * self.rows * 8)
        view = self.mapped.array[at // 8:at // 8 + cols * self.rows]
        return view.reshape(cols, self.rows)[:, :b - a]

    def orthogonalise(self, w: np.ndarray, cols: int) -> np.ndarray:
        """w minus its projection on vectors 0..cols-1 (in place; twice, as DGKS), and the
        coefficients. Three passes over the basis: project, subtract + project again,
        subtract."""
        h1 = np.zeros(cols)
        for blk, (a, b) in enumerate(self.spans):
            h1 += self.block(blk, cols) @ w[a:b]
        h2 = np.zeros(cols)
        for blk, (a, b) in enumerate(self.spans):
            v = self.block(blk, cols)
            w[a:b] -= h1 @ v
            h2 += v @ w[a:b]
        for blk, (a, b) in enumerate(self.spans):
            w[a:b] -= h2 @ self.block(blk, cols)
        return h1 + h2

    def combine(self, cols: int, y: np.ndarray, out: _Basis | None = None):
        """Vectors 0..cols-1 times y (cols x p): into `out`'s vectors 0..p-1, or returned
        (n x p) when out is None."""
        res = np.empty((self.n, y.shape[1])) if out is None else None
        for blk, (a, b) in enumerate(self.spans):
            part = y.T @ self.block(blk, cols)  # p x rows
            if out is None:
                res[a:b] = part.T
            else:
                for j in range(y.shape[1]):
                    out._put_rows(blk, j, part[j])
        return res

    def close(self) -> None:
        self._taken = self.mapped = None
        self.path.unlink(missing_ok=True)


def largest_eigenpairs(matvec, n: int, k: int, root: Path, m: int = 32, tol: float = 1e-4,
                       v0: np.ndarray | None = None, max_products: int | None = None,
                       keep: int | None = None):
    """The k largest (algebraic) eigenvalues of the symmetric n x n operator `matvec` and
    their eigenvectors (n x k), largest first, with a basis of `m` vectors as files under
    `root` (removed before returning). Start vector v0 (default: ones, as umap-learn gives
    ARPACK). Raises ArpackLikeError past max_products products (default 5 n, ARPACK's
    maxiter as umap-learn sets it)."""
    m = min(m, n)
    if not 0 < k < m:
        raise ValueError(f"need 0 < k < m (k={k}, m={m}, n={n})")
    # at least one new vector per restart (keep < m), else the basis would never grow
    keep = min(keep or max(k + 1, (m + k) // 2), m - 1)
    max_products = max_products or 5 * n
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    bases = [_Basis(root / "krylov-a.f64", n, m), _Basis(root / "krylov-b.f64", n, m)]
    basis = bases[0]
    v = np.ones(n) if v0 is None else np.array(v0, dtype=np.float64)
    v /= np.linalg.norm(v)
    basis.put(0, v)
    t = np.zeros((m + 1, m))  # column j: coefficients of A v_j on v_0..v_j+1
    j, size, products = 0, m, 0
    try:
        while True:
            while j < size:
                w = np.array(matvec(v), dtype=np.float64).ravel()
                products += 1
                h = basis.orthogonalise(w, j + 1)
                beta = float(np.linalg.norm(w))
                t[:j + 1, j] = h
                t[j + 1, j] = beta
                if beta <= 1e-12 * max(float(np.abs(h).max()), 1.0):
                    size = j + 1  # an invariant subspace: its Ritz pairs are exact
                    break
                v = w / beta
                basis.put(j + 1, v)
                j += 1
            # the projected matrix from its upper triangle (below it: the betas)
            s = np.triu(t[:size, :size])
            s = s + np.triu(s, 1).T
            theta, y = np.linalg.eigh(s)
            order = np.argsort(-theta, kind="stable")
            theta, y = theta[order], y[:, order]
            if size < m:
                if size < k:
                    raise ArpackLikeError(f"invariant subspace of dimension {size} < {k}")
                return theta[:k], basis.combine(size, y[:, :k])
            resid = np.abs(t[m, m - 1] * y[m - 1, :k])
            if (resid <= tol * np.maximum(np.abs(theta[:k]), EPS23)).all():
                return theta[:k], basis.combine(m, y[:, :k])
            if products >= max_products:
                raise ArpackLikeError(f"no convergence in {products} operator products")
            # restart: the `keep` best Ritz vectors, then the residual direction; their
            # couplings to it are recomputed by the next projection
            other = bases[1] if basis is bases[0] else bases[0]
            basis.combine(m, y[:, :keep], out=other)
            other.put(keep, v)
            t = np.zeros((m + 1, m))
            t[:keep, :keep] = np.diag(theta[:keep])
            basis, j = other, keep
    finally:
        for b in bases:
            b.close()
