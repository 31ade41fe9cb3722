"""Run cellmill on an HPC cluster: Dask workers as SLURM jobs (dask-jobqueue), cellmill pointed at
their scheduler.

    pip install dask-jobqueue          # not a cellmill dependency; on the login/head node
    python examples/hpc_slurm.py study.toml -o /shared/results --jobs 8 --queue normal \
        --account myproj --cores 8 --memory 32GB --walltime 04:00:00

What it does:
1. starts a dask.distributed scheduler in this process and submits `--jobs` SLURM jobs, each
   running `--cores` single-threaded Dask workers (one process per core, `--memory` per job);
2. waits for the first workers, then runs the workflow with
   `compute.scheduler = <the scheduler's tcp:// address>`: every streaming pass (hvg, pca, grouped
   statistics, ...) runs its blocks on the SLURM workers, which read them from the store
   themselves, so the store (the output folder) must be on a file system every node mounts, at the
   same path;
3. closes the cluster (cancels the jobs) at the end, also on errors.

Results are identical to a laptop run with threads: reductions fold per-granule partial sums in a
fixed order whatever the worker count, and a task lost with a preempted or crashed worker is
recomputed on another one.

The other way round -- a long-lived cluster started once, several runs against it:

    # in a Python session on the head node (keep it open)
    from dask_jobqueue import SLURMCluster
    cluster = SLURMCluster(queue="normal", account="myproj", cores=8, processes=8,
                           memory="32GB", walltime="08:00:00",
                           scheduler_options={"port": 8786})
    cluster.scale(jobs=8)
    print(cluster.scheduler_address)        # e.g. tcp://10.1.2.3:8786

    # in a shell, or in a batch job of its own
    cellmill run study.toml -o /shared/results --set compute.scheduler=tcp://10.1.2.3:8786

or in the TOML file:

    [compute]
    scheduler = "tcp://10.1.2.3:8786"
    workers = 64          # total worker processes (jobs x cores): blocks in flight
    memory = "128GB"      # budget over all of them: blocks are sized to memory / 4 / workers

The `cellmill run` process itself keeps only O(cells x small) arrays (embeddings, neighbour lists,
the graph, labels) and the folded partial sums; at a million cells give it a node with a few GB.
Every node needs the same Python environment (cellmill and its dependencies, same versions).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="the study's TOML configuration")
    ap.add_argument("-o", "--output", required=True,
                    help="output folder, on a file system shared with the compute nodes")
    ap.add_argument("--jobs", type=int, default=4, help="SLURM jobs (each a group of workers)")
    ap.add_argument("--cores", type=int, default=8, help="cores (= worker processes) per job")
    ap.add_argument("--memory", default="32GB", help="memory per job")
    ap.add_argument("--queue", default=None, help="SLURM partition (#SBATCH -p)")
    ap.add_argument("--account", default=None, help="SLURM account (#SBATCH -A)")
    ap.add_argument("--walltime", default="04:00:00")
    ap.add_argument("--interface", default=None,
                    help="network interface the workers use (e.g. ib0 for InfiniBand)")
    ap.add_argument("--local-directory", default=None,
                    help="node-local scratch for worker spill files (e.g. $TMPDIR)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="more configuration overrides, as for `cellmill run`")
    args = ap.parse_args(argv)

    from dask_jobqueue import SLURMCluster
    from distributed import Client

    from cellmill.config import load_config
    from cellmill.engine.schedulers import close_clients
    from cellmill.engine.workflow import run_workflow, timing_summary

    output = Path(args.output).resolve()  # workers open the store by this path
    cluster = SLURMCluster(
        queue=args.queue, account=args.account, cores=args.cores, processes=args.cores,
        memory=args.memory, walltime=args.walltime, interface=args.interface,
        local_directory=args.local_directory,
        # one thread per worker process: cellmill's kernels release the GIL, but one process
        # per core keeps BLAS/Numba threads from oversubscribing the node
        job_script_prologue=["export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 "
                             "MKL_NUM_THREADS=1"],
    )
    try:
        print(cluster.job_script(), file=sys.stderr)
        cluster.scale(jobs=args.jobs)
        n_workers = args.jobs * args.cores
        with Client(cluster) as client:  # only to wait for workers; cellmill opens its own
            client.wait_for_workers(min(n_workers, args.cores), timeout=3600)
        per_job = _bytes(args.memory)
        overrides = [f"compute.scheduler={cluster.scheduler_address}",
                     f"compute.workers={n_workers}",
                     f"compute.memory={per_job * args.jobs}", *args.set]
        cfg = load_config(args.config, overrides)
        ctx = run_workflow(cfg, output)
        print(timing_summary(ctx))
    finally:
        close_clients()  # cellmill's client to the scheduler
        cluster.close()  # cancels the SLURM jobs
    return 0


def _bytes(text: str) -> int:
    from cellmill.config import parse_bytes

    return parse_bytes(text)


if __name__ == "__main__":
    sys.exit(main())
