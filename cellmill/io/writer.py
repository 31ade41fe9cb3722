"""Build a store sample by sample: memory is one sample plus one chunk buffer."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

from cellmill.errors import InputError
from cellmill.io.store import (
    CHUNK_NNZ,
    DEFAULT_BLOCK_CELLS,
    GRANULE,
    Store,
    _empty_dict_group,
    codec,
    write_json_atomic,
)
from cellmill.kernels.ingest import remap_and_count


class _Appender:
    """Append to a 1-d zarr array, writing whole chunks only (no read-modify-write)."""

    def __init__(self, group: zarr.Group, name: str, dtype, chunk: int):
        self.arr = group.create_array(name, shape=(0,), dtype=dtype, chunks=(chunk,),
                                      compressors=codec())
        self.chunk = chunk
        self.buf: list[np.ndarray] = []
        self.buffered = 0
        self.written = 0

    def append(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=self.arr.dtype)
        if self.buffered:  # complete the pending partial chunk first
            take = min(self.chunk - self.buffered, len(values))
            self.buf.append(values[:take].copy())
            self.buffered += take
            values = values[take:]
            if self.buffered < self.chunk:
                return
            self._write(np.concatenate(self.buf))
            self.buf, self.buffered = [], 0
        n = (len(values) // self.chunk) * self.chunk
        if n:  # whole chunks straight from the caller's array, no copy of the sample
            self._write(values[:n])
        if len(values) > n:
            self.buf = [values[n:].copy()]
            self.buffered = len(values) - n

    def _write(self, values: np.ndarray) -> None:
        self.arr.resize((self.written + len(values),))
        self.arr[self.written: self.written + len(values)] = values
        self.written += len(values)

    def close(self) -> None:
        if self.buffered:
            self._write(np.concatenate(self.buf))
            self.buf, self.buffered = [], 0


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
        self.data = _Appender(x, "data", np.int32, CHUNK_NNZ)
        self.indices = _Appender(x, "indices", np.int32, CHUNK_NNZ)
        self.indptr = [np.zeros(1, dtype=np.int64)]
        self.nnz = 0
        self.gene_index: dict[str, int] = {}
        self.var_rows: list[dict] = []
        self.gene_cells = np.zeros(0, dtype=np.int64)
        self.gene_counts = np.zeros(0, dtype=np.int64)
        self.obs_parts: list[pd.DataFrame] = []
        self.n_cells = 0
        self.sample_genes: list[tuple[str, set]] = []

    def add_sample(self, sample_name: str, sample, metadata: dict | None = None,
                   prefix_cells: bool = True) -> None:
        counts = sample.counts
        n, _ = counts.shape
        names = list(sample.var.index)
        cols = np.empty(len(names), dtype=np.int64)
        for j, name in enumerate(names):
            col = self.gene_index.get(name)
            if col is None:
                col = len(self.gene_index)
                self.gene_index[name] = col
                row = {"gene": name}
                row.update({c: sample.var.iloc[j][c] for c in sample.var.columns})
                self.var_rows.append(row)
            cols[j] = col
        self.sample_genes.append((sample_name, set(names)))
        n_union = len(self.gene_index)
        self.gene_cells = _grow(self.gene_cells, n_union)
        self.gene_counts = _grow(self.gene_counts, n_union)
        indices, n_counts, n_features = remap_and_count(
            counts.data, counts.indices, counts.indptr, cols.astype(np.int32),
            self.gene_cells, self.gene_counts)
        data = counts.data.astype(np.int32, copy=False)
        indptr = counts.indptr.astype(np.int64, copy=False)
        if len(cols) > 1 and np.any(np.diff(cols) < 0):
            # this sample lists genes in another order than the study: re-sort each row
            m = sp.csr_matrix((data, indices, indptr), shape=(n, n_union))
            m.sort_indices()
            data, indices = m.data.astype(np.int32, copy=False), m.indices
            del m
        self.data.append(data)
        self.indices.append(indices.astype(np.int32, copy=False))
        self.indptr.append(indptr[1:] + self.nnz)
        self.nnz += len(data)
        barcodes = np.asarray(sample.barcodes).astype(str)
        cells = [f"{sample_name}_{b}" for b in barcodes] if prefix_cells else list(barcodes)
        obs = pd.DataFrame({"barcode": barcodes, "sample": sample_name}, index=cells)
        for k, v in (metadata or {}).items():
            obs[k] = v
        obs["n_counts"] = n_counts
        obs["n_features"] = n_features
        self.obs_parts.append(obs)
        self.n_cells += n

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
        obs = pd.concat(self.obs_parts)
        if obs.index.has_duplicates:
            dup = obs.index[obs.index.duplicated()][0]
            raise InputError(self.path, f"duplicate cell name {dup!r}")
        for c in obs.columns:
            if c not in ("n_counts", "n_features", "barcode"):
                obs[c] = pd.Categorical(obs[c].astype(str),
                                        categories=list(dict.fromkeys(obs[c].astype(str))))
        var = pd.DataFrame(self.var_rows).set_index("gene")
        var.index.name = None
        var["n_cells"] = self.gene_cells
        var["total_counts"] = self.gene_counts
        write_elem(self.root, "obs", obs)
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
