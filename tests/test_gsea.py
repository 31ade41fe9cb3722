"""Preranked GSEA (fgsea 1.24.0 compatible): GMT reading, ES / leading edge, the
Monte Carlo p-values, and parity with real fgsea 1.24.0 outputs (5 seeds)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import special, stats

from cellmill.errors import InputError
from cellmill.io.gmt import GmtError, matched_sizes, read_gmt
from cellmill.kernels import gsea as kern
from cellmill.stages.gsea import fgsea as engine
from cellmill.stages.gsea.fgsea import fgsea, gsea_command, read_ranks

pytestmark = pytest.mark.filterwarnings("ignore:There are ties")

GMT_NAME = "mh.all.mouse_hallmark_2025.Mm.symbols.gmt"


# ---------------------------------------------------------------- helpers


def synthetic(n=3000, seed=0, shifts=None, sizes=(40, 60, 25, 80)):
    """Normal stats rounded to 2 decimals (ties) with some zeros; sets with planted shifts."""
    rng = np.random.default_rng(seed)
    genes = np.array([f"g{i}" for i in range(n)])
    stat = rng.standard_normal(n)
    members = [rng.choice(n, s, replace=False) for s in sizes]
    for i, shift in (shifts or {}).items():
        stat[members[i]] += shift
    stat = np.round(stat, 2)
    stat[rng.choice(n, 30, replace=False)] = 0.0
    pathways = {f"P{i}": list(genes[m]) for i, m in enumerate(members)}
    return pd.Series(stat, index=genes), pathways


def brute_es(stats: pd.Series, members, gsea_param=1.0):
    """Running sum over every gene (hits +w/NR, misses -1/(N-m)); fgsea's ES and the
    1.24.0 leading edge, written independently of the engine."""
    order = np.argsort(-stats.to_numpy(), kind="stable")
    genes = stats.index.to_numpy()[order]
    w = np.abs(stats.to_numpy()[order]) ** gsea_param
    hit = np.isin(genes, list(members))
    m, n = hit.sum(), len(genes)
    nr = w[hit].sum()
    before, after, run = [], [], 0.0
    for i in range(n):
        if hit[i]:
            before.append(run)
            run += w[i] / nr if nr > 0 else 1.0 / m
            after.append(run)
        else:
            run -= 1.0 / (n - m)
    before, after = np.array(before), np.array(after)
    top, bot = after.max(), before.min()
    es = 0.0 if top == -bot else (top if top > -bot else bot)
    hits = genes[hit]
    if top > -bot:
        edge = list(hits[: np.argmax(before) + 1])
    elif top < -bot:
        edge = list(hits[np.argmin(before):][::-1])
    else:
        edge = []
    return es, edge


@pytest.fixture(scope="module")
def fgsea_ref(shared_data):
    ref_dir = shared_data.parent / "reference" / "fgsea"
    if not ref_dir.is_dir():
        pytest.skip("fgsea reference outputs are not present")
    ref = pd.read_csv(ref_dir / "fgsea_1.24.0_planted.csv")
    stats = read_ranks(ref_dir / "ranks_planted.csv")
    pathways = read_gmt(shared_data / "gmt" / GMT_NAME)
    return ref, stats, pathways


@pytest.fixture(scope="module")
def planted_result(fgsea_ref):
    _, stats, pathways = fgsea_ref
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fgsea(stats, pathways, min_size=15, max_size=500, seed=1)


# ---------------------------------------------------------------- GMT


def test_read_gmt_and_matched_sizes(tmp_path):
    f = tmp_path / "sets.gmt"
    f.write_bytes(b"SET_A\tdesc\tActb\tGapdh\tActb\t\r\n\nSET_B\t\tGapdh\tactb\tXist\n")
    sets = read_gmt(f)
    assert sets == {"SET_A": ["Actb", "Gapdh", "Actb"], "SET_B": ["Gapdh", "actb", "Xist"]}
    sizes = matched_sizes(sets, ["Actb", "Gapdh", "Cd4"]).set_index("pathway")
    assert sizes.loc["SET_A", "matched"] == 2  # duplicates count once
    assert sizes.loc["SET_B", "matched"] == 1  # case-sensitive: actb is not Actb
    assert sizes.loc["SET_B", "n_listed"] == 3


@pytest.mark.parametrize("text, problem", [
    ("SET_A Actb Gapdh\n", "line 1: no tab"),
    ("SET_A\tdesc\tActb\nSET_B\tdesc\t\t\n", "line 2: gene set 'SET_B' has no genes"),
    ("SET_A\tdesc\tActb\n\nSET_A\tdesc\tGapdh\n", "line 3: duplicate gene set name 'SET_A'"),
    ("\n\n", "no gene sets"),
])
def test_read_gmt_errors(tmp_path, text, problem):
    f = tmp_path / "bad.gmt"
    f.write_text(text)
    with pytest.raises(GmtError) as e:
        read_gmt(f)
    assert str(f) in str(e.value) and problem in str(e.value)
    assert isinstance(e.value, ValueError) and isinstance(e.value, InputError)


def test_read_gmt_missing_file(tmp_path):
    with pytest.raises(GmtError, match="not found"):
        read_gmt(tmp_path / "nope.gmt")


def test_read_real_gmt(shared_data):
    sets = read_gmt(shared_data / "gmt" / GMT_NAME)
    assert len(sets) == 50 and all(sets.values())
    assert "HALLMARK_INFLAMMATORY_RESPONSE" in sets


# ---------------------------------------------------------------- ES and leading edge


@pytest.mark.parametrize("gsea_param", [1.0, 0.0, 2.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_es_and_leading_edge_match_running_sum(seed, gsea_param):
    stats, pathways = synthetic(n=800, seed=seed, shifts={0: 0.8, 1: -0.8})
    with pytest.warns(UserWarning, match="ties"):
        genes, w, kept = engine.prepare(stats, pathways, 1, None, gsea_param)
    for name, pos in kept.items():
        es, edge = engine.gsea_stat(w, pos)
        es_b, edge_b = brute_es(stats, pathways[name], gsea_param)
        assert es == pytest.approx(es_b, abs=1e-12)
        assert list(genes[edge]) == edge_b


def test_es_all_zero_weights_and_score_types():
    stats = pd.Series([3.0, 2.0, 0.0, 0.0, -1.0, -2.0], index=list("abcdef"))
    genes, w, kept = engine.prepare(stats, {"z": ["c", "d"], "m": ["a", "f"]}, 1, None, 1.0)
    es, edge = engine.gsea_stat(w, kept["z"])  # NR == 0: equal weights, as fgsea
    assert es == pytest.approx(brute_es(stats, ["c", "d"])[0])
    es_pos, edge_pos = engine.gsea_stat(w, kept["m"], "pos")
    es_neg, edge_neg = engine.gsea_stat(w, kept["m"], "neg")
    # hits at ranks 1 and 6 of 6 with weights 3 and 2: tops 0.6, 0; bottoms 0, -0.4
    assert es_pos == pytest.approx(0.6) and es_neg == pytest.approx(-0.4)
    assert list(genes[edge_pos]) == ["a"] and list(genes[edge_neg]) == ["f"]


def test_prepare_sort_is_stable_and_filters_sizes():
    stats = pd.Series([1.0, 2.0, 1.0, 2.0, 0.0], index=["a", "b", "c", "d", "e"])
    with pytest.warns(UserWarning, match="ties"):
        genes, w, kept = engine.prepare(
            stats, {"s": ["c", "a", "zz", "c"], "t": ["a"], "u": list("abcde")}, 2, None, 1.0)
    assert list(genes) == ["b", "d", "a", "c", "e"]  # R's order(decreasing=TRUE) keeps ties
    assert list(kept) == ["s"]  # t too small, u larger than n - 1
    assert list(kept["s"]) == [3, 2]  # unique matched positions, first-occurrence order


@pytest.mark.parametrize("bad, msg", [
    (pd.Series([1.0, np.nan], index=["a", "b"]), "finite"),
    (pd.Series([1.0, 2.0], index=["a", "a"]), "Duplicate"),
])
def test_prepare_rejects_bad_stats(bad, msg):
    with pytest.raises(ValueError, match=msg):
        fgsea(bad, {"s": ["a"]})


# ---------------------------------------------------------------- kernels and formulas


def test_random_prefix_es_matches_direct_es():
    stats, _ = synthetic(n=500, seed=3)
    genes, w, _ = engine.prepare(stats, {}, 1, None, 1.0)
    sizes = np.array([5, 17, 40], dtype=np.int64)
    seed = 1234
    rand = kern.random_prefix_es(w, sizes, 1, seed, kern.STD, False)
    # replay the same draw and compute each prefix's ES the slow way
    state = kern.new_streams(seed, 1)
    draw = np.empty(40, dtype=np.int64)
    kern._draw_distinct(state, 0, len(w), 40, draw, np.zeros(len(w), dtype=np.bool_))
    for j, m in enumerate(sizes):
        es, _ = engine.gsea_stat(w, draw[:m])
        assert rand[0, j] == pytest.approx(es, abs=1e-12)
    again = kern.random_prefix_es(w, sizes, 50, seed, kern.STD, False)
    assert np.array_equal(again[:1], rand)
    assert np.array_equal(again, kern.random_prefix_es(w, sizes, 50, seed, kern.STD, False))


def test_bh_matches_r_p_adjust():
    # p.adjust(c(0.001, 0.01, 0.02, 0.5, 0.04, NA), "BH")
    got = engine.bh_adjust([0.001, 0.01, 0.02, 0.5, 0.04, np.nan])
    want = [0.005, 0.025, 0.02 * 5 / 3, 0.5, 0.05, np.nan]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_error_formulas():
    tri = special.polygamma(1, [1.0, 1001.0, 51.0, 102.0])
    assert engine.simple_error(0, 1000) == pytest.approx(math.sqrt(tri[0] - tri[1]) / math.log(2))
    p = 1e-10
    want = math.sqrt(math.floor(-math.log2(p) + 1) * (tri[2] - tri[3])) / math.log(2)
    assert engine.multilevel_error(p, 101) == pytest.approx(want)
    np.testing.assert_allclose(engine.qbeta(0.025, [3, 40], [998, 961]),
                               stats.beta.ppf(0.025, [3, 40], [998, 961]), rtol=1e-10)
    assert engine.qbeta(0.025, 0, 1001) == 0.0 and engine.qbeta(0.975, 1001, 0) == 1.0
    # nothing more extreme than ES in 1000 draws -> multilevel; many -> keep simple
    assert list(engine.simple_is_precise(np.array([0, 5, 300]), 1000, 101)) == [
        False, False, True]


def test_multilevel_agrees_with_many_simple_permutations():
    """A p-value near 1e-4: the multilevel estimate vs 300,000 plain random sets."""
    stats, pathways = synthetic(n=2000, seed=5, shifts={0: 0.75}, sizes=(40,))
    genes, w, kept = engine.prepare(stats, pathways, 1, None, 1.0)
    es, _ = engine.gsea_stat(w, kept["P0"])
    c = engine.simple_counts(w, np.array([es]), np.array([40]), 300_000, 99, "std")
    p_ref = (1 + c["nGeEs"][0]) / (1 + c["nGeZero"][0])
    assert 1e-5 < p_ref < 1e-3
    res = fgsea(stats, pathways, seed=3)
    assert res.attrs["multilevel"] == ["P0"]
    p, err = res["pval"][0], res["log2err"][0]
    ref_err = math.sqrt(1 / (1 + c["nGeEs"][0]))  # rough sd of log2(p_ref)
    assert abs(math.log2(p) - math.log2(p_ref)) < 3.5 * math.hypot(err, ref_err)


# ---------------------------------------------------------------- the public function


def test_reproducible_and_seed_dependent():
    stats, pathways = synthetic(seed=7, shifts={0: 1.5, 1: -0.4})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = fgsea(stats, pathways, seed=11)
        b = fgsea(stats, pathways, seed=11)
        c = fgsea(stats, pathways, seed=12)
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a["pval"], c["pval"])
    assert list(a.columns) == engine.COLUMNS
    assert list(a["pathway"]) == sorted(pathways)
    np.testing.assert_allclose(a["padj"], engine.bh_adjust(a["pval"]))
    assert a["pval"][0] < 1e-6 and a.attrs["multilevel"][0] == "P0"


def test_score_types():
    stats, pathways = synthetic(seed=8, shifts={0: 0.7, 1: -0.7})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        std = fgsea(stats, pathways, seed=1).set_index("pathway")
        pos = fgsea(stats, pathways, seed=1, score_type="pos").set_index("pathway")
        neg = fgsea(stats, pathways, seed=1, score_type="neg").set_index("pathway")
    assert pos.loc["P0", "ES"] == std.loc["P0", "ES"] > 0
    assert neg.loc["P1", "ES"] == std.loc["P1", "ES"] < 0
    assert pos.loc["P0", "pval"] < 1e-4 and neg.loc["P1", "pval"] < 1e-4
    assert pos.loc["P1", "pval"] > 0.5 and neg.loc["P0", "pval"] > 0.5
    assert pos.loc["P0", "leadingEdge"] == std.loc["P0", "leadingEdge"]
    with pytest.raises(ValueError, match="score_type"):
        fgsea(stats, pathways, score_type="both")


def test_unbalanced_pathways_are_nan():
    stats, pathways = synthetic(seed=9)
    with pytest.warns(UserWarning, match="unbalanced"):
        res = fgsea(stats, pathways, nperm_simple=12, seed=0)
    unb = res["pathway"].isin(res.attrs["unbalanced"])
    assert unb.any()
    assert res.loc[unb, ["pval", "padj", "NES", "log2err"]].isna().all().all()
    assert res.loc[unb, "ES"].notna().all()


def test_eps_floor():
    stats, pathways = synthetic(seed=10, shifts={0: 1.5}, sizes=(60, 30))
    with pytest.warns(UserWarning, match="less than 1e-08"):
        res = fgsea(stats, pathways, eps=1e-8, seed=0)
    assert res["pval"][0] == 1e-8 and np.isnan(res["log2err"][0])


def test_min_max_size_and_empty():
    stats, pathways = synthetic(seed=11)
    res = fgsea(stats, pathways, min_size=30, max_size=70)
    assert sorted(res["size"]) == [40, 60]
    empty = fgsea(stats, pathways, min_size=1000)
    assert list(empty.columns) == engine.COLUMNS and len(empty) == 0


def test_gsea_command_writes_csv(tmp_path, capsys):
    stats, pathways = synthetic(seed=12, shifts={0: 0.8})
    ranks = tmp_path / "ranks.csv"
    pd.DataFrame({"gene": stats.index, "stat": stats.to_numpy()}).to_csv(ranks, index=False)
    gmt = tmp_path / "sets.gmt"
    gmt.write_text("".join(f"{k}\tna\t" + "\t".join(v) + "\n" for k, v in pathways.items()))
    out = tmp_path / "out" / "gsea.csv"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = gsea_command(ranks, gmt, out, min_size=15, max_size=None, seed=2)
    assert "4 gene sets" in capsys.readouterr().out
    back = pd.read_csv(out)
    assert list(back.columns) == engine.COLUMNS
    assert back["leadingEdge"][0] == ";".join(res["leadingEdge"][0])
    with pytest.raises(InputError, match="not found"):
        gsea_command(tmp_path / "missing.csv", gmt, out)


# ---------------------------------------------------------------- parity with fgsea 1.24.0


def test_parity_es_size_leading_edge(fgsea_ref, planted_result):
    ref, _, _ = fgsea_ref
    res = planted_result
    for seed, r in ref.groupby("seed"):
        r = r.reset_index(drop=True)
        assert list(res["pathway"]) == list(r["pathway"])
        assert list(res["size"]) == list(r["size"])
        np.testing.assert_allclose(res["ES"], r["ES"], rtol=1e-13, atol=1e-15)
        assert list(res["leadingEdge"].map(";".join)) == list(r["leadingEdge"]), seed


def test_parity_pval_nes_log2err(fgsea_ref, planted_result):
    ref, _, _ = fgsea_ref
    g = ref.groupby("pathway").agg(
        pmin=("pval", "min"), pmax=("pval", "max"), err=("log2err", "mean"),
        nmin=("NES", "min"), nmax=("NES", "max"))
    res = planted_result.set_index("pathway").join(g)
    # p-values: inside fgsea's seed range widened by 3 x its log2err (sd of log2 p)
    err = np.maximum(res["err"], res["log2err"])
    lp = np.log2(res["pval"])
    inside = (lp >= np.log2(res["pmin"]) - 3 * err) & (lp <= np.log2(res["pmax"]) + 3 * err)
    assert inside.all(), res.loc[~inside, ["pval", "pmin", "pmax", "err"]]
    # the same estimator: same log2err formula and regime (simple vs multilevel)
    np.testing.assert_allclose(res["log2err"], res["err"], rtol=0.25, atol=0.03)
    tiny = res.index[res["pmax"] < 1e-4]
    assert set(tiny) <= set(planted_result.attrs["multilevel"])
    # NES: inside fgsea's seed range +- 3%
    lo = np.minimum(res["nmin"] * 0.97, res["nmin"] * 1.03)
    hi = np.maximum(res["nmax"] * 0.97, res["nmax"] * 1.03)
    ok = (res["NES"] >= lo) & (res["NES"] <= hi)
    assert ok.all(), res.loc[~ok, ["NES", "nmin", "nmax"]]
    np.testing.assert_allclose(res["padj"], engine.bh_adjust(res["pval"]))


def test_extreme_pathway_does_not_hang():
    """The top genes themselves: the splitting cannot climb past the maximal ES; it
    stops, reports an overestimated (still tiny) p-value and flags it (log2err NaN)."""
    rng = np.random.default_rng(0)
    stats = pd.Series(rng.standard_normal(500), index=[f"g{i}" for i in range(500)])
    top = list(stats.sort_values(ascending=False).index[:20])
    with pytest.warns(UserWarning, match="overestimated"):
        res = fgsea(stats, {"top": top}, eps=0.0, seed=1)
    assert res["ES"][0] == pytest.approx(1.0)
    assert res["pval"][0] < 1e-15 and np.isnan(res["log2err"][0])
