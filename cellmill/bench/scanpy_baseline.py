"""The scanpy 1.11 baseline: the same study, the same steps, in memory, timed step by step.

    python -m cellmill.bench.scanpy_baseline MANIFEST.csv --out scanpy.json [--until STEP]

`cellmill bench` runs this in a child process so that its peak RSS is its own. Steps, named
after the cellmill stages they correspond to:

  ingest      read every sample's 10x .h5 (sc.read_10x_h5), concatenate (cells <sample>_<barcode>)
  qc          keep cells with 500 < n_genes < 4000 (sc.pp.filter_cells)
  hvg         highly_variable_genes flavor="seurat_v3", 2000 genes, on the counts
  normalize   normalize_total(1e4) + log1p
  pca         scale(max_value=10) of the variable genes + pca(50)
  neighbors   neighbors(n_neighbors=20, n_pcs=15)
  cluster     leiden(resolution=0.3), igraph flavour
  umap        umap
  markers     rank_genes_groups(method="wilcoxon", tie_correct=True) on all genes

Every step records wall seconds, CPU seconds (this process) and the peak RSS sampled while it
ran. First, untimed, the same steps run on the first 10,000 cells (enough for scanpy's
pynndescent path), so that the timings do not include compiling scanpy's Numba functions
(cellmill's are cached on disk and compiled by the bench's warm-up run). Exits with status 3
(and writes {"skipped": reason}) when scanpy is not installed: it is the optional extra `bench`
(pip install 'cellmill[bench]').
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import sys
import threading
import time
from pathlib import Path

STEPS = ["ingest", "qc", "hvg", "normalize", "pca", "neighbors", "cluster", "umap", "markers"]
NOT_INSTALLED = 3


class _Peak:
    """Peak RSS of this process while a block runs (sampled every 20 ms)."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(0.02)

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        return False


def read_manifest(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        p = Path(r["path"])
        r["path"] = str(p if p.is_absolute() else path.parent / p)
    return rows


def _scipy_compat() -> None:
    """scanpy 1.11's neighbors calls .getnnz(axis=1) on the csr_array its kNN transformer
    returns; SciPy 1.17 dropped getnnz from the sparse *array* classes (kept _getnnz)."""
    import scipy.sparse as sp

    for cls in (sp.csr_array, sp.csc_array):
        if not hasattr(cls, "getnnz") and hasattr(cls, "_getnnz"):
            cls.getnnz = lambda self, axis=None: self._getnnz(axis=axis)


def run(manifest: Path, until: str = "markers", min_genes: int = 500, max_genes: int = 4000,
        n_top: int = 2000, warmup: bool = True) -> dict:
    import numpy as np
    import scanpy as sc

    sc.settings.verbosity = 0
    _scipy_compat()
    rows = read_manifest(manifest)
    if warmup:  # compile scanpy's Numba functions on a small slice first (not timed)
        small = warmup_cells(rows)
        pipeline({"adata": small}, lambda name, func: func(), until, min_genes, max_genes,
                 min(n_top, 500), skip_ingest=True)
    steps: dict[str, dict] = {}

    def timed(name, func):
        t0, c0 = time.perf_counter(), time.process_time()
        with _Peak() as mem:
            func()
        steps[name] = {"seconds": round(time.perf_counter() - t0, 3),
                       "cpu_seconds": round(time.process_time() - c0, 3),
                       "peak_rss_mb": round(mem.peak / 2**20, 1)}
        print(f"scanpy {name}: {steps[name]['seconds']:.1f} s, "
              f"peak {steps[name]['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)

    state: dict = {"rows": rows}
    pipeline(state, timed, until, min_genes, max_genes, n_top)
    versions = {"scanpy": _version("scanpy"), "anndata": _version("anndata"),
                "numpy": np.__version__}
    return {"versions": versions, "steps": steps, "warmup": warmup,
            "cells_read": state.get("cells_read"), "cells_qc": state.get("cells_qc"),
            "nnz_read": state.get("nnz_read"), "n_clusters": state.get("n_clusters"),
            "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


# scanpy's neighbors uses pynndescent (Numba, compiled on first use) only from 8,192 cells
# (brute force below), so the untimed warm-up must be larger than that.
WARMUP_CELLS = 10_000


def warmup_cells(rows: list[dict]):
    """The first WARMUP_CELLS cells of the samples, read in order (fewer if that is all)."""
    import anndata as ad
    import scanpy as sc

    parts, n = [], 0
    for row in rows:
        a = sc.read_10x_h5(row["path"])
        a.var_names_make_unique()
        parts.append(a[: WARMUP_CELLS - n].copy())
        n += parts[-1].n_obs
        if n >= WARMUP_CELLS:
            break
    return ad.concat(parts, index_unique="_") if len(parts) > 1 else parts[0]


def pipeline(state: dict, step, until: str, min_genes: int, max_genes: int, n_top: int,
             skip_ingest: bool = False) -> None:
    """The steps, each run through step(name, func)."""
    import anndata as ad
    import scanpy as sc

    def ingest():
        parts = []
        for row in state["rows"]:
            a = sc.read_10x_h5(row["path"])
            a.var_names_make_unique()
            for k, v in row.items():
                if k not in ("sample", "path"):
                    a.obs[k] = v
            parts.append(a)
        names = [r["sample"] for r in state["rows"]]
        adata = ad.concat(parts, join="outer", label="sample", keys=names, index_unique="_")
        del parts
        state["adata"] = adata
        state["nnz_read"] = int(adata.X.nnz)
        state["cells_read"] = int(adata.n_obs)

    def qc():
        adata = state["adata"]
        sc.pp.filter_cells(adata, min_genes=min_genes + 1)  # strict, as Seurat's subset
        sc.pp.filter_cells(adata, max_genes=max_genes - 1)
        state["cells_qc"] = int(adata.n_obs)

    def hvg():
        sc.pp.highly_variable_genes(state["adata"], flavor="seurat_v3", n_top_genes=n_top)

    def normalize():
        sc.pp.normalize_total(state["adata"], target_sum=1e4)
        sc.pp.log1p(state["adata"])

    def pca():
        adata = state["adata"]
        hv = adata[:, adata.var["highly_variable"].to_numpy()].copy()
        sc.pp.scale(hv, max_value=10)
        sc.pp.pca(hv, n_comps=50)
        state["hv"] = hv

    def neighbors():
        sc.pp.neighbors(state["hv"], n_neighbors=20, n_pcs=15)

    def cluster():
        sc.tl.leiden(state["hv"], resolution=0.3, flavor="igraph", n_iterations=2,
                     directed=False, random_state=0)
        state["n_clusters"] = int(state["hv"].obs["leiden"].nunique())

    def umap():
        sc.tl.umap(state["hv"], random_state=42)

    def markers():
        adata = state["adata"]
        adata.obs["leiden"] = state["hv"].obs["leiden"].to_numpy()
        sc.tl.rank_genes_groups(adata, "leiden", method="wilcoxon", tie_correct=True)

    funcs = [ingest, qc, hvg, normalize, pca, neighbors, cluster, umap, markers]
    for name, func in zip(STEPS, funcs, strict=True):
        if STEPS.index(name) > STEPS.index(until) or (skip_ingest and name == "ingest"):
            continue
        step(name, func)


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("manifest", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="JSON result")
    ap.add_argument("--until", choices=STEPS, default="markers")
    ap.add_argument("--no-warmup", action="store_true",
                    help="time the first calls too (they compile scanpy's Numba functions)")
    args = ap.parse_args(argv)
    try:
        import scanpy  # noqa: F401
    except ImportError:
        args.out.write_text(json.dumps({"skipped": "scanpy is not installed "
                                        "(pip install 'cellmill[bench]')"}))
        return NOT_INSTALLED
    result = run(args.manifest, until=args.until, warmup=not args.no_warmup)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
