"""Runs killed with SIGKILL never leave a result that lies (issue 18).

Every stage is killed at two points, right after its first write (to the store or OUTDIR) and
at a random moment inside it, while it rewrites results of an earlier complete run with another
setting (the state in which a stale completion record would lie). The kills run as one chain
of `cellmill run` processes on one output folder; a final rerun with the original config must
end byte-identical (tables) and bit-identical (store) to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cellmill.config import load_config
from cellmill.engine import registry as stages_mod
from cellmill.engine.registry import ORDER, dependants, load_stages
from cellmill.engine.workflow import run_workflow
from cellmill.io.store import Store

N_CELLS = 1200
N_GENES = 5000

# stage -> a setting under which that stage writes other values than the reference run
CHANGES = {
    "ingest": "input.manifest=MANIFEST_B",
    "qc": "qc.min_features=170",
    "normalize": "normalize.scale_factor=5000",
    "hvg": "hvg.n_top=1500",
    "pca": "pca.clip=5",
    "neighbors": "neighbors.k=15",
    "cluster": "cluster.resolution=0.5",
    "umap": "umap.min_dist=0.5",
    "statistics": 'study.group_by=["cluster", "condition", "timepoint"]',
    "markers": "markers.logfc_threshold=0.5",
    "gsea": "gsea.seed=1",
    "report": "umap.min_dist=0.5",  # the report has no setting of its own
}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from cellmill.simulate import simulate_study

    root = tmp_path_factory.mktemp("faults")
    sim = root / "sim"
    simulate_study(sim, n_cells=N_CELLS, seed=11, n_genes=N_GENES)
    lines = (sim / "manifest.csv").read_text().splitlines()
    (sim / "manifest_b.csv").write_text("\n".join(lines[:-1]) + "\n")  # one sample fewer
    cfg = root / "study.toml"
    cfg.write_text(f'[input]\nmanifest = "{sim / "manifest.csv"}"\n'
                   f'[gsea]\ngmt = "{sim / "planted.gmt"}"\nnperm_simple = 200\n'
                   "[umap]\nn_epochs = 60\n"
                   "[compute]\nprogress = false\n")
    ref = root / "reference"
    ctx = run_workflow(load_config(cfg), ref)
    assert not any(t["skipped"] for t in ctx.timings.values())
    seconds = {n: t["seconds"] for n, t in ctx.timings.items()}
    return cfg, ref, seconds, sim / "manifest_b.csv"


def _snapshot(outdir: Path) -> dict[str, bytes]:
    """The store (minus the stage records, which hold timings) and every table. Figures and
    report.html carry times or come from matplotlib; they are checked to exist."""
    out = {}
    for sub in ("study.zarr", "tables"):
        for p in sorted((outdir / sub).rglob("*")):
            rel = p.relative_to(outdir).as_posix()
            if p.is_file() and rel != "study.zarr/uns/cellmill/zarr.json":
                out[rel] = p.read_bytes()
    return out


def _same(a: dict[str, bytes], b: dict[str, bytes]) -> None:
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))[:10]
    differ = [k for k in a if a[k] != b[k]]
    assert not differ, f"files differ: {differ[:10]}"


def _run(cfg: Path, out: Path, sets: list[str], until: str, fault: str) -> int:
    cmd = [sys.executable, "-m", "cellmill.cli", "run", str(cfg), "-o", str(out),
           "--until", until]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, CELLMILL_QUIET="1", CELLMILL_FAULT=fault)
    proc = subprocess.run(cmd, env=env, capture_output=True, timeout=900)
    if proc.returncode not in (0, -signal.SIGKILL):
        pytest.fail(f"run {sets} {fault} failed: {proc.stderr.decode()[-2000:]}")
    return proc.returncode


def _records(out: Path) -> dict:
    meta = out / "study.zarr" / "uns" / "cellmill" / "zarr.json"
    return json.loads(meta.read_text())["attributes"]["stages"]


def test_kill_every_stage_at_two_points_then_rerun(study, tmp_path):
    cfg, ref, seconds, manifest_b = study
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    rng = np.random.default_rng(18)
    matrix = []
    for name in ORDER:
        changed = [CHANGES[name].replace("MANIFEST_B", json.dumps(str(manifest_b)))]
        # right after the stage's first write
        code = _run(cfg, out, changed, name, f"{name}:write:1")
        assert code == -signal.SIGKILL, f"{name}: no write to kill at"
        matrix.append((name, "first write", "killed"))
        # at a random moment inside it; a stage that ended first is rerun under the other
        # setting (its record then disagrees) with a shorter delay
        delay = float(rng.uniform(0.1, 0.9)) * max(seconds[name], 0.02)
        for attempt in range(6):
            sets = changed if attempt % 2 == 0 else []
            code = _run(cfg, out, sets, name, f"{name}:after:{delay:.4f}")
            if code == -signal.SIGKILL:
                break
            delay /= 2
        assert code == -signal.SIGKILL, f"{name}: never killed inside the stage"
        matrix.append((name, f"{delay:.3f} s in", "killed"))
    print("\nfault matrix:", matrix)
    ctx = run_workflow(load_config(cfg), out)
    assert not all(t["skipped"] for t in ctx.timings.values())
    _same(_snapshot(ref), _snapshot(out))
    assert (out / "report.html").is_file() and (out / "run.json").is_file()


def test_changed_qc_killed_after_its_first_write_then_rerun(study, tmp_path):
    """The sequence of issue 18 item 1: qc rewrites qc_pass under another setting and dies
    before its record is replaced; a rerun with the first setting must not trust the old
    records."""
    cfg, ref, _, _ = study
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    before = np.asarray(Store(ref / "study.zarr").obs_column("qc_pass"))
    code = _run(cfg, out, ["qc.min_features=170"], "qc", "qc:write:1")
    assert code == -signal.SIGKILL
    killed = np.asarray(Store(out / "study.zarr").obs_column("qc_pass"))
    assert killed.sum() != before.sum()  # the kill came after qc_pass was rewritten
    assert set(_records(out)) == {"ingest"}  # qc and everything after it: no record
    ctx = run_workflow(load_config(cfg), out)
    ran = [n for n, t in ctx.timings.items() if not t["skipped"]]
    assert ran == ORDER[1:]
    np.testing.assert_array_equal(np.asarray(Store(out / "study.zarr").obs_column("qc_pass")),
                                  before)
    _same(_snapshot(ref), _snapshot(out))


def test_code_change_reruns_that_stage_and_its_dependants(study, tmp_path, monkeypatch):
    cfg, ref, _, _ = study
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    real = stages_mod.stage_code
    monkeypatch.setattr(stages_mod, "stage_code",
                        lambda st: real(st) + ("-new" if st.name == "markers" else ""))
    ctx = run_workflow(load_config(cfg), out)
    ran = [n for n, t in ctx.timings.items() if not t["skipped"]]
    assert ran == dependants("markers", load_stages()) == ["markers", "report"]
    _same(_snapshot(ref), _snapshot(out))


def test_code_digest_follows_the_modules_a_stage_uses():
    """The digest of a stage covers the modules it imports, transitively, and not others."""
    closure = set()
    todo = ["cellmill.stages.markers"]
    while todo:
        m = todo.pop()
        if m not in closure and m not in stages_mod.PLUMBING:
            closure.add(m)
            todo.extend(stages_mod._imports(m))
    assert "cellmill.kernels.wilcoxon" in closure
    assert "cellmill.stages.neighbors" not in closure and "cellmill.kernels.layout" not in closure
    assert "cellmill.config" not in closure


def test_outputs_land_in_a_new_outdir_from_an_existing_store(study, tmp_path):
    """input.store with a new -o: every stage is up to date, and OUTDIR still gets every
    table, figure and the report."""
    cfg, ref, _, _ = study
    work = tmp_path / "work"
    shutil.copytree(ref, work)
    meta = work / "study.zarr" / "uns" / "cellmill" / "zarr.json"  # as if run into `work`
    meta.write_text(meta.read_text().replace(json.dumps(str(ref.resolve())),
                                             json.dumps(str(work.resolve()))))
    store_cfg = tmp_path / "store.toml"
    text = Path(cfg).read_text().replace("[input]\n", "").splitlines()
    text = [t for t in text if not t.startswith("manifest")]
    store_cfg.write_text(f'[input]\nstore = "{work / "study.zarr"}"\n' + "\n".join(text) + "\n")
    new = tmp_path / "new"
    ctx = run_workflow(load_config(store_cfg), new)
    ran = [n for n, t in ctx.timings.items() if not t["skipped"]]
    assert ran == ["report"]  # the report names its folder: rebuilt, the rest copied
    ref_tables = {p.relative_to(ref).as_posix(): p.read_bytes()
                  for p in (ref / "tables").rglob("*") if p.is_file()}
    new_tables = {p.relative_to(new).as_posix(): p.read_bytes()
                  for p in (new / "tables").rglob("*") if p.is_file()}
    assert ref_tables == new_tables
    assert (new / "report.html").is_file()
    assert sorted(p.name for p in (new / "figures").iterdir()) == \
        sorted(p.name for p in (ref / "figures").iterdir())
    # the folder the tables were written to is gone: the stages that wrote them run again
    shutil.rmtree(work / "tables")
    new2 = tmp_path / "new2"
    shutil.rmtree(work / "figures")
    ctx = run_workflow(load_config(store_cfg), new2)
    assert ctx.timings["ingest"]["skipped"] and not ctx.timings["qc"]["skipped"]
    assert {p.relative_to(new2).as_posix(): p.read_bytes()
            for p in (new2 / "tables").rglob("*") if p.is_file()} == new_tables
