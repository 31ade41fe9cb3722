"""Streaming writer of Cell Ranger v3 feature-barcode HDF5 files (what `cellranger count` writes as
filtered_feature_bc_matrix.h5): features x barcodes CSC in matrix/{data,indices,indptr,shape,
barcodes} and matrix/features/{_all_tag_keys,feature_type,genome,id,name}.

Output is byte-identical for identical input: no timestamps (track_times=False), fixed chunking,
gzip level 4 with shuffle like Cell Ranger, fixed-length byte strings, the same append sequence.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

CHUNK = 80_000  # Cell Ranger's chunk length for matrix/{data,indices,indptr}
GZIP = dict(compression="gzip", compression_opts=4)


def _fixed_bytes(values) -> np.ndarray:
    arr = np.array([str(v).encode("ascii") for v in values])
    if arr.size == 0:
        arr = np.array([], dtype="S1")
    return arr


def feature_arrays(gene_ids, gene_names, genome: str = "mm10") -> dict[str, np.ndarray]:
    """matrix/features columns as fixed-length byte strings (built once, shared by all samples)."""
    n = len(gene_ids)
    return {"id": _fixed_bytes(gene_ids), "name": _fixed_bytes(gene_names),
            "feature_type": np.array([b"Gene Expression"] * n),
            "genome": np.array([genome.encode("ascii")] * n)}


def _string_dataset(group, name, arr: np.ndarray):
    chunk = max(1, min(arr.size, max(1, 8192 // arr.dtype.itemsize)))
    group.create_dataset(name, data=arr, chunks=(chunk,), maxshape=(None,), track_times=False,
                         **GZIP)


class TenxWriter:
    """Write one sample's matrix cell by cell (columns in order) without holding it in memory.

    Written under a temporary name and renamed on close(), so a crash leaves no complete-looking
    file.
    """

    def __init__(self, path, features: dict[str, np.ndarray], barcodes, library_id: str):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".partial")
        self.n_genes = len(features["id"])
        self.n_cells = len(barcodes)
        self.f = h5py.File(self.tmp, "w", track_order=False)
        f = self.f
        f.attrs["chemistry_description"] = np.bytes_("Single Cell 3' v3")
        f.attrs["filetype"] = np.bytes_("matrix")
        f.attrs["library_ids"] = np.array([library_id.encode("ascii")])
        f.attrs["original_gem_groups"] = np.array([1], dtype=np.int64)
        f.attrs["software_version"] = np.bytes_("cellmill-simulate")
        f.attrs["version"] = np.int64(2)
        m = f.create_group("matrix", track_order=False)
        _string_dataset(m, "barcodes", _fixed_bytes(barcodes))
        num = dict(chunks=(CHUNK,), maxshape=(None,), track_times=False, shuffle=True, **GZIP)
        self.data = m.create_dataset("data", shape=(0,), dtype=np.int32, **num)
        self.indices = m.create_dataset("indices", shape=(0,), dtype=np.int64, **num)
        self.m = m
        feats = m.create_group("features", track_order=False)
        feats.create_dataset("_all_tag_keys", data=np.array([b"genome"]), track_times=False)
        for name in ("feature_type", "genome", "id", "name"):
            _string_dataset(feats, name, features[name])
        self.indptr = [np.zeros(1, dtype=np.int64)]
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.n_pending = 0
        self.flushed = 0
        self.nnz = 0
        self.cells_written = 0

    def append(self, indptr, indices, data):
        """Append cells: indptr (n+1, starting at 0), gene indices and counts of those cells."""
        n_new = indices.shape[0]
        if n_new:
            self.pending.append((indices, data))
            self.n_pending += n_new
        self.indptr.append(indptr[1:].astype(np.int64) + self.nnz)
        self.nnz += n_new
        self.cells_written += indptr.shape[0] - 1
        if self.n_pending >= CHUNK:
            self._flush(final=False)

    def _flush(self, final: bool):
        """Write whole chunks only (each chunk is compressed once); keep the rest for later."""
        n_write = self.n_pending if final else (self.n_pending // CHUNK) * CHUNK
        if n_write == 0:
            return
        idx = np.concatenate([a for a, _ in self.pending])
        dat = np.concatenate([b for _, b in self.pending])
        start, stop = self.flushed, self.flushed + n_write
        self.data.resize((stop,))
        self.data[start:stop] = dat[:n_write].astype(np.int32, copy=False)
        self.indices.resize((stop,))
        self.indices[start:stop] = idx[:n_write].astype(np.int64, copy=False)
        self.flushed = stop
        self.n_pending -= n_write
        self.pending = [(idx[n_write:], dat[n_write:])] if self.n_pending else []

    def close(self):
        if self.cells_written != self.n_cells:
            raise RuntimeError(f"{self.path}: wrote {self.cells_written} of {self.n_cells} cells")
        self._flush(final=True)
        indptr = np.concatenate(self.indptr)
        self.m.create_dataset("indptr", data=indptr, chunks=(min(CHUNK, indptr.size),),
                              maxshape=(None,), track_times=False, shuffle=True, **GZIP)
        self.m.create_dataset("shape", data=np.array([self.n_genes, self.n_cells], np.int32),
                              chunks=(2,), maxshape=(None,), track_times=False, shuffle=True,
                              **GZIP)
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self):
        try:
            self.f.close()
        finally:
            self.tmp.unlink(missing_ok=True)
