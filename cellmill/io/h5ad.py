"""AnnData ``.h5ad`` files: raw counts from ``X`` or from a named layer.

The matrix may be stored as CSR, CSC or dense; values must be non-negative integers (an integral
float matrix, as most h5ad files hold, is converted). Barcodes are the ``obs`` index. Gene names
are the ``var`` index, with Seurat's rules (``make.unique`` then SeuratObject's clean-up); the
original index becomes ``gene_ids`` unless ``var`` has a ``gene_ids`` column. ``feature_types``
and ``genome`` come from ``var`` columns of those names when present; without a
``feature_types`` column every feature counts as "Gene Expression".
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellmill.errors import InputError
from cellmill.io.names import make_unique, seurat_clean
from cellmill.io.sample import (
    GENE_EXPRESSION,
    Sample,
    build_var,
    canonical,
    counts_csr,
    decode_strings,
    genome_mask,
    integer_counts,
    keep_mask,
    make_sample,
    require_file,
    select,
    take_features,
)


def read_h5ad(
    path: str | os.PathLike,
    layer: str | None = None,
    feature_types: Iterable[str] | str | None = (GENE_EXPRESSION,),
    genome: str | None = None,
) -> Sample:
    """Read counts (``X``, or ``layers[layer]``), barcodes and genes of an ``.h5ad`` file."""
    path = Path(path)
    require_file(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise InputError(path, f"cannot open as HDF5, the file is truncated or corrupt ({e})") \
            from None
    try:
        with f:
            return _read(path, f, layer, feature_types, genome)
    except InputError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError, NotImplementedError) as e:
        raise InputError(path, f"cannot read the h5ad file, it is corrupt ({e})") from e


def _read(path: Path, f: h5py.File, layer, feature_types, genome) -> Sample:
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

    obs_index = _index(f["obs"])
    var = _dataframe(path, f["var"])
    n_cells, n_genes = obs_index.size, len(var)
    counts = _matrix(path, elem, what, (n_cells, n_genes))

    original = decode_strings(var.index.to_numpy())
    ids = decode_strings(var["gene_ids"].to_numpy()) if "gene_ids" in var else original
    if "feature_types" in var:
        types = decode_strings(var["feature_types"].astype(str).to_numpy())
    else:
        types = np.full(n_genes, GENE_EXPRESSION, dtype=object)
    genomes = decode_strings(var["genome"].astype(str).to_numpy()) if "genome" in var else None

    mask = select(keep_mask(path, types, feature_types), genome_mask(path, genomes, genome))
    if mask is not None and not mask.any():
        raise InputError(path, f"no features of the requested types in genome {genome!r}")
    unique = make_unique(original)
    if mask is not None:
        unique, ids, types = unique[mask], ids[mask], types[mask]
        genomes = genomes[mask] if genomes is not None else None
    out_var = build_var(seurat_clean(unique), ids, types, genomes)
    return make_sample(path, take_features(counts, mask), obs_index, out_var)


def _index(group: h5py.Group) -> np.ndarray:
    df_index = group.attrs.get("_index", "_index")
    if isinstance(df_index, bytes):
        df_index = df_index.decode()
    return decode_strings(np.asarray(group[df_index][()]).ravel())


def _dataframe(path: Path, group) -> pd.DataFrame:
    """``var`` as a DataFrame (anndata's own reader; only the small per-gene table)."""
    from anndata.io import read_elem

    if not isinstance(group, h5py.Group):
        raise InputError(path, "var is stored in an old h5ad layout that is not supported")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # anndata's OldFormatWarning on older files
            return read_elem(group)
    except Exception as e:  # anndata raises many types for damaged or foreign data frames
        raise InputError(path, f"cannot read var ({type(e).__name__}: {e})") from e


def _matrix(path: Path, elem, what: str, shape: tuple[int, int]) -> sp.csr_matrix:
    n_cells, n_genes = shape
    if isinstance(elem, h5py.Dataset):  # dense
        if elem.shape != (n_cells, n_genes):
            raise InputError(path, f"{what} has shape {elem.shape}, expected {shape}")
        values = integer_counts(path, np.asarray(elem[()]).ravel())
        return canonical(sp.csr_matrix(values.reshape(n_cells, n_genes)))
    enc = elem.attrs.get("encoding-type", elem.attrs.get("h5sparse_format", ""))
    if isinstance(enc, bytes):
        enc = enc.decode()
    stored = tuple(int(x) for x in elem.attrs.get("shape", elem.attrs.get("h5sparse_shape", ())))
    if stored != (n_cells, n_genes):
        raise InputError(path, f"{what} has shape {stored}, obs x var is {shape}")
    if enc in ("csr_matrix", "csr"):
        return counts_csr(
            path, elem["data"][()], elem["indices"][()], elem["indptr"][()], (n_cells, n_genes)
        )
    if enc in ("csc_matrix", "csc"):
        # CSC of cells x genes = CSR of genes x cells: validate as such, then transpose
        genes_major = counts_csr(
            path, elem["data"][()], elem["indices"][()], elem["indptr"][()], (n_genes, n_cells)
        )
        return canonical(genes_major.T.tocsr())
    raise InputError(path, f"{what} has an unsupported encoding {enc!r}")
