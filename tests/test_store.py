"""The store: ingest round trips, AnnData compatibility, block reads, manifests."""

import time
import warnings

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from make_10x import barcodes, random_counts, write_10x_v3
from test_ingest_stream import dense_union

from cellmill.errors import InputError
from cellmill.io.ingest import ingest
from cellmill.io.store import GRANULE, Store


def _study(tmp_path, sizes=(700, 1500, 300), n_genes=60, shuffle_genes=False):
    """Three samples; sample 2 lacks some genes and (optionally) lists genes in another order."""
    genes = [f"G{i}" for i in range(n_genes)]
    rows = []
    mats = {}
    for s, n in enumerate(sizes):
        g = list(genes)
        if s == 1:
            g = g[:-5] + ["Extra1", "Extra2"]
        if s == 2 and shuffle_genes:
            g = list(np.random.default_rng(5).permutation(g))
        m = random_counts(n, len(g), seed=s)
        bc = barcodes(n, seed=s)
        path = tmp_path / f"s{s}.h5"
        write_10x_v3(path, m, bc, g)
        mats[f"S{s}"] = (m, bc, g)
        rows.append({"sample": f"S{s}", "path": path.name, "condition": ["SNI", "Sham"][s % 2],
                     "timepoint": "3d"})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    return tmp_path / "manifest.csv", mats


def _quiet_ingest(manifest, out, **kw):
    """ingest(), its warnings (samples of few cells, ...) silenced: not what these tests check."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ingest(manifest, out, **kw)


@pytest.mark.parametrize("shuffle", [False, True])
def test_manifest_round_trip(tmp_path, shuffle):
    manifest, mats = _study(tmp_path, shuffle_genes=shuffle)
    with pytest.warns(UserWarning, match="absent, set to zero"):
        store = ingest(manifest, tmp_path / "study.zarr", block_cells=GRANULE)
    union, expected = dense_union(mats)
    assert store.shape == expected.shape
    assert list(store.var().index) == union
    full = store.read_rows(0, store.n_cells)
    assert np.array_equal(full.toarray(), expected)
    assert full.has_sorted_indices
    obs = store.obs()
    names = [f"{s}_{b}" for s, (_, bc, _) in mats.items() for b in bc]
    assert list(obs.index) == names
    assert obs["condition"].dtype == "category"
    assert list(obs["sample"].cat.categories) == ["S0", "S1", "S2"]
    # QC metrics computed on the way in
    assert np.array_equal(obs["n_counts"], expected.sum(1))
    assert np.array_equal(obs["n_features"], (expected > 0).sum(1))
    assert np.array_equal(store.var()["n_cells"], (expected > 0).sum(0))
    # anndata reads it unchanged
    ad = anndata.read_zarr(store.path)
    assert ad.X.dtype.kind == "i" and ad.X.indptr.dtype == np.int64
    assert np.array_equal(ad.X.toarray(), expected)
    assert list(ad.obs_names) == names


def test_blocks_and_masks(tmp_path):
    manifest, mats = _study(tmp_path)
    store = _quiet_ingest(manifest, tmp_path / "study.zarr", block_cells=GRANULE)
    _, expected = dense_union(mats)
    assert list(store.blocks) == [0, 1024, 2048, 2500]
    # blocks concatenate to the matrix, with a mask and a gene subset
    rng = np.random.default_rng(1)
    mask = rng.random(store.n_cells) < 0.6
    genes = np.array([3, 0, 17, 40])
    parts = [m.toarray() for _, _, m in store.iter_blocks(mask=mask, genes=genes)]
    assert np.array_equal(np.vstack(parts), expected[mask][:, genes])
    for bc in (GRANULE, 2 * GRANULE, 10**6):
        parts = [m.toarray() for _, _, m in store.iter_blocks(block_cells=bc)]
        assert np.array_equal(np.vstack(parts), expected)
    darr = store.to_dask(mask=mask, genes=genes)
    got = darr.compute(scheduler="sync")
    assert sp.issparse(got) and np.array_equal(got.toarray(), expected[mask][:, genes])


def test_reads_into_reused_buffers(tmp_path):
    """read_rows(buffers=...) gives the same matrices, in one thread's arrays, reused."""
    from concurrent.futures import ThreadPoolExecutor

    from cellmill.io.buffers import ThreadBuffers

    manifest, mats = _study(tmp_path)
    store = _quiet_ingest(manifest, tmp_path / "study.zarr", block_cells=GRANULE)
    _, expected = dense_union(mats)
    buf = ThreadBuffers()
    first = store.read_rows(0, 1024, buffers=buf)
    assert np.array_equal(first.toarray(), expected[:1024])
    held = buf.nbytes()
    again = store.read_rows(0, 512, buffers=buf)  # fewer values: the same arrays
    assert np.array_equal(again.toarray(), expected[:512])
    assert np.shares_memory(again.data, first.data) and buf.nbytes() == held
    whole = store.read_rows(0, store.n_cells, buffers=buf)  # larger: the arrays grow
    assert np.array_equal(whole.toarray(), expected) and buf.nbytes() > held

    def block(a):
        m = store.read_rows(a, min(a + 512, store.n_cells), buffers=buf)
        return a, m.toarray().copy()  # before this thread's next read reuses the arrays

    with ThreadPoolExecutor(3) as pool:
        for a, dense in pool.map(block, range(0, store.n_cells, 512)):
            assert np.array_equal(dense, expected[a: a + 512])
    buf.clear()
    assert buf.nbytes() == 0


def test_block_read_touches_only_its_chunks(tmp_path):
    """Reading block b decodes only the X chunks overlapping its nonzero range."""
    manifest, _ = _study(tmp_path, sizes=(3000, 3000, 3000), n_genes=200)
    store = _quiet_ingest(manifest, tmp_path / "study.zarr", block_cells=GRANULE)
    chunk = store.root["X"]["data"].chunks[0]
    ip = store.indptr
    b = store.blocks
    for i in range(len(b) - 1):
        a, z = ip[b[i]], ip[b[i + 1]]
        first, last = a // chunk, (z - 1) // chunk
        # a block never spans more than its own nonzeros plus one partial chunk at each edge
        assert (last - first + 1) * chunk <= (z - a) + 2 * chunk


def test_single_file_keeps_barcodes(tmp_path, shared_data):
    src = shared_data / "10x" / "pbmc_1k_citeseq_v3.h5"
    store = ingest(src, tmp_path / "pbmc.zarr")
    with h5py.File(src) as f:
        bc = [b.decode() for b in f["matrix/barcodes"][:]]
        types = f["matrix/features/feature_type"][:]
        shape = f["matrix/shape"][:]
        m = sp.csc_matrix((f["matrix/data"][:], f["matrix/indices"][:], f["matrix/indptr"][:]),
                          shape=tuple(shape))
    ge = types == b"Gene Expression"
    expected = m[ge].T.tocsr()
    assert list(store.obs().index) == bc
    got = store.read_rows(0, store.n_cells)
    assert (got != expected).nnz == 0
    assert store.var()["feature_types"].eq("Gene Expression").all()


def test_existing_output_refused(tmp_path):
    manifest, _ = _study(tmp_path, sizes=(50, 60, 70))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ingest(manifest, tmp_path / "a.zarr")
        with pytest.raises(InputError, match="exists"):
            ingest(manifest, tmp_path / "a.zarr")
        ingest(manifest, tmp_path / "a.zarr", overwrite=True)


@pytest.mark.parametrize("problem, match", [
    ("missing_column", "lacks column"),
    ("duplicate", "duplicate sample"),
    ("missing_file", "not found"),
    ("empty_sample", "empty|no cells"),
    ("corrupt", "HDF5|corrupt|truncated|not"),
])
def test_bad_manifest(tmp_path, problem, match):
    manifest, _ = _study(tmp_path, sizes=(50, 60, 70))
    df = pd.read_csv(manifest)
    if problem == "missing_column":
        df = df.drop(columns=["path"])
    elif problem == "duplicate":
        df.loc[1, "sample"] = "S0"
    elif problem == "missing_file":
        df.loc[2, "path"] = "nope.h5"
    elif problem == "empty_sample":
        write_10x_v3(tmp_path / "empty.h5", sp.csr_matrix((0, 5), dtype=np.int64), [],
                     [f"G{i}" for i in range(5)])
        df.loc[2, "path"] = "empty.h5"
    elif problem == "corrupt":
        (tmp_path / "bad.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
        df.loc[2, "path"] = "bad.h5"
    df.to_csv(manifest, index=False)
    out = tmp_path / "study.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(InputError, match=match):
            ingest(manifest, out)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_store_pickles_by_path(tmp_path):
    import pickle

    manifest, _ = _study(tmp_path, sizes=(50, 60, 70))
    store = _quiet_ingest(manifest, tmp_path / "s.zarr")
    clone = pickle.loads(pickle.dumps(store))
    assert isinstance(clone, Store) and clone.shape == store.shape
    assert len(pickle.dumps(store)) < 500


def test_obs_columns_read_and_written_one_by_one(tmp_path):
    """obs_column / update_obs touch one column; anndata sees the same frame as a full rewrite."""
    manifest, _ = _study(tmp_path)
    store = _quiet_ingest(manifest, tmp_path / "s.zarr")
    full = store.obs()
    assert store.obs_columns() == list(full.columns)
    assert (store.obs_names() == full.index).all()
    np.testing.assert_array_equal(store.obs_column("n_features"), full["n_features"].to_numpy())
    assert (pd.Series(store.obs_column("sample")) == full["sample"].reset_index(drop=True)).all()
    keep = full["n_features"].to_numpy() > 20
    cl = pd.Categorical.from_codes(np.arange(len(full)) % 3, categories=["0", "1", "2"])
    store.update_obs(qc_pass=keep, cluster=cl)
    store.update_obs(qc_pass=~keep)  # replacing a column keeps its place
    ad = anndata.read_zarr(store.path)
    assert list(ad.obs.columns) == list(full.columns) + ["qc_pass", "cluster"]
    np.testing.assert_array_equal(ad.obs["qc_pass"].to_numpy(), ~keep)
    assert (ad.obs["cluster"].to_numpy() == np.asarray(cl)).all()
    assert list(store.obs_column("cluster").categories) == ["0", "1", "2"]
    with pytest.raises(ValueError, match="values for"):
        store.update_obs(qc_pass=keep[:-1])
    with pytest.raises(KeyError, match="no column"):
        store.obs_column("nope")
    assert not list(store.path.glob("obs/*.__new__"))


def test_peak_memory_sees_peaks_the_sampler_misses():
    """A 300 MB allocation freed within one sampling interval still counts (kernel mark), and
    a nested monitor's peak reaches the outer one."""
    import sys

    from cellmill.engine.monitor import PeakMemory, current_rss

    if not sys.platform.startswith("linux"):
        pytest.skip("the kernel high-water mark is read from /proc")
    with PeakMemory(interval=3600) as outer:
        base = current_rss()
        with PeakMemory(interval=3600) as inner:
            a = np.ones(300 * 2**20 // 8)
            del a
        after = PeakMemory(interval=3600)
        with after:
            pass
    assert inner.peak >= base + 250 * 2**20
    assert outer.peak >= inner.peak
    assert after.peak < base + 150 * 2**20


def test_current_rss_counts_children_and_grandchildren():
    """The descendants found from /proc's children lists are psutil's (which reads every
    process's stat file), and their memory is counted."""
    import subprocess
    import sys

    import psutil

    from cellmill.engine import monitor

    if not monitor._PROC_CHILDREN:
        pytest.skip("no /proc/<pid>/task/<tid>/children on this system")
    hold = "import time; a = bytearray(200 * 2**20); time.sleep(30)"
    code = ("import subprocess, sys, time; "
            f"subprocess.Popen([sys.executable, '-c', {hold!r}]); time.sleep(30)")
    base = monitor.current_rss()
    kids = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(2)]
    try:
        me = psutil.Process()
        for _ in range(100):  # until both grandchildren hold their 200 MB
            found = me.children(recursive=True)
            if len(found) == 4 and sum(p.memory_info().rss for p in found) > 400 * 2**20:
                break
            time.sleep(0.1)
        assert sorted(monitor._descendants(me.pid)) == sorted(p.pid for p in found)
        assert monitor.current_rss() >= base + 400 * 2**20
    finally:
        for k in kids:
            for p in psutil.Process(k.pid).children(recursive=True):
                p.kill()
            k.kill()
            k.wait()


def test_qc_table_written_in_pieces(tmp_path, monkeypatch):
    """tables/qc.csv, written a few cells at a time, is the table of the whole obs."""
    import cellmill.engine.tables as tables
    import cellmill.stages.ingest as si
    from cellmill.config import Config
    from cellmill.engine.registry import Context

    manifest, _ = _study(tmp_path)
    store = _quiet_ingest(manifest, tmp_path / "s.zarr")
    monkeypatch.setattr(tables, "QC_ROWS", 7)
    cfg = Config()
    cfg.qc.min_features, cfg.qc.max_features = 10, 40
    ctx = Context(cfg=cfg, outdir=tmp_path / "out", store=store, progress=False)
    si.run_qc(ctx)
    got = pd.read_csv(ctx.tables / "qc.csv")
    obs = store.obs()
    nf = obs["n_features"].to_numpy()
    want = pd.DataFrame({"cell": obs.index.to_numpy(), "sample": obs["sample"].astype(str),
                         "n_counts": obs["n_counts"].to_numpy(), "n_features": nf,
                         "pass": (nf > 10) & (nf < 40)}).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
    np.testing.assert_array_equal(store.obs_column("qc_pass"), want["pass"].to_numpy())
    assert list(store.obs_names(3, 9)) == list(obs.index[3:9])


def test_cell_table_of_some_cells_written_in_pieces(tmp_path, monkeypatch):
    """A table of selected cells (as clusters.csv), a few store cells at a time."""
    import cellmill.engine.tables as tables

    manifest, _ = _study(tmp_path)
    store = _quiet_ingest(manifest, tmp_path / "s.zarr")
    monkeypatch.setattr(tables, "QC_ROWS", 7)
    rng = np.random.default_rng(4)
    cells = np.flatnonzero(rng.random(store.n_cells) < 0.3)
    cells = cells[(cells < 20) | (cells > 40)]  # some pieces without a listed cell
    labels = rng.integers(0, 5, len(cells))
    path = tmp_path / "t.csv"
    tables.write_cell_table(store, path, {"cluster": labels}, cells)
    got = pd.read_csv(path)
    names = store.obs().index.to_numpy()
    assert list(got.columns) == ["cell", "cluster"]
    np.testing.assert_array_equal(got["cell"].to_numpy(), names[cells])
    np.testing.assert_array_equal(got["cluster"].to_numpy(), labels)


def test_obs_strings_written_in_chunks(tmp_path, monkeypatch):
    """Cell names and barcodes go to disk sample by sample in chunks that do not line up with
    the samples; anndata reads back the frame pandas would build."""
    from cellmill.io import writer

    monkeypatch.setattr(writer, "STRING_CHUNK", 7)
    manifest, mats = _study(tmp_path, sizes=(20, 33, 5))
    store = _quiet_ingest(manifest, tmp_path / "study.zarr", block_cells=GRANULE)
    ad = anndata.read_zarr(store.path)
    names = [f"{s}_{b}" for s, (_, bc, _) in mats.items() for b in bc]
    assert list(ad.obs_names) == names
    barcodes = [b for _, bc, _ in mats.values() for b in bc]
    assert list(ad.obs["barcode"]) == barcodes
    # the column anndata reads back is the one it reads from its own write of the column
    # pandas builds (object strings under pandas 2, a StringArray under pandas 3)
    import zarr
    from anndata.io import read_elem, write_elem

    scratch = zarr.open_group(tmp_path / "ref.zarr", mode="w")
    write_elem(scratch, "barcode", pd.Series(np.array(barcodes, dtype=object))._values)
    ref = pd.Series(read_elem(scratch["barcode"]))
    assert ad.obs["barcode"].dtype == ref.dtype
    assert type(ad.obs["barcode"].array) is type(ref.array)
    assert dict(store.root["obs"]["barcode"].attrs) == dict(scratch["barcode"].attrs)
    assert list(ad.obs.columns) == ["barcode", "sample", "condition", "timepoint",
                                    "n_counts", "n_features"]
    assert list(ad.obs["condition"]) == ["SNI"] * 20 + ["Sham"] * 33 + ["SNI"] * 5
    assert (store.obs_names() == pd.Index(names)).all()


def test_duplicate_cell_names_leave_no_store(tmp_path):
    m = random_counts(6, 10, seed=3)
    bc = barcodes(6, seed=3)
    bc[4] = bc[1]
    write_10x_v3(tmp_path / "dup.h5", m, bc, [f"G{i}" for i in range(10)])
    with pytest.raises(InputError, match=f"duplicate cell name '{bc[1]}'"):
        ingest(tmp_path / "dup.h5", tmp_path / "study.zarr")
    assert not (tmp_path / "study.zarr").exists()
    assert not list(tmp_path.glob(".study.zarr.tmp-*"))


def test_appender_writes_zarrs_own_chunks(tmp_path):
    """Appender compresses and writes the chunk files itself (on threads): the files are
    byte for byte those zarr writes for the same values, the last one padded as zarr pads it,
    and the array reads back whole; in a store it does not write itself (memory) zarr does."""
    import zarr

    from cellmill.io.store import Appender, codec

    g = zarr.open_group(tmp_path / "a.zarr", mode="w")
    v = np.random.default_rng(0).poisson(2, 100_003).astype(np.int32)
    a = Appender(g, "direct", np.int32, 4096)
    assert a._direct is not None
    for part in np.array_split(v, 37):  # pieces that end mid-chunk
        a.append(part)
    a.close()
    z = g.create_array("zarr", shape=v.shape, dtype=np.int32, chunks=(4096,), compressors=codec())
    z[:] = v
    mine = sorted((tmp_path / "a.zarr" / "direct" / "c").iterdir(), key=lambda f: int(f.name))
    theirs = sorted((tmp_path / "a.zarr" / "zarr" / "c").iterdir(), key=lambda f: int(f.name))
    assert [f.name for f in mine] == [f.name for f in theirs] and len(mine) == 25
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(mine, theirs, strict=True))
    back = zarr.open_group(tmp_path / "a.zarr", mode="r")["direct"]
    assert back.shape == v.shape
    np.testing.assert_array_equal(back[:], v)
    m = Appender(zarr.open_group(zarr.storage.MemoryStore(), mode="w"), "x", np.int32, 4096)
    assert m._direct is None
    m.append(v)
    m.close()
    np.testing.assert_array_equal(m.arr[:], v)


def test_direct_chunks_of_row_blocks_are_zarrs_own(tmp_path):
    """_direct_chunks on a 2-d array chunked by rows only (as pca's embeddings): each chunk's
    file is byte for byte zarr's, the last one padded with the fill value as zarr pads it;
    chunks that split a row are left to zarr."""
    import zarr

    from cellmill.io.store import _direct_chunks, codec

    g = zarr.open_group(tmp_path / "a.zarr", mode="w")
    v = np.random.default_rng(1).normal(size=(2500, 7))
    v[1000:1100] = np.nan
    kw = dict(shape=v.shape, dtype=np.float64, chunks=(1024, 7), compressors=codec(),
              fill_value=np.nan)
    direct, z = g.create_array("direct", **kw), g.create_array("zarr", **kw)
    put = _direct_chunks(direct)
    assert put is not None
    for i, a in enumerate(range(0, len(v), 1024)):
        put(i, v[a:a + 1024])
    z[:] = v
    mine = sorted((tmp_path / "a.zarr" / "direct" / "c").rglob("*"))
    theirs = sorted((tmp_path / "a.zarr" / "zarr" / "c").rglob("*"))
    assert [f.relative_to(tmp_path / "a.zarr" / "direct") for f in mine] == \
        [f.relative_to(tmp_path / "a.zarr" / "zarr") for f in theirs]
    files = [f for f in mine if f.is_file()]
    assert len(files) == 3
    assert all(x.read_bytes() == (tmp_path / "a.zarr" / "zarr" / x.relative_to(
        tmp_path / "a.zarr" / "direct")).read_bytes() for x in files)
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "a.zarr" / "direct")[:], v)
    split = g.create_array("split", shape=v.shape, dtype=np.float64, chunks=(1024, 4),
                           compressors=codec())
    assert _direct_chunks(split) is None
