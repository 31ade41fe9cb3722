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

from .study import simulate_study

__all__ = ["simulate_study"]


class _CallableModule(types.ModuleType):
    """`cellmill.simulate(outdir, n_cells=..., seed=...)` is `cellmill.api.simulate`: this
    package and the API function share the name, so the package itself is callable."""

    def __call__(self, outdir, **kwargs):
        from cellmill.api import simulate

        return simulate(outdir, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
