"""The batch log of `cellmill run` (stderr not a terminal): one line per stage start and end,
the reason a stage runs or is skipped, a final summary with the output paths; -q and -v."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from cellmill.engine.registry import ORDER

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from cellmill.simulate import simulate_study

    root = tmp_path_factory.mktemp("batchlog")
    sim = root / "sim"
    simulate_study(sim, n_cells=1200, seed=7, n_genes=6000)
    cfg = root / "study.toml"
    cfg.write_text(f'[input]\nmanifest = "{sim / "manifest.csv"}"\n'
                   f'[gsea]\ngmt = "{sim / "planted.gmt"}"\n')
    return root, cfg


def _run(root, cfg, *args) -> str:
    """`cellmill run` with stderr to a file (a batch job); returns stderr."""
    err = root / "stderr.log"
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "CELLMILL_QUIET")}
    with open(err, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "cellmill.cli", "run", str(cfg),
                               "-o", str(root / "out"), *args],
                              stdout=subprocess.DEVNULL, stderr=f, env=env)
    text = err.read_text()
    assert proc.returncode == 0, text
    return text


def _lines(text: str, pattern: str) -> list[str]:
    return re.findall(rf"^{STAMP}{pattern}$", text, flags=re.M)


@pytest.fixture(scope="module")
def logs(study):
    root, cfg = study
    first = _run(root, cfg)
    again = _run(root, cfg)
    changed = _run(root, cfg, "--set", "cluster.resolution=0.5", "-v")
    quiet = _run(root, cfg, "--set", "cluster.resolution=0.5", "-q")
    return root, first, again, changed, quiet


def test_first_run_one_start_and_one_end_line_per_stage(logs):
    root, first, *_ = logs
    for name in ORDER:
        assert len(_lines(first, rf"stage {name} started \(no earlier result\)")) == 1, first
        done = _lines(first, rf"stage {name} done in \d+\.\d s, peak [\d,]+ MB, [\d,]+ cells")
        assert len(done) == 1, first
    # cells: all of them for ingest and qc, the QC-passed ones after
    n_all = int(re.search(r"stage ingest done .* ([\d,]+) cells", first).group(1).replace(",", ""))
    n_qc = int(re.search(r"stage pca done .* ([\d,]+) cells", first).group(1).replace(",", ""))
    assert n_qc == 1200 < n_all
    # no other loggers' INFO lines without -v
    assert not re.search(r"^\S+ \S+ cellmill\.?\w*: ", first, flags=re.M), first


def test_final_summary_names_the_outputs(logs):
    root, first, *_ = logs
    out = (root / "out").resolve()
    assert len(_lines(first, r"run done in \d+\.\d s, peak [\d,]+ MB: 12 stages, 12 ran, "
                             r"0 up to date")) == 1
    for what, path in [("report", out / "report.html"), ("tables", f"{out / 'tables'}/"),
                       ("figures", f"{out / 'figures'}/"), ("store", out / "study.zarr"),
                       ("run.json", out / "run.json")]:
        assert f" output {what}: {path}\n" in first, first


def test_rerun_skips_every_stage_saying_why(logs):
    _, _, again, *_ = logs
    for name in ORDER:
        assert len(_lines(again, rf"stage {name} up to date \(skipped: same parameters, "
                                 r"inputs and code\)")) == 1, again
    assert "started" not in again
    assert _lines(again, r"run done in .*: 12 stages, 0 ran, 12 up to date")


def test_changed_parameter_reason_and_verbose_detail(logs):
    _, _, _, changed, _ = logs
    assert _lines(changed, r"stage cluster started \(parameters changed: resolution\)")
    assert _lines(changed, r"stage markers started \(inputs changed: cluster\)")
    for name in ("ingest", "qc", "normalize", "hvg", "pca", "neighbors"):
        assert _lines(changed, rf"stage {name} up to date .*"), changed
    # -v after the subcommand is accepted and adds the stages' own logs
    assert re.search(rf"^{STAMP}cellmill: cluster: ", changed, flags=re.M), changed


def test_quiet_prints_nothing_on_success(logs):
    *_, quiet = logs
    assert quiet == ""


def test_options_before_and_after_the_subcommand():
    from cellmill.cli import build_parser

    p = build_parser()
    assert p.parse_args(["-v", "run", "x.toml"]).verbose == 1
    assert p.parse_args(["run", "x.toml", "-vv"]).verbose == 2
    a = p.parse_args(["run", "x.toml", "-q", "--debug"])
    assert a.quiet and a.debug
    assert not p.parse_args(["info", "s.zarr"]).quiet
