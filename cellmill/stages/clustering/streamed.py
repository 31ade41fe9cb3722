"""Leiden clustering with the graph streamed from the store (`cluster.leiden_backend = "streamed"`).

igraph and leidenalg need the whole graph in memory (~60 bytes per SNN edge with their
indexes: 0.7 GB at 196k cells, 1 GB at 400k). Here the big graph is only ever read a block of
rows at a time:

1. local moving (the first level of Louvain and Leiden) over obsp/snn among the QC-passed
   cells, in node order, block by block, with O(cells) state: each node goes to the
   neighbouring community of largest modularity gain, and the neighbours of a node that moved
   are visited again, until fewer than MOVE_TOL of the nodes move in a sweep (with
   MOVE_TOL = 0: until none is left to visit, a local optimum where no single move raises
   the modularity);
2. the communities become the nodes of an aggregated graph (one more streaming sweep; edges
   inside a community become self-loops, so every partition of it has the modularity of the
   same partition of the cells);
3. leidenalg's Leiden (RBConfigurationVertexPartition: modularity with resolution, seeded,
   `n_iterations`) on that small graph.

The objective is the one of the in-memory backends; the partition is a coarsening of step 1's
communities (Leiden on the whole graph may also split them, which its refinement does rarely
at this resolution). Blocks are a fixed number of rows and are visited in order on one thread,
so the result does not depend on the memory budget, worker count or scheduler; the next block
is decoded on a second thread while one is processed. The stage first decodes the graph once
into raw scratch files beside the store and reads those through mappings (``GraphRows.spill``):
decoding it again for every sweep was most of the time.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from cellmill.io.progress import bar
from cellmill.kernels.moving import community_edges, move_rows, row_strengths

ROWS = 32_768  # rows per block: fixed, so sums are added in the same order for any budget
MAX_SWEEPS = 200  # a safeguard only: every move raises the modularity, so sweeps end
# Sweeps stop once fewer than this fraction of the nodes moved: the long tail after that is
# mostly whole communities migrating node by node (at 400k cells: 120 sweeps to the exact local
# optimum, 35 to this point), which Leiden on the community graph does in one step.
MOVE_TOL = 1e-3
DENSE_PAIRS = 1 << 22  # community pairs summed in a dense array (32 MB) below this many


class GraphRows:
    """Row blocks of slot/name among `cells` (ascending), renumbered to nodes 0..N-1.

    The rows of other cells must be empty and no row may point to them (the neighbors
    stage writes obsp/snn so): then the entries of cells[p0:p1] are one contiguous range."""

    def __init__(self, store, cells: np.ndarray, slot: str = "obsp", name: str = "snn"):
        self.store, self.slot, self.name = store, slot, name
        self.cells = np.asarray(cells, dtype=np.int64)
        indptr = store.sparse_indptr(slot, name)
        n_cells = len(indptr) - 1
        self.n = len(self.cells)
        lengths = indptr[self.cells + 1] - indptr[self.cells]
        if int(lengths.sum()) != int(indptr[-1]):
            raise ValueError(f"{store.path}: {slot}/{name} has entries in rows of cells "
                             "outside the clustered ones")
        self.ptr = np.zeros(self.n + 1, dtype=np.int64)  # node -> its first entry
        self.ptr[:-1] = indptr[self.cells]
        self.ptr[-1] = indptr[-1]
        self.rank = None
        if self.n != n_cells:
            self.rank = np.full(n_cells, -1, dtype=np.int32)
            self.rank[self.cells] = np.arange(self.n, dtype=np.int32)
        self._mapped = None  # (node indices, weights) of all entries once `spill` wrote them

    def spill(self, root: Path, threads: int = 1) -> None:
        """Decode the entries once into raw files under `root` (made; the caller removes it),
        then read them through mappings: the local moving's sweeps (30 or so) take views
        instead of decoding the graph each time (196k cells: 4.7 of the 6.1 s). Pages are
        handed back block by block, so memory does not grow with the graph. The same blocks
        either way. Blocks are decoded and written by `threads` threads (each to its own
        place in the files)."""
        from cellmill.io.scratch import Mapped, write_raw

        root.mkdir(parents=True, exist_ok=True)
        nnz = int(self.ptr[-1])

        def one(p0: int) -> None:
            a, b = int(self.ptr[p0]), int(self.ptr[min(p0 + ROWS, self.n)])
            idx, data = self._entries(a, b)
            write_raw(root / "snn.idx", idx.astype(np.int32), 4 * a)
            write_raw(root / "snn.w", data, 8 * a)

        with ThreadPoolExecutor(max(1, threads)) as pool:
            list(pool.map(one, range(0, self.n, ROWS)))
        self._mapped = (Mapped(root / "snn.idx", np.int32, (nnz,)),
                        Mapped(root / "snn.w", np.float64, (nnz,)))

    def read(self, p0: int, p1: int):
        """Rows p0..p1 as (p0, indptr, node indices, weights)."""
        a, b = int(self.ptr[p0]), int(self.ptr[p1])
        if self._mapped is not None:
            idx, data = self._mapped[0].array[a:b], self._mapped[1].array[a:b]
        else:
            idx, data = self._entries(a, b)
        return p0, self.ptr[p0: p1 + 1] - a, idx, data

    def _release(self, p0: int, p1: int) -> None:
        """Hand back the mapped pages of rows p0..p1 (nothing when not spilled)."""
        if self._mapped is not None:
            a, b = int(self.ptr[p0]), int(self.ptr[p1])
            self._mapped[0].release(4 * a, 4 * b)
            self._mapped[1].release(8 * a, 8 * b)

    def _entries(self, a: int, b: int):
        idx, data = self.store.sparse_entries(self.slot, self.name, a, b)
        if self.rank is not None:
            idx = self.rank[idx]
            if len(idx) and idx.min() < 0:
                raise ValueError(f"{self.store.path}: {self.slot}/{self.name} points to cells "
                                 "outside the clustered ones")
        return idx, np.asarray(data, dtype=np.float64)

    def blocks(self, want=None, desc: str = "", progress: bool = False):
        """Every block in order (or those for which want(p0, p1) is true), the next one read
        ahead on a second thread."""
        spans = [(p0, min(p0 + ROWS, self.n)) for p0 in range(0, self.n, ROWS)]
        if want is not None:
            spans = [s for s in spans if want(*s)]
        with ThreadPoolExecutor(1) as pool:
            ahead = pool.submit(self.read, *spans[0]) if spans else None
            for i in bar(range(len(spans)), desc=desc, enabled=progress):
                block = ahead.result()
                ahead = pool.submit(self.read, *spans[i + 1]) if i + 1 < len(spans) else None
                yield block
                del block
                self._release(*spans[i])


def local_moving(rows: GraphRows, resolution: float, progress: bool = False):
    """Step 1: community labels (0..C-1) and the node strengths."""
    n = rows.n
    k = np.zeros(n)
    for p0, ip, idx, data in rows.blocks(desc="graph strengths", progress=progress):
        row_strengths(ip, idx, data, p0, k)
    two_m = float(k.sum())
    labels = np.arange(n, dtype=np.int64)
    if two_m <= 0.0:
        return labels, k
    comm = k.copy()
    dirty = np.ones(n, dtype=bool)
    w = np.zeros(n)
    touched = np.empty(n, dtype=np.int64)
    gamma_2m = float(resolution) / two_m
    for sweep in range(MAX_SWEEPS):
        moves = 0
        for p0, ip, idx, data in rows.blocks(lambda a, b: dirty[a:b].any(),
                                             desc=f"local moving {sweep + 1}",
                                             progress=progress):
            moves += move_rows(ip, idx, data, p0, labels, k, comm, gamma_2m, dirty, w, touched)
        if not dirty.any() or moves < MOVE_TOL * n:
            break
    _, inv = np.unique(labels, return_inverse=True)
    return inv.ravel().astype(np.int64), k


def aggregate(rows: GraphRows, labels: np.ndarray, progress: bool = False):
    """Step 2: the community graph as undirected edges (E x 2, a <= b) and their weights."""
    n_comm = int(labels.max()) + 1 if len(labels) else 0
    dense = n_comm * n_comm <= DENSE_PAIRS
    keys = np.empty(0, dtype=np.int64)
    weights = np.zeros(n_comm * n_comm if dense else 0)
    for p0, ip, idx, data in rows.blocks(desc="aggregate", progress=progress):
        a, b, w = community_edges(ip, idx, data, p0, labels)
        if dense:  # few communities: a pair's weight at index a * n_comm + b
            weights += np.bincount(a * n_comm + b, weights=w, minlength=len(weights))
            continue
        keys, inv = np.unique(np.concatenate([keys, a * n_comm + b]), return_inverse=True)
        weights = np.bincount(inv.ravel(), weights=np.concatenate([weights, w]),
                              minlength=len(keys))
    if dense:
        keys = np.flatnonzero(weights)
        weights = weights[keys]
    edges = np.column_stack([keys // max(n_comm, 1), keys % max(n_comm, 1)])
    return n_comm, edges, weights


def streamed_leiden(rows: GraphRows, resolution: float = 0.3, seed: int = 0,
                    n_iterations: int = -1, progress: bool = False):
    """Raw community membership of the nodes (0..K-1) and its modularity with resolution."""
    import leidenalg as la

    from cellmill.stages.clustering.in_memory import _igraph

    level1, _ = local_moving(rows, resolution, progress)
    n_comm, edges, weights = aggregate(rows, level1, progress)
    g = _igraph(n_comm, edges)
    # leidenalg, not igraph's community_leiden: the latter misjudges the self-loops that carry
    # the weight inside the communities (measured on PBMC: modularity 0.873 against 0.9015)
    part = la.find_partition(g, la.RBConfigurationVertexPartition, weights=weights,
                             resolution_parameter=resolution, n_iterations=n_iterations,
                             seed=seed)
    top = np.asarray(part.membership, dtype=np.int64)
    q = g.modularity(list(top), weights=weights, resolution=resolution)
    return top[level1], q


def rows_of(rows: GraphRows, nodes) -> sp.csr_matrix:
    """N x N CSR holding only the rows of `nodes` (the others empty): what Seurat's
    GroupSingletons reads for the singleton cells."""
    nodes = sorted(int(i) for i in nodes)
    ip = np.zeros(rows.n + 1, dtype=np.int64)
    parts_i, parts_d = [], []
    for i in nodes:
        _, _, idx, data = rows.read(i, i + 1)
        ip[i + 1] = len(idx)
        parts_i.append(idx)
        parts_d.append(data)
    np.cumsum(ip, out=ip)
    idx = np.concatenate(parts_i) if nodes else np.empty(0, np.int32)
    data = np.concatenate(parts_d) if nodes else np.empty(0)
    return sp.csr_matrix((data, idx, ip), shape=(rows.n, rows.n))


def streamed_cluster_labels(store, cells: np.ndarray, resolution: float = 0.3, seed: int = 0,
                            n_iterations: int = -1, progress: bool = False,
                            scratch: Path | None = None, threads: int = 1) -> np.ndarray:
    """Final labels of `cells` as cluster_labels gives them (renumbered by size, singletons
    grouped as Seurat does), with the graph streamed from the store, or decoded once into
    raw files under `scratch` (removed on return; by `threads` threads) and read from there
    (the same labels)."""
    from cellmill.stages.clustering.in_memory import group_singletons, order_by_size

    rows = GraphRows(store, cells)
    try:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)  # a killed run's
            rows.spill(scratch, threads)
        raw, _ = streamed_leiden(rows, resolution, seed, n_iterations, progress)
        labels = order_by_size(raw)
        single = np.flatnonzero(np.bincount(labels)[labels] == 1)
        return group_singletons(labels, lambda: rows_of(rows, single))
    finally:
        rows._mapped = None
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
