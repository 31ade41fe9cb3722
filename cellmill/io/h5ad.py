"""AnnData ``.h5ad`` files: raw counts from ``X`` or from a named layer.

The matrix may be stored as CSR, CSC or dense; values must be non-negative integers (an integral
float matrix, as most h5ad files hold, is converted). Barcodes are the ``obs`` index. Gene names
are the ``var`` index, with Seurat's rules (``make.unique`` then SeuratObject's clean-up); the
original index becomes ``gene_ids`` unless ``var`` has a ``gene_ids`` column. ``feature_types``
and ``genome`` come from ``var`` columns of those names when present; without a
``feature_types`` column every feature counts as "Gene Expression".

Elements are read with anndata's own readers (``anndata.io.read_elem``, ``sparse_dataset``), so
every layout anndata reads is read here (0.7's ``index`` datasets, 0.13's nullable-string
indexes, ...): from ``obs`` only its index, from ``var`` the whole (per-gene) table.

Streaming (``open_h5ad``): the counts come as CSR slices of consecutive cells holding at most
``SLICE_NNZ`` values (one cell may exceed it), each read with ``sparse_dataset`` row slicing (HDF5
row slicing for a dense matrix) and checked like a whole matrix (index bounds, integer
non-negative counts, canonical form). A CSC matrix is read in gene chunks of at most
``SLICE_NNZ`` values and transposed once into one slice (see ``_csc``). ``read_h5ad`` copies the
slices into one matrix as they come.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellmill.errors import InputError
from cellmill.io.names import make_unique, seurat_clean
from cellmill.io.sample import (
    GENE_EXPRESSION,
    INT32_MAX,
    Sample,
    SampleStream,
    build_var,
    canonical,
    check_indptr,
    check_not_empty,
    decode_strings,
    genome_mask,
    integer_counts,
    keep_mask,
    make_sample,
    require_file,
    select,
    slice_csr,
    take_features,
)
from cellmill.io.tenx import SLICE_NNZ, cell_ranges

READ_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError, NotImplementedError,
               AssertionError, IndexError)


def read_h5ad(
    path: str | os.PathLike,
    layer: str | None = None,
    feature_types: Iterable[str] | str | None = (GENE_EXPRESSION,),
    genome: str | None = None,
) -> Sample:
    """Read counts (``X``, or ``layers[layer]``), barcodes and genes of an ``.h5ad`` file."""
    with _opened(path, layer, feature_types, genome, SLICE_NNZ) as (s, stored):
        counts = _join_rows(s.slices, s.n_cells, stored)
        return make_sample(Path(path), counts, s.barcodes, s.var)


@contextmanager
def open_h5ad(
    path: str | os.PathLike,
    layer: str | None = None,
    feature_types: Iterable[str] | str | None = (GENE_EXPRESSION,),
    genome: str | None = None,
    slice_nnz: int | None = None,
) -> Iterator[SampleStream]:
    """An ``.h5ad`` file as a :class:`SampleStream` (slices of at most `slice_nnz` values,
    default ``SLICE_NNZ``); the file stays open until the block ends."""
    slice_nnz = SLICE_NNZ if slice_nnz is None else max(1, int(slice_nnz))
    with _opened(path, layer, feature_types, genome, slice_nnz) as (stream, _):
        yield stream


def _join_rows(slices: Iterable[sp.csr_matrix], n_rows: int,
              capacity: int | None = None) -> sp.csr_matrix:
    """Canonical CSR slices (`n_rows` rows in all) stacked by rows. Given `capacity` (at least
    their nonzeros), each is copied as it comes into arrays of that size whose unused tail is
    never touched, so never resident: the peak is the result and one slice. Without, they are
    all kept first (the peak is about twice the result)."""
    it = iter(slices)
    if capacity is None:
        parts = list(it)
        if len(parts) == 1:
            return parts[0]
        capacity = sum(m.nnz for m in parts)
        parts.reverse()
        it = (parts.pop() for _ in range(len(parts)))  # each freed once copied
    data = np.empty(capacity, dtype=np.int32)
    indices = np.empty(capacity, dtype=np.int32)  # genes < 2^31
    indptr = np.empty(n_rows + 1, dtype=np.int64 if capacity > INT32_MAX else np.int32)
    indptr[0] = 0
    row = pos = n_cols = 0
    for m in it:
        n_cols, end = m.shape[1], pos + m.nnz
        data[pos:end] = m.data
        indices[pos:end] = m.indices
        indptr[row + 1: row + 1 + m.shape[0]] = m.indptr[1:] + pos
        row, pos = row + m.shape[0], end
        del m
    if row != n_rows:
        raise ValueError(f"slices hold {row} rows, expected {n_rows}")
    out = sp.csr_matrix((data[:pos], indices[:pos], indptr), shape=(n_rows, n_cols))
    out.has_sorted_indices = True  # each slice is canonical: so are their rows stacked
    out.has_canonical_format = True
    return out


@contextmanager
def _opened(path, layer, feature_types, genome, slice_nnz: int):
    """What ``_open`` gives, with the file open until the block ends."""
    path = Path(path)
    require_file(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise InputError(path, f"cannot open as HDF5, the file is truncated or corrupt ({e})") \
            from None
    with f:
        with _reading(path):
            opened = _open(path, f, layer, feature_types, genome, slice_nnz)
        # outside _reading: errors of the caller's block are not the file's
        yield opened


@contextmanager
def _reading(path: Path):
    """Report a failure of h5py, anndata or numpy on the file's content as a corrupt file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # anndata's OldFormatWarning, pandas' future notes
            yield
    except InputError:
        raise
    except READ_ERRORS as e:
        raise InputError(path, f"cannot read the h5ad file, it is corrupt ({e})") from e


def _open(path: Path, f: h5py.File, layer, feature_types, genome, slice_nnz: int):
    """(the stream, the values stored if the matrix is a CSR, else None)."""
    for key in ("obs", "var"):
        if key not in f:
            raise InputError(path, f"not an h5ad file: no '{key}'")
    if layer is None:
        if "X" not in f:
            raise InputError(path, "the h5ad file has no X (give layer=)")
        elem, what = f["X"], "X"
    else:
        layers = list(f["layers"].keys()) if "layers" in f else []
        if layer not in layers:
            raise InputError(
                path, f"unknown layer {layer!r} (layers in the file: {', '.join(layers) or 'none'})"
            )
        elem, what = f["layers"][layer], f"layers/{layer}"

    barcodes = _obs_names(path, f["obs"])
    var = _dataframe(path, f["var"], "var")
    n_cells, n_genes = barcodes.size, len(var)
    matrix, indptr = _matrix(path, elem, what, (n_cells, n_genes))

    out_var, mask = gene_table(path, var, feature_types, genome)
    check_not_empty(path, n_cells, len(out_var))
    slices = _slices(path, matrix, indptr, (n_cells, n_genes), slice_nnz, mask)
    stored = int(indptr[-1]) if indptr is not None and matrix.format == "csr" else None
    return SampleStream(barcodes, out_var, os.fspath(path), slices), stored


def gene_table(path: Path, var: pd.DataFrame, feature_types, genome=None):
    """(the genes kept, named as the store names them, and the mask of kept rows of `var`;
    None: all) from an h5ad file's `var` table: Seurat's names, the feature types kept."""
    original = decode_strings(var.index.to_numpy())
    ids = decode_strings(var["gene_ids"].to_numpy()) if "gene_ids" in var else original
    if "feature_types" in var:
        types = decode_strings(var["feature_types"].astype(str).to_numpy())
    else:
        types = np.full(len(var), GENE_EXPRESSION, dtype=object)
    genomes = decode_strings(var["genome"].astype(str).to_numpy()) if "genome" in var else None

    mask = select(keep_mask(path, types, feature_types), genome_mask(path, genomes, genome))
    if mask is not None and not mask.any():
        raise InputError(path, f"no features of the requested types in genome {genome!r}")
    unique = make_unique(original)
    if mask is not None:
        unique, ids, types = unique[mask], ids[mask], types[mask]
        genomes = genomes[mask] if genomes is not None else None
    return build_var(seurat_clean(unique), ids, types, genomes), mask


def _read_elem(path: Path, elem, what: str):
    from anndata.io import read_elem

    try:
        return read_elem(elem)
    except Exception as e:  # anndata raises many types for damaged or foreign elements
        raise InputError(path, f"cannot read {what} ({type(e).__name__}: {e})") from e


def _obs_names(path: Path, group) -> np.ndarray:
    """The ``obs`` index alone (anndata's reader on the index element: obs may hold many
    per-cell columns that are not needed here)."""
    if not isinstance(group, h5py.Group):
        raise InputError(path, "obs is stored in an old h5ad layout that is not supported")
    key = group.attrs.get("_index", "_index")  # the data frame spec names its index element
    if isinstance(key, bytes):
        key = key.decode()
    if key not in group:
        raise InputError(path, f"obs has no index element {key!r} (corrupt h5ad file)")
    return decode_strings(np.asarray(_read_elem(path, group[key], "the obs index")).ravel())


def _dataframe(path: Path, group, what: str) -> pd.DataFrame:
    """``var`` as a DataFrame (anndata's own reader; only the small per-gene table)."""
    if not isinstance(group, h5py.Group):
        raise InputError(path, f"{what} is stored in an old h5ad layout that is not supported")
    df = _read_elem(path, group, what)
    if not isinstance(df, pd.DataFrame):
        raise InputError(path, f"{what} is not a data frame ({type(df).__name__})")
    return df


def _matrix(path: Path, elem, what: str, shape: tuple[int, int]):
    """``X`` or a layer: (an h5py dataset, None) for a dense matrix, (anndata's sparse dataset,
    its checked pointers) for CSR (cell pointers) or CSC (gene pointers)."""
    from anndata.io import sparse_dataset

    if isinstance(elem, h5py.Dataset):
        if tuple(elem.shape) != shape:
            raise InputError(path, f"{what} has shape {tuple(elem.shape)}, obs x var is {shape}")
        return elem, None
    try:
        matrix = sparse_dataset(elem)
    except Exception as e:  # no or an unknown sparse encoding: anndata asserts or raises
        raise InputError(
            path, f"{what} is not a dense, CSR or CSC matrix ({type(e).__name__}: {e})"
        ) from e
    stored = tuple(int(x) for x in matrix.shape)
    if stored != shape:
        raise InputError(path, f"{what} has shape {stored}, obs x var is {shape}")
    # The pointers (8 B a cell) plan slices by their values: anndata's public API has no
    # accessor for them, and fixed-size slices of few cells cost anndata's per-read overhead
    # thousands of times. data/indices/indptr are the sparse spec's members in every version.
    indptr = np.asarray(elem["indptr"][()])
    n_major = shape[0] if matrix.format == "csr" else shape[1]
    check_indptr(path, indptr, n_major, elem["indices"].size, elem["data"].size)
    return matrix, indptr


def _slices(path: Path, matrix, indptr: np.ndarray | None, shape: tuple[int, int],
            slice_nnz: int, mask: np.ndarray | None) -> Iterator[sp.csr_matrix]:
    n_cells, n_genes = shape
    if indptr is not None and matrix.format == "csc":
        with _reading(path):
            m = _csc(path, matrix, indptr, n_cells, slice_nnz, mask)
        yield m
        return
    if indptr is None:  # dense: a cell holds n_genes values
        step = max(1, slice_nnz // n_genes)
        ranges = ((c0, min(c0 + step, n_cells)) for c0 in range(0, n_cells, step))
    else:
        ranges = cell_ranges(indptr, slice_nnz)
    for c0, c1 in ranges:
        with _reading(path):
            if indptr is None:
                m = canonical(sp.csr_matrix(integer_counts(path, np.asarray(matrix[c0:c1]))))
            else:
                part = matrix[c0:c1]
                m = slice_csr(path, part.data, part.indices, part.indptr, n_genes)
            m = take_features(m, mask)
        yield m  # outside _reading: the consumer's errors pass through unchanged


def _csc(path: Path, matrix, indptr: np.ndarray, n_cells: int, slice_nnz: int,
         mask: np.ndarray | None) -> sp.csr_matrix:
    """A CSC matrix as one CSR. A row slice of a CSC needs every column (anndata reads the whole
    matrix for each), so the genes are read in chunks of at most `slice_nnz` values, each checked
    as the CSR of genes x cells and kept for the wanted genes only, then transposed once: the
    peak is about twice the kept counts (~16 B a value; a CSR needs about one copy)."""
    def chunks():
        for g0, g1 in cell_ranges(indptr, slice_nnz):
            keep = None if mask is None else np.flatnonzero(mask[g0:g1])
            if keep is not None and keep.size == 0:
                continue
            part = matrix[:, g0:g1]
            genes_major = slice_csr(path, part.data, part.indices, part.indptr, n_cells)
            yield genes_major if keep is None else genes_major[keep]

    n_kept = len(indptr) - 1 if mask is None else int(mask.sum())
    genes_major = _join_rows(chunks(), n_kept, int(indptr[-1]))
    return canonical(genes_major.T.tocsr())
