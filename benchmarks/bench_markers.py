"""FindAllMarkers and the grouped-statistics pass on a simulated study, next to scanpy.

    python benchmarks/bench_markers.py [--cells 196000] [--out bench_out] [--study PATH]
                                       [--workers 2] [--memory 2GB] [--repeats 3]
                                       [--scanpy-cells 5000,10000] [--no-scanpy]

Simulates a study (`cellmill.simulate.simulate_study`, reused if already in --out) or takes
--study (a manifest CSV, a folder holding manifest.csv, or a store), ingests it, and uses the
simulator's planted populations (truth.csv) of the QC-passed cells as clusters (numbered by
size, as Seurat does), unless the store already has a `cluster` column. Then it times:
  raw         a read-only pass over the QC-passed cells (decode + CSR + mask, a kernel that
              touches data and indices): the decode throughput the passes are measured against;
  statistics  the grouped-statistics pass (cluster x condition x timepoint x sample, every
              gene: n, sum, sum of squares, m2, sum expm1, nonzeros), as a fraction of raw;
  gene-major  building the gene-major copy (once per store);
  markers     FindAllMarkers (Wilcoxon, only.pos, logfc 0.25, min.pct 0.1) on the gene-major
              copy, wall and CPU seconds, peak RSS;
  scanpy      rank_genes_groups(method="wilcoxon", tie_correct=True) on random subsets of the
              QC-passed cells (log-normalised in memory beforehand; that time is not counted),
              at two sizes; its time at the full size is extrapolated with the exponent fitted
              to the CPU seconds of those two points (at least linear), and cellmill's
              FindAllMarkers on the same largest subset is timed too (it still reads the whole
              gene-major copy), for a same-subset ratio.
Best of --repeats for cellmill's passes. Writes OUT/markers.json and OUT/markers.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from numba import njit

from cellmill.config import load_config, parse_bytes
from cellmill.engine.monitor import PeakMemory, current_rss
from cellmill.engine.passes import map_blocks
from cellmill.engine.schedulers import close_clients, scheduler_for
from cellmill.io.gene_major import build_gene_major
from cellmill.io.ingest import ingest, is_store
from cellmill.io.store import Store
from cellmill.stages.ingest import qc_mask
from cellmill.stages.shared.findmarkers import find_all_markers
from cellmill.stages.statistics.grouped import grouped_statistics


@njit(nogil=True, cache=True)
def _touch_kernel(data, indices):
    acc = 0
    for k in range(len(data)):
        acc += data[k] ^ indices[k]
    return acc


def _touch(start, stop, m, cells):
    return int(_touch_kernel(m.data, m.indices))


def study_store(args, out: Path) -> tuple[Store, Path | None]:
    """The store, and the simulator's truth.csv when there is one."""
    if args.study:
        src = Path(args.study)
        if is_store(src):
            truth = src.parent / "truth.csv"
            return Store(src), truth if truth.exists() else None
        if src.is_dir():
            src = src / "manifest.csv"
        target = out / f"{src.parent.name}.zarr"
    else:
        data = out / f"sim_{args.cells}"
        if not (data / "manifest.csv").exists():
            from cellmill.simulate import simulate_study

            t0 = time.perf_counter()
            simulate_study(data, n_cells=args.cells, seed=0)
            print(f"simulated {args.cells} cells in {time.perf_counter() - t0:.0f} s", flush=True)
        src = data / "manifest.csv"
        target = out / f"sim_{args.cells}.zarr"
    if not is_store(target):
        t0 = time.perf_counter()
        ingest(src, target, overwrite=True)
        print(f"ingested in {time.perf_counter() - t0:.0f} s", flush=True)
    truth = src.parent / "truth.csv"
    return Store(target), truth if truth.exists() else None


def set_clusters(store: Store, mask: np.ndarray, truth: Path | None) -> None:
    obs = store.obs()
    if "cluster" in obs and "qc_pass" in obs and np.array_equal(obs["qc_pass"], mask):
        return
    if truth is None:
        raise SystemExit("no cluster column in the store and no truth.csv to take clusters from")
    pop = pd.read_csv(truth, index_col="cell")["population"].reindex(obs.index).to_numpy()
    sizes = pd.Series(pop[mask]).value_counts()  # Seurat numbers clusters by size
    code = {p: str(i) for i, p in enumerate(sizes.index)}
    labels = np.array([code[p] if m else None for p, m in zip(pop, mask, strict=True)],
                      dtype=object)
    store.update_obs(qc_pass=mask, cluster=pd.Categorical(
        labels, categories=[str(i) for i in range(len(sizes))]))


def timed(f, *a, **k):
    t0, c0 = time.perf_counter(), time.process_time()
    out = f(*a, **k)
    return time.perf_counter() - t0, time.process_time() - c0, out


def bench_scanpy(store: Store, labels: np.ndarray, sizes: list[int], sf: float,
                 seed: int = 0) -> list[dict]:
    import anndata as ad
    import scanpy as sc

    rng = np.random.default_rng(seed)
    cells = np.flatnonzero(labels >= 0)
    rows = []
    warnings.filterwarnings("ignore", module="scanpy")  # its per-group PerformanceWarnings
    warm = _rows(store, cells[:300])  # compile scanpy's numba functions outside the timing
    a = ad.AnnData(warm.astype(np.float32))
    a.obs["cluster"] = pd.Categorical(labels[cells[:300]] % 2)
    sc.pp.log1p(a)
    sc.tl.rank_genes_groups(a, "cluster", method="wilcoxon", tie_correct=True, use_raw=False)
    for size in sizes:
        sub = np.sort(rng.choice(cells, size=min(size, len(cells)), replace=False))
        x = _rows(store, sub)
        a = ad.AnnData(x.astype(np.float32))
        a.obs["cluster"] = pd.Categorical(labels[sub].astype(str))
        sc.pp.normalize_total(a, target_sum=sf)
        sc.pp.log1p(a)
        t0, c0 = time.perf_counter(), time.process_time()
        sc.tl.rank_genes_groups(a, "cluster", method="wilcoxon", tie_correct=True,
                                use_raw=False)
        rows.append({"cells": int(len(sub)), "seconds": round(time.perf_counter() - t0, 2),
                     "cpu_seconds": round(time.process_time() - c0, 2), "subset": sub})
        del a, x
    return rows


def _rows(store: Store, cells: np.ndarray):
    """CSR rows of the given cells, read block by block (never the whole matrix at once)."""
    import scipy.sparse as sp

    parts = []
    for start, stop in store.block_ranges():
        sel = cells[(cells >= start) & (cells < stop)]
        if len(sel):
            parts.append(store.read_rows(start, stop)[sel - start])
    return sp.vstack(parts).tocsr()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=196_000)
    ap.add_argument("--study", default="")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory", default="2GB")
    ap.add_argument("--scheduler", default="threads")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scanpy-cells", default="5000,10000")
    ap.add_argument("--no-scanpy", dest="scanpy", action="store_false", default=True)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    memory = parse_bytes(args.memory)

    store, truth = study_store(args, out)
    cfg = load_config(None, [])
    mask = qc_mask(store.obs()["n_features"].to_numpy(), cfg)
    set_clusters(store, mask, truth)
    store = Store(store.path)
    obs = store.obs()
    labels = obs["cluster"].cat.codes.to_numpy().astype(np.int32)
    labels[~mask] = -1
    n_clusters = int(labels.max()) + 1
    group_by = [c for c in cfg.study.group_by if c in obs]
    n_qc = int(mask.sum())
    nnz_qc = int(np.diff(store.indptr)[mask].sum())
    sched = scheduler_for(args.scheduler, args.workers)
    print(f"{store.n_cells} cells ({n_qc} pass QC), {store.n_genes} genes, {nnz_qc} nonzeros "
          f"in QC cells, {n_clusters} clusters; {args.scheduler} x {args.workers}", flush=True)

    # compile / warm caches on a few cells
    small = np.zeros(store.n_cells, bool)
    small[np.flatnonzero(mask)[:64]] = True
    map_blocks(store, _touch, mask=small, scheduler=("sync", 1), progress=False)
    grouped_statistics(store, group_by, 1e4, mask=small, scheduler=("sync", 1))

    best = {"raw": (np.inf, 0.0), "statistics": (np.inf, 0.0)}
    for _ in range(args.repeats):
        t, c, _r = timed(map_blocks, store, _touch, mask=mask, scheduler=sched, progress=False)
        best["raw"] = min(best["raw"], (t, c))
        t, c, ds = timed(grouped_statistics, store, group_by, 1e4, mask=mask,
                         memory_bytes=memory, scheduler=sched)
        best["statistics"] = min(best["statistics"], (t, c))
        print(f"  raw {nnz_qc / best['raw'][0] / 1e6:.1f} Mnnz/s, statistics "
              f"{nnz_qc / best['statistics'][0] / 1e6:.1f} Mnnz/s (best so far)", flush=True)
    n_groups = int(ds.sizes["group"])
    del ds

    t_gm = c_gm = None
    rss_gm = current_rss()
    if not store.has_gene_major():
        with PeakMemory() as mem_gm:
            t_gm, c_gm, _r = timed(build_gene_major, store, memory, workers=args.workers)
        print(f"  gene-major copy built in {t_gm:.1f} s", flush=True)
    store = Store(store.path)
    # warm the markers kernels
    warm = np.full(store.n_cells, -1, np.int32)
    warm[np.flatnonzero(mask)[:40]] = np.arange(40) % 2
    find_all_markers(store, labels=warm, memory_bytes=memory, scheduler=("sync", 1))

    best_m = (np.inf, 0.0)
    rss_m = current_rss()
    for _ in range(args.repeats):
        with PeakMemory() as mem:
            t, c, table = timed(find_all_markers, store, labels=labels, logfc_threshold=0.25,
                                min_pct=0.1, only_pos=True, memory_bytes=memory,
                                scheduler=sched)
        best_m = min(best_m, (t, c))
        print(f"  FindAllMarkers {t:.1f} s wall, {c:.1f} s CPU, {len(table)} rows", flush=True)

    result = {
        "n_cells": store.n_cells, "n_cells_qc": n_qc, "n_genes": store.n_genes,
        "nnz_qc": nnz_qc, "n_clusters": n_clusters, "n_groups": n_groups,
        "group_by": group_by, "scheduler": args.scheduler, "workers": args.workers,
        "memory_budget": args.memory, "repeats": args.repeats,
        "raw": {"seconds": round(best["raw"][0], 2), "cpu_seconds": round(best["raw"][1], 2),
                "mnnz_per_s": round(nnz_qc / best["raw"][0] / 1e6, 1)},
        "statistics": {"seconds": round(best["statistics"][0], 2),
                       "cpu_seconds": round(best["statistics"][1], 2),
                       "mnnz_per_s": round(nnz_qc / best["statistics"][0] / 1e6, 1),
                       "fraction_of_raw": round(best["raw"][0] / best["statistics"][0], 3),
                       "cpu_fraction_of_raw": round(best["raw"][1] / best["statistics"][1], 3)},
        "gene_major": None if t_gm is None else {
            "seconds": round(t_gm, 1), "cpu_seconds": round(c_gm, 1),
            "peak_rss_mb": round(mem_gm.peak / 2**20, 1),
            "rss_before_mb": round(rss_gm / 2**20, 1)},
        "markers": {"seconds": round(best_m[0], 2), "cpu_seconds": round(best_m[1], 2),
                    "rows": int(len(table)), "peak_rss_mb": round(mem.peak / 2**20, 1),
                    "rss_before_mb": round(rss_m / 2**20, 1)},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_1min": round(os.getloadavg()[0], 2)},
    }
    if args.scanpy:
        sizes = [int(s) for s in args.scanpy_cells.split(",") if s]
        runs = bench_scanpy(store, labels, sizes, 1e4)
        big = runs[-1]
        sub_labels = np.full(store.n_cells, -1, np.int32)
        sub_labels[big["subset"]] = labels[big["subset"]]
        t_sub, c_sub, _r = timed(find_all_markers, store, labels=sub_labels,
                                 logfc_threshold=0.25, min_pct=0.1, only_pos=True,
                                 memory_bytes=memory, scheduler=sched)
        # scaling exponent from CPU seconds (steadier than wall time on a shared machine)
        if len(runs) > 1 and runs[0]["cpu_seconds"] > 0:
            k = math.log(runs[-1]["cpu_seconds"] / runs[0]["cpu_seconds"]) / math.log(
                runs[-1]["cells"] / runs[0]["cells"])
        else:
            k = 1.0
        k = max(k, 1.0)  # never extrapolate below linear
        grow = (n_qc / big["cells"]) ** k
        result["scanpy"] = {
            "runs": [{k2: v for k2, v in r.items() if k2 != "subset"} for r in runs],
            "scaling_exponent": round(k, 3),
            "extrapolated_seconds_full": round(big["seconds"] * grow, 1),
            "extrapolated_cpu_seconds_full": round(big["cpu_seconds"] * grow, 1),
            "cellmill_over_scanpy_speedup_full": round(big["seconds"] * grow / best_m[0], 1),
            "cellmill_over_scanpy_cpu_speedup_full": round(
                big["cpu_seconds"] * grow / best_m[1], 1),
            "cellmill_same_subset_seconds": round(t_sub, 2),
            "cellmill_same_subset_cpu_seconds": round(c_sub, 2),
            "speedup_same_subset": round(big["seconds"] / t_sub, 1)}
    close_clients()
    (out / "markers.json").write_text(json.dumps(result, indent=1))
    (out / "markers.md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(r: dict) -> str:
    lines = [
        f"### markers + grouped statistics: {r['n_cells']:,} cells ({r['n_cells_qc']:,} pass "
        f"QC), {r['n_genes']:,} genes, {r['nnz_qc']:,} nonzeros, {r['n_clusters']} clusters",
        "",
        f"{r['scheduler']} x {r['workers']} workers, memory budget {r['memory_budget']}, "
        f"{r['machine']['cpus']} CPUs, load average {r['machine']['load_avg_1min']}",
        "",
        "| step | wall s | CPU s | note |",
        "|---|---:|---:|---|",
        f"| raw decode pass | {r['raw']['seconds']} | {r['raw']['cpu_seconds']} | "
        f"{r['raw']['mnnz_per_s']} Mnnz/s |",
        f"| grouped statistics ({r['n_groups']} groups) | {r['statistics']['seconds']} | "
        f"{r['statistics']['cpu_seconds']} | {r['statistics']['mnnz_per_s']} Mnnz/s = "
        f"{r['statistics']['fraction_of_raw']:.0%} of raw (CPU: "
        f"{r['statistics']['cpu_fraction_of_raw']:.0%}) |",
    ]
    if r["gene_major"]:
        g = r["gene_major"]
        lines.append(f"| gene-major copy (once) | {g['seconds']} | {g['cpu_seconds']} | "
                     f"peak RSS {g['peak_rss_mb']} MB (process before: {g['rss_before_mb']} "
                     f"MB) |")
    m = r["markers"]
    lines.append(f"| FindAllMarkers | {m['seconds']} | {m['cpu_seconds']} | {m['rows']} rows, "
                 f"peak RSS {m['peak_rss_mb']} MB (process before: {m['rss_before_mb']} MB) |")
    if "scanpy" in r:
        s = r["scanpy"]
        for run in s["runs"]:
            lines.append(f"| scanpy rank_genes_groups wilcoxon, {run['cells']:,} cells | "
                         f"{run['seconds']} | {run['cpu_seconds']} | |")
        lines.append(f"| scanpy at {r['n_cells_qc']:,} cells (extrapolated, exponent "
                     f"{s['scaling_exponent']}) | {s['extrapolated_seconds_full']} | "
                     f"{s['extrapolated_cpu_seconds_full']} | cellmill "
                     f"{s['cellmill_over_scanpy_speedup_full']}x faster (CPU: "
                     f"{s['cellmill_over_scanpy_cpu_speedup_full']}x) |")
        lines.append(f"| cellmill FindAllMarkers on scanpy's largest subset | "
                     f"{s['cellmill_same_subset_seconds']} | "
                     f"{s['cellmill_same_subset_cpu_seconds']} | "
                     f"{s['speedup_same_subset']}x faster than scanpy (reads the whole "
                     f"gene-major copy) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
