"""Ingest streams 10x HDF5 samples slice by slice: same store as whole-sample reading, errors in
late slices still abort cleanly."""

import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from make_10x import barcodes, random_counts, write_10x_v3

import cellmill.io.tenx as tenx
from cellmill.errors import InputError
from cellmill.io.ingest import ingest
from cellmill.io.readers import open_sample, read_sample
from cellmill.io.store import GRANULE
from cellmill.io.writer import StoreWriter

TINY = 37  # nonzeros per slice: every sample is cut into many slices


def dense_union(expected) -> tuple[list[str], np.ndarray]:
    """The union of the written matrices' genes (first-seen order) and the matrices stacked as
    one dense cells x genes array over it (absent genes are zero), as ingest merges samples."""
    union = list(dict.fromkeys(g for _, _, genes in expected.values() for g in genes))
    col = {g: i for i, g in enumerate(union)}
    dense = []
    for m, _, genes in expected.values():
        d = np.zeros((m.shape[0], len(union)), dtype=np.int64)
        d[:, [col[g] for g in genes]] = m.toarray()
        dense.append(d)
    return union, np.vstack(dense)


def write_10x_v2(path, counts: sp.csr_matrix, bcs, genes, genome="mm10"):
    """A Cell Ranger v2 HDF5 (one genome group), written here from the layout's description."""
    counts = sp.csr_matrix(counts)
    with h5py.File(path, "w") as f:
        g = f.create_group(genome)
        g["barcodes"] = np.array(bcs, dtype="S")
        g["data"] = counts.data.astype(np.int32)
        g["indices"] = counts.indices.astype(np.int64)
        g["indptr"] = counts.indptr.astype(np.int64)
        g["shape"] = np.array([counts.shape[1], counts.shape[0]], dtype=np.int32)
        g["genes"] = np.array([f"ENSMUSG{i:011d}" for i in range(len(genes))], dtype="S")
        g["gene_names"] = np.array(genes, dtype="S")


def _study(folder: Path):
    """Four samples: the second lacks genes and adds some, the third lists genes in another order
    and holds antibody features, the fourth is v2. Returns the manifest and, per sample, the
    expected Gene Expression counts with their gene names."""
    folder.mkdir(parents=True, exist_ok=True)
    genes = [f"G{i}" for i in range(40)]
    rows, expected = [], {}
    for s, n in enumerate((300, 450, 200, 120)):
        g = list(genes)
        if s == 1:
            g = g[:-4] + ["Extra1", "Extra2"]
        if s == 2:
            g = list(np.random.default_rng(3).permutation(g))
        m = random_counts(n, len(g), density=0.3, seed=s)
        m.data[: m.indptr[1]] = 0  # an empty first cell
        m.eliminate_zeros()
        bc = barcodes(n, seed=s)
        path = folder / f"s{s}.h5"
        if s == 2:
            ab = random_counts(n, 3, density=0.5, seed=9)
            types = ["Gene Expression"] * len(g) + ["Antibody Capture"] * 3
            write_10x_v3(path, sp.hstack([m, ab], format="csr"), bc, g + ["A1", "A2", "A3"],
                         types=types)
        elif s == 3:
            write_10x_v2(path, m, bc, g)
        else:
            write_10x_v3(path, m, bc, g)
        expected[f"S{s}"] = (m, bc, g)
        rows.append({"sample": f"S{s}", "path": path.name, "condition": ["SNI", "Sham"][s % 2]})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv", expected


def _ingest(manifest, out, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # genes absent from a sample
        return ingest(manifest, out, block_cells=GRANULE, **kw)


def _files(store_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(store_dir).as_posix(): p.read_bytes()
            for p in sorted(store_dir.rglob("*")) if p.is_file()}


def test_cell_ranges_cover_every_cell_within_budget():
    sizes = np.array([0, 5, 3, 0, 0, 12, 1, 4, 4, 0])
    indptr = np.r_[0, np.cumsum(sizes)]
    for budget in (1, 4, 8, 100):
        ranges = list(tenx.cell_ranges(indptr, budget))
        assert ranges[0][0] == 0 and ranges[-1][1] == len(sizes)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        for c0, c1 in ranges:
            assert c1 > c0
            assert sizes[c0:c1].sum() <= budget or c1 == c0 + 1


def test_tiny_slices_give_the_same_store(tmp_path, monkeypatch):
    manifest, expected = _study(tmp_path / "in")
    monkeypatch.setattr(tenx, "SLICE_NNZ", 1 << 40)  # each sample in one slice
    whole = _ingest(manifest, tmp_path / "whole.zarr")
    monkeypatch.setattr(tenx, "SLICE_NNZ", TINY)
    with open_sample(tmp_path / "in" / "s0.h5") as s:
        assert len(list(s.slices)) > 20
    sliced = _ingest(manifest, tmp_path / "sliced.zarr")

    # the same bytes in every file of the store: X, obs, var (n_cells, total_counts), blocks
    a, b = _files(whole.path), _files(sliced.path)
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []

    # and the right content (independent: dense union of the written matrices)
    union, dense = dense_union(expected)
    got = sliced.read_rows(0, sliced.n_cells)
    assert got.has_sorted_indices
    np.testing.assert_array_equal(got.toarray(), dense)
    var = sliced.var()
    assert list(var.index) == union
    np.testing.assert_array_equal(var["n_cells"], (dense > 0).sum(0))
    np.testing.assert_array_equal(var["total_counts"], dense.sum(0))
    obs = sliced.obs()
    np.testing.assert_array_equal(obs["n_counts"], dense.sum(1))
    np.testing.assert_array_equal(obs["n_features"], (dense > 0).sum(1))
    bcs = [b for _, bc, _ in expected.values() for b in bc]
    assert list(obs["barcode"]) == bcs
    assert list(obs.index[:2]) == [f"S0_{bcs[0]}", f"S0_{bcs[1]}"]


def test_read_sample_unchanged_by_slicing(tmp_path, monkeypatch):
    manifest, expected = _study(tmp_path)
    monkeypatch.setattr(tenx, "SLICE_NNZ", TINY)
    for name, (m, bc, genes) in expected.items():
        s = read_sample(tmp_path / f"s{name[1:]}.h5")
        assert list(s.barcodes) == bc
        assert list(s.var.index) == genes
        assert s.counts.has_sorted_indices
        assert (s.counts != m).nnz == 0


def test_writer_leaves_the_callers_sample_intact(tmp_path):
    # a sample whose genes come in another order than the study's is re-sorted per row
    m = random_counts(50, 6, density=0.5, seed=1).astype(np.int32)
    path = tmp_path / "a.h5"
    write_10x_v3(path, m, barcodes(50), ["A", "B", "C", "D", "E", "F"])
    write_10x_v3(tmp_path / "b.h5", m, barcodes(50, seed=1), ["F", "E", "D", "C", "B", "A"])
    b = read_sample(tmp_path / "b.h5")
    before = b.counts.copy()
    w = StoreWriter(tmp_path / "s.zarr")
    w.add_sample("a", read_sample(path))
    w.add_sample("b", b)
    store = w.finish()
    assert (b.counts != before).nnz == 0 and (b.counts.data == before.data).all()
    got = store.read_rows(50, 100)
    assert got.has_sorted_indices
    np.testing.assert_array_equal(got.toarray(), m.toarray()[:, ::-1])


def _corrupt_last(path: Path, key: str, value) -> None:
    with h5py.File(path, "a") as f:
        arr = f[f"matrix/{key}"][()]
        if isinstance(value, float):
            arr = arr.astype(np.float64)
        arr[-1] = value
        del f[f"matrix/{key}"]
        f[f"matrix/{key}"] = arr


@pytest.mark.parametrize("key, value, match", [
    ("data", -3, "negative"),
    ("data", 2.5, "not integers"),
    ("indices", 1000, "indices out of range for 38 features"),
])
def test_bad_value_in_a_late_slice_aborts(tmp_path, monkeypatch, key, value, match):
    manifest, _ = _study(tmp_path)
    bad = tmp_path / "s1.h5"  # the second sample; its last nonzero is in its last slice
    _corrupt_last(bad, key, value)
    monkeypatch.setattr(tenx, "SLICE_NNZ", TINY)
    slices = []
    add = StoreWriter._remap

    def counting(self, counts, *args):
        slices.append(counts.shape[0])
        return add(self, counts, *args)

    monkeypatch.setattr(StoreWriter, "_remap", counting)
    out = tmp_path / "study.zarr"
    with pytest.raises(InputError, match=match) as e:
        _ingest(manifest, out)
    assert Path(e.value.path).resolve() == bad.resolve()
    assert str(e.value).startswith(e.value.path) and "\n" not in str(e.value)
    assert len(slices) > 20  # the first sample and most of the second were written already
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint16, np.float64, np.float32,
                                   np.bool_])
def test_slice_checks_match_scipy_canonical(dtype):
    # unsorted rows, duplicates (some summing to 0 are impossible with counts >= 0, but an
    # explicit 0 is not), explicit zeros: the same matrix as scipy's sum_duplicates and
    # eliminate_zeros, with int32 counts and indices
    from cellmill.io.sample import slice_csr

    rng = np.random.default_rng(4)
    n_rows, n_cols = 60, 40
    lens = rng.integers(0, 12, n_rows)
    indptr = np.concatenate([[0], np.cumsum(lens)])
    indices = rng.integers(0, n_cols, indptr[-1])
    for i in range(0, n_rows, 3):  # every third row sorted and duplicate-free
        a, b = indptr[i], indptr[i + 1]
        indices[a:b] = np.sort(rng.choice(n_cols, b - a, replace=False))
    data = rng.integers(0, 5, indptr[-1]).astype(dtype)
    ref = sp.csr_matrix((data.astype(np.int64), indices.copy(), indptr.copy()),
                        shape=(n_rows, n_cols))
    ref.sum_duplicates()
    ref.eliminate_zeros()
    m = slice_csr(Path("x.h5"), data, indices, indptr, n_cols)
    assert m.data.dtype == np.int32 and m.indices.dtype == np.int32
    assert m.has_canonical_format
    np.testing.assert_array_equal(m.indptr, ref.indptr)
    np.testing.assert_array_equal(m.indices, ref.indices)
    np.testing.assert_array_equal(m.data, ref.data)


@pytest.mark.parametrize("values, indices, match", [
    ([1, 2, -3, 4], [0, 1, 2, 3], "negative values \\(minimum -3\\)"),
    ([1.0, np.nan, 2.5, -1.0], [0, 1, 2, 3], "NaN or infinite"),
    ([1.0, 2.0, 2.5, -1.0], [0, 1, 2, 3], "not integers \\(found np.float64\\(2.5\\)\\)|"
                                           "not integers \\(found 2.5\\)"),
    ([1, 2**31, -1, 4], [0, 1, 2, 3], "negative"),
    ([1, 2**31, 5, 4], [0, 1, 2, 3], "count 2147483648 is larger"),
    ([1, -2, 5, 4], [0, 1, 9, 3], "indices out of range for 5 features"),
])
def test_slice_checks_in_order(values, indices, match):
    from cellmill.io.sample import slice_csr

    dtype = np.float64 if any(isinstance(v, float) for v in values) else np.int64
    with pytest.raises(InputError, match=match):
        slice_csr(Path("x.h5"), np.array(values, dtype=dtype), np.array(indices),
                  np.array([0, 2, 4]), 5)
