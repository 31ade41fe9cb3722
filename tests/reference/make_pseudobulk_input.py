"""Make the committed simulated pseudobulk input of tests/reference/pseudobulk_reference.R.

Usage (from the repository root):
    PYTHONPATH=$PWD python tests/reference/make_pseudobulk_input.py [tmp_dir]

Simulates a study with cellmill's simulator (6,000 cells, default genes, seed 20) into tmp_dir
(default: a temporary directory, removed afterwards), sums the raw counts of every cell per
sample x planted population (truth.csv) for three populations and writes, under
tests/reference/pseudobulk/sim/:
  counts_<population>.csv.gz  gene, then one integer column per sample (manifest order)
  samples.csv                 population, sample, condition, timepoint, sex, n_cells
The R script reads these files; the Python test reads the same files, so the case runs without
../shared. Output is deterministic for the seed.
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from cellmill.io.tenx import read_10x_h5
from cellmill.simulate import simulate_study

SEED = 20
N_CELLS = 6000
POPULATIONS = ("MG_homeostatic_1", "MG_Apoe_high", "MG_homeostatic_2")
OUT = Path(__file__).resolve().parent / "pseudobulk" / "sim"


def make(study: Path) -> None:
    # replicate_sd 0: the study the references were made from (before animal variation)
    simulate_study(study, n_cells=N_CELLS, seed=SEED, threads=1, replicate_sd=0.0)
    manifest = pd.read_csv(study / "manifest.csv")
    truth = pd.read_csv(study / "truth.csv")
    sums = {p: {} for p in POPULATIONS}
    rows = []
    genes = None
    for rec in manifest.itertuples():
        s = read_10x_h5(study / rec.path)
        if genes is None:
            genes = s.var.index.to_numpy()
        elif not np.array_equal(genes, s.var.index.to_numpy()):
            raise SystemExit(f"{rec.path}: gene order differs from the first sample")
        cells = pd.Index([f"{rec.sample}_{b}" for b in s.barcodes])
        pop = truth.set_index("cell")["population"].reindex(cells).to_numpy()
        for p in POPULATIONS:
            sel = pop == p
            sums[p][rec.sample] = np.asarray(s.counts[sel].sum(axis=0)).ravel().astype(np.int64)
            rows.append((p, rec.sample, rec.condition, rec.timepoint, rec.sex, int(sel.sum())))
    OUT.mkdir(parents=True, exist_ok=True)
    for p in POPULATIONS:
        df = pd.DataFrame(sums[p], index=pd.Index(genes, name="gene"))
        df.to_csv(OUT / f"counts_{p}.csv.gz", compression={"method": "gzip", "mtime": 0})
    pd.DataFrame(rows, columns=["population", "sample", "condition", "timepoint", "sex",
                                "n_cells"]).to_csv(OUT / "samples.csv", index=False)


def main() -> None:
    if len(sys.argv) > 1:
        make(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            make(Path(tmp))


if __name__ == "__main__":
    main()
