"""preflight: every bad input refused before any heavy work, with one line naming the file (or
the config key); `cellmill run` exits 2 and creates nothing. Without the study's condition
column the study parts are skipped with one warning, and a plain 10x file runs to a report.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from cellmill.cli import main
from cellmill.config import ConfigError, load_config
from cellmill.engine.preflight import preflight
from cellmill.errors import InputError
from cellmill.io.gmt import GmtError

N_CELLS = 120
N_GENES = 5000
WARNING = "no 'condition' column"


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    """A small simulated study (12 samples: SNI/Sham x 3d/14d/5mo x F/M) and its planted GMT."""
    from cellmill.simulate import simulate_study

    out = tmp_path_factory.mktemp("preflight") / "sim"
    simulate_study(out, n_cells=N_CELLS, seed=3, n_genes=N_GENES)
    return out


@pytest.fixture
def study(sim, tmp_path) -> Path:
    """A private copy of the study's manifest (absolute sample paths) and GMT to alter."""
    m = pd.read_csv(sim / "manifest.csv", dtype=str)
    m["path"] = [str(sim / p) for p in m["path"]]
    m.to_csv(tmp_path / "manifest.csv", index=False)
    shutil.copy(sim / "planted.gmt", tmp_path / "sets.gmt")
    return tmp_path


def _config(tmp: Path, text: str) -> Path:
    path = tmp / "study.toml"
    path.write_text(text + "\n[compute]\nprogress = false\n")
    return path


def _manifest_config(tmp: Path, extra: str = "", gmt: bool = True) -> Path:
    return _config(tmp, '[input]\nmanifest = "manifest.csv"\n'
                   + ('[gsea]\ngmt = "sets.gmt"\n' if gmt else "") + extra)


def _edit(tmp: Path, func) -> None:
    m = pd.read_csv(tmp / "manifest.csv", dtype=str, keep_default_na=False)
    func(m)
    m.to_csv(tmp / "manifest.csv", index=False)


def _refused(cfg_path: Path, kind: type, *names: str) -> str:
    """preflight raises `kind` with one line holding every one of `names`; `cellmill run`
    exits 2 and creates nothing at its output folder."""
    with pytest.raises(kind) as info:
        preflight(load_config(cfg_path))
    text = str(info.value)
    assert "\n" not in text
    for name in names:
        assert name in text, (name, text)
    out = cfg_path.parent / "out"
    assert main(["run", str(cfg_path), "-o", str(out)]) == 2
    assert not out.exists()
    return text


# ----------------------------------------------------------------------------- the manifest


def test_valid_study_passes(study, caplog):
    with caplog.at_level(logging.WARNING, logger="cellmill"):
        inp = preflight(load_config(_manifest_config(study)))
    assert inp.study and inp.timepoints and "Sigmar1" in set(inp.genes)
    assert len(inp.genes) == N_GENES and not caplog.records


def test_manifest_missing(tmp_path):
    _refused(_config(tmp_path, '[input]\nmanifest = "nope.csv"'), InputError, "nope.csv",
             "not found")


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00bad\x00\x81\n\x00\x00"])
def test_manifest_not_csv(tmp_path, content):
    (tmp_path / "manifest.csv").write_bytes(content)
    _refused(_manifest_config(tmp_path), InputError, "manifest.csv", "CSV")


def test_manifest_without_path_column(study):
    _edit(study, lambda m: m.drop(columns=["path"], inplace=True))
    _refused(_manifest_config(study), InputError, "manifest.csv", "path")


def test_empty_path_names_manifest_and_sample(study):
    _edit(study, lambda m: m.loc.__setitem__((3, "path"), ""))
    _refused(_manifest_config(study), InputError, "manifest.csv", "line 5", "SNI_14d_M",
             "empty path")


def test_duplicated_paths_are_refused(study):
    # the same file twice would count its cells twice, as if from two animals: an error
    _edit(study, lambda m: m.loc.__setitem__((1, "path"), m.loc[0, "path"]))
    _refused(_manifest_config(study), InputError, "manifest.csv", "same path")


@pytest.mark.parametrize("column", ["barcode", "n_counts", "n_features", "qc_pass", "cluster"])
def test_reserved_column_is_refused(study, column):
    _edit(study, lambda m: m.insert(2, column, "x"))
    _refused(_manifest_config(study), InputError, "manifest.csv", repr(column))


def test_sample_file_missing(study):
    _edit(study, lambda m: m.loc.__setitem__((2, "path"), str(study / "gone.h5")))
    _refused(_manifest_config(study), InputError, "gone.h5", "not found")


def test_sample_file_not_hdf5(study):
    (study / "junk.h5").write_text("not a matrix\n")
    _edit(study, lambda m: m.loc.__setitem__((2, "path"), str(study / "junk.h5")))
    _refused(_manifest_config(study), InputError, "junk.h5", "HDF5")


def test_sample_file_without_10x_layout(study):
    with h5py.File(study / "other.h5", "w") as f:
        f["something"] = np.arange(5)
    _edit(study, lambda m: m.loc.__setitem__((2, "path"), str(study / "other.h5")))
    _refused(_manifest_config(study), InputError, "other.h5", "10x layout")


def test_input_path_missing(tmp_path):
    _refused(_config(tmp_path, '[input]\npath = "none.h5"'), InputError, "none.h5")


def test_store_that_is_not_a_store(tmp_path):
    (tmp_path / "s.zarr").mkdir()
    _refused(_config(tmp_path, '[input]\nstore = "s.zarr"'), InputError, "s.zarr", "store")


# ----------------------------------------------------------------------------- the study


def test_lowercase_labels_get_a_hint(study):
    _edit(study, lambda m: m.__setitem__("condition", m["condition"].str.lower()))
    text = _refused(_manifest_config(study), ConfigError, "study.case", "'SNI'", "manifest.csv",
                    "values: sni, sham", "did you mean 'sni'?")
    assert text.startswith("study.case: 'SNI' is not a value of column 'condition' in ")


def test_control_label_absent(study):
    _refused(_manifest_config(study, '[study]\ncontrol = "Naive"'), ConfigError,
             "study.control", "'Naive'", "manifest.csv")


def test_timepoints_not_listed_are_named(study):
    text = _refused(_manifest_config(study, '[study]\ntimepoints = ["3d", "14d", "6mo"]'),
                    ConfigError, "study.timepoints", "manifest.csv", "'5mo'", "6mo")
    assert "not listed: '5mo'" in text and "listed but absent: 6mo" in text


def test_other_conditions_may_have_other_timepoints(study, sim):
    """Naive animals (neither case nor control) at time point 'naive' take part in no test."""
    def add_naive(m):
        m.loc[len(m)] = ["Naive_F", str(study / "naive.h5"), "Naive", "naive", "F"]

    shutil.copy(sim / "SNI_3d_F.h5", study / "naive.h5")
    _edit(study, add_naive)
    assert preflight(load_config(_manifest_config(study))).study


def test_target_gene_absent_with_case_hint(study):
    _refused(_manifest_config(study, '[study]\ntarget_genes = ["SIGMAR1"]'), ConfigError,
             "study.target_genes", "'SIGMAR1'", "did you mean 'Sigmar1'?", "manifest.csv")


def test_gmt_missing(study):
    text = _refused(_manifest_config(study, '[gsea]\ngmt = "no_such_sets.gmt"', gmt=False),
                    InputError, "no_such_sets.gmt", "gsea.gmt")
    assert "not found" in text


def test_default_hallmark_without_a_clear_organism(study):
    """The default gsea.gmt = "hallmark" on the simulator's mostly invented genes: which
    organism cannot be told, and the message says what to set (tests/test_genesets.py)."""
    _refused(_manifest_config(study, gmt=False), ConfigError, 'gsea.gmt = "hallmark"',
             "manifest.csv", '"hallmark:mouse", "hallmark:human" or a GMT file')


def test_gmt_unreadable(study):
    (study / "sets.gmt").write_text("no tabs on this line\n")
    _refused(_manifest_config(study), GmtError, "sets.gmt", "line 1")


def test_gmt_without_overlap(study):
    """Sets in another species' spelling (upper case): named, with the overlap and a hint."""
    sets = (study / "sets.gmt").read_text().splitlines()
    upper = ["\t".join(f.upper() if i >= 2 else f for i, f in enumerate(line.split("\t")))
             for line in sets]
    (study / "sets.gmt").write_text("\n".join(upper) + "\n")
    _refused(_manifest_config(study), InputError, "sets.gmt",
             f"0 of {len(sets)} sets overlap the genes", ">= 15 genes",
             "largest overlap 0 genes", "ignoring case")


def test_checks_a_store_by_its_obs(study):
    from cellmill.io.ingest import ingest

    ingest(study / "manifest.csv", study / "s.zarr")
    cfg = _config(study, '[input]\nstore = "s.zarr"\n[gsea]\ngmt = "sets.gmt"\n'
                  '[study]\ncase = "sni"')
    text = _refused(cfg, ConfigError, "study.case", "s.zarr", "did you mean 'SNI'?")
    assert "values: SNI, Sham" in text
    assert preflight(load_config(cfg, ['study.case="SNI"'])).study


# ----------------------------------------------------------------------------- study absent


def test_no_condition_column_skips_the_study(study, caplog):
    """No GMT, no target gene in the data needed. Preflight says so at INFO only: the warning
    is the statistics stage's, when it skips the tests (else it would join the one-line
    error of a run that fails before then)."""
    _edit(study, lambda m: m.drop(columns=["condition"], inplace=True))
    cfg = load_config(_manifest_config(study, '[study]\ntarget_genes = ["NOPE"]', gmt=False))
    with caplog.at_level(logging.INFO, logger="cellmill"):
        inp = preflight(cfg)
    assert not inp.study
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    lines = [r.getMessage() for r in caplog.records if WARNING in r.getMessage()]
    assert len(lines) == 1 and "manifest.csv (columns: timepoint, sex)" in lines[0]
    assert lines[0].endswith("target tests and per-condition GSEA are skipped")


def test_condition_without_timepoints_pools(study, caplog):
    _edit(study, lambda m: m.drop(columns=["timepoint"], inplace=True))
    with caplog.at_level(logging.INFO, logger="cellmill"):
        inp = preflight(load_config(_manifest_config(study)))
    assert inp.study and not inp.timepoints
    assert any("no 'timepoint' column" in r.getMessage() and "pool all time points"
               in r.getMessage() for r in caplog.records)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "cellmill" and r.levelno >= logging.WARNING and WARNING in r.getMessage()]


def _store(study: Path):
    """The (edited) study ingested, all cells in cluster "0" (stages called directly)."""
    from cellmill.io.ingest import ingest

    store = ingest(study / "manifest.csv", study / "s.zarr")
    store.update_obs(qc_pass=np.ones(store.n_cells, dtype=bool),
                     cluster=pd.Categorical(["0"] * store.n_cells))
    return store


def test_stages_skip_the_study_without_condition(study, caplog):
    """Stages decide from the store's obs (no preflight): grouped statistics yes, target
    tests, GSEA and their tables no (an earlier run's are removed); no GMT needed."""
    from cellmill.engine.registry import Context, load_stages, stage_hash
    from cellmill.report.stage import build_report
    from cellmill.stages.gsea.stage import run_gsea
    from cellmill.stages.statistics.grouped import load_grouped_stats
    from cellmill.stages.statistics.stage import run_statistics

    _edit(study, lambda m: m.drop(columns=["condition"], inplace=True))
    store = _store(study)
    cfg = load_config(None, ['study.target_genes=["NOPE"]', f'gsea.gmt="{study / "no.gmt"}"'])
    stage_hash(load_stages()["gsea"], cfg, {})  # params need no GMT
    ctx = Context(cfg=cfg, outdir=study / "out", store=store, progress=False)
    for name in ("target_tests.csv", "gsea.csv"):
        (ctx.tables / name).write_text("stale\n")
    with caplog.at_level(logging.WARNING, logger="cellmill"):
        run_statistics(ctx)
    assert len(_warnings(caplog)) == 1
    assert load_grouped_stats(store).attrs["group_by"] == ["cluster", "timepoint", "sample"]
    run_gsea(ctx)
    assert not (ctx.tables / "target_tests.csv").exists() and not (ctx.tables / "gsea.csv").exists()
    text = build_report(ctx).read_text()
    assert "study parts skipped" in text and "Cells per cluster and sample" in text


def test_stages_pool_time_points_without_their_column(study, sim):
    from cellmill.engine.registry import Context
    from cellmill.stages.gsea.stage import run_gsea
    from cellmill.stages.statistics.stage import run_statistics

    _edit(study, lambda m: m.drop(columns=["timepoint"], inplace=True))
    store = _store(study)
    cfg = load_config(None, [f'gsea.gmt="{sim / "planted.gmt"}"', "gsea.min_size=5"])
    ctx = Context(cfg=cfg, outdir=study / "out", store=store, progress=False)
    run_statistics(ctx)
    tests = pd.read_csv(ctx.tables / "target_tests.csv")
    assert len(tests) == 2 and set(tests["timepoint"]) == {"pooled"}  # all cells, cluster 0
    run_gsea(ctx)
    gsea = pd.read_csv(ctx.tables / "gsea.csv")
    assert len(gsea) > 0 and set(gsea["timepoint"]) == {"pooled"}


def _check_pbmc_outputs(out: Path) -> None:
    from cellmill.io.store import Store

    tables = out / "tables"
    for name in ("clusters.csv", "markers.csv"):
        assert len(pd.read_csv(tables / name)) > 0, name
    assert Store(out / "study.zarr").has("obsm", "X_umap")
    assert (out / "report.html").is_file()
    assert not (tables / "gsea.csv").exists() and not (tables / "target_tests.csv").exists()
    assert "study parts skipped" in (out / "report.html").read_text()


def test_pbmc_runs_without_config(shared_data, tmp_path, caplog):
    """Human PBMC, no study columns, default (mouse study) config: clusters, markers, UMAP and
    a report; no target tests, no GSEA, no GMT needed; the warning once."""
    from cellmill.engine.workflow import run_workflow

    pbmc = shared_data / "10x" / "pbmc_1k_citeseq_v3.h5"
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="cellmill"):
        run_workflow(load_config(None, [f'input.path="{pbmc}"', "compute.progress=false"]), out)
    _check_pbmc_outputs(out)
    assert len(_warnings(caplog)) == 1


def test_pbmc_cli_without_config(shared_data, tmp_path, caplog):
    pbmc = shared_data / "10x" / "pbmc_1k_citeseq_v3.h5"
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="cellmill"):
        assert main(["run", str(pbmc), "-o", str(out)]) == 0
    _check_pbmc_outputs(out)
    assert len(_warnings(caplog)) == 1
