"""The study simulator: synthetic 10x studies shaped like the microglia study, planted truth.

    from cellmill.simulate import simulate_study
    info = simulate_study(out_dir, n_cells=20000, seed=0, n_genes=27998, gmt=None, progress=False)

Writes to out_dir: one Cell Ranger v3 HDF5 per sample (SNI/Sham x 3d/14d/5mo x F/M), manifest.csv
(sample, path, condition, timepoint, sex), truth.csv (cell = <sample>_<barcode>, sample,
population; QC-failing extras are "low_quality" or "doublet"), planted.json (effects, populations,
samples, ...), and planted.gmt when no GMT is given. Modules: design (samples, populations),
genes (gene universe), model (expression parameters, planted biology), kernels (Numba counts),
tenx (HDF5 writer), study (the driver).
"""

import sys
import types
from pathlib import Path

from .study import simulate_study

__all__ = ["simulate_study", "simulate_with_paths"]


def simulate_with_paths(outdir, n_cells: int = 20_000, seed: int = 0, n_genes: int = 27_998,
                        gmt=None, progress: bool = False, **kwargs) -> dict:
    """`simulate_study`'s summary (`kwargs`: replicates, replicate_sd, threads) plus the paths
    "manifest", "gmt" (the planted gene sets, or `gmt` when given), "truth" and "planted"
    (`cellmill.simulate(...)` in the Python API)."""
    outdir = Path(outdir)
    info = simulate_study(outdir, n_cells=n_cells, seed=seed, n_genes=n_genes, gmt=gmt,
                          progress=progress, **kwargs)
    return {**info, "manifest": outdir / "manifest.csv",
            "gmt": Path(gmt) if gmt is not None else outdir / "planted.gmt",
            "truth": outdir / "truth.csv", "planted": outdir / "planted.json"}


class _CallableModule(types.ModuleType):
    """`cellmill.simulate(outdir, n_cells=..., seed=...)` (the Python API's `simulate`): this
    package and the API function share the name, so the package itself is callable."""

    def __call__(self, outdir, **kwargs) -> dict:
        return simulate_with_paths(outdir, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
