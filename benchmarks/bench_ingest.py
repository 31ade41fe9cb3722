"""Ingest at scale: peak RSS and speed of `cellmill ingest`, and raw decode of the store.

    python benchmarks/bench_ingest.py [--cells 200000] [--samples 12] [--out bench_out]

Writes its own synthetic 10x v3 files (vectorised generator, ~2,000 genes per cell), runs
`cellmill ingest` in a child process (its peak RSS is the child's ru_maxrss), then times a
read-only pass over the store. Results: bench_out/ingest.json and bench_out/ingest.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd


def write_sample(path: Path, n_cells: int, n_genes: int, per_cell: int, seed: int) -> int:
    rng = np.random.default_rng(seed)
    p = rng.lognormal(0, 2, n_genes)
    p /= p.sum()
    draws = rng.choice(n_genes, size=n_cells * per_cell, p=p).astype(np.int64)
    rows = np.repeat(np.arange(n_cells, dtype=np.int64), per_cell)
    keys, counts = np.unique(rows * n_genes + draws, return_counts=True)
    del draws, rows
    cell, gene = keys // n_genes, keys % n_genes
    indptr = np.searchsorted(cell, np.arange(n_cells + 1)).astype(np.int64)
    names = [f"Gene{i}" for i in range(n_genes)]
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["barcodes"] = np.array([f"{seed:04d}{i:012d}-1" for i in range(n_cells)], dtype="S")
        m.create_dataset("data", data=counts.astype(np.int32), compression="gzip",
                         compression_opts=1)
        m.create_dataset("indices", data=gene, compression="gzip", compression_opts=1)
        m["indptr"] = indptr
        m["shape"] = np.array([n_genes, n_cells], dtype=np.int32)
        ft = m.create_group("features")
        ft["id"] = np.array([f"ENSMUSG{i:011d}" for i in range(n_genes)], dtype="S")
        ft["name"] = np.array(names, dtype="S")
        ft["feature_type"] = np.array(["Gene Expression"] * n_genes, dtype="S")
        ft["genome"] = np.array(["mm10"] * n_genes, dtype="S")
    return len(keys)


def run_measured(cmd: list[str]) -> float:
    """Run a command; return its peak RSS in MB, sampled every 20 ms. (The child's ru_maxrss
    would count the pages it shared with this process between fork and exec.)"""
    import psutil

    proc = subprocess.Popen(cmd)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.02)
    if proc.returncode:
        raise SystemExit(f"{cmd} failed with {proc.returncode}")
    return peak / 2**20


def raw_decode(store_path: Path) -> dict:
    from cellmill.engine.passes import map_blocks
    from cellmill.io.store import Store

    store = Store(store_path)

    def touch(start, stop, m, cells):
        return int(m.data.sum(dtype=np.int64))

    best = np.inf
    for _ in range(2):
        t0 = time.perf_counter()
        map_blocks(store, touch, progress=False)
        best = min(best, time.perf_counter() - t0)
    return {"seconds": round(best, 2), "mnnz_per_s": round(store.nnz / best / 1e6, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cells", type=int, default=200000)
    ap.add_argument("--samples", type=int, default=12)
    ap.add_argument("--genes", type=int, default=27998)
    ap.add_argument("--per-cell", type=int, default=2100)
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows, nnz = [], 0
        t0 = time.perf_counter()
        per = args.cells // args.samples
        for s in range(args.samples):
            path = tmp / f"s{s}.h5"
            nnz += write_sample(path, per, args.genes, args.per_cell, seed=s)
            rows.append({"sample": f"S{s}", "path": path.name, "condition": "SNI"})
        pd.DataFrame(rows).to_csv(tmp / "manifest.csv", index=False)
        gen_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        peak_mb = run_measured([sys.executable, "-m", "cellmill.cli", "ingest",
                                str(tmp / "manifest.csv"), "-o", str(tmp / "study.zarr")])
        ingest_s = time.perf_counter() - t0
        decode = raw_decode(tmp / "study.zarr")
        store_mb = sum(f.stat().st_size for f in (tmp / "study.zarr").rglob("*")
                       if f.is_file()) / 2**20
    result = {"cells": per * args.samples, "samples": args.samples, "genes": args.genes,
              "nnz": nnz, "generate_s": round(gen_s, 1), "ingest_s": round(ingest_s, 1),
              "ingest_mnnz_per_s": round(nnz / ingest_s / 1e6, 1),
              "ingest_peak_rss_mb": round(peak_mb), "store_mb": round(store_mb),
              "raw_decode": decode}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ingest.json").write_text(json.dumps(result, indent=1))
    md = ["| cells | nonzeros | ingest s | ingest Mnnz/s | ingest peak RSS MB | store MB | "
          "raw decode Mnnz/s |", "|---|---|---|---|---|---|---|",
          f"| {result['cells']} | {nnz} | {result['ingest_s']} | "
          f"{result['ingest_mnnz_per_s']} | {result['ingest_peak_rss_mb']} | "
          f"{result['store_mb']} | {decode['mnnz_per_s']} |"]
    (out / "ingest.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
