"""End to end: `cellmill run` with the study's defaults on a simulated study with planted truth.

The simulator plants (planted.json): Sigmar1 up in SNI vs Sham in one population at 5mo (and in
another at 3d), and the inflammatory-response set up in the same population at 5mo. The run must
find them, and its clusters must match the simulated populations.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellmill.engine.registry import ORDER, load_stages

N_CELLS = 5000
SEED = 3
ALPHA = 0.05


def _missing_stages() -> list[str]:
    stages = load_stages()
    return [n for n in ORDER if n not in stages]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    missing = _missing_stages()
    if missing:
        pytest.skip(f"stage(s) not built yet: {', '.join(missing)}")
    from cellmill.engine.workflow import run_demo

    # `cellmill demo` = simulate, then `cellmill run` with the study's defaults (planted GMT)
    out = tmp_path_factory.mktemp("e2e")
    ctx = run_demo(out, n_cells=N_CELLS, seed=SEED)
    sim = out / "simulated"
    planted = json.loads((sim / "planted.json").read_text())
    truth = pd.read_csv(sim / "truth.csv", dtype=str).set_index("cell")
    return ctx, out, planted, truth


def _effect(planted: dict, kind: str, timepoint: str) -> dict:
    hits = [e for e in planted["effects"] if e["kind"] == kind and e["timepoint"] == timepoint]
    assert len(hits) == 1, hits
    return hits[0]


def adjusted_rand_index(a, b) -> float:
    """Hubert & Arabie's ARI from the contingency table (written out, no library)."""
    _, ai = np.unique(np.asarray(a), return_inverse=True)
    _, bi = np.unique(np.asarray(b), return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(table, (ai, bi), 1)

    def pairs(x):
        return (x * (x - 1) / 2).sum()

    n = len(ai)
    index, rows, cols = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = rows * cols / (n * (n - 1) / 2)
    return float((index - expected) / ((rows + cols) / 2 - expected))


def test_ari_formula_matches_a_hand_count():
    # a = {1,2,3}{4,5,6}, b = {1,2}{3,4,5,6}: index 4, rows 6, cols 7, expected 42/15
    a, b = [0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]
    assert adjusted_rand_index(a, b) == pytest.approx((4 - 2.8) / (6.5 - 2.8))
    assert adjusted_rand_index(a, a) == pytest.approx(1.0)


def _clusters_and_truth(ctx, truth):
    obs = ctx.store.obs()
    qc = obs["qc_pass"].to_numpy().astype(bool)
    lab = obs["cluster"][qc].astype(str)
    pop = truth.loc[lab.index, "population"]
    return lab, pop


def _cluster_of(lab: pd.Series, pop: pd.Series, population: str) -> str:
    """The cluster that holds most cells of a simulated population."""
    return str(lab[pop == population].value_counts().idxmax())


def test_clusters_match_planted_populations(run):
    ctx, out, planted, truth = run
    lab, pop = _clusters_and_truth(ctx, truth)
    assert set(pop) <= {p["name"] for p in planted["populations"]}  # QC removed the fakes
    ari = adjusted_rand_index(lab.to_numpy(), pop.to_numpy())
    assert ari >= 0.8, f"ARI {ari:.3f}"


def _target_tests(out: Path) -> pd.DataFrame:
    tt = pd.read_csv(out / "tables" / "target_tests.csv", dtype={"cluster": str,
                                                                  "timepoint": str})
    cond = tt["contrast"].str.contains("SNI") & tt["contrast"].str.contains("Sham")
    return tt[cond & (tt["gene"] == "Sigmar1")]


def test_planted_sigmar1_increase_found(run):
    ctx, out, planted, truth = run
    eff = _effect(planted, "gene", "5mo")
    assert eff["name"] == "Sigmar1"
    lab, pop = _clusters_and_truth(ctx, truth)
    target = _cluster_of(lab, pop, eff["population"])
    tt = _target_tests(out)
    at5 = tt[(tt["timepoint"] == "5mo") & (tt["cluster"] != "all")]
    row = at5[at5["cluster"] == target]
    assert len(row) == 1
    row = row.iloc[0]
    assert row["alternative"] == "greater"
    assert row["mean_case"] > row["mean_control"]
    assert row["p_value"] < ALPHA, row.to_dict()
    others = at5[at5["cluster"] != target]
    sig = others[others["p_value"] < ALPHA]
    assert len(sig) <= len(others) // 4, sig[["cluster", "p_value"]].to_dict("records")


def test_planted_pathway_up_in_that_cluster(run):
    ctx, out, planted, truth = run
    eff = _effect(planted, "gene_set", "5mo")
    lab, pop = _clusters_and_truth(ctx, truth)
    target = _cluster_of(lab, pop, eff["population"])
    g = pd.read_csv(out / "tables" / "gsea.csv", dtype={"cluster": str, "timepoint": str})
    row = g[(g["pathway"] == eff["name"]) & (g["cluster"] == target) & (g["timepoint"] == "5mo")]
    assert len(row) == 1
    assert row["NES"].iloc[0] > 0 and row["padj"].iloc[0] < ALPHA, row.to_dict("records")


def test_report_is_complete(run):
    from cellmill.report.figures import ReportInputs

    ctx, out, planted, truth = run
    text = (out / "report.html").read_text()
    assert "Every figure and table was produced." in text, re.findall(r"<li>(.*?)</li>", text)
    assert len(re.findall(r'src="data:image/png;base64,', text)) == 13  # with the QQ figure
    tt = pd.read_csv(out / "tables" / "target_tests.csv")
    assert {"p_value_pseudobulk", "n_samples_case", "n_samples_control"} <= set(tt.columns)
    pb = pd.read_csv(out / "tables" / "pseudobulk.csv", low_memory=False)
    assert pb["P.Value"].notna().sum() > 1000 and pb["p_value_cells"].notna().sum() > 1000
    # the report's cluster of interest is the cluster holding the planted population
    lab, pop = _clusters_and_truth(ctx, truth)
    eff = _effect(planted, "gene", "5mo")
    coi, _ = ReportInputs(ctx.cfg, ctx.store, out / "tables").cluster_of_interest()
    assert coi == _cluster_of(lab, pop, eff["population"])
    runinfo = json.loads((out / "run.json").read_text())
    assert sorted(runinfo["stages"]) == sorted(ORDER)
    assert runinfo["peak_rss_mb"] > 0
