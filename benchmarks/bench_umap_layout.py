"""Time of the UMAP layout epochs alone, on one graph and one start for every optimiser.

    python benchmarks/bench_umap_layout.py [--pcs PCS.npy] [--labels LABELS.npy]
                                           [--cells 50000] [--dims 20] [--threads 1,2]
                                           [--epochs 200] [--out bench_out] [--no-sequential]
                                           [--no-umap-learn]

The points are --pcs (rows = cells, e.g. obsm/X_pca of the QC-passed cells of a simulated
study) or a Gaussian mixture of --cells x --dims. The streamed backend builds its fuzzy graph
and spectral start once (untimed); then, timed one after the other (wall seconds, CPU seconds
of all threads):
  batch_<t>     the batch optimiser (the default) on t Numba threads
  sequential    umap-learn's in-place updates streamed over the graph (`umap.optimizer`)
  umap_learn    umap-learn's simplicial_set_embedding on the same graph and start (one thread,
                its JIT warmed first), and umap_learn_parallel (parallel=True: not reproducible)
and the quality of each layout: trustworthiness of the 15-NN (sklearn, 5,000 cells) and, with
labels, the silhouette of the groups. Writes OUT/umap_layout.json and OUT/umap_layout.md. The
machine may be shared: the load average before and after is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def mixture(n, dim, groups=12, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(groups, dim)) * 3.0
    labels = rng.integers(0, groups, n)
    return centers[labels] + rng.normal(size=(n, dim)), labels


def quality(points, emb, labels):
    from sklearn.manifold import trustworthiness
    from sklearn.metrics import silhouette_score

    from cellmill.stages.umap.in_memory import unit_rows

    sub = np.random.default_rng(0).choice(len(points), min(5000, len(points)), replace=False)
    out = {"trustworthiness": round(float(trustworthiness(unit_rows(points[sub]), emb[sub],
                                                          n_neighbors=15)), 4)}
    if labels is not None:
        out["silhouette"] = round(float(silhouette_score(emb[sub], labels[sub])), 4)
    return out


def timed(func):
    w, c = time.perf_counter(), time.process_time()
    emb = func()
    return emb, {"wall_s": round(time.perf_counter() - w, 2),
                 "cpu_s": round(time.process_time() - c, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pcs")
    p.add_argument("--labels")
    p.add_argument("--cells", type=int, default=50_000)
    p.add_argument("--dims", type=int, default=20)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--out", default="bench_out")
    p.add_argument("--no-sequential", action="store_true")
    p.add_argument("--no-umap-learn", action="store_true")
    args = p.parse_args()

    from umap.umap_ import find_ab_params, simplicial_set_embedding

    from cellmill.stages.umap import streamed as L

    if args.pcs:
        points = np.load(args.pcs)
        labels = np.load(args.labels) if args.labels else None
    else:
        points, labels = mixture(args.cells, args.dims)
    n, epochs = len(points), args.epochs
    res = {"cells": n, "dims": points.shape[1], "epochs": epochs, "load_before": os.getloadavg(),
           "cpus": os.cpu_count(), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        knn, mean = L._knn_to_buckets(points, 30, root, None, False)
        g = L.fuzzy_graph(knn, n, 30, mean, root)
        keep = float(np.float32(g.w_max / epochs))
        init = L.spectral_init(g, keep, points, np.random.RandomState(42))
        a, b = find_ab_params(1.0, 0.3)
        L.optimize_batch(g, init, 2, a, b, keep, 42)  # compile outside the timings
        L.optimize(g, init, 2, a, b, keep, 42)
        runs = [(f"batch_{t}", lambda t=int(t): L.optimize_batch(g, init, epochs, a, b, keep,
                                                                    42, threads=t))
                for t in args.threads.split(",")]
        if not args.no_sequential:
            runs.append(("sequential", lambda: L.optimize(g, init, epochs, a, b, keep, 42)))
        if not args.no_umap_learn:
            coo = L.pruned(g, keep)
            x32 = points.astype(np.float32)

            def ref(parallel):
                return lambda: simplicial_set_embedding(
                    x32, coo, 2, 1.0, a, b, 1.0, 5, epochs, init, np.random.RandomState(42),
                    "cosine", {}, False, {}, False, parallel=parallel)[0]

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for par in (False, True):  # warm umap-learn's JIT on a few epochs
                    simplicial_set_embedding(x32, coo, 2, 1.0, a, b, 1.0, 5, 2, init,
                                             np.random.RandomState(0), "cosine", {}, False, {},
                                             False, parallel=par)
            runs += [("umap_learn", ref(False)), ("umap_learn_parallel", ref(True))]
        for name, func in runs:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                emb, t = timed(func)
            while name in res["runs"]:  # a thread count given twice: timed twice
                name += "'"
            res["runs"][name] = {**t, **quality(points, np.asarray(emb), labels),
                                 "load": round(os.getloadavg()[0], 2)}
            print(name, res["runs"][name], flush=True)
    res["load_after"] = os.getloadavg()
    write_results(Path(args.out), "umap_layout", res,
                  f"UMAP layout, {n} cells x {points.shape[1]} dims, {epochs} epochs")


def write_results(out: Path, stem: str, res: dict, title: str, notes: tuple = ()) -> None:
    """OUT/STEM.json and OUT/STEM.md (a table of res["runs"]), and the table printed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    lines = [f"{title} (load {res['load_before'][0]:.1f} -> {res['load_after'][0]:.1f}, "
             f"{res['cpus']} CPUs)", "",
             "| run | wall s | CPU s | trustworthiness | silhouette |", "|---|---|---|---|---|"]
    for name, r in res["runs"].items():
        lines.append(f"| {name} | {r['wall_s']} | {r['cpu_s']} | {r['trustworthiness']} | "
                     f"{r.get('silhouette', '')} |")
    lines += list(notes)
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
