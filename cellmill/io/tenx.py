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
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp

from cellmill.errors import InputError
from cellmill.io.names import fill_empty, make_unique, seurat_clean
from cellmill.io.sample import (
    GENE_EXPRESSION,
    Sample,
    build_var,
    counts_csr,
    decode_strings,
    genome_mask,
    keep_mask,
    make_sample,
    require_file,
    select,
    take_features,
)

MATRIX_KEYS = ("data", "indices", "indptr", "shape", "barcodes")


def read_10x_h5(
    path: str | os.PathLike,
    feature_types: Iterable[str] | str | None = (GENE_EXPRESSION,),
    genome: str | None = None,
) -> Sample:
    """Read a Cell Ranger HDF5 file (v3 or v2). See the module docstring for the rules."""
    path = Path(path)
    require_file(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise InputError(path, f"cannot open as HDF5, the file is truncated or corrupt ({e})") \
            from None
    try:
        with f:
            if "matrix" in f:
                return _read_v3(path, f, feature_types, genome)
            return _read_v2(path, f, feature_types, genome)
    except InputError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
        raise InputError(path, f"cannot read the 10x matrix, the file is corrupt ({e})") from e


def _read_v3(path: Path, f: h5py.File, feature_types, genome) -> Sample:
    g = f["matrix"]
    if not isinstance(g, h5py.Group):
        raise InputError(path, "not a 10x v3 HDF5 file: 'matrix' is not a group")
    missing = [k for k in (*MATRIX_KEYS, "features/id", "features/name") if k not in g]
    if missing:
        raise InputError(path, f"not a 10x v3 HDF5 file: 'matrix' lacks {', '.join(missing)}")
    ids = _strings(g["features/id"])
    names = fill_empty(_strings(g["features/name"]), ids)
    n = ids.size
    types = _strings(g["features/feature_type"]) if "features/feature_type" in g else None
    if types is None:
        types = np.full(n, GENE_EXPRESSION, dtype=object)
    genomes = _strings(g["features/genome"]) if "features/genome" in g else None
    if names.size != n or types.size != n or (genomes is not None and genomes.size != n):
        raise InputError(path, "features/id, name, feature_type and genome differ in length")

    counts, barcodes = _matrix(path, g, n)
    mask = select(keep_mask(path, types, feature_types), genome_mask(path, genomes, genome))
    if mask is not None and not mask.any():
        raise InputError(path, f"no features of the requested types in genome {genome!r}")
    unique = make_unique(names)  # Read10X_h5: over the whole feature vector
    if mask is not None:
        unique, ids, types = unique[mask], ids[mask], types[mask]
        genomes = genomes[mask] if genomes is not None else None
    var = build_var(seurat_clean(unique), ids, types, genomes)
    return make_sample(path, take_features(counts, mask), barcodes, var)


def _read_v2(path: Path, f: h5py.File, feature_types, genome) -> Sample:
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
    blocks, barcodes, names, ids, genomes = [], None, [], [], []
    for name in groups:
        g = f[name]
        gid = _strings(g["genes"]) if "genes" in g else _strings(g["gene_names"])
        gname = _strings(g["gene_names"]) if "gene_names" in g else gid
        if gname.size != gid.size:
            raise InputError(path, f"{name}/gene_names and {name}/genes differ in length")
        counts, bc = _matrix(path, g, gid.size, prefix=f"{name}/")
        if barcodes is None:
            barcodes = bc
        elif bc.size != barcodes.size or (bc != barcodes).any():
            raise InputError(
                path, f"genome groups {groups[0]!r} and {name!r} have different barcodes; "
                "choose one with genome="
            )
        blocks.append(counts)
        names.append(make_unique(fill_empty(gname, gid)))  # Read10X_h5: per genome group
        ids.append(gid)
        genomes.append(np.full(gid.size, name, dtype=object))
    counts = blocks[0] if len(blocks) == 1 else sp.hstack(blocks, format="csr")
    names, ids, genomes = (np.concatenate(x) for x in (names, ids, genomes))
    types = np.full(ids.size, GENE_EXPRESSION, dtype=object)
    keep_mask(path, types, feature_types)  # v2 has only Gene Expression: error if not wanted
    var = build_var(seurat_clean(names), ids, types, genomes)
    return make_sample(path, counts, barcodes, var)


def _matrix(path: Path, g: h5py.Group, n_features: int, prefix: str = ""):
    """The CSC features x barcodes of a group as the CSR barcodes x features, and the barcodes."""
    shape = np.asarray(g["shape"][()]).ravel()
    if shape.size != 2:
        raise InputError(path, f"{prefix}shape has {shape.size} values, expected 2")
    n_feat, n_bc = int(shape[0]), int(shape[1])
    barcodes = _strings(g["barcodes"])
    if n_feat != n_features:
        raise InputError(path, f"{prefix}shape says {n_feat} features but there are {n_features}")
    if n_bc != barcodes.size:
        raise InputError(path, f"{prefix}shape says {n_bc} barcodes but there are {barcodes.size}")
    counts = counts_csr(
        path, g["data"][()], g["indices"][()], g["indptr"][()], shape=(n_bc, n_feat)
    )
    return counts, barcodes


def _strings(ds: h5py.Dataset) -> np.ndarray:
    return decode_strings(np.asarray(ds[()]).ravel())
