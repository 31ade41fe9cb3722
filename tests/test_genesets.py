"""Built-in gene sets (cellmill/genesets): the MSigDB hallmark collections ship with the
package, `gsea.gmt = "hallmark"` (the default) picks the organism from the data's gene names,
"hallmark:mouse" / "hallmark:human" name one, and a study run with no GSEA settings runs GSEA.
Counts are those of the MSigDB files (50 sets each; 4,291 mouse and 4,383 human genes)."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from cellmill.cli import main
from cellmill.config import ConfigError, load_config
from cellmill.engine.preflight import preflight
from cellmill.errors import InputError
from cellmill.genesets import (
    FILES,
    MIN_OVERLAP,
    builtin_path,
    detect_organism,
    gmt_digest,
    gmt_path,
    hallmark_genes,
    overlaps,
)
from cellmill.io.gmt import read_gmt

N_CELLS = 1200
N_GENES = 5000


def _genes_of(path: Path) -> list[str]:
    """Every gene of a GMT file, read by hand (not by read_gmt)."""
    out = set()
    for line in path.read_text().splitlines():
        if line.strip():
            out.update(g for g in line.split("\t")[2:] if g)
    return sorted(out)


@pytest.mark.parametrize("organism, n_genes, example",
                         [("mouse", 4291, "Sigmar1"), ("human", 4383, "TNF")])
def test_builtin_collections_ship_and_parse(organism, n_genes, example):
    path = builtin_path(organism)
    assert path.is_file() and path.parent.name == "genesets"
    sets = read_gmt(path)
    assert len(sets) == 50
    assert all(name.startswith("HALLMARK_") for name in sets)
    assert len(hallmark_genes(organism)) == len(_genes_of(path)) == n_genes
    assert "HALLMARK_INFLAMMATORY_RESPONSE" in sets
    if organism == "human":
        assert example in sets["HALLMARK_TNFA_SIGNALING_VIA_NFKB"]
    readme = (path.parent / "README.md").read_text()
    for words in ("CC BY 4.0", "Liberzon", "Cell Systems", "Castanza", "gsea-msigdb.org",
                  FILES[organism]):
        assert words in readme, words


def test_attribution_in_the_project_readme():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    for words in ('gmt = "hallmark"', "CC BY 4.0", "Liberzon", "hallmark:mouse"):
        assert words in text, words


def test_hallmark_is_the_default_and_resolves_each_way(tmp_path):
    cfg = load_config(None, [])
    assert cfg.gsea.gmt == "hallmark"
    mouse = sorted(hallmark_genes("mouse"))[:MIN_OVERLAP] + ["mt-Nd1", "Gm12345"]
    assert gmt_path(cfg, mouse) == builtin_path("mouse")
    human = sorted(hallmark_genes("human"))[:MIN_OVERLAP]
    assert gmt_path(cfg, human) == builtin_path("human")
    for org in FILES:  # named: no genes needed
        assert gmt_path(load_config(None, [f'gsea.gmt="hallmark:{org}"'])) == builtin_path(org)
    own = tmp_path / "own.gmt"
    assert gmt_path(load_config(None, [f'gsea.gmt="{own}"']), human) == own
    with pytest.raises(ValueError, match="gene names"):
        gmt_path(cfg)


def test_unknown_builtin_name_is_a_config_error():
    with pytest.raises(ConfigError, match=r"gsea\.gmt.*hallmark:rat.*hallmark:mouse"):
        load_config(None, ['gsea.gmt="hallmark:rat"'])


def test_params_digest_covers_the_builtin_files(tmp_path):
    d = {v: gmt_digest(load_config(None, [f'gsea.gmt="{v}"']))
         for v in ("hallmark", "hallmark:mouse", "hallmark:human")}
    assert len(set(d.values())) == 3
    assert re.fullmatch(r"mouse:[0-9a-f]{64}\+human:[0-9a-f]{64}", d["hallmark"])
    missing = tmp_path / "none.gmt"
    assert gmt_digest(load_config(None, [f'gsea.gmt="{missing}"'])) == f"absent: {missing}"


def test_unclear_organism_is_refused_naming_gsea_gmt():
    few = sorted(hallmark_genes("mouse"))[:MIN_OVERLAP - 1]
    both = sorted(hallmark_genes("mouse"))[:300] + sorted(hallmark_genes("human"))[:300]
    for genes in (few, both, ["GeneA", "GeneB"]):
        with pytest.raises(ConfigError) as info:
            detect_organism(genes, "data.h5")
        text = str(info.value)
        assert "gsea.gmt" in text and "data.h5" in text
        assert '"hallmark:mouse", "hallmark:human" or a GMT file' in text


# ----------------------------------------------------------------------------- real data


def test_human_pbmc_is_human(shared_data):
    from cellmill.io.headers import gene_names

    genes = gene_names(shared_data / "10x" / "pbmc_1k_citeseq_v3.h5")
    n = overlaps(genes)
    assert n["human"] > 4000 and n["mouse"] <= 12, n  # 12 symbols are spelled alike in both
    assert detect_organism(genes) == "human"


@pytest.mark.parametrize("rel", ["mex/mouse_brain_10k_x_1k", "h5ad/dentategyrus_100obs.h5ad"])
def test_mouse_data_is_mouse(shared_data, rel):
    from cellmill.io.headers import gene_names

    genes = gene_names(shared_data / rel)
    n = overlaps(genes)
    assert n["mouse"] >= MIN_OVERLAP and n["human"] <= 12, n
    assert detect_organism(genes) == "mouse"


# ----------------------------------------------------------------------------- studies


@pytest.fixture(scope="module")
def hallmark_study(tmp_path_factory) -> Path:
    """A simulated study whose genes include every mouse hallmark gene (the simulator plants
    its effects in the built-in inflammatory and TNF-alpha sets)."""
    from cellmill.simulate import simulate_study

    out = tmp_path_factory.mktemp("genesets") / "sim"
    simulate_study(out, n_cells=N_CELLS, seed=5, n_genes=N_GENES, gmt=builtin_path("mouse"))
    return out


def _config(sim: Path, extra: str = "") -> Path:
    path = sim.parent / "study.toml"
    path.write_text(f'[input]\nmanifest = "{sim / "manifest.csv"}"\n[compute]\n'
                    f"progress = false\n{extra}")
    return path


def test_preflight_picks_mouse_for_the_study(hallmark_study):
    cfg = load_config(_config(hallmark_study))
    inp = preflight(cfg)
    assert inp.study
    assert overlaps(inp.genes)["mouse"] == 4291
    assert gmt_path(cfg, inp.genes) == builtin_path("mouse")


def test_human_sets_on_mouse_data_are_refused(hallmark_study):
    cfg = load_config(_config(hallmark_study, '[gsea]\ngmt = "hallmark:human"\n'))
    with pytest.raises(InputError) as info:
        preflight(cfg)
    text = str(info.value)
    assert FILES["human"] in text and "0 of 50 sets overlap" in text and "ignoring case" in text


def test_simulated_planted_study_cannot_pick_an_organism(tmp_path):
    """The plain simulator's genes are mostly invented (Gm12345, ...Rik): too few hallmark
    genes to tell, so the default asks for "hallmark:mouse" or a file."""
    from cellmill.simulate import simulate_study

    sim = tmp_path / "sim"
    simulate_study(sim, n_cells=60, seed=1, n_genes=2000)
    with pytest.raises(ConfigError, match=r'gsea\.gmt = "hallmark".*"hallmark:mouse"'):
        preflight(load_config(_config(sim)))


def test_study_without_gsea_settings_runs_gsea(hallmark_study):
    cfg = _config(hallmark_study, "[umap]\nn_epochs = 60\n")
    out = hallmark_study.parent / "out"
    assert main(["run", str(cfg), "-o", str(out)]) == 0
    res = pd.read_csv(out / "tables" / "gsea.csv")
    assert len(res) > 0
    assert set(res["pathway"]) <= set(read_gmt(builtin_path("mouse")))
    assert "HALLMARK_INFLAMMATORY_RESPONSE" in set(res["pathway"])
    html = (out / "report.html").read_text()  # the report resolves "hallmark" the same way
    assert "gene sets not readable" not in html
    assert (out / "figures" / "fig2c_enrichment_curves.png").is_file()  # drawn from the sets


def test_gsea_command_takes_the_builtin_sets(tmp_path, capsys):
    """`cellmill gsea RANKS --gmt hallmark`: the organism from the ranked genes; the result is
    what the same command gives with the packaged mouse file named explicitly."""
    import numpy as np

    from cellmill.genesets import builtin_path

    sets = read_gmt(builtin_path("mouse"))
    genes = sorted({g for s in sets.values() for g in s})
    rng = np.random.default_rng(3)
    stat = rng.normal(size=len(genes))
    hypoxia = set(sets["HALLMARK_HYPOXIA"])
    stat += np.array([1.5 if g in hypoxia else 0.0 for g in genes])
    ranks = tmp_path / "ranks.csv"
    pd.DataFrame({"gene": genes, "stat": stat}).to_csv(ranks, index=False)
    outs = {}
    for gmt in ("hallmark", str(builtin_path("mouse"))):
        out = tmp_path / f"out_{len(outs)}.csv"
        assert main(["-q", "gsea", str(ranks), "--gmt", gmt, "-o", str(out),
                     "--min-size", "15", "--max-size", "500"]) == 0
        outs[gmt] = pd.read_csv(out)
    a, b = outs.values()
    pd.testing.assert_frame_equal(a, b)
    assert a.sort_values("pval").iloc[0]["pathway"] == "HALLMARK_HYPOXIA"
    # human names for mouse ranks: one line naming the ranks file
    assert main(["gsea", str(ranks), "--gmt", "hallmark:nope", "-o",
                 str(tmp_path / "x.csv")]) == 2
    assert "hallmark:nope" in capsys.readouterr().err
