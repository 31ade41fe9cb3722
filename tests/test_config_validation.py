"""Every config value type- and range-checked and finite; errors are one line naming the key
and, when known, where the value came from (the config file, or `--set ...`)."""

import math
from dataclasses import fields

import pytest

from cellmill.config import RANGES, Config, ConfigError, load_config

# (section.key, the value as TOML, a word the message must hold besides the key)
BAD = [
    ("cluster.resolution", "nan", "finite"),
    ("cluster.resolution", "inf", "finite"),
    ("cluster.resolution", "-inf", "finite"),
    ("cluster.resolution", "0", "> 0"),
    ("normalize.scale_factor", "inf", "finite"),
    ("normalize.scale_factor", "nan", "finite"),
    ("normalize.scale_factor", "0.5", ">= 1"),
    ("hvg.n_top", "0", ">= 1"),
    ("hvg.span", "0.0", "(0, 1]"),
    ("hvg.span", "1.5", "(0, 1]"),
    ("hvg.span", "nan", "finite"),
    ("pca.n_components", "0", ">= 1"),
    ("pca.clip", "0", "> 0"),
    ("pca.clip", "inf", "finite"),
    ("neighbors.k", "1", ">= 2"),
    ("neighbors.prune", "1.0", "[0, 1)"),
    ("neighbors.prune", "-0.1", "[0, 1)"),
    ("neighbors.n_pcs", "0", ">= 1"),
    ("neighbors.n_pcs", "60", "pca.n_components"),  # more than the 50 PCs computed
    ("pca.n_components", "10", "neighbors.n_pcs"),  # fewer than the 15 PCs used
    ("cluster.n_iterations", "0", "-1 or >= 1"),
    ("cluster.n_iterations", "-2", "-1 or >= 1"),
    ("cluster.seed", "-1", "[0, 4294967295]"),
    ("umap.n_neighbors", "1", ">= 2"),
    ("umap.min_dist", "-0.1", "[0, 1]"),
    ("umap.min_dist", "1.5", "[0, 1]"),
    ("umap.min_dist", "nan", "finite"),
    ("umap.n_epochs", "-1", ">= 0"),
    ("umap.seed", "4294967296", "[0, 4294967295]"),
    ("markers.logfc_threshold", "-0.25", ">= 0"),
    ("markers.logfc_threshold", "nan", "finite"),
    ("markers.min_pct", "1.5", "[0, 1]"),
    ("markers.min_pct", "-inf", "finite"),
    ("markers.return_thresh", "0", "(0, 1]"),
    ("markers.min_cells_group", "0", ">= 1"),
    ("gsea.min_size", "0", ">= 1"),
    ("gsea.min_size", "600", "gsea.max_size"),  # above the default max_size 500
    ("gsea.max_size", "10", "gsea.min_size"),  # below the default min_size 15
    ("gsea.nperm_simple", "0", ">= 1"),
    ("gsea.seed", "-5", "[0, 4294967295]"),
    ("compute.workers", "0", ">= 1"),
    ("compute.memory", '"1..2GB"', "'1..2GB'"),
    ("compute.memory", '""', "'512MiB'"),
    ("compute.memory", '"-2GB"', "'-2GB'"),
    ("compute.memory", '"nan"', "'2GB'"),
    ("compute.memory", '"1MB"', "64 MiB"),
    ("qc.min_features", "-1", ">= 0"),
    ("qc.min_features", "5000", "qc.max_features"),
    ("qc.min_features", "1.5", "integer"),
    ("qc.max_features", "2.0", "integer"),
    ("hvg.n_top", '"1.5"', "integer"),
    ("study.condition", '""', "empty"),
    ("study.control", '"  "', "empty"),
    ("study.timepoint", '""', "empty"),
    ("study.case", '"Sham"', "study.control"),  # the default control
    ("study.condition", '"timepoint"', "study.timepoint"),
    ("study.timepoints", "[]", "at least one"),
    ("study.timepoints", '["3d", "3d"]', "'3d'"),
    ("study.timepoints", '["3d", ""]', "empty"),
    ("study.target_genes", '["Sigmar1", "Tspo", "Sigmar1"]', "'Sigmar1'"),
    ("study.target_genes", '[""]', "empty"),
    ("study.group_by", '["cluster", "sample", "cluster"]', "'cluster'"),
    ("input.feature_types", '[""]', "empty"),
    ("gsea.clusters", '["1", "2", "1"]', "'1'"),
    ("gsea.gmt", '""', "empty"),
]


def _one_line_naming(e: pytest.ExceptionInfo, key: str, word: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "\r" not in msg, msg
    assert key in msg and word in msg, msg
    return msg


@pytest.mark.parametrize("key, value, word", BAD)
def test_bad_value_in_file(tmp_path, key, value, word):
    section, name = key.split(".")
    p = tmp_path / "c.toml"
    p.write_text(f"[{section}]\n{name} = {value}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert _one_line_naming(e, key, word).startswith(f"{p}: ")


@pytest.mark.parametrize("key, value, word", BAD)
def test_bad_value_in_override(key, value, word):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}={value}"])
    assert _one_line_naming(e, key, word).startswith(f"--set {key}={value}: ")


# --set values that are not TOML literals arrive as bare strings
@pytest.mark.parametrize("text, key", [
    ("cluster.resolution=NaN", "cluster.resolution"),
    ("normalize.scale_factor=Infinity", "normalize.scale_factor"),
    ("umap.min_dist=1e400", "umap.min_dist"),
    ("compute.memory=1..2GB", "compute.memory"),
    ("compute.memory=2 GB extra", "compute.memory"),
    ("neighbors.k=2.5", "neighbors.k"),
    ("study.case=Sham", "study.case"),
])
def test_bad_bare_override(text, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [text])
    assert _one_line_naming(e, key, "").startswith(f"--set {text}: ")


@pytest.mark.parametrize("text, shown", [
    ("foo", "'foo'"),
    ("a=1", "'a=1'"),
    ("nosuch.key=1", "[nosuch]"),
    ("qc.nosuch=1", "qc.nosuch"),
    ("qc.min_features", "'qc.min_features'"),
])
def test_bad_override_syntax(text, shown):
    with pytest.raises(ConfigError) as e:
        load_config(None, [text])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--set ") and shown in msg, msg


def test_blame_goes_to_the_last_setter(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[pca]\nn_components = 20\n")
    with pytest.raises(ConfigError, match=r"^--set neighbors.n_pcs=30: "):
        load_config(p, ["neighbors.n_pcs=30"])
    p.write_text("[neighbors]\nn_pcs = 30\n")
    with pytest.raises(ConfigError, match=r"^--set pca.n_components=20: "):
        load_config(p, ["pca.n_components=20"])
    # a file value no override touched: the file is blamed
    p.write_text('[study]\ncase = "Sham"\n')
    with pytest.raises(ConfigError) as e:
        load_config(p, ["cluster.resolution=0.5"])
    assert str(e.value).startswith(f"{p}: study.case")
    # an override fixes a bad file value
    p.write_text("[cluster]\nresolution = nan\n")
    assert load_config(p, ["cluster.resolution=0.8"]).cluster.resolution == 0.8


@pytest.mark.parametrize("key, value", [
    ("cluster.resolution", math.nan),
    ("normalize.scale_factor", math.inf),
    ("hvg.n_top", 1.5),
    ("hvg.n_top", True),
    ("neighbors.k", "20"),
    ("qc.inclusive", "yes"),
    ("study.timepoints", "3d"),
    ("compute.memory", "lots"),
])
def test_check_without_a_file(key, value):
    cfg = Config()
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)
    with pytest.raises(ConfigError) as e:
        cfg.check()
    assert _one_line_naming(e, key, "").startswith(f"{key}")


@pytest.mark.parametrize("sets", [
    ["neighbors.prune=0"], ["neighbors.prune=0.99"],
    ["markers.min_pct=0"], ["markers.min_pct=1"], ["markers.logfc_threshold=0"],
    ["markers.return_thresh=1"], ["markers.min_cells_group=1"],
    ["umap.n_epochs=0"], ["umap.min_dist=0"], ["umap.min_dist=1"], ["umap.n_neighbors=2"],
    ["hvg.span=1"], ["hvg.n_top=1"], ["normalize.scale_factor=1"],
    ["cluster.n_iterations=-1"], ["cluster.n_iterations=1"], ["cluster.resolution=1e-6"],
    ["cluster.seed=0"], ["umap.seed=4294967295"],
    ["neighbors.n_pcs=50"], ["pca.n_components=15"], ["neighbors.k=2"],
    ["gsea.min_size=500"], ["gsea.min_size=1", "gsea.max_size=1"],
    ["qc.min_features=0", "qc.max_features=1"],
    ["compute.memory=64MiB"], ["compute.memory=1.5 GiB"], ["compute.memory=.5GB"],
    ["compute.memory=4000000000"], ["compute.workers=1"],
    ["input.feature_types=[]"], ["study.target_genes=[]"], ["study.timepoints=['5mo']"],
    ["study.target_genes=['Sigmar1', 'sigmar1']"],  # names are case-sensitive
])
def test_edge_values_accepted(sets):
    load_config(None, sets)


def test_defaults_pass_and_every_number_has_a_range():
    Config().check()
    numbers = {f"{s.name}.{f.name}" for s in fields(Config) if s.name != "base_dir"
               for f in fields(s.default_factory()) if f.type in ("int", "float")}
    assert numbers == set(RANGES)


def test_cli_refuses_a_bad_config_before_making_the_output(tmp_path, capsys):
    from cellmill import cli

    p = tmp_path / "c.toml"
    p.write_text("[cluster]\nresolution = nan\n")
    assert cli.main(["run", str(p), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cellmill: error: ") and err.strip().count("\n") == 0, err
    assert str(p) in err and "cluster.resolution" in err
    assert not (tmp_path / "out").exists()
