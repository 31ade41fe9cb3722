"""10x Genomics Cell Ranger HDF5 (``filtered_feature_bc_matrix.h5``), v3 and v2 layouts.

v3 (Cell Ranger >= 3): group ``matrix`` with ``data, indices, indptr, shape, barcodes`` and
``features/{id, name, feature_type, genome}``. v2: one group per genome with ``data, indices,
indptr, shape, barcodes, gene_names, genes``. Both store a CSC matrix of features x barcodes, which
is read as the CSR of cells x features without copying through a dense form.

Genomes: ``genome=None`` keeps all of them. In v3 they are already one matrix (``features/genome``
tells them apart). In v2 the genome groups are concatenated feature-wise in file order (h5py's
order, the same as Seurat's ``names(infile)``); they must have the same barcodes. Seurat's
``Read10X_h5`` instead returns one matrix per genome: pass ``genome="hg19"`` to get one of them.

Names (Seurat): ``make.unique`` over the feature names of each matrix (all feature types), then the
features are subset (type, genome), then SeuratObject's clean-up (see ``cellmill.io.names``).
Several v2 genomes: a second ``make.unique`` over the concatenated names. A feature with an empty
name is named by its id.

Streaming (``open_10x_h5``, used by ingest): the feature table, the barcodes and ``indptr``
(8 bytes per cell) are read and checked first; the counts then come as CSR slices of consecutive
cells holding at most ``SLICE_NNZ`` nonzeros (one cell may exceed it), each read chunk by chunk
(io/h5chunks.py: inflated in threads within ``decode_threads``) and checked like a whole matrix
(index bounds, integer non-negative counts, canonical form). v2 files whose several genome groups
are concatenated are read whole (one slice). ``read_10x_h5`` is the same reading with one slice.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp

from cellmill.errors import InputError
from cellmill.io.h5chunks import read_range
from cellmill.io.names import fill_empty, make_unique, seurat_clean
from cellmill.io.sample import (
    GENE_EXPRESSION,
    Sample,
    SampleStream,
    build_var,
    check_indptr,
    check_not_empty,
    decode_strings,
    genome_mask,
    keep_mask,
    make_sample,
    require_file,
    select,
    slice_csr,
    take_features,
)

MATRIX_KEYS = ("data", "indices", "indptr", "shape", "barcodes")
# Nonzeros per streamed slice (~16 B/nnz read: int32 data, int64 indices, plus the copies of
# validation and gene remapping). Measured on ingest of 12 simulated samples: 4M gave a peak of
# 506 MB at 196k cells and 527 MB at 400k; 2M gave 434 / 496 MB (lower, but then the O(cells)
# obs written at the end sets the peak, so less flat) at the same speed.
SLICE_NNZ = 4 << 20
READ_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError)


def read_10x_h5(
    path: str | os.PathLike,
    feature_types: Iterable[str] | str | None = (GENE_EXPRESSION,),
    genome: str | None = None,
) -> Sample:
    """Read a Cell Ranger HDF5 file (v3 or v2). See the module docstring for the rules."""
    with open_10x_h5(path, feature_types, genome, slice_nnz=np.iinfo(np.int64).max) as s:
        (counts,) = tuple(s.slices)
        return make_sample(Path(path), counts, s.barcodes, s.var)


@contextmanager
def open_10x_h5(
    path: str | os.PathLike,
    feature_types: Iterable[str] | str | None = (GENE_EXPRESSION,),
    genome: str | None = None,
    slice_nnz: int | None = None,
    ranges: list[tuple[int, int]] | None = None,
    names: bool = True,
) -> Iterator[SampleStream]:
    """A Cell Ranger HDF5 file as a :class:`SampleStream` (slices of at most `slice_nnz`
    nonzeros, default ``SLICE_NNZ``); the file stays open until the block ends.

    ranges: give only these cell ranges [c0, c1), one slice each (a part of the sample, see
    ``cellmill.io.decode``; ``plan_ranges`` gives the ranges of the default slicing). The
    header (barcodes, genes) is read and checked as for the whole sample. v2 files whose
    several genome groups are concatenated ignore it (read whole).
    names: False leaves the barcodes as bytes and the gene names raw (no Seurat clean-up) in
    a v3 file, for a part whose header another part gives (the checks are the same)."""
    path = Path(path)
    require_file(path)
    slice_nnz = SLICE_NNZ if slice_nnz is None else int(slice_nnz)
    if ranges is not None:
        slice_nnz = ranges
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise InputError(path, f"cannot open as HDF5, the file is truncated or corrupt ({e})") \
            from None
    with f:
        with _reading(path):
            if "matrix" in f:
                stream = _open_v3(path, f, feature_types, genome, slice_nnz, names)
            else:
                stream = _open_v2(path, f, feature_types, genome, slice_nnz)
        # outside _reading: errors of the caller's block are not the file's
        yield stream


@contextmanager
def _reading(path: Path):
    """Report a failure of h5py or numpy on the file's content as a corrupt file."""
    try:
        yield
    except InputError:
        raise
    except READ_ERRORS as e:
        raise InputError(path, f"cannot read the 10x matrix, the file is corrupt ({e})") from e


def _open_v3(path: Path, f: h5py.File, feature_types, genome, slice_nnz,
             names_too: bool = True) -> SampleStream:
    g = f["matrix"]
    if not isinstance(g, h5py.Group):
        raise InputError(path, "not a 10x v3 HDF5 file: 'matrix' is not a group")
    missing = [k for k in (*MATRIX_KEYS, "features/id", "features/name") if k not in g]
    if missing:
        raise InputError(path, f"not a 10x v3 HDF5 file: 'matrix' lacks {', '.join(missing)}")
    if names_too:
        ids = _strings(g["features/id"])
        names = fill_empty(_strings(g["features/name"]), ids)
    else:  # a later part: the first part gave the names, these only need their count
        ids, names = (np.asarray(g[k][()]).ravel() for k in ("features/id", "features/name"))
    n = ids.size
    types = _strings(g["features/feature_type"]) if "features/feature_type" in g else None
    if types is None:
        types = np.full(n, GENE_EXPRESSION, dtype=object)
    genomes = _strings(g["features/genome"]) if "features/genome" in g else None
    if names.size != n or types.size != n or (genomes is not None and genomes.size != n):
        raise InputError(path, "features/id, name, feature_type and genome differ in length")

    barcodes, indptr = _header(path, g, n, decode=names_too)
    mask = select(keep_mask(path, types, feature_types), genome_mask(path, genomes, genome))
    if mask is not None and not mask.any():
        raise InputError(path, f"no features of the requested types in genome {genome!r}")
    unique = make_unique(names) if names_too else names  # Read10X_h5: over the whole vector
    if mask is not None:
        unique, ids, types = unique[mask], ids[mask], types[mask]
        genomes = genomes[mask] if genomes is not None else None
    var = build_var(seurat_clean(unique) if names_too else unique, ids, types, genomes)
    check_not_empty(path, len(barcodes), len(var))
    slices = _slices(path, g, indptr, n, slice_nnz, mask)
    return SampleStream(barcodes, var, os.fspath(path), slices)


def _open_v2(path: Path, f: h5py.File, feature_types, genome, slice_nnz: int) -> SampleStream:
    groups = [
        k for k, v in f.items()
        if isinstance(v, h5py.Group) and all(m in v for m in MATRIX_KEYS)
        and ("gene_names" in v or "genes" in v)
    ]
    if not groups:
        raise InputError(
            path, "HDF5 file without a 10x layout (no 'matrix' group, no genome group with "
            "data/indices/indptr/shape/barcodes/genes)"
        )
    if genome is not None:
        if genome not in groups:
            raise InputError(
                path, f"unknown genome {genome!r} (genomes in the file: {', '.join(groups)})"
            )
        groups = [genome]
    parts, barcodes, names, ids, genomes = [], None, [], [], []
    for name in groups:
        g = f[name]
        gid = _strings(g["genes"]) if "genes" in g else _strings(g["gene_names"])
        gname = _strings(g["gene_names"]) if "gene_names" in g else gid
        if gname.size != gid.size:
            raise InputError(path, f"{name}/gene_names and {name}/genes differ in length")
        bc, indptr = _header(path, g, gid.size, prefix=f"{name}/")
        if barcodes is None:
            barcodes = bc
        elif bc.size != barcodes.size or (bc != barcodes).any():
            raise InputError(
                path, f"genome groups {groups[0]!r} and {name!r} have different barcodes; "
                "choose one with genome="
            )
        parts.append((g, indptr, gid.size))
        names.append(make_unique(fill_empty(gname, gid)))  # Read10X_h5: per genome group
        ids.append(gid)
        genomes.append(np.full(gid.size, name, dtype=object))
    names, ids, genomes = (np.concatenate(x) for x in (names, ids, genomes))
    types = np.full(ids.size, GENE_EXPRESSION, dtype=object)
    keep_mask(path, types, feature_types)  # v2 has only Gene Expression: error if not wanted
    var = build_var(seurat_clean(names), ids, types, genomes)
    check_not_empty(path, len(barcodes), len(var))
    if len(parts) == 1:
        slices = _slices(path, *parts[0], slice_nnz)
    else:  # genome groups side by side: read whole (rare; Seurat reads one genome at a time)
        slices = _hstack_groups(path, parts)
    return SampleStream(barcodes, var, os.fspath(path), slices)


def _header(path: Path, g: h5py.Group, n_features: int, prefix: str = "", decode: bool = True):
    """Barcodes and the checked column pointers of a group's CSC features x barcodes."""
    shape = np.asarray(g["shape"][()]).ravel()
    if shape.size != 2:
        raise InputError(path, f"{prefix}shape has {shape.size} values, expected 2")
    n_feat, n_bc = int(shape[0]), int(shape[1])
    barcodes = _strings(g["barcodes"]) if decode else np.asarray(g["barcodes"][()]).ravel()
    if n_feat != n_features:
        raise InputError(path, f"{prefix}shape says {n_feat} features but there are {n_features}")
    if n_bc != barcodes.size:
        raise InputError(path, f"{prefix}shape says {n_bc} barcodes but there are {barcodes.size}")
    indptr = np.asarray(g["indptr"][()])
    check_indptr(path, indptr, n_bc, g["indices"].size, g["data"].size)
    return barcodes, indptr


def _slices(path: Path, g: h5py.Group, indptr: np.ndarray, n_features: int, slice_nnz,
            mask: np.ndarray | None = None) -> Iterator[sp.csr_matrix]:
    """The CSC features x barcodes of a group as CSR slices of barcodes x features; `slice_nnz`
    is a budget of nonzeros per slice or a list of cell ranges (one slice each)."""
    if isinstance(slice_nnz, list):
        ranges = slice_nnz
        if any(not 0 <= c0 < c1 < len(indptr) for c0, c1 in ranges):
            raise InputError(path, "the file changed while being read (cell ranges outside "
                             f"its {len(indptr) - 1} cells)")
    else:
        ranges = cell_ranges(indptr, slice_nnz)
    for c0, c1 in ranges:
        with _reading(path):
            a, b = int(indptr[c0]), int(indptr[c1])
            ptr = indptr[c0: c1 + 1] - a
            m = slice_csr(path, read_range(g["data"], a, b), read_range(g["indices"], a, b), ptr,
                          n_features)
            m = take_features(m, mask)
        yield m  # outside _reading: the consumer's errors pass through unchanged


def _hstack_groups(path: Path, parts) -> Iterator[sp.csr_matrix]:
    with _reading(path):
        blocks = [next(_slices(path, g, ptr, n, np.iinfo(np.int64).max)) for g, ptr, n in parts]
        counts = sp.hstack(blocks, format="csr")
        del blocks
    yield counts


def plan_ranges(path: str | os.PathLike, slice_nnz: int = SLICE_NNZ
                ) -> list[tuple[int, int, int]] | None:
    """The cell ranges [c0, c1) ``open_10x_h5`` would slice a v3 file into, each with its
    nonzeros, from the column pointers alone (8 bytes a cell; nothing else is read or checked).
    None when the file is not a readable v3 file with sane pointers: the reader then reads it
    whole and reports why."""
    try:
        with h5py.File(path, "r") as f:
            g = f.get("matrix")
            if not isinstance(g, h5py.Group) or "indptr" not in g:
                return None
            indptr = np.asarray(g["indptr"][()])
    except Exception:  # noqa: BLE001 - any failure: the reader reports it, in sample order
        return None
    if indptr.ndim != 1 or indptr.size < 2 or indptr.dtype.kind not in "iu" \
            or indptr[0] != 0 or (np.diff(indptr) < 0).any():
        return None
    return [(c0, c1, int(indptr[c1] - indptr[c0])) for c0, c1 in cell_ranges(indptr, slice_nnz)]


def cell_ranges(indptr: np.ndarray, max_nnz: int) -> Iterator[tuple[int, int]]:
    """Consecutive cell ranges [c0, c1) covering all cells, each with at most `max_nnz`
    nonzeros unless one cell alone has more."""
    n = len(indptr) - 1
    c0 = 0
    while c0 < n:
        start = int(indptr[c0])
        if int(indptr[n]) - start <= max_nnz:
            c1 = n
        else:  # last pointer within the budget ends the range; at least one cell
            c1 = int(np.searchsorted(indptr, start + max_nnz, side="right")) - 1
            c1 = max(c1, c0 + 1)
        yield c0, c1
        c0 = c1


def _strings(ds: h5py.Dataset) -> np.ndarray:
    return decode_strings(np.asarray(ds[()]).ravel())
