"""`cellmill run` and `cellmill demo`: the whole workflow, with provenance in run.json."""

from __future__ import annotations

import json
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from cellmill.config import Config, load_config
from cellmill.engine.progress import progress_enabled
from cellmill.engine.stages import Context, run_stages

PACKAGES = ["cellmill", "numpy", "scipy", "pandas", "zarr", "numcodecs", "anndata", "dask",
            "distributed", "numba", "pynndescent", "igraph", "leidenalg", "umap-learn",
            "xarray", "scikit-misc", "h5py", "matplotlib"]


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def run_workflow(cfg: Config, outdir: Path, until: str | None = None) -> Context:
    from cellmill.engine.monitor import PeakMemory
    from cellmill.io.store import write_json_atomic

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    ctx = Context(cfg=cfg, outdir=outdir, progress=progress_enabled(cfg.compute.progress))
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        run_stages(ctx, until=until)
    run = {"cellmill": versions()["cellmill"], "versions": versions(), "config": cfg.to_dict(),
           "until": until, "stages": ctx.timings,
           "wall_seconds": round(time.perf_counter() - t0, 3),
           "peak_rss_mb": round(mem.peak / 2**20, 1), "finished": time.time()}
    write_json_atomic(outdir / "run.json", run)
    return ctx


def demo_config(sim_dir: Path) -> str:
    return f"""# cellmill demo: a simulated study shaped like the microglia study
[input]
manifest = "{sim_dir / 'manifest.csv'}"

[gsea]
gmt = "{sim_dir / 'planted.gmt'}"
"""


def run_demo(outdir: Path, n_cells: int = 20000, seed: int = 0) -> Context:
    from cellmill.simulate import simulate_study

    outdir = Path(outdir)
    sim_dir = outdir / "simulated"
    if not (sim_dir / "manifest.csv").exists():
        print(f"simulating {n_cells} cells into {sim_dir} ...")
        simulate_study(sim_dir, n_cells=n_cells, seed=seed, progress=True)
    cfg_path = outdir / "demo.toml"
    cfg_path.write_text(demo_config(sim_dir.resolve()))
    cfg = load_config(cfg_path)
    print("running the workflow ...")
    ctx = run_workflow(cfg, outdir)
    report = outdir / "report.html"
    if report.exists():
        print(f"report: {report}")
    return ctx
