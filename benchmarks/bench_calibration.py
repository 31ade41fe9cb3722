"""Benchmark: calibration and power of the cell-level Welch tests vs the pseudobulk tests.

Simulates studies with animal-to-animal variation (the study's design of 12 samples, and
`--replicates 3`: 36), takes the planted populations as the clusters (so clustering errors do
not enter), runs the statistics pass and the pseudobulk contrasts, and measures per cluster:
  - the false-positive rate: the share of genes without a planted effect (in that cluster and
    time point) with two-sided p < 0.05, cell-level Welch (all cells) and pseudobulk (voom);
  - the power: the share of planted (population, time point, gene) effects found at
    BH-adjusted p < 0.05 by each test (BH over the contrast's tested genes for both).
Also times the grouped pass and the pseudobulk part (sums to Dataset, contrasts, table).

    python benchmarks/bench_calibration.py [OUT_DIR] [--cells N] [--replicates 1,3]
        [--replicate-sd 0.2] [--seed S]

Writes OUT_DIR/bench_calibration.json and OUT_DIR/bench_calibration.md (default ./bench_out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cellmill.config import load_config
from cellmill.io.ingest import ingest
from cellmill.io.store import Store
from cellmill.simulate import simulate_study
from cellmill.stages.statistics.grouped import grouped_statistics
from cellmill.stages.statistics.pseudobulk import (
    pseudobulk_dataset,
    pseudobulk_tests,
    sample_metadata,
)
from cellmill.stages.statistics.welch import bh_adjust

SIG = 0.05


def run_design(root: Path, n_cells: int, replicates: int, replicate_sd: float, seed: int,
               workers: int) -> dict:
    sim = root / f"sim_r{replicates}"
    simulate_study(sim, n_cells=n_cells, seed=seed, replicates=replicates,
                   replicate_sd=replicate_sd)
    planted = json.loads((sim / "planted.json").read_text())
    store = ingest(sim / "manifest.csv", root / f"r{replicates}.zarr", overwrite=True)
    truth = pd.read_csv(sim / "truth.csv").set_index("cell")["population"]
    pop = truth.reindex(store.obs().index).to_numpy()
    qc = ~np.isin(pop, ["low_quality", "doublet"])
    store.update_obs(qc_pass=qc, cluster=pd.Categorical(np.where(qc, pop, None),
                                                        categories=sorted(set(pop[qc]))))
    store = Store(store.path)
    cfg = load_config(None, [])
    t0 = time.perf_counter()
    ds = grouped_statistics(store, ["cluster", "condition", "timepoint", "sample"], 1e4,
                            mask=qc, scheduler=("threads", workers))
    t1 = time.perf_counter()
    meta = sample_metadata(store.obs(), "sample", ["condition", "timepoint", "sex"])
    pb = pseudobulk_dataset(ds, "sample", meta)
    table, _ = pseudobulk_tests(pb, cfg, cfg.study.pseudobulk_min_cells, ds=ds,
                                workers=workers)
    t2 = time.perf_counter()

    effects = {}
    for e in planted["effects"]:
        effects.setdefault((e["population"], e["timepoint"]), set()).update(e["genes"])
    rows = table[(table["contrast"] == "SNI_vs_Sham") & (table["gene"] != "")
                 & ~table["cluster"].isin(["all"]) & ~table["timepoint"].isin(["pooled"])]
    per_cluster, found = [], []
    for (cl, tp), g in rows.groupby(["cluster", "timepoint"], sort=False):
        hits = effects.get((cl, tp), set())
        planted_mask = g["gene"].isin(hits).to_numpy()
        null = g[~planted_mask]
        per_cluster.append(dict(cluster=cl, timepoint=tp, genes=int(len(null)),
                                fpr_cells=float(np.mean(null["p_value_cells"] < SIG)),
                                fpr_pseudobulk=float(np.mean(null["P.Value"] < SIG))))
        if planted_mask.any():
            padj_cells = bh_adjust(g["p_value_cells"].to_numpy(float))
            found.append(dict(cluster=cl, timepoint=tp, planted_tested=int(planted_mask.sum()),
                              planted_total=len(hits),
                              found_cells=int((padj_cells[planted_mask] < SIG).sum()),
                              found_pseudobulk=int((g["adj.P.Val"].to_numpy(float)
                                                    [planted_mask] < SIG).sum())))
    fpr = pd.DataFrame(per_cluster)
    by_cluster = fpr.groupby("cluster").apply(
        lambda d: pd.Series({"genes": int(d["genes"].sum()),
                             "fpr_cells": float(np.average(d["fpr_cells"], weights=d["genes"])),
                             "fpr_pseudobulk": float(np.average(d["fpr_pseudobulk"],
                                                                weights=d["genes"]))}),
        include_groups=False).reset_index()
    total_null = fpr["genes"].sum()
    return dict(
        replicates=replicates, samples=int(pb.sizes["sample"]), cells=int(qc.sum()),
        replicate_sd=replicate_sd,
        fpr_cells=float((fpr["fpr_cells"] * fpr["genes"]).sum() / total_null),
        fpr_pseudobulk=float((fpr["fpr_pseudobulk"] * fpr["genes"]).sum() / total_null),
        by_cluster=by_cluster.to_dict("records"), power=found,
        power_cells=sum(f["found_cells"] for f in found) / max(1, sum(f["planted_tested"]
                                                                     for f in found)),
        power_pseudobulk=sum(f["found_pseudobulk"] for f in found) / max(
            1, sum(f["planted_tested"] for f in found)),
        seconds_grouped_pass=t1 - t0, seconds_pseudobulk=t2 - t1,
        contrasts=int(table.drop_duplicates(["cluster", "timepoint", "contrast"]).shape[0]),
    )


def markdown(res: dict) -> str:
    out = [f"# Cell-level vs pseudobulk tests ({res['machine']})", "",
           f"Simulated studies of {res['cells']:,} cells, animal sd {res['replicate_sd']} "
           "(natural log), planted populations as clusters; SNI vs Sham per cluster x time "
           "point. FPR: genes without a planted effect with p < 0.05 (goal for pseudobulk: "
           "0.04-0.06). Power: planted effects found at BH-adjusted p < 0.05.", "",
           "| design | samples | FPR cells | FPR pseudobulk | power cells | power pseudobulk "
           "| grouped pass s | pseudobulk s |", "|---|---|---|---|---|---|---|---|"]
    for d in res["designs"]:
        out.append(f"| {d['replicates']} per group | {d['samples']} | {d['fpr_cells']:.3f} | "
                   f"{d['fpr_pseudobulk']:.3f} | {d['power_cells']:.3f} | "
                   f"{d['power_pseudobulk']:.3f} | {d['seconds_grouped_pass']:.1f} | "
                   f"{d['seconds_pseudobulk']:.1f} |")
    for d in res["designs"]:
        out += ["", f"## {d['replicates']} animal(s) per condition x time point x sex: FPR by "
                "cluster", "", "| cluster | null genes x time points | FPR cells | FPR "
                "pseudobulk |", "|---|---|---|---|"]
        for r in d["by_cluster"]:
            out.append(f"| {r['cluster']} | {int(r['genes']):,} | {r['fpr_cells']:.3f} | "
                       f"{r['fpr_pseudobulk']:.3f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", nargs="?", default="bench_out")
    ap.add_argument("--cells", type=int, default=40_000)
    ap.add_argument("--replicates", default="1,3")
    ap.add_argument("--replicate-sd", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    designs = []
    with tempfile.TemporaryDirectory(prefix="cellmill-calib-") as tmp:
        for r in [int(x) for x in args.replicates.split(",")]:
            d = run_design(Path(tmp), args.cells, r, args.replicate_sd, args.seed, args.workers)
            print(f"replicates {r}: FPR cells {d['fpr_cells']:.3f}, pseudobulk "
                  f"{d['fpr_pseudobulk']:.3f}; power cells {d['power_cells']:.3f}, "
                  f"pseudobulk {d['power_pseudobulk']:.3f}", flush=True)
            designs.append(d)
    res = dict(machine=f"{os.cpu_count()} CPUs, {platform.machine()}", cells=args.cells,
               replicate_sd=args.replicate_sd, seed=args.seed, designs=designs)
    (out / "bench_calibration.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "bench_calibration.md").write_text(markdown(res))
    print(f"wrote {out / 'bench_calibration.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
