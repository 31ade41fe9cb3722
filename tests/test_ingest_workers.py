"""Ingest with samples decoded in worker processes (issue 21): the same store, byte for byte,
for any worker count; at most `workers` parts in flight; a worker's InputError reaches the user
as the sequential ingest's one line; a killed ingest leaves no store and no worker behind."""

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
import warnings
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import psutil
import pytest
from test_ingest_stream import TINY, _corrupt_last, _files, _study, dense_union

import cellmill.io.decode as decode
import cellmill.io.tenx as tenx
from cellmill.cli import main
from cellmill.errors import InputError
from cellmill.io.ingest import ingest
from cellmill.io.store import GRANULE


def _ingest(manifest, out, workers, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # genes absent from a sample
        return ingest(manifest, out, block_cells=GRANULE, workers=workers, **kw)


@pytest.fixture
def small_parts(monkeypatch):
    """Slices of TINY nonzeros, parts of three slices: every v3 sample is cut into many parts."""
    monkeypatch.setattr(tenx, "SLICE_NNZ", TINY)
    monkeypatch.setattr(decode, "PART_NNZ", 3 * TINY)


def test_any_worker_count_gives_the_same_store(tmp_path, small_parts):
    manifest, expected = _study(tmp_path / "in")
    n_parts = [t.n_parts for t in decode.tasks([tmp_path / "in" / f"s{i}.h5" for i in range(4)],
                                               ("Gene Expression",)) if t.index == 0]
    assert min(n_parts[:3]) > 10 and n_parts[3] == 1  # v3 samples in parts, v2 read whole
    ref = _ingest(manifest, tmp_path / "w1.zarr", workers=1)
    a = _files(ref.path)
    for workers in (2, 3, 4):  # 1, 2, 3 decoding processes
        store = _ingest(manifest, tmp_path / f"w{workers}.zarr", workers=workers)
        b = _files(store.path)
        assert sorted(a) == sorted(b)
        assert [k for k in a if a[k] != b[k]] == []
        assert not store.path.with_name(store.path.name + ".ingest-scratch").exists()

    # and the content itself, against the matrices the files were written from
    _, dense = dense_union(expected)
    np.testing.assert_array_equal(store.read_rows(0, store.n_cells).toarray(), dense)
    obs = store.obs()
    np.testing.assert_array_equal(obs["n_counts"], dense.sum(1))
    assert list(obs["barcode"]) == [b for _, bc, _ in expected.values() for b in bc]
    np.testing.assert_array_equal(store.var()["total_counts"], dense.sum(0))


def test_spilled_part_comes_back_as_the_same_slices(tmp_path):
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    slices = [sp.random(7, 49, 0.2, format="csr", random_state=1),  # 69 values: padded
              sp.csr_matrix((5, 49), dtype=np.int32),  # no entries
              sp.random(3, 49, 0.5, format="csr", random_state=2)]
    slices[0].data = rng.integers(1, 9, slices[0].nnz).astype(np.int32)
    assert slices[0].nnz % 2 == 1
    spilled = decode.Spilled.write(slices, tmp_path / "0-0.part")
    back = spilled.load()
    assert not (tmp_path / "0-0.part").exists()
    for a, b in zip(slices, back, strict=True):
        assert a.shape == b.shape
        for x, y in ((a.data, b.data), (a.indices, b.indices), (a.indptr, b.indptr)):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)


class _InlinePool:
    """A pool that runs each task when submitted; records how many were submitted and not yet
    done with by the consumer."""

    def __init__(self):
        self.submitted, self.taken, self.most = 0, 0, 0

    def submit(self, fn, *args):
        f = Future()
        f.set_result(fn(*args))
        self.submitted += 1
        self.most = max(self.most, self.submitted - self.taken)
        return f

    def shutdown(self, wait=True, cancel_futures=False):
        pass


def test_at_most_workers_parts_in_flight(tmp_path, small_parts, monkeypatch):
    _study(tmp_path)
    paths = [tmp_path / f"s{i}.h5" for i in range(4)]
    pool = _InlinePool()
    monkeypatch.setattr(decode, "spawn_pool", lambda workers: pool)
    order = []
    for part in decode.decoded(decode.tasks(paths, ("Gene Expression",)), workers=3):
        order.append((part.sample, part.index))
        # held: this part (being written) and at most 3 decoding for the idle workers
        assert pool.submitted - pool.taken <= 3 + 1
        pool.taken += 1
    assert pool.most == 4 and pool.submitted == len(order) > 30
    assert order == sorted(order)  # sample order, parts in order


def test_bad_value_in_a_late_part_is_the_sequential_error(tmp_path, small_parts):
    manifest, _ = _study(tmp_path)
    _corrupt_last(tmp_path / "s1.h5", "data", -3)
    errors = []
    for workers in (1, 3):
        out = tmp_path / f"w{workers}.zarr"
        with pytest.raises(InputError, match="negative") as e:
            _ingest(manifest, out, workers=workers)
        errors.append(str(e.value))
        assert not out.exists()
        assert not out.with_name(out.name + ".ingest-scratch").exists()
    assert errors[0] == errors[1] and "\n" not in errors[1]
    assert Path(errors[1].split(": ")[0]).resolve() == (tmp_path / "s1.h5").resolve()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_truncated_file_is_one_line_from_the_cli(tmp_path, capsys):
    manifest, _ = _study(tmp_path)
    data = (tmp_path / "s2.h5").read_bytes()
    (tmp_path / "s2.h5").write_bytes(data[: len(data) // 2])
    lines = []
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}.zarr"
        assert main(["ingest", str(manifest), "-o", str(out), "--workers", workers]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "s2.h5" in err[0] and "HDF5" in err[0]
        lines.append(err[0])
        assert not out.exists()
    assert lines[0] == lines[1]


def _marked(mark: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("CELLMILL_TEST_MARK") == mark:
                found.append(p)
        except (psutil.Error, OSError):
            pass
    return found


def test_killed_ingest_leaves_no_store_and_no_worker(tmp_path, small_parts):
    manifest, _ = _study(tmp_path)
    out = tmp_path / "study.zarr"
    script = textwrap.dedent(f"""
        import warnings
        warnings.simplefilter("ignore")
        import cellmill.io.decode as decode, cellmill.io.tenx as tenx
        from cellmill.io import faults
        from cellmill.io.ingest import ingest
        tenx.SLICE_NNZ, decode.PART_NNZ = {TINY}, {3 * TINY}
        faults.stage_started("ingest")
        ingest({str(manifest)!r}, {str(out)!r}, workers=2)
    """)
    mark = uuid.uuid4().hex
    env = dict(os.environ, CELLMILL_FAULT="ingest:write:40", CELLMILL_TEST_MARK=mark,
               PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not out.exists()
    assert [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # the dead one's, unfinished
    assert (tmp_path / "study.zarr.ingest-scratch").is_dir()  # its decoded parts' folder
    deadline = time.monotonic() + 20
    while _marked(mark) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _marked(mark) == []  # the workers exit with their ingest

    # a rerun removes the dead one's temporary store and writes the sequential store
    store = _ingest(manifest, out, workers=2)
    ref = _ingest(manifest, tmp_path / "ref.zarr", workers=1)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert not (tmp_path / "study.zarr.ingest-scratch").exists()
    a, b = _files(ref.path), _files(store.path)
    assert sorted(a) == sorted(b) and [k for k in a if a[k] != b[k]] == []
