"""Stage `pca`: exact, out-of-core PCA of the scaled variable-gene matrix (Seurat's RunPCA).

A = the QC-passed cells x variable genes matrix of ScaleData (clipped at `pca.clip` from above,
not re-centred), never held for all cells. Two streaming passes:
1. the float64 Gram matrix A^T A (genes x genes), from scaled blocks of one GRANULE of cells
   each. A is dense, but A = Y + 1 z^T with z the scaled value of a zero count and Y sparse
   (nonzero only where the count is), so A^T A = Y^T Y + s z^T + z s^T + N z z^T (s = column sums
   of Y): Y^T Y comes from a hybrid kernel (often-detected genes dense through BLAS syrk, the
   rest as sparse products) and the rank-one terms are added once at the end. Partial sums are
   summed along a fixed binary tree over the granules: granule sums are paired as aligned
   power-of-two ranges of granules, inside a Dask task for the granules of one task and, above
   it, as the tasks' results arrive (fold_aligned), within groups of GROUP_GRANULES granules;
   the groups' sums are added one after the other. The tree does not depend on the task size
   or scheduler, so the Gram matrix (and everything after it) is bit-identical for any of them;
2. after `eigh` (A^T A = V diag(d^2) V^T), the embeddings A V = U d = 1 (z^T V) + Y V from
   the sparse counts (kernels/gram.py project_rows), each block written straight into
   obsm/X_pca (so the n x 50 embeddings are never all in memory).
Output as Seurat: embeddings U d, loadings V, stdev d / sqrt(N - 1). Signs: the loading of the
largest magnitude of every component is made positive (Seurat's signs are arbitrary).
Stored: obsm/X_pca (NaN rows for QC-failed cells), varm/PCs (zero rows for other genes),
uns/pca_stdev.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from cellmill.engine.registry import Context, stage
from cellmill.io.store import GRANULE, Store
from cellmill.kernels.gram import project_rows, shifted_gram, zero_values

log = logging.getLogger("cellmill")

SCALE_FACTOR_KEY = "lognorm_scale_factor"  # uns key written by the normalize stage
# Genes detected in at least this fraction of cells go into the dense (BLAS) part of the Gram
# matrix, the others into the sparse part (kernels/gram.py: shifted_gram). Where the split
# falls changes only the speed (Gram pass at 196k simulated cells, 2 threads: 0.05 14.1 s,
# 0.08 14.6 s, 0.12 12.1-12.8 s, 0.15 13.5 s, 0.2 19.8 s, 0.3 24.1 s; all-dense syrk was 21 s).
DENSE_AT = 0.12


@dataclass
class PCAResult:
    embeddings: np.ndarray  # QC-passed cells x n_components (U d)
    loadings: np.ndarray  # variable genes x n_components (V), rows in `genes` order
    stdev: np.ndarray  # d / sqrt(N - 1)
    genes: np.ndarray  # indices of the variable genes (ascending)
    cells: np.ndarray  # indices of the QC-passed cells (ascending)


@dataclass
class _Scaling:
    """What a task needs to scale a block (small, shipped once per task)."""

    col_of_gene: np.ndarray  # gene -> column in the scaled block, -1 if not variable
    mean: np.ndarray
    sd: np.ndarray
    zero: np.ndarray
    clip: float
    scale_factor: float
    gram_col: np.ndarray  # gene -> column in the Gram pass's order (dense genes first), or -1
    n_dense: int  # genes of the dense part

    def permuted(self):
        """mean, sd and zero in the Gram pass's column order."""
        order = np.empty(len(self.mean), dtype=np.int64)
        cols = self.col_of_gene >= 0
        order[self.gram_col[cols]] = self.col_of_gene[cols]
        return self.mean[order], self.sd[order], self.zero[order], order


def gram_order(genes: np.ndarray, detected: np.ndarray | None, n_cells: int,
               n_genes: int) -> tuple[np.ndarray, int]:
    """gene -> Gram column: the genes detected in >= DENSE_AT of the cells first, each group
    in gene order. `detected`: cells per gene (var n_cells); None puts every gene in the
    dense part."""
    if detected is None:
        dense = np.ones(len(genes), dtype=bool)
    else:
        dense = np.asarray(detected, dtype=np.float64)[genes] >= DENSE_AT * max(n_cells, 1)
    order = np.concatenate([genes[dense], genes[~dense]])
    col = np.full(n_genes, -1, dtype=np.int64)
    col[order] = np.arange(len(order))
    return col, int(dense.sum())


def scaling_inputs(store: Store, clip: float, scale_factor: float):
    """The variable genes (ascending) and their scaling from the hvg stage's var columns."""
    var = store.var()
    missing = [c for c in ("highly_variable", "ln_mean", "ln_std") if c not in var]
    if missing:
        raise RuntimeError(f"{store.path}: var lacks {', '.join(missing)}: run the hvg stage")
    genes = np.flatnonzero(var["highly_variable"].to_numpy().astype(bool))
    if len(genes) == 0:
        raise RuntimeError(f"{store.path}: no highly variable genes")
    mean = var["ln_mean"].to_numpy(np.float64)[genes]
    sd = var["ln_std"].to_numpy(np.float64)[genes]
    sd = np.where(np.isfinite(sd), sd, 0.0)
    col = np.full(store.n_genes, -1, dtype=np.int64)
    col[genes] = np.arange(len(genes))
    detected = var["n_cells"].to_numpy() if "n_cells" in var else None
    gcol, n_dense = gram_order(genes, detected, store.n_cells, store.n_genes)
    return genes, _Scaling(col, mean, sd, zero_values(mean, sd, float(clip)), float(clip),
                           float(scale_factor), gcol, n_dense)


def _granule_rows(rows: np.ndarray, n_gran: int) -> np.ndarray:
    """Boundaries in `rows` (ascending row indices within a block) of its n_gran granules."""
    return np.searchsorted(rows, np.arange(n_gran + 1) * GRANULE)


def _add(a, b):
    """a + b for the in-task tree (a is a fresh partial sum: add in place)."""
    if a is None:
        return b
    if b is None:
        return a
    a += b
    return a


def _right_edge(stack):
    """The sum of a binary counter's partial sums (the tree's right edge)."""
    acc = None
    while stack:
        _, left = stack.pop()
        acc = _add(left, acc)
    return acc


def fold_aligned(parts, group: int | None = None):
    """Sum of `parts` (in order) along the aligned binary tree over their positions, as they
    arrive: subtrees are summed as soon as they are complete (a binary counter), the right
    edge at the end. The same additions in the same order as pairing neighbours level by
    level, with at most one partial sum per level alive. None parts are empty. With `group`:
    one such tree per `group` consecutive parts, the trees' sums added in order (at most one
    partial sum per level of a group's tree, whatever the number of parts)."""
    stack = []  # (leaves covered, partial sum), sizes strictly decreasing
    total, count = None, 0
    for part in parts:
        size = 1
        while stack and stack[-1][0] == size:
            _, left = stack.pop()
            part = _add(left, part)
            size *= 2
        stack.append((size, part))
        count += 1
        if group and count == group:
            total = _add(total, _right_edge(stack))
            count = 0
    return _add(total, _right_edge(stack))


def _tree(part, lo: int, hi: int):
    """Sum of part(g) for lo <= g < hi along the aligned binary tree (None when empty).
    Depth first: at most one partial sum per level is alive."""
    if hi - lo == 1:
        return part(lo)
    mid = (lo + hi) // 2
    return _add(_tree(part, lo, mid), _tree(part, mid, hi))


def _gram_leaf(store: Store, g0: int, g1: int, mask, n_counts, sc: _Scaling):
    """Tree sum of the granule partials of granules g0..g1 (an aligned power-of-two range):
    each a (p + 1) x p array, Y^T Y in the Gram column order (dense block full, sparse x
    dense block below it, sparse x sparse upper triangle) and the column sums of Y in row p."""
    from threadpoolctl import threadpool_limits

    start, stop = g0 * GRANULE, min(g1 * GRANULE, store.n_cells)
    if start >= stop:
        return None
    rows = np.flatnonzero(mask[start:stop])
    if len(rows) == 0:
        return None
    m = store.read_rows(start, stop)
    nc = n_counts[start:stop]
    bounds = _granule_rows(rows, g1 - g0)
    mean, sd, zero, _ = sc.permuted()
    p, nd = len(mean), sc.n_dense

    def part(g):
        a, b = bounds[g - g0], bounds[g - g0 + 1]
        if a == b:
            return None
        acc = np.zeros((p + 1, p))
        dense = np.empty((b - a, nd))
        shifted_gram(m.data, m.indices, m.indptr, rows[a:b], nc, sc.gram_col, nd, mean, sd,
                     sc.clip, sc.scale_factor, zero, dense, acc[:p], acc[p])
        acc[:nd, :nd] += dense.T @ dense  # numpy calls syrk for a^T a
        return acc

    # once per leaf, not per granule: each threadpool_limits scans the loaded libraries
    # (~6 ms; 1.1 CPU s of the 196k Gram pass when it was per granule)
    with threadpool_limits(1, user_api="blas"):
        return _tree(part, g0, g1)


def assemble_gram(acc: np.ndarray, sc: _Scaling, n: int) -> np.ndarray:
    """Z^T Z in the variable genes' order from the tree sum of the granule partials:
    Y^T Y made symmetric, plus s zero^T + zero s^T + n zero zero^T."""
    mean, _, zero, order = sc.permuted()
    p, nd = len(mean), sc.n_dense
    y = acc[:p]
    g = np.empty((p, p))
    g[:nd, :nd] = y[:nd, :nd]
    g[nd:, :nd] = y[nd:, :nd]
    g[:nd, nd:] = y[nd:, :nd].T
    ss = np.triu(y[nd:, nd:])
    g[nd:, nd:] = ss + np.triu(ss, 1).T
    s = acc[p]
    g += np.outer(s, zero) + np.outer(zero, s) + float(n) * np.outer(zero, zero)
    back = np.empty(p, dtype=np.int64)
    back[order] = np.arange(p)
    return g[np.ix_(back, back)]


# Granules per group of the Gram sum: along a binary tree within a group, then group after
# group. A tree over all granules held one 32 MB partial sum (2,000 genes) per level: ~9 at
# 1M cells, the pca stage's growth from 196k. Memory now stops growing past one group.
GROUP_GRANULES = 16


def _leaf_granules(store: Store, block_cells: int | None, memory_bytes: int, workers: int) -> int:
    """Granules per Gram task: a power of two (the tree needs aligned power-of-two ranges)."""
    from cellmill.engine.passes import block_cells_for_budget

    cells = block_cells or block_cells_for_budget(store, memory_bytes, workers=workers)
    g = max(1, int(cells) // GRANULE)
    return min(1 << (g.bit_length() - 1), GROUP_GRANULES)  # a group's tree holds whole tasks


def gram_matrix(store: Store, mask: np.ndarray, sc: _Scaling, n_counts: np.ndarray,
                leaf_granules: int, scheduler=None, progress: bool = False) -> np.ndarray:
    """A^T A over the masked cells, bit-identical for any leaf size (a power of two up to
    GROUP_GRANULES granules) and scheduler."""
    import dask

    if leaf_granules > GROUP_GRANULES or leaf_granules & (leaf_granules - 1):
        raise ValueError(f"leaf of {leaf_granules} granules: a power of two up to "
                         f"{GROUP_GRANULES} is needed")

    from cellmill.engine.schedulers import in_waves

    n_gran = (store.n_cells + GRANULE - 1) // GRANULE
    d_mask, d_nc, d_sc = (dask.delayed(x, pure=True) for x in (mask, n_counts, sc))
    leaf = dask.delayed(_gram_leaf, pure=True)
    leaves = [leaf(store, g, g + leaf_granules, d_mask, d_nc, d_sc)
              for g in range(0, n_gran, leaf_granules)]
    # leaves computed one per worker at a time and folded here as they come: the partial
    # sums alive are one per tree level plus those in flight, whatever Dask's task order
    g = fold_aligned(in_waves(leaves, scheduler, "pca gram", progress, per_worker=1),
                     group=GROUP_GRANULES // leaf_granules)
    if g is None:
        raise RuntimeError(f"{store.path}: no QC-passed cells for PCA")
    return assemble_gram(g, sc, int(mask.sum()))


def _project_block(start, stop, m, cells, n_counts, sc: _Scaling, v: np.ndarray):
    """Embeddings Z V of one block's (masked) cells, from the sparse counts (kernels/gram.py
    project_rows: no dense scaled block)."""
    nc = n_counts[start:stop][(cells - start).astype(np.int64)]
    out = np.empty((len(cells), v.shape[1]))
    project_rows(m.data, m.indices, m.indptr.astype(np.int64), nc, sc.col_of_gene, sc.mean,
                 sc.sd, sc.clip, sc.scale_factor, sc.zero, np.ascontiguousarray(v), out)
    return out


def orient(v: np.ndarray) -> np.ndarray:
    """Flip each column so that its entry of largest magnitude (first on ties) is positive."""
    pick = np.argmax(np.abs(v), axis=0)
    signs = np.where(v[pick, np.arange(v.shape[1])] < 0, -1.0, 1.0)
    return v * signs


def _fit(store: Store, n_components: int, clip: float, scale_factor: float, mask,
         block_cells: int | None, memory_bytes: int, workers: int, scheduler, progress: bool):
    """Gram pass and eigendecomposition: (loadings v, singular values d, scaling, leaf)."""
    import scipy.linalg
    from threadpoolctl import threadpool_limits

    genes, sc = scaling_inputs(store, clip, scale_factor)
    n_counts = np.asarray(store.obs_column("n_counts"), dtype=np.float64)
    n = int(mask.sum())
    leaf = _leaf_granules(store, block_cells, memory_bytes, workers)
    nc = min(n_components, len(genes), n)
    # one BLAS thread per task: the tasks are the parallelism (and OpenBLAS threads spinning
    # against busy cores made eigh ten times slower in measurements)
    with threadpool_limits(1, user_api="blas"):
        g = gram_matrix(store, mask, sc, n_counts, leaf, scheduler=scheduler, progress=progress)
        p = g.shape[0]
        # only the top nc eigenpairs (MRRR); eigenvalues ascending
        lam, vec = scipy.linalg.eigh(g, subset_by_index=(p - nc, p - 1), driver="evr")
    lam, vec = lam[::-1], vec[:, ::-1]
    d = np.sqrt(np.clip(lam, 0.0, None))
    return orient(vec), d, genes, sc, n_counts, leaf


def _mask(store: Store, mask) -> np.ndarray:
    from cellmill.engine.cells import qc_passed

    return np.asarray(qc_passed(store) if mask is None else mask, dtype=bool)


def compute_pca(store: Store, n_components: int = 50, clip: float = 10.0,
                scale_factor: float = 1e4, mask: np.ndarray | None = None,
                block_cells: int | None = None, memory_bytes: int = 2 << 30, workers: int = 2,
                scheduler=None, progress: bool = False) -> PCAResult:
    """Exact PCA of the scaled variable genes of the masked (default: QC-passed) cells, with
    the embeddings in memory (the pca stage streams them into the store instead)."""
    from cellmill.engine.passes import map_blocks

    mask = _mask(store, mask)
    v, d, genes, sc, n_counts, leaf = _fit(store, n_components, clip, scale_factor, mask,
                                           block_cells, memory_bytes, workers, scheduler,
                                           progress)
    parts = map_blocks(store, _project_block, n_counts, sc, v, mask=mask,
                       block_cells=leaf * GRANULE, scheduler=scheduler, desc="pca embed",
                       progress=progress)
    emb = np.concatenate(parts, axis=0) if parts else np.empty((0, v.shape[1]))
    n = int(mask.sum())
    return PCAResult(emb, v, d / np.sqrt(max(1, n - 1)), genes, np.flatnonzero(mask))


def _project_to_array(start, stop, m, cells, n_counts, sc: _Scaling, v: np.ndarray, path):
    """Write one block's embeddings (NaN for cells outside the mask) into rows start:stop of
    the zarr array at `path`; blocks are chunk-aligned, so writers never share a chunk."""
    import zarr

    from cellmill.io.store import write_row_chunk

    out = np.full((stop - start, v.shape[1]), np.nan)
    out[cells - start] = _project_block(start, stop, m, cells, n_counts, sc, v)
    write_row_chunk(zarr.open_array(path, mode="r+"), start, out)
    return len(cells)


def pca_to_store(store: Store, n_components: int = 50, clip: float = 10.0,
                 scale_factor: float = 1e4, mask: np.ndarray | None = None,
                 block_cells: int | None = None, memory_bytes: int = 2 << 30, workers: int = 2,
                 scheduler=None, progress: bool = False) -> PCAResult:
    """compute_pca whose embeddings go block by block into obsm/X_pca (all cells, NaN outside
    the mask) and are never all in memory; the result's `embeddings` is empty."""
    from cellmill.engine.passes import map_blocks

    mask = _mask(store, mask)
    v, d, genes, sc, n_counts, leaf = _fit(store, n_components, clip, scale_factor, mask,
                                           block_cells, memory_bytes, workers, scheduler,
                                           progress)
    rows = leaf * GRANULE
    path = store.begin_array("obsm", "X_pca", (store.n_cells, v.shape[1]), np.float64, rows,
                             fill_value=np.nan)
    map_blocks(store, _project_to_array, n_counts, sc, v, str(path), mask=mask,
               block_cells=rows, scheduler=scheduler, desc="pca embed", progress=progress)
    store.commit_array("obsm", "X_pca")
    n = int(mask.sum())
    return PCAResult(np.empty((0, v.shape[1])), v, d / np.sqrt(max(1, n - 1)), genes,
                     np.flatnonzero(mask))


def _params(cfg):
    return {"n_components": cfg.pca.n_components, "clip": cfg.pca.clip,
            "scale_factor": cfg.normalize.scale_factor}


@stage("pca", after=("hvg",), params=_params)
def run_pca(ctx: Context) -> None:
    store = ctx.store
    c = ctx.cfg.compute
    sf = ctx.cfg.normalize.scale_factor
    if store.has("uns", SCALE_FACTOR_KEY):  # the one the normalize stage really used
        sf = float(store.read_array("uns", SCALE_FACTOR_KEY)[0])
    res = pca_to_store(store, ctx.cfg.pca.n_components, ctx.cfg.pca.clip, sf,
                       memory_bytes=c.memory_bytes,
                       workers=c.workers, scheduler=ctx.scheduler(), progress=ctx.progress)
    nc = res.loadings.shape[1]
    pcs = np.zeros((store.n_genes, nc))
    pcs[res.genes] = res.loadings
    store.write_array("varm", "PCs", pcs)
    store.write_array("uns", "pca_stdev", res.stdev)
    log.info("pca: %d components of %d genes x %d cells; stdev %s", nc, len(res.genes),
             len(res.cells), np.array2string(res.stdev[:5], precision=3))
    from cellmill.io.heap import release_heap

    del res, pcs
    release_heap()
