"""Build a store sample by sample, slice by slice: memory is one slice of a sample (see
``cellmill.io.sample.SampleStream``) plus one chunk buffer, and O(cells) obs bookkeeping."""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

from cellmill.errors import InputError
from cellmill.io import faults
from cellmill.io.heap import release_heap
from cellmill.io.prefetch import prefetched
from cellmill.io.sample import SampleStream
from cellmill.io.store import (
    CHUNK_NNZ,
    DEFAULT_BLOCK_CELLS,
    FORMAT,
    GRANULE,
    Appender,
    Store,
    _empty_dict_group,
    codec,
    write_json_atomic,
)
from cellmill.kernels.ingest import remap_and_count, sort_rows


class StoreWriter:
    """Write a new store under a temporary name; `finish()` renames it into place."""

    def __init__(self, path: str | Path, overwrite: bool = False,
                 block_cells: int = DEFAULT_BLOCK_CELLS):
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise InputError(self.path, "output exists (use --overwrite to replace it)")
        if block_cells % GRANULE:
            raise ValueError(f"block_cells must be a multiple of {GRANULE}")
        self.block_cells = block_cells
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        _remove_stale_tmp(self.path)
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        self.root = zarr.open_group(self.tmp, mode="w", zarr_format=3)
        self.root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        x = self.root.create_group("X")
        self.x = x
        self.data = Appender(x, "data", np.int32, CHUNK_NNZ)
        self.indices = Appender(x, "indices", np.int32, CHUNK_NNZ)
        self.indptr = [np.zeros(1, dtype=np.int64)]
        self.nnz = 0
        self.gene_index: dict[str, int] = {}
        self.var_rows: list[dict] = []
        self.gene_cells = np.zeros(0, dtype=np.int64)
        self.gene_counts = np.zeros(0, dtype=np.int64)
        self.obs_parts: list[_ObsPart] = []
        self.n_cells = 0
        self.sample_genes: list[tuple[str, set]] = []

    def add_sample(self, sample_name: str, sample, metadata: dict | None = None,
                   prefix_cells: bool = True) -> None:
        """Append one sample: a ``Sample`` (counts in memory) or a ``SampleStream`` (counts
        consumed slice by slice; an error while reading propagates, and the store is to be
        aborted)."""
        stream = sample if isinstance(sample, SampleStream) else SampleStream.whole(sample)
        cols = self._gene_columns(sample_name, stream.var)
        # this sample lists genes in another order than the study: re-sort each row
        resort = len(cols) > 1 and bool(np.any(np.diff(cols) < 0))
        n_counts, n_features = [], []
        # slice k is remapped on a thread while slice k - 1 is appended here (the remap was
        # most of this thread's time, and this thread was ingest's bottleneck); one thread,
        # so the per-gene sums are added in slice order
        for part in prefetched(self._remap(c, cols, resort) for c in stream.slices):
            self._append(*part, n_counts, n_features)
        n = sum(len(c) for c in n_counts)
        if n != stream.n_cells:
            raise InputError(stream.source, f"{n} cells in the matrix but "
                             f"{stream.n_cells} barcodes")
        self._add_obs(sample_name, stream.barcodes, metadata, prefix_cells,
                      _concat(n_counts, np.int64), _concat(n_features, np.int32))
        self.n_cells += n

    def _gene_columns(self, sample_name: str, var: pd.DataFrame) -> np.ndarray:
        """Study column of each gene of a sample (new genes are appended to the study's)."""
        names = list(var.index)
        cols = np.empty(len(names), dtype=np.int32)
        values = None  # the rows as var.iloc[j] gives them (one common dtype), built once
        for j, name in enumerate(names):
            col = self.gene_index.get(name)
            if col is None:
                if values is None:
                    values = var.to_numpy()
                col = len(self.gene_index)
                self.gene_index[name] = col
                row = {"gene": name}
                row.update(zip(var.columns, values[j], strict=True))
                self.var_rows.append(row)
            cols[j] = col
        self.sample_genes.append((sample_name, set(names)))
        n_union = len(self.gene_index)
        self.gene_cells = _grow(self.gene_cells, n_union)
        self.gene_counts = _grow(self.gene_counts, n_union)
        return cols

    def _remap(self, counts: sp.csr_matrix, cols: np.ndarray, resort: bool):
        """One slice of cells with the study's gene columns (rows re-sorted when the sample's
        genes come in another order), its per-cell totals and genes; adds its per-gene
        detected cells and counts into the study's."""
        indices, n_counts, n_features = remap_and_count(
            counts.data, counts.indices, counts.indptr, cols, self.gene_cells, self.gene_counts)
        # a copy when re-sorting: the caller's Sample must stay intact
        data = counts.data.astype(np.int32, copy=resort)
        indptr = counts.indptr.astype(np.int64, copy=False)
        if resort:
            sort_rows(data, indices, indptr)
        return data, indices, indptr, n_counts, n_features

    def _append(self, data, indices, indptr, c, f, n_counts: list, n_features: list) -> None:
        self.data.append(data)
        self.indices.append(indices)
        self.indptr.append(indptr[1:] + self.nnz)
        self.nnz += len(data)
        n_counts.append(c)
        n_features.append(f)
        faults.wrote()

    def _add_obs(self, sample_name, barcodes, metadata, prefix_cells, n_counts, n_features):
        self.obs_parts.append(_ObsPart(
            sample_name, _compact(barcodes), dict(metadata or {}), prefix_cells,
            n_counts, n_features))

    def finish(self) -> Store:
        try:
            return self._finish()
        except BaseException:
            self.abort()
            raise

    def _finish(self) -> Store:
        from anndata.io import write_elem

        if self.n_cells == 0:
            raise InputError(self.path, "no cells to write")
        self.data.close()
        self.indices.close()
        indptr = np.concatenate(self.indptr)
        ip = self.x.create_array("indptr", shape=indptr.shape, dtype=np.int64,
                                 chunks=(min(len(indptr), 1 << 20),), compressors=codec())
        ip[:] = indptr
        n_genes = len(self.gene_index)
        self.x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                             "shape": [self.n_cells, n_genes]})
        self._warn_missing_genes()
        release_heap()  # the slices' freed buffers, before the O(cells) obs is built
        dup = _duplicate_name(self.obs_parts)
        if dup is not None:
            raise InputError(self.path, f"duplicate cell name {dup!r}")
        var = pd.DataFrame(self.var_rows).set_index("gene")
        var.index.name = None
        var["n_cells"] = self.gene_cells
        var["total_counts"] = self.gene_counts
        _write_obs(self.root, self.obs_parts, self.n_cells)
        write_elem(self.root, "var", var)
        for slot in ("obsm", "varm", "obsp", "layers"):
            _empty_dict_group(self.root, slot)
        uns = _empty_dict_group(self.root, "uns")
        meta = _empty_dict_group(uns, "cellmill")
        blocks = np.unique(np.r_[np.arange(0, self.n_cells, self.block_cells), self.n_cells])
        b = meta.create_array("blocks", shape=blocks.shape, dtype=np.int64, chunks=blocks.shape)
        b[:] = blocks.astype(np.int64)
        b.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        meta_json = self.tmp / "uns" / "cellmill" / "zarr.json"
        import json

        m = json.loads(meta_json.read_text())
        m["attributes"]["stages"] = {}
        m["attributes"]["format"] = FORMAT
        write_json_atomic(meta_json, m)
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)
        return Store(self.path)

    def _warn_missing_genes(self) -> None:
        if len(self.sample_genes) < 2:
            return
        union = set(self.gene_index)
        for name, genes in self.sample_genes:
            missing = union - genes
            if missing:
                shown = ", ".join(sorted(missing)[:10])
                more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
                warnings.warn(f"sample {name}: {len(missing)} genes absent, set to zero: "
                              f"{shown}{more}", stacklevel=3)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass
class _ObsPart:
    """The obs of one sample until finish(): barcodes as UTF-8 bytes (~20 B a cell instead of
    two Python strings for barcode and cell name) and metadata once, not once per cell."""

    sample: str
    barcodes: np.ndarray
    metadata: dict
    prefix: bool
    n_counts: np.ndarray
    n_features: np.ndarray

    def columns(self) -> list[str]:
        return list(dict.fromkeys(["barcode", "sample", *self.metadata]))

    def value(self, key: str):
        """A column's value: one for the sample (a scalar) or one per cell."""
        if key == "sample" and "sample" not in self.metadata:
            return self.sample
        if key == "barcode" and "barcode" not in self.metadata:
            return self.barcode_strings()
        return self.metadata.get(key, np.nan)  # a column other samples have: NaN, as concat

    def barcode_strings(self) -> np.ndarray:
        return np.char.decode(self.barcodes, "utf-8").astype(object)

    def cell_names(self) -> list[str]:
        barcodes = self.barcode_strings()
        return [f"{self.sample}_{b}" for b in barcodes] if self.prefix else list(barcodes)


def _compact(barcodes) -> np.ndarray:
    return np.char.encode(np.asarray(barcodes).astype(str), "utf-8")


STRING_CHUNK = 1 << 16  # cells per chunk of the obs string columns


def _write_obs(root, parts: list[_ObsPart], n_cells: int) -> None:
    """obs as anndata writes a DataFrame: barcode (str), sample and metadata (categorical,
    categories in order of first appearance), n_counts, n_features; index = cell names. The
    cell names (an object index, as before) are written sample by sample from the compact
    barcodes: built whole as Python strings with anndata's copies they were most of the ~300
    MB the obs took at the end of ingest at 1M cells."""
    from anndata.io import write_elem

    sizes = [len(p.n_counts) for p in parts]
    group = root.create_group("obs")
    keys = list(dict.fromkeys(k for p in parts for k in p.columns()))
    for key in keys:
        if key == "barcode" and not any("barcode" in p.metadata for p in parts):
            # sample by sample: as Python strings the whole column was ~100 MB at 1M cells
            _write_str_column(group, key, (p.barcode_strings() for p in parts), n_cells)
            continue
        values = [p.value(key) for p in parts]
        if key == "barcode":  # through pandas, as anndata writes a column: under pandas 3
            # a column of str is a StringArray, written and read back as such
            write_elem(group, key, pd.Series(_per_cell_all(values, sizes))._values)
        else:
            write_elem(group, key, _categorical(values, sizes))
    write_elem(group, "n_counts", np.concatenate([p.n_counts for p in parts]))
    write_elem(group, "n_features", np.concatenate([p.n_features for p in parts]))
    _write_strings(group, "_index", (np.asarray(p.cell_names(), dtype=object) for p in parts),
                   n_cells)
    group.attrs.update({"_index": "_index", "column-order": keys + ["n_counts", "n_features"],
                        "encoding-type": "dataframe", "encoding-version": "0.2.0"})


def _write_strings(group, name: str, pieces, n: int) -> None:
    """An anndata string array written piece by piece (pieces: object arrays of str), with
    the data type anndata gives them (zarr's VariableLengthUTF8: `dtype=str` reads back as
    another dtype under pandas 3)."""
    from zarr.core.dtype import VariableLengthUTF8

    arr = group.create_array(name, shape=(n,), dtype=VariableLengthUTF8(),
                             chunks=(min(STRING_CHUNK, n),))
    pos = 0
    for piece in pieces:
        arr[pos:pos + len(piece)] = piece
        pos += len(piece)
    arr.attrs.update({"encoding-type": "string-array", "encoding-version": "0.2.0"})


def _str_column_is_nullable() -> bool:
    """Whether pandas makes a column of str a StringArray (pandas >= 3), which anndata writes
    as a nullable-string-array (values + mask), not a string-array."""
    return isinstance(pd.Series(np.array(["a"], dtype=object))._values, pd.arrays.StringArray)


def _write_str_column(group, name: str, pieces, n: int) -> None:
    """A DataFrame column of str (no missing values), piece by piece, in the encoding anndata
    gives the column pandas builds from those strings."""
    if not _str_column_is_nullable():
        _write_strings(group, name, pieces, n)
        return
    sub = group.create_group(name)
    _write_strings(sub, "values", pieces, n)
    mask = sub.create_array("mask", shape=(n,), dtype=bool, chunks=(min(STRING_CHUNK, n),),
                            fill_value=False)
    mask[:] = np.zeros(n, dtype=bool)  # written (a byte a cell), not left to the fill value
    mask.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    sub.attrs.update({"encoding-type": "nullable-string-array", "encoding-version": "0.1.0",
                      "na-value": "NaN"})


def _duplicate_name(parts: list[_ObsPart]) -> str | None:
    """The first cell name (in the order of a sort) that occurs twice, or None. On UTF-8
    bytes (~40 B a cell), not a hash table of Python strings."""
    names = np.concatenate([np.char.encode(np.asarray(p.cell_names(), dtype=str), "utf-8")
                            for p in parts])
    names.sort()
    same = np.flatnonzero(names[1:] == names[:-1])
    return names[same[0]].decode("utf-8") if len(same) else None


def _per_cell_all(values: list, sizes: list[int]) -> np.ndarray:
    return np.concatenate([_per_cell(v, n) for v, n in zip(values, sizes, strict=True)])


def _per_cell(value, n: int) -> np.ndarray:
    if np.ndim(value) == 0:
        return np.full(n, value, dtype=object)
    return np.asarray(value, dtype=object)


def _categorical(values: list, sizes: list[int]) -> pd.Categorical:
    """Strings of the values as a categorical; a value per sample costs 1 byte a cell."""
    if any(np.ndim(v) for v in values):  # per-cell values: build the strings
        strings = pd.Series(_per_cell_all(values, sizes)).astype(str)
        return pd.Categorical(strings, categories=list(dict.fromkeys(strings)))
    kept = [(str(v), n) for v, n in zip(values, sizes, strict=True) if n]
    categories = list(dict.fromkeys(v for v, _ in kept))
    codes = np.repeat([categories.index(v) for v, _ in kept], [n for _, n in kept])
    return pd.Categorical.from_codes(codes, categories=categories)


def _concat(parts: list[np.ndarray], dtype) -> np.ndarray:
    if not parts:
        return np.zeros(0, dtype=dtype)
    return parts[0] if len(parts) == 1 else np.concatenate(parts).astype(dtype, copy=False)


def _grow(a: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([a, np.zeros(n - len(a), dtype=a.dtype)]) if len(a) < n else a


def _remove_stale_tmp(path: Path) -> None:
    """Delete temporary stores left by killed ingests (their process is gone)."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
