"""Fast ranged reads of the store's 1-D count arrays (X/data, X/indices and the gene-major copy).

zarr-python 3 reads a range through its asyncio machinery: measured at ~110M nonzeros/s for
X/data, against ~400M/s for the Blosc decompression alone on one core, and its many small
objects keep the garbage collector busy. The store's count arrays have the simplest Zarr v3
layout (regular 1-D chunks, default "c/<i>" keys, the `bytes` codec then `blosc`, no
sharding), so a range is read here chunk file by chunk file and decompressed straight into the
output. Any other layout, or a store that is not a local directory, is read by zarr itself.
Missing chunk files are the fill value, as in zarr.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

_DTYPES = {"int32": np.int32, "int64": np.int64, "float32": np.float32, "float64": np.float64,
           "uint32": np.uint32, "uint16": np.uint16, "int16": np.int16}


class RangeReader:
    """arr[a:b] of a 1-D Zarr v3 array at `path` (a directory), decoded without zarr."""

    def __init__(self, path: Path):
        self.path = Path(path)
        meta = json.loads((self.path / "zarr.json").read_text())
        self.direct = _simple_layout(meta)
        self.shape = int(meta["shape"][0])
        if self.direct:
            self.dtype = np.dtype(_DTYPES[meta["data_type"]]).newbyteorder("<")
            self.chunk = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
            self.fill = meta.get("fill_value") or 0
            sep = meta["chunk_key_encoding"]["configuration"].get("separator", "/")
            self._key = (lambda i: f"c{sep}{i}")
        self._zarr = None

    def __getitem__(self, sl: slice) -> np.ndarray:
        return self.read(sl)

    def read(self, sl: slice, out: np.ndarray | None = None) -> np.ndarray:
        """arr[sl], into the start of `out` when given (its dtype, and long enough); a reused
        buffer spares the page faults of fresh memory: a range past glibc's mmap threshold
        (32 MB) is otherwise new pages every time."""
        a, b, step = sl.indices(self.shape)
        if step != 1:
            raise ValueError("RangeReader reads contiguous ranges only")
        if out is not None:
            out = out[: max(0, b - a)]
        if not self.direct:
            if out is None:
                return self._zarr_array()[a:b]
            out[:] = self._zarr_array()[a:b]
            return out
        if out is None:
            out = np.empty(max(0, b - a), dtype=self.dtype)
        if b <= a:
            return out
        from numcodecs import blosc

        c = self.chunk
        for i in range(a // c, (b - 1) // c + 1):
            lo, hi = max(a, i * c), min(b, (i + 1) * c)
            dst = out[lo - a: hi - a]
            f = self.path / self._key(i)
            try:
                raw = f.read_bytes()
            except FileNotFoundError:
                dst[:] = self.fill
                continue
            if lo == i * c and hi == (i + 1) * c:
                blosc.decompress(raw, dst)  # a whole chunk: straight into the output
            else:
                whole = np.frombuffer(blosc.decompress(raw), dtype=self.dtype)
                dst[:] = whole[lo - i * c: hi - i * c]
        return out

    def _zarr_array(self):
        if self._zarr is None:
            import zarr

            self._zarr = zarr.open_array(self.path, mode="r")
        return self._zarr


def _simple_layout(meta: dict) -> bool:
    try:
        codecs = meta["codecs"]
        return (meta.get("zarr_format") == 3 and meta.get("node_type") == "array"
                and len(meta["shape"]) == 1 and meta["data_type"] in _DTYPES
                and meta["chunk_grid"]["name"] == "regular"
                and meta["chunk_key_encoding"]["name"] == "default"
                and not meta.get("storage_transformers")
                and len(codecs) == 2 and codecs[0]["name"] == "bytes"
                and codecs[0].get("configuration", {}).get("endian", "little") == "little"
                and codecs[1]["name"] == "blosc")
    except (KeyError, TypeError, IndexError):
        return False
