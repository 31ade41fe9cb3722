"""Exact kNN against NN-descent (pynndescent) by size: the measurement behind neighbors.method =
"auto" and its crossover (stages/shared/knn.py EXACT_UP_TO).

    python benchmarks/bench_knn.py --sizes 100000,200000,400000 [--pcs PCS.npy] [--k 20]

Points: 15-D draws from a 12-component Gaussian mixture (full covariances) fitted to --pcs
(a cells x >= 15 array of a study's PCs; the QC-passed rows of obsm/X_pca), or with no --pcs
from 12 synthetic clusters of unequal size and spread. For each size, each method runs in its
own fresh process (pynndescent compiles its Numba code in every process, not cached: a fixed
cost of every run that uses it), timed twice in that process; wall and CPU seconds of all
threads (the CPU figure depends less on the machine's load). exact: cellmill's search on 2
threads; nndescent: pynndescent on one thread (neighbors.method's setting: its result depends on
its thread count), with recall@k of its lists against exact search on 1,000 seeded cells.
Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def points(n: int, pcs: str | None, seed: int = 0) -> np.ndarray:
    if pcs:
        from sklearn.mixture import GaussianMixture

        x = np.load(pcs)[:, :15]
        x = x[np.isfinite(x).all(axis=1)]
        g = GaussianMixture(12, covariance_type="full", random_state=0).fit(x)
        g.random_state = seed
        return np.random.default_rng(seed).permutation(g.sample(n)[0])
    rng = np.random.default_rng(seed)
    d = 15
    centers = rng.normal(size=(12, d)) * (6.0 * 0.85 ** np.arange(d))
    lab = rng.choice(12, n, p=rng.dirichlet(np.full(12, 2.0)))
    within = rng.uniform(0.5, 1.5, (12, 1)) * (1.5 * 0.9 ** np.arange(d))
    return centers[lab] + rng.normal(size=(n, d)) * within[lab]


def one(n: int, method: str, pcs: str | None, k: int) -> dict:
    from cellmill.stages.shared.knn import (
        exact_knn,
        exact_of_queries,
        nndescent_knn,
        recall,
        sample_queries,
    )

    x = points(n, pcs)
    out = {"n": n, "method": method}
    for rep in range(2):
        c, t = time.process_time(), time.perf_counter()
        if method == "exact":
            idx, _ = exact_knn(x, k, scheduler=("threads", 2))
        else:
            idx, _ = nndescent_knn(x, k)
        out[f"wall{rep}"] = round(time.perf_counter() - t, 2)
        out[f"cpu{rep}"] = round(time.process_time() - c, 2)
    if method != "exact":
        q = sample_queries(n)
        out["recall"] = recall(idx[q], exact_of_queries(x, q, k, ("threads", 2)))
    out["load"] = os.getloadavg()[0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,200000,400000")
    ap.add_argument("--pcs", default=None)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # "n,method": child process
    a = ap.parse_args()
    if a.one:
        n, method = a.one.split(",")
        print(json.dumps(one(int(n), method, a.pcs, a.k)), flush=True)
        return
    for n in a.sizes.split(","):
        for method in ("exact", "nndescent"):
            cmd = [sys.executable, __file__, "--one", f"{n},{method}", "--k", str(a.k)]
            subprocess.run(cmd + (["--pcs", a.pcs] if a.pcs else []), check=True)


if __name__ == "__main__":
    main()
