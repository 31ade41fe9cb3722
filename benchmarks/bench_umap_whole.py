"""The whole UMAP (kNN, fuzzy graph, spectral start, epochs) against umap-learn's, same PCs.

    python benchmarks/bench_umap_whole.py STORE [--dims 15] [--out bench_out] [--memory 1GB]
                                          [--threads 2] [--no-umap-learn]

STORE: a study.zarr whose pca (and cluster) stages have run. The points are the first --dims PCs
of the QC-passed cells (what the umap stage embeds). Timed one after the other, wall and CPU
seconds of all threads, each with its Numba functions compiled beforehand on 3,000 cells:
  cellmill     stages/umap/streamed.umap_streamed as the umap stage calls it (exact or
               NN-descent kNN by size, batch optimiser on --threads threads, the graph held in
               memory when it fits a quarter of --memory)
  umap_learn   umap.UMAP(n_neighbors=30, min_dist=0.3, metric="cosine", n_epochs as cellmill)
               .fit_transform: its own NN-descent kNN, spectral start and parallel SGD
               (random_state unset, so it runs on all threads; not reproducible)
and each layout's trustworthiness (15-NN, 5,000 cells) and, with a cluster column, the
silhouette of the clusters. Writes OUT/umap_whole.json and OUT/umap_whole.md.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import numpy as np
from bench_umap_layout import quality, write_results


def timed(func):
    w, c = time.perf_counter(), time.process_time()
    emb = func()
    return np.asarray(emb), {"wall_s": round(time.perf_counter() - w, 2),
                             "cpu_s": round(time.process_time() - c, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store")
    p.add_argument("--dims", type=int, default=15)
    p.add_argument("--out", default="bench_out")
    p.add_argument("--memory", default="1GB")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-umap-learn", action="store_true")
    args = p.parse_args()

    from umap import UMAP

    from cellmill.config import parse_bytes
    from cellmill.engine.cells import passed_pcs
    from cellmill.io.store import Store
    from cellmill.stages.umap.in_memory import umap_epochs
    from cellmill.stages.umap.streamed import umap_streamed

    store = Store(args.store)
    cells, points = passed_pcs(store, args.dims)
    labels = None
    if "cluster" in store.obs_columns():
        labels = np.asarray(store.obs_column("cluster").astype(str))[cells]
    n = len(points)
    epochs = umap_epochs(n, 0)
    mem = parse_bytes(args.memory)
    sched = ("threads", args.threads)

    def ours(x):
        return umap_streamed(x, 30, 0.3, 42, 0, scheduler=sched, memory_bytes=mem)

    def theirs(x):
        return UMAP(n_neighbors=30, min_dist=0.3, metric="cosine", n_epochs=epochs,
                    init="spectral").fit_transform(x)

    runs = [("cellmill", ours)] + ([] if args.no_umap_learn else [("umap_learn", theirs)])
    res = {"store": str(args.store), "cells": n, "dims": args.dims, "epochs": epochs,
           "cpus": os.cpu_count(), "threads": args.threads, "memory": args.memory,
           "load_before": os.getloadavg(), "runs": {}}
    warm = points[np.random.default_rng(0).choice(n, min(n, 3000), replace=False)]
    for name, func in runs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            func(warm)  # compile outside the timings
            emb, t = timed(lambda f=func: f(points))
        res["runs"][name] = {**t, **quality(points, emb, labels),
                             "load": round(os.getloadavg()[0], 2)}
        print(name, res["runs"][name], flush=True)
    res["load_after"] = os.getloadavg()
    r = res["runs"]
    if "umap_learn" in r:
        res["time_ratio"] = round(r["cellmill"]["wall_s"] / r["umap_learn"]["wall_s"], 3)
    notes = () if "time_ratio" not in res else (
        "", f"cellmill / umap-learn wall time: {res['time_ratio']:.2f} (goal at 196k: <= 0.3, "
            "and <= 35 s)")
    write_results(Path(args.out), "umap_whole", res,
                  f"Whole UMAP, {n} cells x {args.dims} PCs, {epochs} epochs, "
                  f"{args.threads} threads", notes)


if __name__ == "__main__":
    main()
