"""One sample read from any supported file: the common types and checks every reader uses
(the readers import this module; ``cellmill.io.readers`` picks the reader for a path).

Supported inputs:

- a 10x Cell Ranger HDF5 file, v3 (``matrix/``) or v2 (one group per genome): ``cellmill.io.tenx``
- a Matrix Market folder (``matrix.mtx[.gz]``, ``barcodes.tsv[.gz]``, ``features.tsv[.gz]`` or
  ``genes.tsv[.gz]``), or the path of its ``matrix.mtx[.gz]``: ``cellmill.io.mex``
- an ``.h5ad`` file (counts from ``X`` or a layer): ``cellmill.io.h5ad``

Every reader returns a :class:`Sample` whose counts are validated (non-negative integers), whose
gene names follow Seurat (see ``cellmill.io.names``) and whose features are restricted to the
requested feature types (default "Gene Expression"; ``feature_types=None`` keeps all).

Streaming (``open_sample``, used by ingest): a :class:`SampleStream` gives the barcodes and genes
at once and the counts as CSR slices of consecutive cells, so memory does not grow with the
cells of a sample. 10x HDF5 files are read slice by slice (except v2 files whose several genome
groups are concatenated); Matrix Market folders and ``.h5ad`` files are read whole and given as
one slice.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellmill.errors import InputError

GENE_EXPRESSION = "Gene Expression"
INT32_MAX = np.iinfo(np.int32).max
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


@dataclass
class Sample:
    """Counts of one sample, cells x genes.

    counts:   CSR, int32 values, sorted indices, no
              explicit zeros.
    barcodes: str array (object dtype), one per cell, as in the file.
    var:      one row per gene; index = unique gene names (Seurat style); columns ``gene_ids``,
              ``feature_types`` and, when the file records it, ``genome``.
    source:   the path read.
    """

    counts: sp.csr_matrix
    barcodes: np.ndarray
    var: pd.DataFrame
    source: str

    @property
    def n_cells(self) -> int:
        return self.counts.shape[0]

    @property
    def n_genes(self) -> int:
        return self.counts.shape[1]


@dataclass
class SampleStream:
    """A sample whose counts come as CSR slices of consecutive cells (see the module docstring).

    barcodes, var, source: as in :class:`Sample`.
    slices: iterable of CSR matrices (cells x genes), validated and canonical like
        ``Sample.counts``; together they hold every cell in order. Iterate it once; a bad value
        in any slice raises InputError while iterating.
    """

    barcodes: np.ndarray
    var: pd.DataFrame
    source: str
    slices: Iterable[sp.csr_matrix]

    @property
    def n_cells(self) -> int:
        return len(self.barcodes)

    @property
    def n_genes(self) -> int:
        return len(self.var)

    @classmethod
    def whole(cls, sample: Sample) -> SampleStream:
        return cls(sample.barcodes, sample.var, sample.source, (sample.counts,))


def sample_kind(p: Path, layer: str | None) -> str:
    """"mex", "h5ad" or "10x": which reader a path needs (InputError if none fits)."""
    if not p.exists():
        raise InputError(p, "no such file or folder")
    name = p.name.lower()
    if p.is_dir() or name.endswith((".mtx", ".mtx.gz")):
        if layer is not None:
            raise InputError(p, f"layer={layer!r} applies to .h5ad files only")
        return "mex"
    if not is_hdf5(p):
        raise InputError(
            p, "not a 10x HDF5 file, an .h5ad file or a Matrix Market folder "
            "(no HDF5 signature: corrupt, truncated or another format)"
        )
    if name.endswith(".h5ad") or looks_like_h5ad(p):
        return "h5ad"
    if layer is not None:
        raise InputError(p, f"layer={layer!r} applies to .h5ad files only")
    return "10x"


# ---------------------------------------------------------------- helpers shared by the readers


def is_hdf5(path: Path) -> bool:
    """True if the file starts with the HDF5 signature (at offset 0, the usual place)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(8) == HDF5_SIGNATURE
    except OSError:
        return False


def looks_like_h5ad(path: Path) -> bool:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("encoding-type") in ("anndata", b"anndata"):
                return True
            return "obs" in f and "var" in f and "matrix" not in f
    except OSError:
        return False  # let the 10x reader report the failure


def require_file(path: Path) -> None:
    if not path.exists():
        raise InputError(path, "no such file")
    if not path.is_file():
        raise InputError(path, "is a folder, expected a file")


def normalise_types(feature_types: Iterable[str] | str | None) -> tuple[str, ...] | None:
    if feature_types is None:
        return None
    if isinstance(feature_types, str):
        return (feature_types,)
    return tuple(feature_types)


def decode_strings(values: np.ndarray) -> np.ndarray:
    """bytes / str array -> object array of str (UTF-8)."""
    values = np.asarray(values)
    if values.dtype.kind == "S" and values.size and values.dtype.itemsize and \
            np.ascontiguousarray(values).reshape(-1).view(np.uint8).max() < 0x80:
        values = values.astype(str)  # ASCII (gene ids, barcodes): numpy's cast, ~4x faster
    elif values.dtype.kind == "S":
        values = np.char.decode(values, "utf-8")
    elif values.dtype.kind == "O":
        values = np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values])
    return values.astype(object)


def _numeric(path: Path, data: np.ndarray) -> np.ndarray:
    """Count values of a numeric type (booleans as int8), or the error naming the file."""
    kind = data.dtype.kind
    if kind == "b":
        return data.astype(np.int8)
    if kind not in "iuf":
        raise InputError(path, f"counts have a non-numeric type ({data.dtype})")
    return data


def _count_error(path: Path, problem: int, where: int, data: np.ndarray) -> None:
    """The InputError of what kernels/ingest.py found wrong with the counts `data`."""
    from cellmill.kernels import ingest as kern

    if problem == kern.NOT_FINITE:
        raise InputError(path, "counts contain NaN or infinite values")
    if problem == kern.NOT_INTEGER:
        raise InputError(path, f"counts are not integers (found {data[where]!r})")
    if problem == kern.NEGATIVE:
        raise InputError(path, f"counts contain negative values (minimum {data.min()})")
    # the store keeps counts as int32: a larger one would wrap around
    raise InputError(path, f"count {data.max()} is larger than the largest count a store "
                     f"holds ({INT32_MAX})")


def integer_counts(path: Path, data: np.ndarray) -> np.ndarray:
    """Validate count values and return them as int32.

    Integers must be in 0..2^31-1; floats must also be finite and integral (1.0 is fine, 1.5
    is not).
    """
    from cellmill.kernels import ingest as kern

    data = _numeric(path, np.asarray(data))
    flat = data.reshape(-1)
    out = np.empty(0 if data.dtype == np.int32 else flat.size, dtype=np.int32)
    problem, where = kern.check_counts(flat, out)
    if problem != kern.OK:
        _count_error(path, problem, where, flat)
    return data if data.dtype == np.int32 else out.reshape(data.shape)


def counts_csr(
    path: Path,
    data: np.ndarray,
    indices: np.ndarray,
    indptr: np.ndarray,
    shape: tuple[int, int],
) -> sp.csr_matrix:
    """A validated canonical CSR (cells x genes) from compressed arrays.

    The arrays are used as they are (a 10x CSC of genes x barcodes is the CSR of barcodes x genes),
    after checks that catch corrupt files: pointer lengths and order, index bounds, counts.
    """
    indptr = np.asarray(indptr)
    indices = np.asarray(indices)
    check_indptr(path, indptr, int(shape[0]), indices.size, np.size(data))
    return slice_csr(path, data, indices, indptr, int(shape[1]))


def check_indptr(path: Path, indptr: np.ndarray, n_rows: int, n_indices: int,
                 n_values: int) -> None:
    """The checks of a whole matrix's row pointers (and its stored lengths) against corruption."""
    if indptr.ndim != 1 or indptr.size != n_rows + 1:
        raise InputError(path, f"indptr has {indptr.size} entries, expected {n_rows + 1}")
    if indptr.size and (indptr[0] != 0 or indptr[-1] != n_indices):
        raise InputError(path, "indptr does not span the stored entries (corrupt matrix)")
    if n_indices != n_values:
        raise InputError(path, f"{n_indices} indices but {n_values} values")
    if indptr.size > 1 and (np.diff(indptr) < 0).any():
        raise InputError(path, "indptr is not non-decreasing (corrupt matrix)")


def slice_csr(path: Path, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray,
              n_cols: int) -> sp.csr_matrix:
    """A canonical CSR of some rows (int32 counts and indices), after the checks of their
    values; `indptr` (starting at 0) must have passed :func:`check_indptr`. One sweep
    (kernels/ingest.py check_slice) checks and converts what took numpy and scipy seven."""
    from cellmill.kernels import ingest as kern

    data, indices = _numeric(path, np.asarray(data)), np.asarray(indices)
    out_idx = np.empty(indices.size, dtype=np.int32)
    out_data = np.empty(0 if data.dtype == np.int32 else data.size, dtype=np.int32)
    indptr = np.asarray(indptr)
    ptr = indptr.astype(np.int32) if indices.size < 2**31 else indptr.astype(np.int64)
    problem, where, is_canonical, zeros = kern.check_slice(
        data, indices, ptr, int(n_cols), out_idx, out_data)
    if problem == kern.BAD_INDEX:
        raise InputError(path, f"indices out of range for {n_cols} features (corrupt matrix)")
    if problem != kern.OK:
        _count_error(path, problem, where, data)
    values = data if data.dtype == np.int32 else out_data
    m = sp.csr_matrix((values, out_idx, ptr), shape=(len(indptr) - 1, n_cols))
    if not is_canonical:
        m.sum_duplicates()
        zeros = 1  # duplicates may have summed to 0
    if zeros:
        m.eliminate_zeros()
    return m


def canonical(m: sp.csr_matrix) -> sp.csr_matrix:
    """Sorted indices, duplicates summed, explicit zeros removed."""
    if not m.has_canonical_format:
        m.sum_duplicates()
    m.eliminate_zeros()
    return m


def keep_mask(
    path: Path,
    types: np.ndarray,
    feature_types: Iterable[str] | str | None,
) -> np.ndarray | None:
    """Boolean mask of the features to keep, or None for all of them."""
    wanted = normalise_types(feature_types)
    if wanted is None or len(types) == 0:
        return None  # nothing to choose from: make_sample() reports the empty sample
    mask = np.isin(types, wanted)
    if not mask.any():
        present = ", ".join(dict.fromkeys(str(t) for t in types)) or "none"
        raise InputError(
            path, f"no features of type {', '.join(wanted)} (types in the file: {present})"
        )
    return None if mask.all() else mask


def genome_mask(path: Path, genomes: np.ndarray | None, genome: str | None) -> np.ndarray | None:
    if genome is None:
        return None
    if genomes is None:
        raise InputError(path, f"genome={genome!r} given but the file records no genomes")
    mask = genomes == genome
    if not mask.any():
        known = ", ".join(g for g in dict.fromkeys(genomes) if g) or "none"
        raise InputError(path, f"unknown genome {genome!r} (genomes in the file: {known})")
    return mask


def check_not_empty(path: Path, n_cells: int, n_genes: int) -> None:
    """A sample needs cells and genes (checked by streaming readers before any counts)."""
    if n_cells == 0:
        raise InputError(path, "empty sample: no cells")
    if n_genes == 0:
        raise InputError(path, "empty sample: no genes")


def make_sample(
    path: Path,
    counts: sp.csr_matrix,
    barcodes: np.ndarray,
    var: pd.DataFrame,
) -> Sample:
    """Final checks shared by every reader."""
    check_not_empty(path, counts.shape[0], counts.shape[1])
    if len(barcodes) != counts.shape[0] or len(var) != counts.shape[1]:
        raise InputError(path, "matrix dimensions disagree with the barcodes or features")
    return Sample(counts=counts, barcodes=barcodes, var=var, source=os.fspath(path))


def build_var(
    names: np.ndarray,
    gene_ids: np.ndarray,
    feature_types: np.ndarray,
    genome: np.ndarray | None,
) -> pd.DataFrame:
    cols = {"gene_ids": gene_ids, "feature_types": feature_types}
    if genome is not None:
        cols["genome"] = genome
    index = pd.Index(names, dtype=object)
    return pd.DataFrame({k: np.asarray(v, dtype=object) for k, v in cols.items()}, index=index)


def select(mask_a: np.ndarray | None, mask_b: np.ndarray | None) -> np.ndarray | None:
    if mask_a is None:
        return mask_b
    if mask_b is None:
        return mask_a
    return mask_a & mask_b


def take_features(counts: sp.csr_matrix, mask: np.ndarray | None) -> sp.csr_matrix:
    if mask is None:
        return counts
    return canonical(counts[:, np.flatnonzero(mask)].tocsr())
