"""Configuration validation, the stage skeleton (skip / rerun), and CLI error handling."""

import subprocess
import sys
import warnings

import pandas as pd
import pytest
from make_10x import barcodes, random_counts, write_10x_v3

from cellmill.config import ConfigError, load_config
from cellmill.engine.registry import Context, run_stages
from cellmill.io.store import Store


def test_defaults_are_the_study():
    cfg = load_config()
    assert (cfg.qc.min_features, cfg.qc.max_features, cfg.qc.inclusive) == (500, 4000, False)
    assert cfg.hvg.n_top == 2000 and cfg.neighbors.k == 20 and cfg.neighbors.n_pcs == 15
    assert cfg.cluster.resolution == 0.3 and cfg.study.target_genes == ["Sigmar1"]
    assert cfg.compute.memory_bytes == 2 * 10**9


def test_toml_and_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[qc]\nmin_features = 200\n[study]\ntarget_genes = ["Sigmar1", "Tspo"]\n')
    cfg = load_config(p, ["cluster.resolution=0.5", "compute.scheduler=processes",
                          "qc.inclusive=true"])
    assert cfg.qc.min_features == 200 and cfg.study.target_genes == ["Sigmar1", "Tspo"]
    assert cfg.cluster.resolution == 0.5 and cfg.compute.scheduler == "processes"
    assert cfg.qc.inclusive is True


@pytest.mark.parametrize("text, match", [
    ("[qc]\nmin_feature = 3\n", "unknown key qc.min_feature"),
    ("[qcc]\n", "unknown section"),
    ('[qc]\nmin_features = "many"\n', "expected an integer"),
    ('[cluster]\nalgorithm = "kmeans"\n', "leiden or louvain"),
    ('[compute]\nmemory = "lots"\n', "compute.memory"),
    ("[qc]\nmin_features = 5000\n", "min_features < max_features"),
    ("[qc\n", "not valid TOML"),
])
def test_bad_config(tmp_path, text, match):
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(p)


def _one_sample(tmp_path, n=3000):
    m = random_counts(n, 40, density=0.3, seed=2)
    write_10x_v3(tmp_path / "a.h5", m, barcodes(n, seed=2), [f"G{i}" for i in range(40)])
    pd.DataFrame({"sample": ["A"], "path": ["a.h5"], "condition": ["SNI"]}).to_csv(
        tmp_path / "m.csv", index=False)
    return tmp_path / "m.csv", m


def test_stages_skip_and_rerun(tmp_path):
    manifest, m = _one_sample(tmp_path)
    nf = (m > 0).sum(1).A1
    cfg = load_config(None, [f"input.manifest={manifest}", "qc.min_features=10",
                             "qc.max_features=14"])
    out = tmp_path / "out"
    ctx = Context(cfg, out, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = run_stages(ctx, until="qc")
    assert not t["ingest"]["skipped"] and not t["qc"]["skipped"]
    qc = pd.read_csv(out / "tables" / "qc.csv")
    assert list(qc.columns) == ["cell", "sample", "n_counts", "n_features", "pass"]
    assert qc["pass"].tolist() == ((nf > 10) & (nf < 14)).tolist()
    # same config: nothing runs
    t = run_stages(Context(cfg, out, progress=False), until="qc")
    assert t["ingest"]["skipped"] and t["qc"]["skipped"]
    # changed QC parameter: only qc reruns
    cfg2 = load_config(None, [f"input.manifest={manifest}", "qc.min_features=10",
                              "qc.max_features=14", "qc.inclusive=true"])
    t = run_stages(Context(cfg2, out, progress=False), until="qc")
    assert t["ingest"]["skipped"] and not t["qc"]["skipped"]
    qc = pd.read_csv(out / "tables" / "qc.csv")
    assert qc["pass"].tolist() == ((nf >= 10) & (nf <= 14)).tolist()
    assert set(Store(out / "study.zarr").stage_records()) == {"ingest", "qc"}
    # a crash mid-stage (record absent) reruns that stage only
    Store(out / "study.zarr").set_stage_record("qc", None)
    t = run_stages(Context(cfg2, out, progress=False), until="qc")
    assert t["ingest"]["skipped"] and not t["qc"]["skipped"]


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cellmill.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_cli_ingest_and_info(tmp_path):
    manifest, _ = _one_sample(tmp_path, n=500)
    r = _cli("ingest", str(manifest), "-o", str(tmp_path / "s.zarr"))
    assert r.returncode == 0, r.stderr
    r = _cli("info", str(tmp_path / "s.zarr"))
    assert r.returncode == 0 and "cells   500" in r.stdout and "A: 500 cells" in r.stdout
    r = _cli("ingest", str(manifest), "-o", str(tmp_path / "s.zarr"))
    assert r.returncode == 2 and "exists" in r.stderr and "s.zarr" in r.stderr


def test_cli_errors_are_one_line(tmp_path):
    r = _cli("ingest", str(tmp_path / "missing.csv"), "-o", str(tmp_path / "x.zarr"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "missing.csv" in r.stderr
    bad = tmp_path / "c.toml"
    bad.write_text("[qc]\nfoo = 1\n")
    r = _cli("run", str(bad))
    assert r.returncode == 2 and "unknown key qc.foo" in r.stderr
    assert not (tmp_path / "x.zarr").exists()


def test_bench_takes_its_own_options(capsys):
    from cellmill import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--sizes", "25k", "--help"])
    assert e.value.code == 0
    assert "--sizes" in capsys.readouterr().out
