"""Measure codecs for the store's CSR arrays: size and decode throughput.

    python benchmarks/bench_codecs.py [--cells 20000] [--out bench_out]

Writes bench_out/codecs.json and bench_out/codecs.md. The data are counts shaped like 10x
data (~2,000 detected genes per cell out of 28k, gamma-Poisson values), in X's layout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from numcodecs import zarr3 as nc3
from zarr.codecs import BloscCodec, ZstdCodec

CHUNK = 1 << 18


def synthetic_csr(n_cells: int, n_genes: int = 27998, per_cell: int = 2000, seed: int = 0):
    rng = np.random.default_rng(seed)
    # gene popularity spans orders of magnitude, as in real data
    p = rng.lognormal(0, 2, n_genes)
    p /= p.sum()
    indices, data, indptr = [], [], [0]
    for _ in range(n_cells):
        k = int(rng.normal(per_cell, 300))
        idx = np.unique(rng.choice(n_genes, size=max(k, 10), replace=False, p=p))
        mu = p[idx] * 6000
        vals = 1 + rng.poisson(rng.gamma(2.0, mu / 2.0))
        indices.append(idx.astype(np.int32))
        data.append(vals.astype(np.int32))
        indptr.append(indptr[-1] + len(idx))
    return np.concatenate(data), np.concatenate(indices), np.array(indptr, dtype=np.int64)


CODECS = {
    "none": [],
    "zstd-1": [ZstdCodec(level=1)],
    "zstd-3": [ZstdCodec(level=3)],
    "lz4": [nc3.LZ4()],
    "blosc-lz4-shuffle": [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
    "blosc-lz4-bitshuffle": [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")],
    "blosc-zstd-shuffle": [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")],
}


def measure(data, indices, indptr, tmp: Path, block_cells: int = 4096) -> list[dict]:
    rows = []
    for name, comp in CODECS.items():
        path = tmp / f"{name}.zarr"
        g = zarr.open_group(path, mode="w", zarr_format=3)
        t0 = time.perf_counter()
        for key, arr in (("data", data), ("indices", indices)):
            a = g.create_array(key, shape=arr.shape, dtype=arr.dtype, chunks=(CHUNK,),
                               compressors=comp)
            a[:] = arr
        write_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        a_data, a_idx = g["data"], g["indices"]
        best = np.inf
        for _ in range(3):
            t0 = time.perf_counter()
            for s in range(0, len(indptr) - 1, block_cells):
                lo, hi = indptr[s], indptr[min(s + block_cells, len(indptr) - 1)]
                a_data[lo:hi]
                a_idx[lo:hi]
            best = min(best, time.perf_counter() - t0)
        rows.append({"codec": name, "bytes_per_nnz": round(size / len(data), 3),
                     "decode_mnnz_per_s": round(len(data) / best / 1e6, 1),
                     "encode_mnnz_per_s": round(len(data) / write_s / 1e6, 1)})
        shutil.rmtree(path)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cells", type=int, default=20000)
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args(argv)
    data, indices, indptr = synthetic_csr(args.cells)
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(data, indices, indptr, Path(tmp))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"cells": args.cells, "nnz": int(len(data)), "chunk_nnz": CHUNK, "codecs": rows}
    (out / "codecs.json").write_text(json.dumps(result, indent=1))
    lines = ["| codec | bytes/nnz | decode Mnnz/s | encode Mnnz/s |", "|---|---|---|---|"]
    lines += [f"| {r['codec']} | {r['bytes_per_nnz']} | {r['decode_mnnz_per_s']} | "
              f"{r['encode_mnnz_per_s']} |" for r in rows]
    (out / "codecs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
