"""Stage `cluster` (Seurat's FindClusters). `leiden` by default with the graph streamed from
the store (clustering/streamed.py: local moving block by block, then leidenalg on the graph of
those communities); `cluster.leiden_backend = "igraph"` or `"leidenalg"`, and `louvain`, run
on the whole graph in memory (clustering/in_memory.py). Stored: obs/cluster (categorical
"0".."K-1", NaN for failed cells) and tables/clusters.csv (cell, cluster) for QC-passed cells.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellmill.engine.registry import Context, stage
from cellmill.io.heap import release_heap
from cellmill.stages.clustering.in_memory import N_STARTS, cluster_labels

log = logging.getLogger("cellmill")
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
    from cellmill.engine.cells import qc_passed
    from cellmill.engine.tables import write_cell_table

    cfg, store = ctx.cfg.cluster, ctx.store
    cells = np.flatnonzero(qc_passed(store))
    if cfg.algorithm == "leiden" and cfg.leiden_backend == "streamed":
        from cellmill.io.scratch import scratch_dir
        from cellmill.stages.clustering.streamed import streamed_cluster_labels

        labels = streamed_cluster_labels(store, cells, cfg.resolution, cfg.seed,
                                         cfg.n_iterations, ctx.progress,
                                         scratch=scratch_dir(store.path, "cluster"),
                                         threads=ctx.cfg.compute.local_workers)
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

