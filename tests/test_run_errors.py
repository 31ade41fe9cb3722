"""Failures a user can act on are one line and exit 2; bugs are one line, exit 1, and a log
file with the traceback; a store is used by one run at a time (issue 18)."""

from __future__ import annotations

import errno
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from make_10x import barcodes, random_counts, write_10x_v3

from cellmill import cli
from cellmill.engine import registry as stages_mod
from cellmill.errors import InputError
from cellmill.io.lock import StoreLock


@pytest.fixture
def tiny_h5(tmp_path) -> Path:
    counts = random_counts(300, 400, density=0.3, seed=3)
    path = tmp_path / "tiny.h5"
    write_10x_v3(path, counts, barcodes(300, seed=3), [f"Gene{i}" for i in range(400)])
    return path


def _one_line(capsys) -> str:
    """The error line: one line, after the run log's stage lines (a batch log)."""
    err = capsys.readouterr().err
    err = "\n".join(line for line in err.splitlines()
                    if not re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d stage ", line)).strip()
    assert err.count("\n") == 0, err
    assert err.startswith("cellmill: error:"), err
    return err


def test_a_second_run_on_a_locked_store_is_refused(tmp_path, tiny_h5, capsys):
    out = tmp_path / "out"
    with StoreLock(out / "study.zarr"):
        code = cli.main(["run", str(tiny_h5), "-o", str(out), "--set", "qc.min_features=10"])
    assert code == 2
    err = _one_line(capsys)
    assert "study.zarr.lock" in err and "another cellmill run" in err
    assert not (out / "study.zarr").exists()


def test_a_lock_whose_run_died_is_taken_over(tmp_path):
    store = tmp_path / "study.zarr"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    import socket

    lock = tmp_path / "study.zarr.lock"
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                "started_at": 0, "since": 0}))
    with StoreLock(store) as held:
        assert held.held and json.loads(lock.read_text())["pid"] != int(dead.stdout)
        with pytest.raises(InputError, match="another cellmill run"):
            StoreLock(store).__enter__()
    assert not lock.exists()


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_a_zarr_store_written_by_anndata_is_one_line(tmp_path, capsys, zarr_format):
    import anndata as ad
    import scipy.sparse as sp

    path = tmp_path / "other.zarr"
    ad.settings.zarr_write_format = zarr_format
    try:
        ad.AnnData(sp.random(20, 10, density=0.3, format="csr")).write_zarr(path)
    finally:
        ad.settings.zarr_write_format = 2
    assert cli.main(["info", str(path)]) == 2
    err = _one_line(capsys)
    assert "not written by cellmill" in err and "cellmill ingest" in err


def test_a_store_of_another_format_is_one_line(tmp_path, tiny_h5, capsys):
    store = tmp_path / "s.zarr"
    assert cli.main(["ingest", str(tiny_h5), "-o", str(store)]) == 0
    capsys.readouterr()
    assert cli.main(["info", str(store)]) == 0
    meta = store / "uns" / "cellmill" / "zarr.json"
    doc = json.loads(meta.read_text())
    del doc["attributes"]["format"]
    meta.write_text(json.dumps(doc))
    assert cli.main(["info", str(store)]) == 2
    assert "older cellmill" in _one_line(capsys)
    doc["attributes"]["format"] = 99
    meta.write_text(json.dumps(doc))
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[input]\nstore = "{store}"\n')
    assert cli.main(["run", str(cfg), "-o", str(tmp_path / "out")]) == 2
    assert "format 99" in _one_line(capsys)


def _failing_qc(monkeypatch, exc):
    st = stages_mod.load_stages()["qc"]

    def boom(ctx):
        raise exc

    monkeypatch.setattr(st, "func", boom)


@pytest.mark.parametrize("exc, words", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/out/tables/qc.csv"),
     "no space left"),
    (PermissionError(errno.EACCES, "Permission denied", "/data/out/figures"), "permissions"),
    (FileNotFoundError(errno.ENOENT, "No such file", "/data/in/sample1.h5"), "removed"),
    (MemoryError(), "out of memory"),
])
def test_environment_failures_are_one_line(tmp_path, tiny_h5, capsys, monkeypatch, exc, words):
    _failing_qc(monkeypatch, exc)
    code = cli.main(["run", str(tiny_h5), "-o", str(tmp_path / "out")])
    assert code == 2
    assert words in _one_line(capsys)


def test_an_internal_error_is_one_line_and_a_log(tmp_path, tiny_h5, capsys, monkeypatch):
    _failing_qc(monkeypatch, RuntimeError("a bug"))
    code = cli.main(["run", str(tiny_h5), "-o", str(tmp_path / "out")])
    assert code == 1
    err = _one_line(capsys)
    assert "internal error: RuntimeError: a bug" in err and "--debug" in err
    log = Path(err.split("traceback in ")[1].split(";")[0])
    text = log.read_text()
    assert "Traceback" in text and "boom" in text
    log.unlink()
    with pytest.raises(RuntimeError, match="a bug"):  # --debug: the traceback itself
        cli.main(["--debug", "run", str(tiny_h5), "-o", str(tmp_path / "out2")])
    # the failed stage left no record: it runs again next time
    from cellmill.io.store import Store

    assert set(Store(tmp_path / "out" / "study.zarr").stage_records()) == {"ingest"}


def test_an_output_folder_that_is_a_file_is_refused(tmp_path, tiny_h5, capsys):
    out = tmp_path / "out"
    out.write_text("x")
    assert cli.main(["run", str(tiny_h5), "-o", str(out)]) == 2
    assert "output folder is a file" in _one_line(capsys)


def test_input_store_is_used_in_place_and_said_so(tmp_path, tiny_h5, caplog):
    from cellmill.config import load_config
    from cellmill.engine.workflow import run_workflow

    store = tmp_path / "s.zarr"
    assert cli.main(["ingest", str(tiny_h5), "-o", str(store)]) == 0
    cfg = load_config(None, [f'input.store="{store}"', "qc.min_features=10",
                             "compute.progress=false"])
    with caplog.at_level("WARNING", logger="cellmill"):
        run_workflow(cfg, tmp_path / "out", until="qc")
    assert any("used in place" in r.getMessage() for r in caplog.records)
    from cellmill.io.store import Store

    assert set(Store(store).stage_records()) == {"ingest", "qc"}
    assert np.asarray(Store(store).obs_column("qc_pass")).any()
