"""Speed and memory of the study simulator.

    python benchmarks/bench_simulate.py [N_CELLS] [--seed 0] [--threads T] [--keep DIR]
                                        [--json OUT.json]

Simulates N_CELLS QC-passing cells (default 195,718, the study's size) x 27,998 genes into a
temporary directory (or --keep DIR) and prints JSON: wall time, CPU time, peak RSS (ru_maxrss of
this process and its children), cells, non-zeros and bytes written. The machine's load average is
recorded too, because other work on a shared machine slows the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path


def peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024.0  # ru_maxrss is in KiB on Linux


def run(n_cells: int, seed: int, threads: int | None, out_dir: Path) -> dict:
    from cellmill.simulate import simulate_study

    load_before = os.getloadavg()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    info = simulate_study(out_dir, n_cells=n_cells, seed=seed, threads=threads, progress=True)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    size = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    return dict(
        benchmark="simulate", n_cells=n_cells, n_cells_total=info["n_cells_total"],
        n_genes=info["n_genes"], nnz=info["nnz"], seed=seed, threads=threads or os.cpu_count(),
        cpu_count=os.cpu_count(), wall_seconds=round(wall, 2),
        cpu_user_seconds=round(cpu1.ru_utime - cpu0.ru_utime, 2),
        cpu_system_seconds=round(cpu1.ru_stime - cpu0.ru_stime, 2),
        peak_rss_mb=round(peak_rss_mb(), 1), bytes_written=size,
        load_average_before=[round(x, 2) for x in load_before],
        load_average_after=[round(x, 2) for x in os.getloadavg()],
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n_cells", nargs="?", type=int, default=195_718)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--keep", type=Path, default=None, help="write here and keep the files")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = ap.parse_args(argv)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = run(args.n_cells, args.seed, args.threads, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_simulate_") as tmp:
            result = run(args.n_cells, args.seed, args.threads, Path(tmp))
    text = json.dumps(result, indent=1)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
