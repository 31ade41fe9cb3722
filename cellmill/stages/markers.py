"""Stage `markers` (Seurat's FindAllMarkers on the QC-passed cells; the method is
stages/shared/findmarkers.py, shared with the gsea stage)."""

from __future__ import annotations

import logging

from cellmill.config import Config
from cellmill.engine.registry import Context, stage
from cellmill.stages.shared.findmarkers import find_all_markers

log = logging.getLogger("cellmill")

def _params(cfg: Config) -> dict:
    m = cfg.markers
    return {"logfc_threshold": m.logfc_threshold, "min_pct": m.min_pct, "only_pos": m.only_pos,
            "return_thresh": m.return_thresh, "min_cells_group": m.min_cells_group,
            "scale_factor": cfg.normalize.scale_factor}


@stage("markers", after=("qc", "cluster"), params=_params)
def run_markers(ctx: Context) -> None:
    from cellmill.engine.tables import write_table

    cfg, m = ctx.cfg, ctx.cfg.markers
    table = find_all_markers(ctx.store, logfc_threshold=m.logfc_threshold, min_pct=m.min_pct,
                             only_pos=m.only_pos, return_thresh=m.return_thresh,
                             min_cells_group=m.min_cells_group,
                             scale_factor=cfg.normalize.scale_factor,
                             memory_bytes=cfg.compute.memory_bytes,
                             scheduler=ctx.scheduler(), progress=ctx.progress)
    write_table(table, ctx.tables / "markers.csv")
