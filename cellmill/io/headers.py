"""Gene names of a sample file from its header alone (no counts read): what preflight checks
the configuration against, named as the store will name them (``cellmill.io.names``)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from cellmill.errors import InputError
from cellmill.io.sample import GENE_EXPRESSION, sample_kind


def gene_names(path: str | os.PathLike,
               feature_types: Iterable[str] | str | None = (GENE_EXPRESSION,)) -> np.ndarray:
    """The Seurat-unique names of the kept features of a sample file (str array).

    10x HDF5: the feature table, barcodes and column pointers (8 bytes a cell) are read and
    checked, as ingest reads them first; Matrix Market: the feature and barcode tables and the
    matrix's header lines; .h5ad: the ``var`` table. Raises InputError naming the file.
    """
    p = Path(path)
    kind = sample_kind(p, None)
    if kind == "mex":
        from cellmill.io.mex import read_mex_header

        return np.asarray(read_mex_header(p, feature_types).index, dtype=object)
    if kind == "h5ad":
        return _h5ad_names(p, feature_types)
    from cellmill.io.tenx import open_10x_h5

    with open_10x_h5(p, feature_types=feature_types) as stream:  # counts are not read
        return np.asarray(stream.var.index, dtype=object)


def _h5ad_names(path: Path, feature_types) -> np.ndarray:
    """As ``cellmill.io.h5ad`` names the genes, from ``var`` alone."""
    import h5py

    from cellmill.io.h5ad import gene_table

    try:
        with h5py.File(path, "r") as f:
            for key in ("obs", "var", "X"):
                if key not in f:
                    raise InputError(path, f"not an h5ad file with counts: no '{key}'")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # anndata's OldFormatWarning on older files
                from anndata.io import read_elem

                var = read_elem(f["var"])
    except InputError:
        raise
    except Exception as e:  # h5py and anndata raise many types for damaged or foreign data
        raise InputError(path, f"cannot read the h5ad file's var ({type(e).__name__}: {e})") \
            from e
    names = np.asarray(gene_table(path, var, feature_types)[0].index, dtype=object)
    if names.size == 0:
        raise InputError(path, "empty sample: no genes")
    return names
