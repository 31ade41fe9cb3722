"""Store -> .h5ad (`cellmill export`): a file anndata and scanpy read back unchanged.

What is written, in anndata's own on-disk encoding (the h5ad spec, encoding-version 0.1.0):
- X: the raw counts, CSR int32; with `layers=("lognorm",)` also `layers/lognorm`, CSR float32
  log1p(x / n_counts * scale_factor) (the LogNormalize values the stages compute on the fly).
- obs: every obs column (QC columns, `qc_pass`, `cluster` as categorical, ...); var with the
  HVG columns; obsm `X_pca` / `X_umap` when the stages made them; uns['cellmill'] (version,
  store, cells, scale factor).

Memory is bounded like the stages': X and the layers are read and appended a block of cells at
a time into resizable HDF5 datasets (O(block), never cells x genes); obsm a storage chunk of
rows at a time; obs a column at a time (O(cells) for one column plus the cell names); var is
O(genes). The file is written beside the output as ``OUT.tmp-PID`` and renamed into place, so
an export that fails or is interrupted leaves no output and no temporary file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from cellmill.errors import InputError
from cellmill.io.store import Store
from cellmill.kernels.lognorm import lognorm_values

CELLS = ("all", "qc-passed")
LAYERS = ("lognorm",)
# per-cell embeddings exported when present; knn_index holds absolute cell indices that a
# qc-passed subset would invalidate, so the kNN lists stay in the store
OBSM = ("X_pca", "X_umap")
SCALE_FACTOR_KEY = "lognorm_scale_factor"  # uns array written by the normalize stage
DEFAULT_SCALE_FACTOR = 1e4  # Seurat's default, when normalize has not run
CHUNK = 1 << 16  # HDF5 chunk of the appended 1-D arrays (entries)


def parse_cells(value: str) -> str:
    """'all' or 'qc-passed' from a --cells value (any case; 'qc_passed' also accepted)."""
    v = str(value).strip().lower().replace("_", "-")
    if v not in CELLS:
        raise InputError("--cells", f"{value!r} is not one of {', '.join(CELLS)}")
    return v


def parse_layers(value) -> tuple[str, ...]:
    """Layer names from a --layers value ('lognorm', comma-separated, or a list of names).
    'counts' is refused: X already holds the raw counts, a copy would double the file."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    names = []
    for item in items:
        name = str(item).strip().lower()
        if not name:
            continue
        if name == "counts":
            raise InputError("--layers", "counts: X already holds the raw counts (CSR int32); "
                             f"the layers that can be added are: {', '.join(LAYERS)}")
        if name not in LAYERS:
            raise InputError("--layers", f"unknown layer {item!r}; known: {', '.join(LAYERS)}")
        if name not in names:
            names.append(name)
    return tuple(names)


def export_h5ad(store_path: str | os.PathLike, output: str | os.PathLike, *,
                cells: str = "all", layers=(), overwrite: bool = False,
                block_cells: int | None = None) -> tuple[int, int]:
    """Write the store at `store_path` as an .h5ad at `output`.

    cells: "all" or "qc-passed" (the rows whose obs `qc_pass` is true; any case). layers:
    extra layers, "lognorm" (comma-separated string or list). block_cells: cells read per
    block (default: the storage blocks). Returns (cells, genes) written. Bad input (missing or
    foreign store, existing output without `overwrite`, missing folder, qc-passed before QC,
    unknown layer) raises InputError before anything is written.
    """
    cells = parse_cells(cells)
    layer_names = parse_layers(layers)
    out = Path(output)
    if out.is_dir():
        raise InputError(out, "is a folder; give the path of the .h5ad file to write")
    if out.exists() and not overwrite:
        raise InputError(out, "exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise InputError(out, f"folder {out.parent} does not exist")
    try:
        store = Store(store_path)
    except FileNotFoundError:
        raise InputError(store_path, "not a cellmill store (no such folder)") from None
    mask = _cell_mask(store, cells)
    sf = _scale_factor(store) if "lognorm" in layer_names else None
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        n = _write(store, tmp, mask, layer_names, sf, block_cells, cells)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return n, store.n_genes


def _cell_mask(store: Store, cells: str) -> np.ndarray | None:
    if cells == "all":
        return None
    if "qc_pass" not in store.obs_columns():
        raise InputError(store.path, "no obs qc_pass (the qc stage has not run): "
                         "export with --cells all, or run the workflow first")
    return np.asarray(store.obs_column("qc_pass"), dtype=bool)


def _scale_factor(store: Store) -> float:
    if store.has("uns", SCALE_FACTOR_KEY):
        return float(store.read_array("uns", SCALE_FACTOR_KEY)[0])
    return DEFAULT_SCALE_FACTOR


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cellmill")
    except PackageNotFoundError:
        return "unknown"


def _dict_group(parent, name: str):
    g = parent.create_group(name)
    g.attrs["encoding-type"] = "dict"
    g.attrs["encoding-version"] = "0.1.0"
    return g


def _write(store: Store, path: Path, mask: np.ndarray | None, layers: tuple[str, ...],
           sf: float | None, block_cells: int | None, cells: str) -> int:
    import h5py
    from anndata.io import write_elem

    keep = None if mask is None else np.flatnonzero(mask)
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        n_rows = _write_counts(store, f, mask, layers, sf, block_cells)
        _write_obs(store, f, keep)
        write_elem(f, "var", store.var())
        obsm = _dict_group(f, "obsm")
        for name in OBSM:
            if store.has("obsm", name):
                _write_rows(store.root["obsm"][name], obsm, name, mask, n_rows)
        for empty in ("varm", "obsp", "varp"):
            _dict_group(f, empty)
        info = {"version": _version(), "store": str(store.path.resolve()), "cells": cells,
                "layers": ",".join(layers)}
        if sf is not None:
            info["lognorm_scale_factor"] = sf
        write_elem(f, "uns", {"cellmill": info})
    return n_rows


class _CsrAppender:
    """A CSR matrix in anndata's h5ad encoding, appended a block of rows at a time."""

    def __init__(self, parent, name: str, dtype):
        grow = dict(maxshape=(None,), chunks=(CHUNK,))
        self.group = parent.create_group(name)
        self.data = self.group.create_dataset("data", shape=(0,), dtype=dtype, **grow)
        self.indices = self.group.create_dataset("indices", shape=(0,), dtype=np.int32, **grow)
        self.indptr = self.group.create_dataset("indptr", shape=(1,), dtype=np.int64, **grow)
        self.indptr[0] = 0
        self.rows = self.nnz = 0

    def append(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> None:
        n, k = len(indptr) - 1, len(data)
        if k:
            self.data.resize((self.nnz + k,))
            self.indices.resize((self.nnz + k,))
            self.data[self.nnz:] = data.astype(self.data.dtype, copy=False)
            self.indices[self.nnz:] = indices.astype(np.int32, copy=False)
        if n:
            self.indptr.resize((self.rows + n + 1,))
            self.indptr[self.rows + 1:] = self.nnz + (indptr[1:] - indptr[0]).astype(np.int64)
        self.rows += n
        self.nnz += k

    def close(self, n_cols: int) -> None:
        self.group.attrs["encoding-type"] = "csr_matrix"
        self.group.attrs["encoding-version"] = "0.1.0"
        self.group.attrs["shape"] = np.array([self.rows, n_cols], dtype=np.int64)


def _write_counts(store: Store, f, mask, layers, sf, block_cells) -> int:
    """X (and the layers) a block of cells at a time; returns the number of rows written."""
    x = _CsrAppender(f, "X", np.int32)
    lay = _dict_group(f, "layers")
    lognorm = _CsrAppender(lay, "lognorm", np.float32) if "lognorm" in layers else None
    # obs n_counts: each cell's total over all genes, the denominator the stages use
    n_counts = (np.asarray(store.obs_column("n_counts"), dtype=np.float64)
                if lognorm is not None else None)
    if block_cells is None:  # the storage blocks
        ranges = store.block_ranges()
    else:  # any size: the export needs no granule alignment
        step = max(1, int(block_cells))
        ranges = [(a, min(a + step, store.n_cells)) for a in range(0, store.n_cells, step)]
    indptr = store.indptr  # O(cells), read once rather than per block
    for start, stop in ranges:
        m = store.read_rows(start, stop, indptr=indptr)
        rows = None if mask is None else np.flatnonzero(mask[start:stop])
        if rows is not None:
            m = m[rows]
        m.sort_indices()
        x.append(m.indptr, m.indices, m.data)
        if lognorm is not None:
            nc = n_counts[start:stop] if rows is None else n_counts[start:stop][rows]
            vals = lognorm_values(m.data, m.indptr, nc, sf)
            lognorm.append(m.indptr, m.indices, vals.astype(np.float32))
    x.close(store.n_genes)
    if lognorm is not None:
        lognorm.close(store.n_genes)
    return x.rows


def _write_obs(store: Store, f, keep: np.ndarray | None) -> None:
    """obs a column at a time, in anndata's dataframe encoding (its writer does the index and
    each column, so categoricals and strings are encoded exactly as anndata does)."""
    from anndata.io import write_elem

    names = store.obs_names()
    if keep is not None:
        names = names[keep]
    write_elem(f, "obs", pd.DataFrame(index=names))
    group = f["obs"]
    columns = store.obs_columns()
    for col in columns:
        values = store.obs_column(col)
        write_elem(group, col, values if keep is None else values[keep])
    group.attrs["column-order"] = columns


def _write_rows(arr, parent, name: str, mask: np.ndarray | None, n_rows: int) -> None:
    """A dense per-cell array (zarr) -> parent/name, a storage chunk of rows at a time."""
    ds = parent.create_dataset(name, shape=(n_rows,) + tuple(arr.shape[1:]), dtype=arr.dtype)
    step = max(1, int(arr.chunks[0]))
    r = 0
    for a in range(0, arr.shape[0], step):
        part = arr[a: a + step]
        if mask is not None:
            part = part[mask[a: a + step]]
        ds[r: r + len(part)] = part
        r += len(part)
    ds.attrs["encoding-type"] = "array"
    ds.attrs["encoding-version"] = "0.2.0"
