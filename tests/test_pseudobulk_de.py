"""Pseudobulk differential expression (edgeR filterByExpr + TMM, limma voom + lmFit + eBayes)
against the real R packages: references written by tests/reference/pseudobulk_reference.R
(edgeR 3.40.2, limma 3.54.1; see tests/reference/README.md). The simulated cases read committed
input; the real-data cases build the same made-up pseudobulks from ../shared/data and skip
without it."""

from __future__ import annotations

import gzip
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from cellmill.stages.statistics.edger import filter_by_expr, tmm_factors
from cellmill.stages.statistics.limma import approx_rule2, ebayes, lm_fit, lowess, top_table, voom
from cellmill.stages.statistics.pseudobulk_de import voom_de

REF = Path(__file__).resolve().parent / "reference" / "pseudobulk"
COLUMNS = ("logFC", "AveExpr", "t", "P.Value", "adj.P.Val", "B")
SIM_CASES = {  # case -> (population, time point or None = all 12 samples)
    "sim_homeo1_pooled": ("MG_homeostatic_1", None),
    "sim_apoe_3d": ("MG_Apoe_high", "3d"),
    "sim_homeo2_5mo": ("MG_homeostatic_2", "5mo"),
}
REAL_CASES = ("pbmc_condition", "pbmc_condition_batch", "mouse_condition",
              "mouse_condition_batch")


def read(path) -> pd.DataFrame:
    return pd.read_csv(path, float_precision="round_trip")


def max_rel(actual, expected) -> float:
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape
    same = (a == e) | (np.isnan(a) & np.isnan(e))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.abs(a - e) / np.abs(e)
    return float(np.max(np.where(same, 0.0, rel), initial=0.0))


def assert_rel(actual, expected, rtol, what):
    err = max_rel(actual, expected)
    assert err <= rtol, f"{what}: max relative error {err:.3g} > {rtol:g}"


# ---------------------------------------------------------------------------------------------
# inputs


def sim_counts(case: str) -> np.ndarray:
    population, timepoint = SIM_CASES[case]
    c = pd.read_csv(REF / "sim" / f"counts_{population}.csv.gz", index_col=0)
    samples = pd.read_csv(REF / "sim" / "samples.csv")
    s = samples[samples.population == population]
    assert list(s["sample"]) == list(c.columns)
    if timepoint is not None:
        c = c[s.loc[s.timepoint == timepoint, "sample"]]
    return c.to_numpy(dtype=np.float64)


def sim_design(case: str) -> np.ndarray:
    """The design built here from samples.csv (R's model.matrix with the levels of the R
    script), checked against the one R wrote."""
    population, timepoint = SIM_CASES[case]
    s = pd.read_csv(REF / "sim" / "samples.csv")
    s = s[s.population == population]
    if timepoint is not None:
        s = s[s.timepoint == timepoint]
    cols = [np.ones(len(s)), (s.condition == "SNI").to_numpy(float)]
    if case == "sim_homeo1_pooled":
        cols += [(s.timepoint == "14d").to_numpy(float), (s.timepoint == "5mo").to_numpy(float)]
    if case != "sim_apoe_3d":
        cols.append((s.sex == "male").to_numpy(float))
    return np.column_stack(cols)


def made_up_pseudobulk(cells_by_gene: sp.spmatrix) -> np.ndarray:
    """genes x 8 sums: cell i (0-based) goes to sample i % 8 (as the R script)."""
    n = cells_by_gene.shape[1]
    ind = sp.csr_matrix((np.ones(n), (np.arange(n), np.arange(n) % 8)), shape=(n, 8))
    return np.asarray((cells_by_gene @ ind).todense(), dtype=np.float64)


def real_counts(data, case: str) -> np.ndarray:
    if case.startswith("pbmc"):
        with h5py.File(data / "10x" / "pbmc_1k_citeseq_v3.h5", "r") as f:
            g = f["matrix"]
            m = sp.csc_matrix((g["data"][:].astype(np.float64), g["indices"][:], g["indptr"][:]),
                              shape=tuple(g["shape"][:]))
            ge = g["features/feature_type"][:] == b"Gene Expression"
        return made_up_pseudobulk(m[np.flatnonzero(ge)])
    with gzip.open(data / "mex" / "mouse_brain_10k_x_1k" / "matrix.mtx.gz") as fh:
        m = sp.csc_matrix(scipy.io.mmread(fh), dtype=np.float64)
    return made_up_pseudobulk(m)


def made_up_design(case: str) -> np.ndarray:
    s = np.arange(8)
    cols = [np.ones(8), (s >= 4).astype(float)]
    if case.endswith("_batch"):
        cols.append((s % 2).astype(float))
    return np.column_stack(cols)


# ---------------------------------------------------------------------------------------------
# the pipeline against R


def check_case(case: str, counts: np.ndarray, design: np.ndarray) -> dict:
    d = REF / case
    samples = read(d / "samples.csv")
    r_design = read(d / "design.csv").drop(columns="sample").to_numpy(dtype=np.float64)
    np.testing.assert_array_equal(design, r_design)
    np.testing.assert_array_equal(counts.sum(axis=0), samples["lib_size_all"].to_numpy())

    res = voom_de(counts, samples["group"].to_numpy(), design, coef=1)

    keep = read(d / "keep.csv.gz")["keep"].to_numpy()
    assert keep.dtype == bool and keep.size == counts.shape[0]
    np.testing.assert_array_equal(res.keep, keep, err_msg=f"{case}: filterByExpr genes differ")
    np.testing.assert_array_equal(res.lib_size, samples["lib_size"].to_numpy())
    errors = {"norm_factors": max_rel(res.norm_factors, samples["norm_factors"])}
    assert errors["norm_factors"] <= 1e-9, f"{case}: TMM factors {errors['norm_factors']:.3g}"

    scalars = read(d / "scalars.csv")
    assert_rel(res.df_prior, scalars["df_prior"].iloc[0], 1e-9, f"{case} df.prior")
    assert_rel(res.s2_prior, scalars["s2_prior"].iloc[0], 1e-9, f"{case} s2.prior")

    tt = read(d / "toptable.csv.gz")
    np.testing.assert_array_equal(tt["index"].to_numpy() - 1, np.flatnonzero(keep))
    for col in COLUMNS:
        errors[col] = max_rel(res.table[col], tt[col])
        assert errors[col] <= 1e-6, f"{case} {col}: max relative error {errors[col]:.3g}"

    # voom weights of the first kept genes (a debugging aid, checked too)
    w_ref = read(d / "voom_weights.csv").drop(columns="gene").to_numpy(dtype=np.float64)
    kept = counts[keep]
    lib = kept.sum(axis=0)
    v = voom(kept, design, lib * res.norm_factors)
    assert_rel(v["weights"][: len(w_ref)], w_ref, 1e-9, f"{case} voom weights")
    return errors


@pytest.mark.parametrize("case", SIM_CASES)
def test_simulated_matches_r(case):
    check_case(case, sim_counts(case), sim_design(case))


@pytest.mark.parametrize("case", REAL_CASES)
def test_real_data_matches_r(shared_data, case):
    check_case(case, real_counts(shared_data, case), made_up_design(case))


# ---------------------------------------------------------------------------------------------
# pieces


def test_lowess_matches_r():
    inp = read(REF / "lowess_input.csv")
    ref = read(REF / "lowess.csv")
    x, y = inp["x"].to_numpy(), inp["y"].to_numpy()
    span = x.max() - x.min()
    for col, kw in (("fit_default", {"f": 0.5}),
                    ("fit_delta10", {"f": 0.5, "delta": 0.1 * span}),
                    ("fit_f03_iter0", {"f": 0.3, "iter": 0})):
        lx, ly = lowess(x, y, **kw)
        np.testing.assert_array_equal(lx, ref["x"].to_numpy())
        assert_rel(ly, ref[col].to_numpy(), 1e-12, f"lowess {col}")
    lx, ly = lowess(x, y, f=0.5)
    ap = read(REF / "lowess_approx.csv")
    assert_rel(approx_rule2(lx, ly, ap["x"].to_numpy()), ap["y"].to_numpy(), 1e-12, "approx")


def test_approx_ties_and_ends():
    x = np.array([0.0, 1.0, 1.0, 2.0])
    y = np.array([0.0, 1.0, 3.0, 4.0])  # the tie at 1 becomes its mean, 2
    np.testing.assert_allclose(approx_rule2(x, y, [-1, 0, 0.5, 1, 1.5, 2, 3]),
                               [0, 0, 1, 2, 3, 4, 4])


@pytest.mark.parametrize("name", ["plain", "weighted", "dfinf"])
def test_lmfit_ebayes_matches_r(name):
    e = read(REF / ("ebayes_input_E2.csv" if name == "dfinf" else "ebayes_input_E.csv"))
    e = e.to_numpy(dtype=np.float64)
    design = np.column_stack([np.ones(7), [0, 0, 0, 1, 1, 1, 1], [0, 1, 0, 1, 0, 1, 0]])
    if name == "dfinf":
        design = design[:, :2]
    w = read(REF / "ebayes_input_W.csv").to_numpy(dtype=np.float64) if name == "weighted" \
        else None
    fit = ebayes(lm_fit(e, design, w))
    ref = read(REF / f"ebayes_{name}.csv")
    scal = read(REF / f"ebayes_{name}_scalars.csv")
    if name == "dfinf":
        assert np.isinf(fit["df_prior"]) and np.isinf(scal["df_prior"].iloc[0])
    else:
        assert_rel(fit["df_prior"], scal["df_prior"].iloc[0], 1e-9, "df.prior")
    assert_rel(fit["s2_prior"], scal["s2_prior"].iloc[0], 1e-9, "s2.prior")
    assert_rel(fit["var_prior"][1], scal["var_prior"].iloc[0], 1e-9, "var.prior")
    tt = top_table(fit, 1)
    for col in COLUMNS:
        assert_rel(tt[col], ref[col], 1e-9, f"{name} {col}")
    assert_rel(fit["sigma"], ref["sigma"], 1e-9, f"{name} sigma")
    assert_rel(fit["stdev_unscaled"][:, 1], ref["stdev_unscaled"], 1e-9, f"{name} stdev")


def test_filter_min_sample_size_rule():
    """Groups of 12 and 15: MinSampleSize = 10 + (12 - 10) * 0.7 = 11.4, so a gene at the CPM
    cutoff in 11 samples is dropped and one in 12 kept (worked out by hand)."""
    n = 27
    group = np.array(["a"] * 12 + ["b"] * 15)
    counts = np.zeros((4, n))
    counts[0] = 1e6  # library sizes 1e6 + row 1..3: median lib ~ 1e6, cutoff ~ 10 CPM
    counts[1, :11] = 20  # above the cutoff in 11 samples
    counts[2, :12] = 20  # in 12
    counts[3, :] = 0
    counts[3, 0] = 14  # total 14 < 15
    keep = filter_by_expr(counts, group)
    np.testing.assert_array_equal(keep, [True, False, True, False])


def test_tmm_identical_samples_and_scaling():
    rng = np.random.default_rng(0)
    base = rng.poisson(50, size=(200, 1)).astype(float)
    counts = np.hstack([base, base * 2, base * 3])  # same composition: every factor 1
    np.testing.assert_allclose(tmm_factors(counts), 1.0, rtol=0, atol=1e-15)


def test_errors():
    counts = np.random.default_rng(1).poisson(30, size=(50, 4)).astype(float)
    group = ["a", "a", "b", "b"]
    with pytest.raises(ValueError, match="rank deficient"):
        voom_de(counts, group, np.column_stack([np.ones(4), [0, 0, 1, 1], [0, 0, 2, 2]]), 1)
    with pytest.raises(ValueError, match="residual degrees of freedom"):
        voom_de(counts, group, np.column_stack([np.ones(4), [0, 0, 1, 1], [0, 1, 0, 0],
                                                [0, 0, 0, 1]]), 1)
    zero = counts.copy()
    zero[:, 2] = 0
    with pytest.raises(ValueError, match="no counts"):
        voom_de(zero, group, np.column_stack([np.ones(4), [0, 0, 1, 1]]), 1)
    with pytest.raises(ValueError, match="not a column"):
        voom_de(counts, group, np.column_stack([np.ones(4), [0, 0, 1, 1]]), 2)


def test_weighted_fit_matches_lstsq():
    """The gene-wise weighted fit against numpy's lstsq of each gene's weighted system and the
    normal equations' inverse (an independent route), over designs of 2-5 columns."""
    rng = np.random.default_rng(7)
    for n, p in ((4, 2), (7, 3), (12, 5)):
        design = np.column_stack([np.ones(n)] + [rng.integers(0, 2, n).astype(float)
                                                 for _ in range(p - 2)] + [rng.normal(size=n)])
        e = rng.normal(3.0, 2.0, size=(300, n))
        w = rng.uniform(0.05, 20.0, size=(300, n))
        fit = lm_fit(e, design, w)
        for g in range(e.shape[0]):
            sw = np.sqrt(w[g])
            xw = design * sw[:, None]
            coef, rss, _, _ = np.linalg.lstsq(xw, e[g] * sw, rcond=None)
            cov = np.linalg.inv(xw.T @ xw)
            np.testing.assert_allclose(fit["coefficients"][g], coef, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(fit["stdev_unscaled"][g], np.sqrt(np.diag(cov)),
                                       rtol=1e-10)
            np.testing.assert_allclose(fit["sigma"][g], np.sqrt(rss[0] / (n - p)), rtol=1e-9)


def test_ebayes_chosen_coefficient_is_the_full_ones():
    """eBayes for one coefficient gives that column exactly as for all of them."""
    e = read(REF / "ebayes_input_E.csv").to_numpy(dtype=np.float64)
    design = np.column_stack([np.ones(7), [0, 0, 0, 1, 1, 1, 1], [0, 1, 0, 1, 0, 1, 0]])
    w = read(REF / "ebayes_input_W.csv").to_numpy(dtype=np.float64)
    fit = lm_fit(e, design, w)
    full, one = ebayes(fit), ebayes(fit, coefs=[1])
    for key in ("p_value", "lods"):
        np.testing.assert_array_equal(one[key][:, 1], full[key][:, 1])
        assert np.isnan(one[key][:, [0, 2]]).all()
    assert one["var_prior"][1] == full["var_prior"][1]
    pd.testing.assert_frame_equal(top_table(one, 1), top_table(full, 1))
