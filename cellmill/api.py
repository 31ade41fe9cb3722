"""The Python API, for notebooks and scripts (see README.md, "Python API").

    import cellmill
    sim = cellmill.simulate("sim", n_cells=2000, seed=1)
    res = cellmill.run({"input": {"manifest": sim["manifest"]}, "gsea": {"gmt": sim["gmt"]}},
                       "results")
    adata = cellmill.to_anndata(res.store, cells="qc_passed")   # in memory, counts in X

Everything heavy is imported inside the functions: `import cellmill` stays light.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Result:
    """What `run` made: the output folder and its parts, and per-stage timings
    (stage -> {"seconds", "peak_rss_mb", "cells", "skipped"})."""

    outdir: Path
    store: Path
    report: Path
    tables: Path
    figures: Path
    run_json: Path
    timings: dict[str, dict] = field(default_factory=dict)
    wall_seconds: float = 0.0


def _overrides(overrides: dict[str, Any] | list[str] | None) -> list[str]:
    """{"cluster.resolution": 0.5} or ["cluster.resolution=0.5"] -> --set strings."""
    if overrides is None:
        return []
    if isinstance(overrides, dict):  # a JSON value is a TOML value for these types
        return [f"{k}={json.dumps(str(v) if isinstance(v, Path) else v)}"
                for k, v in overrides.items()]
    return [str(o) for o in overrides]


def load(config: str | Path | dict, overrides: dict[str, Any] | list[str] | None = None):
    """A checked `cellmill.config.Config` from a TOML path or a dict of sections (relative
    paths in a dict: from the current folder); raises `cellmill.config.ConfigError`."""
    from cellmill.config import config_from_dict, load_config

    if isinstance(config, dict):
        return config_from_dict(config, Path.cwd(), _overrides(overrides))
    return load_config(config, _overrides(overrides))


def run(config: str | Path | dict, outdir: str | Path, until: str | None = None,
        overrides: dict[str, Any] | list[str] | None = None, log: bool = True) -> Result:
    """Run the workflow of `config` (a TOML path, or the same structure as a dict:
    ``{"input": {"manifest": "m.csv"}, "gsea": {"gmt": "sets.gmt"}}``) into `outdir`, as
    `cellmill run CONFIG -o OUTDIR` does: stages whose parameters, inputs and code did not
    change are skipped. `until`: stop after this stage. `overrides`: ``{"section.key": value}``
    (like ``--set``). `log`: print the stage lines on stderr when logging is not configured.
    Raises `ConfigError` for a bad config, `cellmill.errors.InputError` for bad input."""
    from cellmill.engine import runlog
    from cellmill.engine.workflow import run_workflow

    cfg = load(config, overrides)
    outdir = Path(outdir)
    with runlog.notebook_lines(log):
        ctx = run_workflow(cfg, outdir, until=until)
    run_json = outdir / "run.json"
    wall = json.loads(run_json.read_text()).get("wall_seconds", 0.0) if run_json.exists() else 0.0
    keep = ("seconds", "peak_rss_mb", "cells", "skipped")
    timings = {n: {k: t.get(k) for k in keep} for n, t in ctx.timings.items()}
    return Result(outdir=outdir, store=Path(ctx.store_path), report=outdir / "report.html",
                  tables=outdir / "tables", figures=outdir / "figures", run_json=run_json,
                  timings=timings, wall_seconds=wall)


def simulate(outdir: str | Path, n_cells: int = 20_000, seed: int = 0, n_genes: int = 27_998,
             gmt: str | Path | None = None, progress: bool = False, replicates: int = 1,
             replicate_sd: float | None = None) -> dict:
    """Simulate a study with planted truth into `outdir` (`cellmill simulate`): `n_cells`
    cells pass QC, in 12 x `replicates` samples (animals), each gene's log expression varying
    between animals with sd about `replicate_sd` (None: the simulator's default, 0.2; 0: no
    animal variation). Returns the simulator's summary plus the paths "manifest", "gmt" (the
    planted gene sets, or `gmt` when given), "truth" and "planted"."""
    from cellmill.simulate import simulate_with_paths

    return simulate_with_paths(outdir, n_cells=n_cells, seed=seed, n_genes=n_genes, gmt=gmt,
                               progress=progress, replicates=replicates,
                               **({} if replicate_sd is None else {"replicate_sd": replicate_sd}))


def fetch(accession: str, outdir: str | Path, samples: list[str] | None = None,
          where: str | None = None, dry_run: bool = False,
          geo_url: str = "https://ftp.ncbi.nlm.nih.gov/geo", progress: bool = False):
    """Download a GEO series' count files into `outdir` and write `outdir/manifest.csv`, as
    `cellmill fetch` does: `samples` (GSM accessions) and `where` (``"condition != Naive"``)
    select samples, `dry_run` only lists them. Returns a `cellmill.io.fetch.FetchResult`
    (`.manifest`, `.rows`, `.frame()` a DataFrame of the samples and their metadata).
    Raises `cellmill.errors.InputError` for bad input (unknown accession, a cut download)."""
    from cellmill.io.fetch import fetch as fetch_series

    return fetch_series(accession, outdir, samples=samples, where=where, dry_run=dry_run,
                        geo_url=geo_url, progress=progress)


def open_store(path: str | Path):
    """The `cellmill.io.store.Store` at `path` (e.g. ``Result.store``)."""
    from cellmill.io.store import Store

    return Store(path)


def _cell_index(store, cells) -> np.ndarray:  # noqa: F821 - numpy imported by the caller
    import numpy as np

    n = store.n_cells
    if cells is None:
        return np.arange(n)
    if isinstance(cells, str):
        if cells != "qc_passed":
            raise ValueError(f"cells={cells!r}: give None, 'qc_passed' or an index array")
        if "qc_pass" not in store.obs_columns():
            raise ValueError(f"{store.path}: no qc_pass column yet (run the qc stage)")
        return np.flatnonzero(np.asarray(store.obs_column("qc_pass"), dtype=bool))
    idx = np.asarray(cells)
    if idx.dtype == bool:
        if idx.shape != (n,):
            raise ValueError(f"a boolean cell mask needs {n} values, got {idx.shape}")
        return np.flatnonzero(idx)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError("cells: give a 1-d integer or boolean array")
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise ValueError(f"cells: indices out of range for {n} cells")
    return np.where(idx < 0, idx + n, idx)


def to_anndata(store, cells=None, backed: bool = False):
    """An `anndata.AnnData` of a store (a `Store` or its path).

    In memory (default): X the raw counts (CSR, int32) of `cells` (None: all, "qc_passed",
    or an integer / boolean index array; rows in that order), obs and var from the store,
    obsm X_pca and X_umap when they exist. Only the chosen cells' rows are read, a storage
    block at a time.

    backed=True: the whole store opened lazily with `anndata.experimental.read_lazy`
    (anndata >= 0.12; X a dask array, obs an xarray-backed frame; subset it and call
    `.to_memory()`); `cells` subsets that view. `anndata.read_zarr(path)` also reads a
    store, but all of it into memory (graphs and the gene-major copy included).
    """
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    st = store if hasattr(store, "read_rows") else open_store(store)
    idx = _cell_index(st, cells)
    if backed:
        try:
            from anndata.experimental import read_lazy
        except ImportError:
            raise RuntimeError("to_anndata(backed=True) needs anndata >= 0.12 "
                               "(anndata.experimental.read_lazy)") from None
        lazy = read_lazy(str(st.path))
        return lazy if cells is None else lazy[idx]
    order = np.unique(idx)
    parts = []
    for start, stop in st.block_ranges():
        a, b = np.searchsorted(order, [start, stop])
        if a < b:
            parts.append(st.read_rows(start, stop)[order[a:b] - start])
    X = (sp.vstack(parts, format="csr") if parts
         else sp.csr_matrix((0, st.n_genes), dtype=np.int32))
    if len(order) != len(idx) or (idx.size and np.any(order != idx)):
        X = X[np.searchsorted(order, idx)]
    obs = st.obs().iloc[idx]
    obsm = {}
    for name in ("X_pca", "X_umap"):
        if st.has("obsm", name):
            obsm[name] = st.root["obsm"][name].get_orthogonal_selection((idx, slice(None)))
    return ad.AnnData(X=X.astype(np.int32, copy=False), obs=obs, var=st.var(), obsm=obsm)
