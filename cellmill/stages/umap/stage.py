"""Stage `umap` (Seurat's RunUMAP): umap-learn's method on the PCs of the QC-passed cells;
spectral init, min_dist 0.3, 200 epochs when N > 10,000 else 500, seeded. By default with the
graph on disk (umap/streamed.py) and the batch optimiser on all workers (`umap.optimizer`);
`umap.backend = "umap-learn"` runs umap-learn in memory (umap/in_memory.py). The streamed
graph's kNN search follows neighbors.method (exact, or NN-descent past its crossover); the
stage's record says which. Stored: obsm/X_umap (NaN rows for failed cells).
"""

from __future__ import annotations

import logging

import numpy as np

from cellmill.engine.cells import passed_pcs, write_all_cells
from cellmill.engine.registry import Context, stage
from cellmill.io.heap import release_heap
from cellmill.stages.umap.in_memory import umap_embedding

log = logging.getLogger("cellmill")
def _umap_params(cfg):
    u = cfg.umap
    return {"n_neighbors": u.n_neighbors, "min_dist": u.min_dist, "seed": u.seed,
            "n_epochs": u.n_epochs, "n_pcs": cfg.neighbors.n_pcs, "metric": "cosine",
            "backend": u.backend, "knn_method": cfg.neighbors.method,
            # only the streamed backend has a choice of optimiser
            "optimizer": u.optimizer if u.backend == "streamed" else None}


@stage("umap", after=("pca",), params=_umap_params)
def run_umap(ctx: Context) -> dict:
    u, store = ctx.cfg.umap, ctx.store
    record: dict = {}
    n_pcs = ctx.cfg.neighbors.n_pcs
    if u.backend == "streamed":
        from cellmill.engine.cells import obsm_row_blocks, qc_passed
        from cellmill.io.scratch import scratch_dir
        from cellmill.stages.umap.streamed import umap_streamed

        cells = np.flatnonzero(qc_passed(store))
        # a loader, not the PCs: read again where needed, so that no copy is held while the
        # kNN search runs (its peak sets the stage's)
        emb = umap_streamed(lambda: passed_pcs(store, n_pcs)[1], u.n_neighbors, u.min_dist,
                            u.seed, u.n_epochs, scratch=scratch_dir(store.path, "umap"),
                            scheduler=ctx.scheduler(), progress=ctx.progress, optimizer=u.optimizer,
                            knn_method=ctx.cfg.neighbors.method, record=record,
                            memory_bytes=ctx.cfg.compute.memory_bytes, n=len(cells),
                            point_blocks=lambda: obsm_row_blocks(store, "X_pca", cells,
                                                                 n_pcs))
    else:
        cells, pcs = passed_pcs(store, n_pcs)
        emb = umap_embedding(pcs, u.n_neighbors, u.min_dist, u.seed, u.n_epochs,
                             scheduler=ctx.scheduler(), progress=ctx.progress)
        del pcs
    write_all_cells(store, "obsm", "X_umap", emb, cells, np.nan)
    release_heap()
    return record
