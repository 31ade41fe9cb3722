"""Readers: every shared 10x / Matrix Market / h5ad file read exactly; Seurat's names; bad input.

The expected values come from independent readings done here with plain h5py, scipy.io.mmread,
gzip + csv and anndata, and (for names) from R 4.2 / Seurat 4.3.0 outputs pasted as literals.
"""

from __future__ import annotations

import csv
import gzip
import shutil
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from cellmill.errors import InputError
from cellmill.io.h5ad import read_h5ad
from cellmill.io.mex import read_mex
from cellmill.io.names import make_unique, seurat_clean, seurat_feature_names
from cellmill.io.readers import read_sample
from cellmill.io.sample import Sample
from cellmill.io.tenx import read_10x_h5

GEX = "Gene Expression"

# --------------------------------------------------------------------------- independent readings


def _dec(a) -> list[str]:
    return [x.decode() if isinstance(x, bytes) else str(x) for x in np.asarray(a).ravel()]


def ref_10x_group(g: h5py.Group):
    """(cells x features CSR, barcodes) of one 10x group, straight from h5py."""
    n_feat, n_bc = (int(x) for x in g["shape"][()])
    csc = sp.csc_matrix((g["data"][()], g["indices"][()], g["indptr"][()]), shape=(n_feat, n_bc))
    return csc.T.tocsr(), _dec(g["barcodes"][()])


def read_tsv(path: Path) -> list[list[str]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt") as fh:
        return [row for row in csv.reader(fh, delimiter="\t") if row]


def ref_mex(folder: Path):
    def pick(*names):
        return next(folder / n for n in names if (folder / n).exists())

    m = scipy.io.mmread(pick("matrix.mtx.gz", "matrix.mtx"))
    barcodes = [r[0] for r in read_tsv(pick("barcodes.tsv.gz", "barcodes.tsv"))]
    feats = read_tsv(pick("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"))
    types = [r[2] if len(r) > 2 else GEX for r in feats]
    return sp.csr_matrix(m.T), barcodes, [r[0] for r in feats], types


def assert_same_counts(got: sp.csr_matrix, want: sp.spmatrix):
    want = sp.csr_matrix(want)
    want.eliminate_zeros()
    assert got.shape == want.shape
    assert got.dtype.kind == "i"
    assert got.has_sorted_indices
    assert (got.data != 0).all()
    assert got.nnz == want.nnz
    assert (got != want).nnz == 0
    assert int(got.sum()) == int(want.sum())


def assert_valid(s: Sample):
    assert isinstance(s, Sample)
    assert isinstance(s.counts, sp.csr_matrix)
    assert s.counts.dtype in (np.int32, np.int64)
    assert len(s.barcodes) == s.counts.shape[0]
    assert len(s.var) == s.counts.shape[1]
    assert s.var.index.is_unique
    assert all(isinstance(x, str) for x in s.barcodes[:5])
    assert {"gene_ids", "feature_types"} <= set(s.var.columns)
    # Seurat's feature-name rules leave no "_" or "|"
    assert not s.var.index.str.contains(r"[_|]").any()


TENX_V3 = ["pbmc_1k_citeseq_v3.h5", "v3_chr21.h5"]
TENX_V2 = ["v2_hg19_chr21.h5", "v2_multiple_genomes.h5"]
MEX = ["v3_chr21", "v2_hg19_chr21", "mouse_brain_10k_x_1k", "GSM6544281_unfiltered"]
H5AD = ["dentategyrus_100obs.h5ad", "pancreas_50obs.h5ad"]


def test_shared_data_is_all_covered(shared_data):
    assert sorted(p.name for p in (shared_data / "10x").iterdir()) == sorted(TENX_V3 + TENX_V2)
    assert sorted(p.name for p in (shared_data / "mex").iterdir()) == sorted(MEX)
    assert sorted(p.name for p in (shared_data / "h5ad").iterdir()) == sorted(H5AD)


# --------------------------------------------------------------------------------------- 10x v3


@pytest.mark.parametrize("name", TENX_V3)
@pytest.mark.parametrize("types", [(GEX,), None])
def test_10x_v3_exact(shared_data, name, types):
    path = shared_data / "10x" / name
    s = read_sample(path, feature_types=types)
    assert_valid(s)
    assert s.source == str(path)
    with h5py.File(path, "r") as f:
        full, barcodes = ref_10x_group(f["matrix"])
        ids = _dec(f["matrix/features/id"][()])
        ftypes = _dec(f["matrix/features/feature_type"][()])
        genomes = _dec(f["matrix/features/genome"][()])
    keep = np.array([types is None or t in types for t in ftypes])
    assert_same_counts(s.counts, full[:, np.flatnonzero(keep)])
    assert list(s.barcodes) == barcodes
    assert list(s.var["gene_ids"]) == list(np.array(ids)[keep])
    assert list(s.var["feature_types"]) == list(np.array(ftypes)[keep])
    assert list(s.var["genome"]) == list(np.array(genomes)[keep])


def test_10x_v3_pbmc_names_match_seurat(shared_data):
    """Names as Seurat 4.3.0 (Read10X_h5 + CreateSeuratObject) gives them (checked in R)."""
    path = shared_data / "10x" / "pbmc_1k_citeseq_v3.h5"
    gex = read_sample(path)
    assert gex.counts.shape == (892, 36601)
    names = list(gex.var.index)
    # duplicated symbols in the GRCh38 reference: the second copy gets ".1"
    for base in ("TBCE", "CYB561D2", "MATR3", "HSPA14", "GOLGA8M", "GGT1", "TMSB15B"):
        assert names.count(base) == 1 and names.count(base + ".1") == 1
    assert names[3235:3238] == ["TBCE", "AL357556.4", "TBCE.1"]
    assert names[10565] == "MATR3" and names[10567] == "MATR3.1"
    ab = read_sample(path, feature_types="Antibody Capture")
    assert ab.counts.shape == (892, 10)
    # make.unique ran over genes + antibodies together, so antibodies named like genes get ".1";
    # then "_" became "-"
    assert list(ab.var.index) == [
        "CD3", "CD4.1", "CD8", "CD11c", "CD14.1", "CD16", "CD19.1", "CD56", "CD45",
        "IgG1-control-TotalSeqC",
    ]
    assert list(ab.var["gene_ids"])[-1] == "IgG1"
    assert int(ab.counts.sum()) == 1716543 and int(gex.counts.sum()) == 6954542


def test_10x_v3_genome_selection(shared_data):
    path = shared_data / "10x" / "pbmc_1k_citeseq_v3.h5"
    s = read_sample(path, genome="GRCh38")
    assert s.counts.shape == (892, 36601)
    assert set(s.var["genome"]) == {"GRCh38"}
    with pytest.raises(InputError, match="unknown genome 'mm10'") as e:
        read_sample(path, genome="mm10")
    assert str(path) in str(e.value) and "GRCh38" in str(e.value)


# --------------------------------------------------------------------------------------- 10x v2


@pytest.mark.parametrize("name", TENX_V2)
def test_10x_v2_exact(shared_data, name):
    path = shared_data / "10x" / name
    with h5py.File(path, "r") as f:
        groups = list(f.keys())
        refs = [ref_10x_group(f[g]) for g in groups]
        ids = [_dec(f[g]["genes"][()]) for g in groups]
    # every genome alone
    for g, (m, barcodes), gid in zip(groups, refs, ids, strict=True):
        s = read_sample(path, genome=g)
        assert_valid(s)
        assert_same_counts(s.counts, m)
        assert list(s.barcodes) == barcodes
        assert list(s.var["gene_ids"]) == gid
        assert set(s.var["feature_types"]) == {GEX}
        assert set(s.var["genome"]) == {g}
    # default: all genomes, concatenated feature-wise in file order
    s = read_sample(path)
    assert_valid(s)
    assert_same_counts(s.counts, sp.hstack([m for m, _ in refs]))
    assert list(s.barcodes) == refs[0][1]
    assert list(s.var["gene_ids"]) == sum(ids, [])
    assert list(s.var["genome"]) == sum(([g] * len(i) for g, i in zip(groups, ids, strict=True)),
                                        [])


def test_10x_v2_names_match_seurat(shared_data):
    path = shared_data / "10x" / "v2_multiple_genomes.h5"
    # Seurat (checked in R): gene_0 ... become gene-0 ...; the hg19 group keeps its symbols
    other = read_sample(path, genome="another_genome")
    assert list(other.var.index[:3]) == ["gene-0", "gene-1", "gene-2"]
    hg19 = read_sample(path, genome="hg19_chr21")
    assert list(hg19.var.index[:3]) == ["DSCAM", "MIR99AHG", "APP"]
    both = read_sample(path)
    assert list(both.var.index) == list(other.var.index) + list(hg19.var.index)
    with pytest.raises(InputError, match="unknown genome 'mm10'"):
        read_sample(path, genome="mm10")
    with pytest.raises(InputError, match="no features of type Antibody Capture"):
        read_sample(path, feature_types=["Antibody Capture"])


# ----------------------------------------------------------------------------------- Matrix Market


@pytest.mark.parametrize("name", MEX)
def test_mex_exact(shared_data, name):
    folder = shared_data / "mex" / name
    s = read_sample(folder, feature_types=None)
    assert_valid(s)
    m, barcodes, ids, types = ref_mex(folder)
    assert_same_counts(s.counts, m)
    assert list(s.barcodes) == barcodes
    assert list(s.var["gene_ids"]) == ids
    assert list(s.var["feature_types"]) == types
    assert "genome" not in s.var
    assert s.source == str(folder)


def test_mex_matches_10x_h5(shared_data):
    """The same cells as Matrix Market and as HDF5 read identically."""
    a = read_sample(shared_data / "mex" / "v3_chr21")
    b = read_sample(shared_data / "10x" / "v3_chr21.h5")
    assert_same_counts(a.counts, b.counts)
    assert list(a.barcodes) == list(b.barcodes)
    assert a.var.index.equals(b.var.index)
    assert list(a.var["gene_ids"]) == list(b.var["gene_ids"])


def test_mex_matrix_path_and_plain_copies(shared_data, tmp_path):
    """The .mtx path itself; gzipped files written plain; GEO-style prefixed names."""
    src = shared_data / "mex" / "v3_chr21"
    want = read_sample(src)
    got = read_sample(src / "matrix.mtx.gz")
    assert_same_counts(got.counts, want.counts)
    plain = tmp_path / "plain"
    plain.mkdir()
    prefixed = tmp_path / "geo"
    prefixed.mkdir()
    for f in src.iterdir():
        with gzip.open(f, "rb") as fh:
            body = fh.read()
        (plain / f.name.removesuffix(".gz")).write_bytes(body)
        shutil.copy(f, prefixed / f"GSM1_{f.name}")
    for folder in (plain, prefixed):
        got = read_sample(folder)
        assert_same_counts(got.counts, want.counts)
        assert list(got.barcodes) == list(want.barcodes)
        assert got.var.equals(want.var)


# -------------------------------------------------------------------------------------------- h5ad


@pytest.mark.filterwarnings("ignore::anndata.OldFormatWarning")
@pytest.mark.parametrize("name", H5AD)
def test_h5ad_exact(shared_data, name):
    path = shared_data / "h5ad" / name
    a = ad.read_h5ad(path)
    for layer in [None, *a.layers.keys()]:
        s = read_sample(path, layer=layer)
        assert_valid(s)
        want = a.X if layer is None else a.layers[layer]
        assert_same_counts(s.counts, want)
        assert list(s.barcodes) == list(a.obs_names)
        assert list(s.var["gene_ids"]) == list(a.var_names)
        assert list(s.var.index) == list(seurat_feature_names(a.var_names))
    with pytest.raises(InputError, match="unknown layer 'nope'") as e:
        read_sample(path, layer="nope")
    assert str(path) in str(e.value)


def test_h5ad_encodings(tmp_path):
    """CSR, CSC and dense X; integral floats become ints; var columns are used."""
    rng = np.random.default_rng(0)
    dense = rng.poisson(0.7, size=(30, 12)).astype(np.float32)
    var = pd.DataFrame(
        {"gene_ids": [f"ENS{i}" for i in range(12)],
         "feature_types": [GEX] * 10 + ["Antibody Capture"] * 2},
        index=["g_1", "g_1", "A|B"] + [f"g{i}" for i in range(3, 12)],
    )
    obs = pd.DataFrame(index=[f"c{i}" for i in range(30)])
    encodings = {"csr": sp.csr_matrix(dense), "csc": sp.csc_matrix(dense), "dense": dense}
    for kind, x in encodings.items():
        p = tmp_path / f"{kind}.h5ad"
        with pytest.warns(UserWarning):  # anndata: var names are not unique
            ad.AnnData(X=x, obs=obs, var=var).write_h5ad(p)
        s = read_sample(p)
        assert_valid(s)
        assert_same_counts(s.counts, sp.csr_matrix(dense[:, :10]))
        assert list(s.var.index[:3]) == ["g-1", "g-1.1", "A-B"]
        assert list(s.var["gene_ids"]) == [f"ENS{i}" for i in range(10)]
        assert read_sample(p, feature_types=None).counts.shape == (30, 12)


# ------------------------------------------------------------------------------------- name rules


def test_make_unique_matches_r():
    # expectations printed by R 4.2.2: make.unique(<input>)
    cases = {
        ("a", "a", "a", "a.1"): ["a", "a.2", "a.3", "a.1"],
        ("a", "a", "a.1", "a.1", "a", "b", "b.1", "b"):
            ["a", "a.2", "a.1", "a.1.1", "a.3", "b", "b.1", "b.2"],
        ("a.1", "a", "a"): ["a.1", "a", "a.2"],
        ("a", "a", "a.2", "a"): ["a", "a.1", "a.2", "a.3"],
        ("", "", ""): ["", ".1", ".2"],
        ("x.1", "x", "x", "x.1"): ["x.1", "x", "x.2", "x.1.1"],
        ("a", "a", "a.1", "a", "a.1.1", "a.1"): ["a", "a.2", "a.1", "a.3", "a.1.1", "a.1.2"],
        ("u", "v", "w"): ["u", "v", "w"],
        (): [],
    }
    for given, want in cases.items():
        assert list(make_unique(list(given))) == want, given
    assert list(make_unique(["a", "a"], sep="-")) == ["a", "a-1"]


def test_seurat_clean_matches_seurat():
    # Seurat 4.3.0: CreateSeuratObject(m) with rownames(m) <- make.unique(<input>)
    given = ["A_1", "A_1", "B|C", "G", "G_H", "G-H.1"]
    assert list(seurat_feature_names(given)) == ["A-1", "A-1.1", "B-C", "G", "G-H", "G-H.1"]
    # Seurat would keep a duplicate here ("A-B" twice); we make it unique
    assert list(seurat_clean(["A_B", "A-B"])) == ["A-B", "A-B.1"]


# --------------------------------------------------------------------------------------- synthetic


def write_10x_v3(path: Path, counts: sp.spmatrix, names, types=None, data=None, ids=None):
    """A Cell Ranger v3 HDF5 with the given cells x features counts."""
    csc = sp.csr_matrix(counts).T.tocsc()  # features x barcodes, CSC -> arrays of the file
    n_feat, n_bc = csc.shape
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"] = csc.data if data is None else data
        g["indices"] = csc.indices.astype(np.int64)
        g["indptr"] = csc.indptr.astype(np.int64)
        g["shape"] = np.array([n_feat, n_bc], dtype=np.int32)
        g["barcodes"] = np.array([f"BC{i}-1" for i in range(n_bc)], dtype="S")
        fg = g.create_group("features")
        fg["id"] = np.array(ids or [f"ID{i}" for i in range(n_feat)], dtype="S")
        fg["name"] = np.array(names, dtype="S")
        fg["feature_type"] = np.array(types or [GEX] * n_feat, dtype="S")
        fg["genome"] = np.array(["GRCh38"] * n_feat, dtype="S")


def test_10x_synthetic_names_types_dtypes(tmp_path):
    m = sp.csr_matrix(np.array([[1, 0, 2, 0], [0, 3, 0, 4], [5, 0, 0, 6]]))
    p = tmp_path / "s.h5"
    write_10x_v3(p, m, ["X_1", "", "X_1", "Y"], types=[GEX, GEX, GEX, "CRISPR Guide Capture"])
    s = read_sample(p)
    assert list(s.var.index) == ["X-1", "ID1", "X-1.1"]  # empty name -> id
    assert_same_counts(s.counts, m[:, :3])
    assert s.counts.dtype == np.int32
    # explicit zeros are dropped; integral floats are fine up to the int32 the store keeps
    big = m.astype(np.float64)
    csc = big.T.tocsc()
    data = csc.data.copy()
    data[0] = 0.0
    data[-1] = 2e9
    write_10x_v3(p, m, ["a", "b", "c", "d"], data=data)
    s = read_sample(p)
    assert s.counts.dtype == np.int32
    assert s.counts.nnz == m.nnz - 1
    assert s.counts.max() == 2_000_000_000
    data[-1] = 3e9
    write_10x_v3(p, m, ["a", "b", "c", "d"], data=data)
    raises_input_error(p, read_sample, p, match="larger than the largest count")


def test_synthetic_mex_unsorted_duplicates(tmp_path):
    """Entries in any order, a repeated coordinate summed (as scipy does)."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "matrix.mtx").write_text(
        "%%MatrixMarket matrix coordinate integer general\n%metadata_json: {}\n"
        "3 2 4\n3 2 1\n1 1 7\n3 2 2\n2 1 1\n"
    )
    (folder / "barcodes.tsv").write_text("c1\nc2\n")
    (folder / "genes.tsv").write_text("E1\tg\nE2\tg\nE3\th_1\n")
    s = read_sample(folder)
    assert s.counts.toarray().tolist() == [[7, 1, 0], [0, 0, 3]]
    assert list(s.var.index) == ["g", "g.1", "h-1"]
    assert list(s.var["gene_ids"]) == ["E1", "E2", "E3"]


# --------------------------------------------------------------------------------------- bad input


def raises_input_error(path: Path, fn, *args, match: str | None = None, **kwargs) -> InputError:
    with pytest.raises(InputError, match=match) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert str(path) in msg, msg
    assert "\n" not in msg
    assert msg.startswith(str(e.value.path) + ": ")
    return e.value


def test_input_error_is_one_line():
    e = InputError("/x/y.h5", "first\nsecond")
    assert str(e) == "/x/y.h5: first second"
    assert e.path == "/x/y.h5" and e.problem == "first second"


def test_missing_inputs(tmp_path):
    for p in (tmp_path / "nope.h5", tmp_path / "nope.h5ad", tmp_path / "nofolder"):
        raises_input_error(p, read_sample, p, match="no such file")
    raises_input_error(tmp_path / "x.h5", read_10x_h5, tmp_path / "x.h5", match="no such file")
    raises_input_error(tmp_path / "d", read_mex, tmp_path / "d", match="no such file")
    raises_input_error(tmp_path / "y.h5ad", read_h5ad, tmp_path / "y.h5ad", match="no such file")
    # a folder that is not a Matrix Market folder, and one missing its barcodes
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    raises_input_error(empty_dir, read_sample, empty_dir, match="no matrix.mtx")
    (empty_dir / "matrix.mtx").write_text("%%MatrixMarket matrix coordinate integer general\n")
    raises_input_error(empty_dir, read_sample, empty_dir, match="no barcodes.tsv")


def test_truncated_and_garbage_hdf5(shared_data, tmp_path):
    src = shared_data / "10x" / "v3_chr21.h5"
    raw = src.read_bytes()
    for frac in (0.5, 0.9):
        p = tmp_path / f"trunc{frac}.h5"
        p.write_bytes(raw[: int(len(raw) * frac)])
        raises_input_error(p, read_sample, p)
        raises_input_error(p, read_10x_h5, p, match="truncated or corrupt")
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(np.random.default_rng(1).bytes(4096))
    raises_input_error(garbage, read_sample, garbage, match="no HDF5 signature")
    raises_input_error(garbage, read_10x_h5, garbage, match="truncated or corrupt")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    raises_input_error(text, read_sample, text)
    h5ad = tmp_path / "trunc.h5ad"
    h5ad.write_bytes((shared_data / "h5ad" / "pancreas_50obs.h5ad").read_bytes()[:100_000])
    raises_input_error(h5ad, read_sample, h5ad)


def test_hdf5_without_10x_layout(tmp_path):
    p = tmp_path / "other.h5"
    with h5py.File(p, "w") as f:
        f["foo/bar"] = np.arange(3)
        f["baz"] = np.arange(3)
    raises_input_error(p, read_sample, p, match="without a 10x layout")
    with h5py.File(p, "w") as f:
        f["matrix/data"] = np.arange(3)
    raises_input_error(p, read_sample, p, match="not a 10x v3 HDF5 file")


def test_corrupt_10x_arrays(tmp_path):
    m = sp.csr_matrix(np.array([[1, 0], [0, 2], [3, 4]]))
    p = tmp_path / "bad.h5"
    write_10x_v3(p, m, ["a", "b"])
    with h5py.File(p, "a") as f:
        del f["matrix/indices"]
        f["matrix/indices"] = np.array([0, 1, 7, 1], dtype=np.int64)
    raises_input_error(p, read_sample, p, match="indices out of range")
    write_10x_v3(p, m, ["a", "b"])
    with h5py.File(p, "a") as f:
        f["matrix/shape"][0] = 5
    raises_input_error(p, read_sample, p, match="shape says 5 features")


def test_bad_count_values_10x(tmp_path):
    m = sp.csr_matrix(np.array([[1, 0], [0, 2], [3, 4]]))
    p = tmp_path / "neg.h5"
    write_10x_v3(p, m, ["a", "b"], data=np.array([1, -3, 2, 4], dtype=np.int32))
    raises_input_error(p, read_sample, p, match="negative")
    write_10x_v3(p, m, ["a", "b"], data=np.array([1, 1.5, 2, 4]))
    raises_input_error(p, read_sample, p, match="not integers")
    write_10x_v3(p, m, ["a", "b"], data=np.array([1, np.nan, 2, 4]))
    raises_input_error(p, read_sample, p, match="NaN")
    # the store keeps int32 counts: a larger count is refused, not wrapped around
    write_10x_v3(p, m, ["a", "b"], data=np.array([1, 2**31, 2, 4], dtype=np.int64))
    raises_input_error(p, read_sample, p, match="larger than the largest count")
    write_10x_v3(p, m, ["a", "b"], data=np.array([1, 2**31 - 1, 2, 4], dtype=np.int64))
    assert read_sample(p).counts.data.max() == 2**31 - 1


def copy_mex(shared_data: Path, tmp_path: Path, name: str = "v2_hg19_chr21") -> Path:
    dst = tmp_path / name
    shutil.copytree(shared_data / "mex" / name, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


def test_mex_dimensions_disagree(shared_data, tmp_path):
    folder = copy_mex(shared_data, tmp_path)
    barcodes = folder / "barcodes.tsv"
    lines = barcodes.read_text().splitlines()
    barcodes.write_text("\n".join(lines[:-1]) + "\n")
    raises_input_error(folder, read_sample, folder, match="lists 11 barcodes")
    barcodes.write_text("\n".join(lines) + "\n")
    genes = folder / "genes.tsv"
    genes.write_text(genes.read_text() + "EXTRA\tEXTRA\n")
    raises_input_error(folder, read_sample, folder, match="lists 344 features")


def write_mex(folder: Path, body: str, header: str = "integer", size: str = "2 2 2",
              n_barcodes: int = 2, n_genes: int = 2) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "matrix.mtx").write_text(
        f"%%MatrixMarket matrix coordinate {header} general\n%\n{size}\n{body}"
    )
    (folder / "barcodes.tsv").write_text("".join(f"c{i}\n" for i in range(n_barcodes)))
    (folder / "features.tsv").write_text("".join(f"E{i}\tg{i}\t{GEX}\n" for i in range(n_genes)))
    return folder


def test_mex_bad_values(tmp_path):
    f = write_mex(tmp_path / "neg", "1 1 3\n2 2 -1\n")
    raises_input_error(f, read_sample, f, match="negative")
    f = write_mex(tmp_path / "frac", "1 1 3\n2 2 1.5\n", header="real")
    raises_input_error(f, read_sample, f, match="not integers")
    f = write_mex(tmp_path / "frac_int", "1 1 3\n2 2 1.5\n")
    raises_input_error(f, read_sample, f, match="not integers")
    f = write_mex(tmp_path / "ok_real", "1 1 3.0\n2 2 1\n", header="real")
    assert read_sample(f).counts.toarray().tolist() == [[3, 0], [0, 1]]
    f = write_mex(tmp_path / "short", "1 1 3\n")
    raises_input_error(f, read_sample, f, match="declares 2 entries but the file has 1")
    f = write_mex(tmp_path / "outside", "1 1 3\n3 2 1\n")
    raises_input_error(f, read_sample, f, match="outside the declared dimensions")
    f = write_mex(tmp_path / "junk", "1 1 3\nx y z\n")
    raises_input_error(f, read_sample, f, match="cannot parse")
    f = write_mex(tmp_path / "array", "1\n2\n3\n4\n", size="2 2")
    (f / "matrix.mtx").write_text("%%MatrixMarket matrix array integer general\n2 2\n1\n2\n3\n4\n")
    raises_input_error(f, read_sample, f, match="format 'array' is not supported")
    f = write_mex(tmp_path / "banner", "1 1 3\n2 2 1\n")
    (f / "matrix.mtx").write_text("hello\n")
    raises_input_error(f, read_sample, f, match="not a Matrix Market file")


def test_mex_truncated_gzip(shared_data, tmp_path):
    folder = copy_mex(shared_data, tmp_path, "v3_chr21")
    mtx = folder / "matrix.mtx.gz"
    raw = mtx.read_bytes()
    mtx.write_bytes(raw[: len(raw) // 2])
    raises_input_error(folder, read_sample, folder)


def test_empty_samples(tmp_path):
    f = write_mex(tmp_path / "nocells", "", size="2 0 0", n_barcodes=0)
    raises_input_error(f, read_sample, f, match="empty sample: no cells")
    f = write_mex(tmp_path / "nogenes", "", size="0 2 0", n_genes=0)
    raises_input_error(f, read_sample, f, match="empty sample: no genes")
    p = tmp_path / "empty.h5"
    write_10x_v3(p, sp.csr_matrix((0, 3), dtype=np.int32), ["a", "b", "c"])
    raises_input_error(p, read_sample, p, match="empty sample: no cells")
    p = tmp_path / "empty.h5ad"
    ad.AnnData(X=sp.csr_matrix((0, 3), dtype=np.float32),
               var=pd.DataFrame(index=["a", "b", "c"])).write_h5ad(p)
    raises_input_error(p, read_sample, p, match="empty sample: no cells")
    # no feature of the wanted type: nothing to analyse either
    p = tmp_path / "ab_only.h5"
    write_10x_v3(p, sp.csr_matrix(np.ones((2, 2), dtype=np.int32)), ["a", "b"],
                 types=["Antibody Capture"] * 2)
    raises_input_error(p, read_sample, p, match="no features of type Gene Expression")


def test_h5ad_bad_values(tmp_path):
    var = pd.DataFrame(index=["a", "b"])
    p = tmp_path / "frac.h5ad"
    ad.AnnData(X=sp.csr_matrix(np.array([[1.0, 0.0], [0.0, 1.5]]))).write_h5ad(p)
    raises_input_error(p, read_sample, p, match="not integers")
    p = tmp_path / "neg.h5ad"
    ad.AnnData(X=np.array([[1, 0], [0, -2]], dtype=np.int32), var=var).write_h5ad(p)
    raises_input_error(p, read_sample, p, match="negative")
    p = tmp_path / "layer.h5ad"
    ad.AnnData(X=np.ones((2, 2), dtype=np.float32), var=var,
               layers={"counts": np.ones((2, 2), dtype=np.int64)}).write_h5ad(p)
    assert read_sample(p, layer="counts").counts.sum() == 4
    raises_input_error(p, read_sample, p, layer="spliced", match="unknown layer 'spliced'")
    raises_input_error(p, read_sample, p, genome="mm10", match="records no genomes")


def test_option_misuse_names_the_file(shared_data):
    h5 = shared_data / "10x" / "v3_chr21.h5"
    raises_input_error(h5, read_sample, h5, layer="spliced", match="h5ad files only")
    folder = shared_data / "mex" / "v3_chr21"
    raises_input_error(folder, read_sample, folder, genome="hg19", match="record no genome")
