"""The benchmark's disk-read accounting (cellmill/bench/suite.py): a file read after its pages
were dropped from the page cache counts as read from the disk, a cached read does not, and the
stage table names the stages that waited on the disk."""

import os

import pytest

from cellmill.bench import suite


def test_disk_reads_count_uncached_reads_only(tmp_path):
    path = tmp_path / "blob"
    size = 32 * 2**20
    with open(path, "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())  # dirty pages are not dropped
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    before = suite.disk_read_mb()
    path.read_bytes()
    first = suite.disk_read_mb() - before
    if first == 0:
        pytest.skip("this file system counts no block reads (tmpfs or similar)")
    assert 0.9 * 32 <= first <= 34
    before = suite.disk_read_mb()
    path.read_bytes()  # now from the page cache
    assert suite.disk_read_mb() - before < 1


def test_stage_table_names_the_stages_that_read_the_disk():
    stage = {"seconds": 10.0, "cpu_seconds": 15.0, "peak_rss_mb": 600.0}
    doc = {"machine": {"cpus": 2, "memory_gb": 24},
           "settings": {"scheduler": "threads", "workers": 2, "memory": "1GB"},
           "results": [{
        "cells": 196_000, "nnz": 427_000_000, "n_cells_qc": 196_000, "store_mb": 1500.0,
        "stages": {"hvg": {**stage, "disk_read_mb": 3.0},
                   "statistics": {**stage, "disk_read_mb": 1234.0}},
        "scanpy": {"skipped": "--no-scanpy"},
        "decode": {"seconds": 1.5, "cpu_seconds": 2.5, "peak_rss_mb": 170.0, "nnz": 427_000_000,
                   "first_disk_read_mb": 0.0}}]}
    md = suite.markdown(doc)
    assert "| statistics | 10.0 | 15.0 | 600 | 42.7 | 1234 |" in md
    assert "| hvg | 10.0 | 15.0 | 600 | 42.7 | 3 |" in md
    note = [line for line in md.splitlines() if line.startswith("Read from the disk")]
    assert note and "statistics 1,234 MB" in note[0] and "hvg" not in note[0]
    assert "(the store: 1,500 MB)" in note[0]


def test_whole_study_line_sets_one_process_beside_the_stage_sum():
    r = {"stages": {"qc": {"seconds": 1.5}, "umap": {"seconds": 30.0}},
         "whole": {"seconds": 25.25, "process_seconds": 27.0, "peak_rss_mb": 812.4,
                   "stages": {"qc": {"peak_rss_mb": 300.0}, "umap": {"peak_rss_mb": 812.4}}}}
    (line,) = [x for x in suite.whole_lines(r) if x]
    assert "**25.2 s**" in line and "peak RSS 812 MB (in umap)" in line
    assert "27.0 s with the process's start-up" in line and "sum to 31.5 s" in line
    assert "failed (exit status 1)" in suite.whole_lines({"stages": {},
                                                          "whole": {"error": "exit status 1"}})[1]


def test_whole_study_child_runs_cellmill_run_in_one_process(tmp_path):
    import json

    from cellmill.simulate import simulate_study

    sim = tmp_path / "sim"
    simulate_study(sim, n_cells=1500, seed=1)
    cfg = tmp_path / "bench.toml"
    cfg.write_text(f'[input]\nmanifest = "{sim / "manifest.csv"}"\n\n'
                   '[compute]\nprogress = false\n\n'
                   f'[gsea]\ngmt = "{sim / "planted.gmt"}"\n')
    out, result = tmp_path / "whole", tmp_path / "whole.json"
    assert suite.main(["_whole", str(cfg), str(out), "normalize", str(result)]) == 0
    got = json.loads(result.read_text())
    run = json.loads((out / "run.json").read_text())
    assert got["seconds"] == run["wall_seconds"] > 0
    assert got["peak_rss_mb"] == run["peak_rss_mb"] > 0
    assert list(got["stages"]) == ["ingest", "qc", "normalize"]
    assert got["seconds_in_process"] >= got["seconds"]
    assert (out / "study.zarr").is_dir()


def test_scaling_table_compares_worker_counts():
    def st(sec, cpu):
        return {"seconds": sec, "cpu_seconds": cpu, "peak_rss_mb": 500.0}

    main = {s: st(8.0, 15.0) for s in suite.HEADLINE}
    main["umap"] = st(20.0, 38.0)
    fast = {s: st(1.0, 12.0) for s in suite.HEADLINE}
    fast["umap"] = st(4.0, 50.0)
    r = {"cells": 196_000, "stages": {}, "scaling": {"16": {"stages": fast},
                                                     "2": {"stages": main}}}
    lines = suite.scaling_lines(r)
    assert "| stage | 2 workers s | 16 workers s | × at 16 | cores used at 16 |" in lines
    assert "| umap | 20.0 | 4.0 | 5.00 | 12.50 |" in lines
    assert "| qc..cluster | 48.0 | 6.0 | 8.00 | – |" in lines
    assert "| all stages | 68.0 | 10.0 | 6.80 | – |" in lines
    assert lines[-1] == "Measured: qc..cluster 8.00x, all stages 6.80x: goal met."
    r["scaling"] = {"1": {"stages": {s: st(16.0, 16.0) for s in main}},
                    "2": {"stages": main}}
    lines = suite.scaling_lines(r)
    assert "| stage | 1 worker s | 2 workers s | × at 2 | cores used at 2 |" in lines
    assert "| umap | 16.0 | 20.0 | 0.80 | 1.90 |" in lines
    assert lines[-1] == "This run did not measure 2 against 16 workers."
    assert suite.scaling_lines({"cells": 1, "stages": main,
                                "scaling": {"2": {"stages": main}}}) == []


def test_scaling_option_takes_worker_counts():
    ap = suite.build_parser()
    assert ap.parse_args(["--scaling", "16,2"]).scaling == [2, 16]
    with pytest.raises(SystemExit):
        ap.parse_args(["--scaling", "0,2"])
    with pytest.raises(SystemExit):
        ap.parse_args(["--scaling", "two"])
