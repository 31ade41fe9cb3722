"""The benchmark suite: the same as `cellmill bench` (the suite lives in cellmill/bench/).

    python benchmarks/run_suite.py [--sizes 25k,50k,100k,196k] [--out bench_out] [--no-scanpy]

Simulates studies of each size, runs every stage of the workflow (each in its own process, with
wall time, CPU time and peak RSS from the store's stage records), a read-only decode pass, and
scanpy on the same data in its own process (cellmill/bench/scanpy_baseline.py; the `bench` extra).
Writes bench_out/bench.json and bench_out/bench.md.
"""

import sys

from cellmill.bench.suite import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
