"""Chunked HDF5 ranges decoded outside HDF5 (io/h5chunks.py) against h5py's own reading."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from cellmill.errors import InputError
from cellmill.io.h5chunks import DEFLATE, SHUFFLE, _filters, decode_threads, read_range
from cellmill.io.readers import read_sample

N = 10_007  # not a multiple of the chunk: the last chunk is partly past the end
LAYOUTS = {
    "gzip+shuffle (Cell Ranger)": dict(chunks=(1000,), compression="gzip",
                                       compression_opts=4, shuffle=True),
    "gzip": dict(chunks=(1000,), compression="gzip", compression_opts=9),
    "shuffle only": dict(chunks=(999,), shuffle=True),
    "chunked, no filter": dict(chunks=(1000,)),
    "contiguous": dict(),
    "lzf (h5py reads it)": dict(chunks=(1000,), compression="lzf"),
    "fletcher32 (h5py reads it)": dict(chunks=(1000,), compression="gzip", fletcher32=True),
}
DTYPES = ["<i4", "<i8", ">i4", "<f8", "u1"]
RANGES = [(0, N), (1, N - 1), (999, 1001), (1000, 2000), (N - 1, N), (5, 5), (0, 1)]


def _values(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 200, N).astype(dtype) if dtype != "<f8" else rng.normal(size=N)


@pytest.fixture(params=["zlib-ng", "zlib"])
def inflater(request, monkeypatch):
    """Chunks inflated by zlib-ng (when installed) and by the standard library's zlib."""
    import zlib

    from cellmill.io import h5chunks

    if request.param == "zlib":
        monkeypatch.setattr(h5chunks, "inflater", zlib)
    elif h5chunks.inflater is zlib:
        pytest.skip("zlib-ng is not installed")
    return request.param


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_ranges_match_h5py(tmp_path, layout, dtype, inflater):
    p = tmp_path / "x.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("x", data=_values(dtype), dtype=dtype, **LAYOUTS[layout])
    with h5py.File(p, "r") as f:
        ds = f["x"]
        if layout.startswith("gzip+shuffle"):  # decoded here, not by h5py
            assert _filters(ds) == [SHUFFLE, DEFLATE]
        for threads in (1, 3):
            with decode_threads(threads):
                for a, b in RANGES:
                    got = read_range(ds, a, b)
                    want = ds[a:b]
                    assert got.dtype == want.dtype
                    np.testing.assert_array_equal(got, want)


def test_unwritten_chunks_read_as_fill(tmp_path):
    p = tmp_path / "x.h5"
    with h5py.File(p, "w") as f:
        ds = f.create_dataset("x", shape=(N,), dtype="<i4", chunks=(1000,), compression="gzip",
                              shuffle=True, fillvalue=7)
        ds[3000:4000] = np.arange(1000)
    with h5py.File(p, "r") as f:
        np.testing.assert_array_equal(read_range(f["x"], 2500, 4500), f["x"][2500:4500])


def _chunked_10x(path, counts: sp.csr_matrix, chunk=7):
    """A Cell Ranger v3 file with the counts in small gzip + shuffle chunks."""
    csc = sp.csc_matrix(counts.T)  # features x barcodes
    n_genes, n_cells = csc.shape
    opts = dict(chunks=(chunk,), compression="gzip", compression_opts=4, shuffle=True)
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["barcodes"] = np.array([f"C{i}" for i in range(n_cells)], dtype="S")
        m.create_dataset("data", data=csc.data.astype(np.int32), **opts)
        m.create_dataset("indices", data=csc.indices.astype(np.int64), **opts)
        m["indptr"] = csc.indptr.astype(np.int64)
        m["shape"] = np.array([n_genes, n_cells], dtype=np.int32)
        ft = m.create_group("features")
        ft["id"] = np.array([f"G{i}" for i in range(n_genes)], dtype="S")
        ft["name"] = np.array([f"g{i}" for i in range(n_genes)], dtype="S")
        ft["feature_type"] = np.array(["Gene Expression"] * n_genes, dtype="S")
        ft["genome"] = np.array(["mm10"] * n_genes, dtype="S")


def test_chunked_10x_file_reads_the_same_counts(tmp_path):
    rng = np.random.default_rng(1)
    counts = sp.random(40, 25, density=0.3, format="csr", random_state=rng,
                       data_rvs=lambda k: rng.integers(1, 30, size=k)).astype(np.int64)
    p = tmp_path / "s.h5"
    _chunked_10x(p, counts)
    for threads in (1, 2):
        with decode_threads(threads):
            got = read_sample(p).counts
        assert (got != counts).nnz == 0


def test_corrupt_chunk_is_a_corrupt_file(tmp_path, inflater):
    counts = sp.csr_matrix(np.arange(1, 61).reshape(6, 10) % 4)
    p = tmp_path / "bad.h5"
    _chunked_10x(p, counts)
    with h5py.File(p, "a") as f:
        f["matrix/data"].id.write_direct_chunk((7,), b"not deflated at all")
    with pytest.raises(InputError, match="corrupt") as e:
        read_sample(p)
    assert "bad.h5" in str(e.value)
