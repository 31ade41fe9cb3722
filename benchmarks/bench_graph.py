"""Time and memory of the pca, neighbors, cluster and umap stages at study size (196k cells).

    python benchmarks/bench_graph.py [--cells 196000] [--out bench_out] [--study PATH]
                                     [--workers 2] [--memory 2GB] [--no-scanpy]
                                     [--no-pynndescent] [--no-louvain] [--leidenalg]
                                     [--synthetic]

Simulates a study (`cellmill.simulate.simulate_study`, reused if already in --out/sim) or takes
--study (a manifest CSV), and runs ingest, qc, normalize and hvg through the workflow in a child
process (their records make reruns skip them). Then, on the QC-passed cells, timed one after the
other in this process (wall seconds, CPU seconds of all threads, peak RSS of the process and its
children during the step):
  the stages, as `cellmill run` runs them (each reads its inputs from the store):
    pca             Gram pass, eigh, projection pass; writes obsm/varm/uns
    neighbors       exact k = 20 on PCs 1..15 + SNN graph + writing them
    cluster_leiden  reads the graph, Leiden (the default), writes obs + tables/clusters.csv
    umap            exact 30-NN in cosine distance + umap-learn (200 epochs)
  (scanpy_umap = sc.pp.neighbors with 30 neighbours + sc.tl.umap, as our umap stage)
  their parts and the options, on the same PCs:
    knn, snn        the two halves of `neighbors` (no I/O)
    leiden          igraph's Leiden alone; leiden_leidenalg (--leidenalg) leidenalg's
    louvain         Louvain, 10 seeded starts (Seurat's n.start)
    pynndescent     the approximate option: time and recall of its k = 20 lists vs exact
With scanpy (default): sc.pp.neighbors (k = 20 on the same 15 PCs), sc.tl.leiden (igraph) and
sc.tl.umap in the same run, as time ratios (cellmill / scanpy).
--synthetic skips the counts: PCs drawn from a Gaussian mixture (no pca step).
Writes OUT/graph.json and OUT/graph.md. The machine may be shared: the load average at the
start and the end is recorded; CPU seconds are the less load-dependent figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from cellmill.config import Config, parse_bytes
from cellmill.engine.monitor import PeakMemory, current_rss
from cellmill.engine.registry import Context


class Step:
    """Wall and CPU seconds and the peak RSS of a block of code.

    The sampled peak misses what C code holding the GIL allocates between samples (igraph's
    graph construction and Leiden, umap's optimiser): `max_rss_mb` is the kernel's high-water
    mark of this process after the step (it only grows, so it tells a step's own peak when the
    step raised it)."""

    def __init__(self, results: dict, name: str):
        self.results, self.name = results, name

    def __enter__(self):
        self.rss0 = current_rss()
        self.mem = PeakMemory().__enter__()
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        wall, cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
        self.mem.__exit__(*exc)
        if exc[0] is None:
            self.results[self.name] = {"seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
                                       "peak_rss_mb": round(self.mem.peak / 2**20),
                                       "max_rss_mb": round(resource.getrusage(
                                           resource.RUSAGE_SELF).ru_maxrss / 1024),
                                       "rss_before_mb": round(self.rss0 / 2**20)}
            print(f"  {self.name:12s} {wall:8.1f} s  cpu {cpu:8.1f} s  "
                  f"peak RSS {self.mem.peak / 2**20:6.0f} MB", flush=True)
        return False


def prepare_study(args, out: Path) -> Context:
    """Simulated (or given) study -> store with qc and hvg done; a Context for the stages."""
    from cellmill.engine.registry import run_stages

    manifest = Path(args.study) if args.study else out / "sim" / "manifest.csv"
    if not args.study and not manifest.exists():
        from cellmill.simulate import simulate_study

        print(f"simulating {args.cells} cells into {manifest.parent} ...", flush=True)
        t0 = time.perf_counter()
        simulate_study(manifest.parent, n_cells=args.cells, seed=args.seed)
        print(f"  simulated in {time.perf_counter() - t0:.0f} s", flush=True)
    cfg = Config()
    cfg.input.manifest = str(manifest.resolve())
    cfg.compute.workers = args.workers
    cfg.compute.memory = args.memory
    ctx = Context(cfg=cfg, outdir=out / "run", progress=False)
    ctx.outdir.mkdir(parents=True, exist_ok=True)
    print("ingest, qc, normalize, hvg (skipped when already done) ...", flush=True)
    t0 = time.perf_counter()
    run_stages(ctx, until="hvg")
    print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    return ctx


def synthetic_pcs(n: int, seed: int, d: int = 15) -> np.ndarray:
    """PCs shaped like a single-cell embedding: 25 clusters of very different sizes."""
    rng = np.random.default_rng(seed)
    k = 25
    weights = rng.dirichlet(np.full(k, 0.7))
    centers = rng.normal(scale=6.0, size=(k, d)) * np.linspace(3, 0.5, d)
    scales = rng.uniform(0.5, 1.5, size=(k, d))
    lab = rng.choice(k, size=n, p=weights)
    return centers[lab] + rng.normal(size=(n, d)) * scales[lab]


def synthetic_context(args, out: Path) -> Context:
    """A small store whose X_pca holds synthetic PCs (the graph stages read only X_pca)."""
    import scipy.sparse as sp

    from cellmill.io.store import Store
    from cellmill.io.writer import StoreWriter

    path = out / "synthetic.zarr"
    if not (path / "zarr.json").exists():
        import pandas as pd

        from cellmill.io.sample import Sample

        n = args.cells
        var = pd.DataFrame({"gene_ids": ["g0"], "feature_types": ["Gene Expression"]},
                           index=["g0"])
        sample = Sample(counts=sp.csr_matrix((n, 1), dtype=np.int32),
                        barcodes=np.array([f"c{i}" for i in range(n)], dtype=object),
                        var=var, source="synthetic")
        w = StoreWriter(path, overwrite=True)
        w.add_sample("synthetic", sample, {}, prefix_cells=False)
        w.finish()
    store = Store(path)
    pcs = synthetic_pcs(store.n_cells, args.seed)
    x = np.full((store.n_cells, 50), 0.0)
    x[:, :15] = pcs
    store.write_array("obsm", "X_pca", x)
    store.update_obs(qc_pass=np.ones(store.n_cells, dtype=bool))
    cfg = Config()
    cfg.compute.workers = args.workers
    cfg.compute.memory = args.memory
    ctx = Context(cfg=cfg, outdir=out / "run_synthetic", store=store, progress=False)
    ctx.outdir.mkdir(parents=True, exist_ok=True)
    return ctx


def run_scanpy(pcs: np.ndarray, results: dict, seed: int) -> None:
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp

    if not hasattr(sp.csr_array, "getnnz"):  # scanpy 1.11.5 calls it; scipy 1.17 removed it
        sp.csr_array.getnnz = lambda self, axis=None: self._getnnz(axis=axis)

    a = ad.AnnData(obsm={"X_pca": pcs.astype(np.float32)},
                   obs={"i": np.arange(len(pcs))})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Step(results, "scanpy_neighbors"):
            sc.pp.neighbors(a, n_neighbors=20, n_pcs=pcs.shape[1], use_rep="X_pca",
                            random_state=seed)
        with Step(results, "scanpy_leiden"):
            sc.tl.leiden(a, resolution=0.3, flavor="igraph", n_iterations=-1, directed=False,
                         random_state=0)
        # UMAP on a 30-neighbour graph, as ours (Seurat's n.neighbors)
        with Step(results, "scanpy_umap"):
            sc.pp.neighbors(a, n_neighbors=30, n_pcs=pcs.shape[1], use_rep="X_pca",
                            random_state=seed, key_added="k30")
            sc.tl.umap(a, min_dist=0.3, random_state=42, neighbors_key="k30")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=196_000)
    p.add_argument("--out", default="bench_out")
    p.add_argument("--study", default="", help="a manifest CSV instead of simulating")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--memory", default="2GB")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-scanpy", action="store_true")
    p.add_argument("--no-pynndescent", action="store_true")
    p.add_argument("--no-louvain", action="store_true", help="skip the 10-start Louvain")
    p.add_argument("--leidenalg", action="store_true", help="also time leidenalg's Leiden")
    p.add_argument("--synthetic", action="store_true",
                   help="Gaussian-mixture PCs instead of a simulated study (no pca step)")
    p.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    parse_bytes(args.memory)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from cellmill.engine.cells import obsm_rows, qc_passed
    from cellmill.stages.clustering.in_memory import N_STARTS, modularity_clusters
    from cellmill.stages.clustering.stage import run_cluster
    from cellmill.stages.neighbors import run_neighbors, snn_graph
    from cellmill.stages.pca import run_pca
    from cellmill.stages.shared.knn import exact_knn, nndescent_knn, recall
    from cellmill.stages.umap.stage import run_umap

    if args.prepare_only:
        prepare_study(args, out)
        return {}
    if args.synthetic:
        ctx = synthetic_context(args, out)
    else:
        # ingest .. hvg in a child process: the timed steps start from a clean process
        subprocess.run([sys.executable, __file__, "--prepare-only", *(argv or sys.argv[1:])],
                       check=True)
        ctx = prepare_study(args, out)  # only reads the stage records now
    store = ctx.store
    cells = np.flatnonzero(qc_passed(store))
    res: dict = {}
    print(f"{len(cells)} QC-passed cells of {store.n_cells}; baseline RSS "
          f"{current_rss() / 2**20:.0f} MB", flush=True)
    warm = synthetic_pcs(3000, 1)  # compile the kernels outside the timings
    exact_knn(warm, 20)
    snn_graph(exact_knn(warm, 20)[0])

    load0 = os.getloadavg()
    # the stages, as `cellmill run` runs them (each reads its inputs from the store)
    if not args.synthetic:
        with Step(res, "pca"):
            run_pca(ctx)
    with Step(res, "neighbors"):
        run_neighbors(ctx)
    with Step(res, "cluster_leiden"):
        run_cluster(ctx)
    with Step(res, "umap"):
        run_umap(ctx)
    stage_peak = max(res[k]["peak_rss_mb"] for k in ("pca", "neighbors", "cluster_leiden", "umap")
                     if k in res)
    # their parts, and the options
    pcs = obsm_rows(store, "X_pca", cells, 15)
    labels = store.obs()["cluster"].to_numpy()[cells]
    sched = ctx.scheduler()
    with Step(res, "knn"):
        idx, dist = exact_knn(pcs, 20, scheduler=sched)
    del dist
    with Step(res, "snn"):
        g = snn_graph(idx, 1 / 15, scheduler=sched)
    with Step(res, "leiden"):
        ld, _ = modularity_clusters(g, "leiden", 0.3, 0, -1)
    if args.leidenalg:
        with Step(res, "leiden_leidenalg"):
            modularity_clusters(g, "leiden", 0.3, 0, -1, leiden_backend="leidenalg")
    if not args.no_louvain:
        with Step(res, "louvain"):
            lv, _ = modularity_clusters(g, "louvain", 0.3, 0, -1, N_STARTS)
    from sklearn.metrics import adjusted_rand_score

    res["clusters"] = {"leiden": int(len(set(labels))), "snn_nnz": int(g.nnz)}
    if not args.no_louvain:
        res["clusters"].update(louvain=int(lv.max() + 1),
                               ari_leiden_louvain=round(float(adjusted_rand_score(ld, lv)), 4))
    truth = (Path(args.study).parent if args.study else out / "sim") / "truth.csv"
    if truth.exists() and not args.synthetic:  # the simulator's planted populations
        import pandas as pd

        pop = pd.read_csv(truth, index_col="cell")["population"]
        names = store.obs().index[cells]
        if names.isin(pop.index).all():
            planted = pop.loc[names].to_numpy()
            res["clusters"]["planted_populations"] = int(len(set(planted)))
            res["clusters"]["ari_leiden_planted"] = round(
                float(adjusted_rand_score(planted, labels)), 4)
            if not args.no_louvain:
                res["clusters"]["ari_louvain_planted"] = round(
                    float(adjusted_rand_score(planted, lv)), 4)
    del g
    if not args.no_pynndescent:
        with Step(res, "pynndescent"):
            approx, _ = nndescent_knn(pcs, 20)
        res["pynndescent_recall"] = round(recall(approx, idx), 5)
        print(f"  pynndescent recall vs exact: {res['pynndescent_recall']}", flush=True)
        del approx
    if not args.no_scanpy:
        try:
            run_scanpy(pcs, res, args.seed)
        except ImportError:
            print("  scanpy not installed: no comparison")

    targets = {"pca": 60, "knn": 90, "cluster_leiden": 60, "umap": 180}
    peak = stage_peak
    doc = {"cells": int(store.n_cells), "qc_passed": int(len(cells)),
           "genes": int(store.n_genes), "nnz": int(store.nnz), "synthetic": args.synthetic,
           "workers": args.workers, "memory": args.memory, "steps": res,
           "targets_seconds": targets, "peak_rss_mb": peak, "target_peak_rss_mb": 2048,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "load_avg_at_start": load0,
                       "load_avg_at_end": os.getloadavg()}}
    for ours, theirs in (("neighbors", "scanpy_neighbors"), ("cluster_leiden", "scanpy_leiden"),
                         ("umap", "scanpy_umap")):
        if ours in res and theirs in res:
            res[f"ratio_{ours}_vs_scanpy"] = round(res[ours]["seconds"]
                                                  / res[theirs]["seconds"], 2)
    (out / "graph.json").write_text(json.dumps(doc, indent=1))
    lines = [f"# graph benchmark: {len(cells)} QC-passed cells "
             f"({'synthetic PCs' if args.synthetic else 'simulated study'}), "
             f"{args.workers} workers, budget {args.memory}", "",
             "| step | seconds | CPU seconds | RSS before MB | peak RSS MB | max RSS MB "
             "| target s |", "|---|---|---|---|---|---|---|"]
    for k, v in res.items():
        if isinstance(v, dict) and "seconds" in v:
            lines.append(f"| {k} | {v['seconds']} | {v['cpu_seconds']} | {v['rss_before_mb']} "
                         f"| {v['peak_rss_mb']} | {v['max_rss_mb']} | {targets.get(k, '')} |")
    lines += ["", f"peak RSS of the four stages: {peak} MB (target 2048)"]
    if "pynndescent_recall" in res:
        lines.append(f"pynndescent recall of the exact k = 20 lists: {res['pynndescent_recall']}")
    lines.append(f"clusters: {res['clusters']}")
    for k, v in res.items():
        if k.startswith("ratio_"):
            lines.append(f"{k}: {v}")
    lines.append(f"load average (1, 5, 15 min) at the start: {load0}, at the end: "
                 f"{os.getloadavg()} on {os.cpu_count()} CPUs")
    (out / "graph.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return doc


if __name__ == "__main__":
    main()
