"""The study store: one AnnData-compatible Zarr v3 directory.

Layout (anndata's on-disk spec, so `anndata.read_zarr` opens it):
  X/{data,indices,indptr}    raw counts, CSR, int32 data/indices, int64 indptr
  obs/, var/                 dataframes (anndata encoding)
  obsm/, varm/, obsp/, layers/ (layers/counts_gene_major: the CSC copy for rank tests)
  uns/cellmill/blocks        cell offsets of the storage blocks (multiples of GRANULE cells)
  uns/cellmill (attributes)  store format version, stage completion records
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
from zarr.codecs import BloscCodec

from cellmill.errors import InputError
from cellmill.io import faults

# Reductions combine per-granule partial sums in cell order; block sizes are multiples of it,
# so results do not depend on how cells are grouped into blocks.
GRANULE = 1024
# Nonzeros per chunk of X/data and X/indices. Small relative to a block (a block holds
# millions of nonzeros), so a block read decodes its own chunks plus at most one shared
# chunk at each edge.
CHUNK_NNZ = 1 << 18
DEFAULT_BLOCK_CELLS = 4 * GRANULE
# Version of this layout. A store of another format (or none: not written by cellmill) is
# refused with what to do, never read by guesswork. Bump it when the layout changes.
FORMAT = 1
GENE_MAJOR = "counts_gene_major"

# anndata's writer leaves sharding to zarr's default; the store chooses its chunks itself
warnings.filterwarnings("ignore", message=".*autosharding.*", category=UserWarning)


def codec():
    # Chosen by measurement (benchmarks/bench_codecs.py, 40M nonzeros): Blosc-LZ4 with bit
    # shuffle gave the fastest decode of the compressed options (~210M nnz/s vs ~130M for
    # Zstd-3, 235M uncompressed) at the smallest size but one (1.8 bytes/nnz vs 8 raw).
    return BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")


def _attrs_path(group_dir: Path) -> Path:
    return group_dir / "zarr.json"


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default))
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def _swap_dir(new: Path, final: Path) -> None:
    """Replace directory `final` by `new` so that one of them is always complete."""
    old = final.with_name(final.name + ".__old__")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    if old.exists():
        shutil.rmtree(old)


def _recover(root: Path) -> None:
    """Finish a swap interrupted by a crash: put back `x.__old__` where `x` is missing."""
    for old in root.rglob("*.__old__"):
        final = old.with_name(old.name[: -len(".__old__")])
        if final.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, final)
    for new in root.rglob("*.__new__"):
        shutil.rmtree(new, ignore_errors=True)


def _empty_dict_group(parent: zarr.Group, name: str) -> zarr.Group:
    g = parent.require_group(name)
    g.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
    return g


def write_sparse(parent: zarr.Group, name: str, m: sp.csr_matrix | sp.csc_matrix,
                 chunk: int = CHUNK_NNZ) -> None:
    """Write a scipy CSR/CSC matrix in anndata's sparse encoding (small matrices)."""
    kind = "csr_matrix" if sp.isspmatrix_csr(m) or isinstance(m, sp.csr_array) else "csc_matrix"
    g = parent.create_group(name, overwrite=True)
    g.attrs.update({"encoding-type": kind, "encoding-version": "0.1.0", "shape": list(m.shape)})
    nnz = max(int(m.nnz), 1)
    for key, arr in (("data", m.data), ("indices", m.indices.astype(np.int32)),
                     ("indptr", m.indptr.astype(np.int64))):
        a = g.create_array(key, shape=arr.shape, dtype=arr.dtype,
                           chunks=(min(chunk, max(nnz, len(arr), 1)),), compressors=codec())
        if arr.size:
            a[:] = arr


def _write_dense(parent: zarr.Group, name: str, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr)
    rows = max(1, min(arr.shape[0], max(1, (8 << 20) // max(1, arr[0:1].nbytes))))
    a = parent.create_array(name, shape=arr.shape, dtype=arr.dtype,
                            chunks=(rows,) + arr.shape[1:], compressors=codec(), overwrite=True)
    a.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    if arr.size:
        a[...] = arr


class StoreError(InputError):
    """A folder that holds a Zarr store cellmill cannot use (another writer, another format)."""


def check_format(path: Path) -> None:
    """Raise StoreError unless `path` is a store of this cellmill's FORMAT."""
    try:
        meta = json.loads((path / "uns" / "cellmill" / "zarr.json").read_text())
    except FileNotFoundError:
        raise StoreError(path, "a Zarr store not written by cellmill (no uns/cellmill); "
                         "cellmill runs on stores it wrote: save the data as .h5ad and run "
                         "`cellmill ingest FILE.h5ad -o NEW.zarr`") from None
    except (OSError, ValueError) as e:
        raise StoreError(path, f"store metadata unreadable ({e})") from None
    fmt = meta.get("attributes", {}).get("format")
    if fmt != FORMAT:
        made = "an older cellmill (no format version)" if fmt is None else f"format {fmt}"
        raise StoreError(path, f"store written by {made}; this cellmill reads format "
                         f"{FORMAT}: ingest the input files again into a new store "
                         "(`cellmill ingest ... -o NEW.zarr`, or remove this one)")


class Store:
    """An open study store. Cheap to create and to pickle (it holds only the path)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "zarr.json").exists():
            if not self.path.exists():
                raise FileNotFoundError(f"{self.path}: not a cellmill store")
            what = "a Zarr v2 store" if (self.path / ".zgroup").exists() else "not a Zarr store"
            raise StoreError(self.path, f"{what}, not written by cellmill; cellmill runs on "
                             "stores it wrote: save the data as .h5ad and run "
                             "`cellmill ingest FILE.h5ad -o NEW.zarr`")
        if not (self.path / "X").exists():
            raise StoreError(self.path, "a Zarr store without counts (no X): not a "
                             "cellmill store")
        check_format(self.path)
        _recover(self.path)
        self._root = None

    # -- pickling: workers reopen the store from its path
    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.path = state["path"]
        self._root = None

    @property
    def root(self) -> zarr.Group:
        if self._root is None:
            self._root = zarr.open_group(self.path, mode="r+", zarr_format=3)
        return self._root

    def _x(self, key: str):
        return self.root["X"][key]

    def _ranged(self, *parts: str):
        """A reader of contiguous ranges of a 1-D count array (io/chunks.py: decoded without
        zarr's per-chunk overhead). Made per call: cheap, and never stale after a rewrite."""
        from cellmill.io.chunks import RangeReader

        return RangeReader(self.path.joinpath(*parts))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.root["X"].attrs["shape"])

    @property
    def n_cells(self) -> int:
        return self.shape[0]

    @property
    def n_genes(self) -> int:
        return self.shape[1]

    @property
    def nnz(self) -> int:
        n = self.n_cells
        return int(self._ranged("X", "indptr")[n: n + 1][0])

    @property
    def indptr(self) -> np.ndarray:
        return self._ranged("X", "indptr")[:]

    @property
    def blocks(self) -> np.ndarray:
        """Cell offsets of the storage blocks: block b holds cells blocks[b]:blocks[b+1]."""
        return self.root["uns"]["cellmill"]["blocks"][:]

    # -- dataframes
    def obs(self) -> pd.DataFrame:
        return self._read_df("obs")

    def var(self) -> pd.DataFrame:
        return self._read_df("var")

    def _read_df(self, key: str) -> pd.DataFrame:
        from anndata.io import read_elem

        return read_elem(zarr.open_group(self.path / key, mode="r", zarr_format=3))

    def write_df(self, key: str, df: pd.DataFrame) -> None:
        """Replace obs or var atomically."""
        from anndata.io import write_elem

        new = key + ".__new__"
        shutil.rmtree(self.path / new, ignore_errors=True)
        write_elem(self.root, new, df)
        _swap_dir(self.path / new, self.path / key)
        self._root = None
        faults.wrote()

    def obs_column(self, name: str):
        """One obs column (numpy array or pandas Categorical) without reading the others:
        the whole obs holds every cell name as a Python string (~150 MB at 400k cells)."""
        from anndata.io import read_elem

        if name not in self._obs_attrs().get("column-order", []):
            raise KeyError(f"{self.path}: obs has no column {name!r}")
        return read_elem(zarr.open_group(self.path, mode="r", zarr_format=3)["obs"][name])

    def obs_names(self, start: int = 0, stop: int | None = None) -> pd.Index:
        """Cell names (all, or cells start:stop: a table can be written in pieces)."""
        obs = zarr.open_group(self.path / "obs", mode="r", zarr_format=3)
        arr = obs[self._obs_attrs()["_index"]]
        stop = arr.shape[0] if stop is None else min(int(stop), arr.shape[0])
        return pd.Index(np.asarray(arr[int(start):stop]).astype(object))

    def obs_columns(self) -> list[str]:
        return list(self._obs_attrs().get("column-order", []))

    def _obs_attrs(self) -> dict:
        return json.loads(_attrs_path(self.path / "obs").read_text())["attributes"]

    def update_obs(self, **columns) -> None:
        """Add or replace obs columns one by one (each swapped in atomically, then listed in
        the column order), leaving the other columns and the cell names untouched."""
        from anndata.io import write_elem

        obs = self.root["obs"]
        for k, v in columns.items():
            if len(v) != self.n_cells:
                raise ValueError(f"obs column {k!r} has {len(v)} values for "
                                 f"{self.n_cells} cells")
            if k == self._obs_attrs()["_index"] or "/" in k or k.startswith("__"):
                raise ValueError(f"bad obs column name {k!r}")
            new = self.path / "obs" / (k + ".__new__")
            shutil.rmtree(new, ignore_errors=True)
            write_elem(obs, k + ".__new__", v)
            _swap_dir(new, self.path / "obs" / k)
            meta_path = _attrs_path(self.path / "obs")
            meta = json.loads(meta_path.read_text())
            order = meta["attributes"].setdefault("column-order", [])
            if k not in order:
                order.append(k)
                write_json_atomic(meta_path, meta)
            faults.wrote()
        self._root = None

    def update_var(self, **columns) -> None:
        df = self.var()
        for k, v in columns.items():
            df[k] = v
        self.write_df("var", df)

    # -- other elements (O(cells x small))
    def write_array(self, slot: str, name: str, arr: np.ndarray) -> None:
        """Write a dense array into obsm / varm / uns / layers atomically."""
        parent = _empty_dict_group(self.root, slot)
        shutil.rmtree(self.path / slot / (name + ".__new__"), ignore_errors=True)
        _write_dense(parent, name + ".__new__", arr)
        _swap_dir(self.path / slot / (name + ".__new__"), self.path / slot / name)
        self._root = None
        faults.wrote()

    def begin_array(self, slot: str, name: str, shape: tuple, dtype, chunk_rows: int,
                    fill_value=0) -> Path:
        """Create slot/name under a temporary name for writers that fill it in row chunks
        (workers open the returned path with zarr.open_array); `commit_array` swaps it in."""
        parent = _empty_dict_group(self.root, slot)
        tmp = name + ".__new__"
        shutil.rmtree(self.path / slot / tmp, ignore_errors=True)
        a = parent.create_array(tmp, shape=shape, dtype=dtype,
                                chunks=(max(1, min(int(chunk_rows), shape[0])),) + shape[1:],
                                compressors=codec(), fill_value=fill_value, overwrite=True)
        a.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        self._root = None
        return self.path / slot / tmp

    def commit_array(self, slot: str, name: str) -> None:
        _swap_dir(self.path / slot / (name + ".__new__"), self.path / slot / name)
        self._root = None
        faults.wrote()

    def sparse_writer(self, slot: str, name: str, shape: tuple[int, int],
                      dtype=np.float64) -> SparseRowWriter:
        """Write a CSR matrix into slot/name a block of rows at a time (see SparseRowWriter)."""
        return SparseRowWriter(self, slot, name, shape, dtype)

    def read_array(self, slot: str, name: str) -> np.ndarray:
        return self.root[slot][name][...]

    def has(self, slot: str, name: str) -> bool:
        return (self.path / slot / name / "zarr.json").exists()

    def remove(self, slot: str, name: str) -> None:
        """Remove slot/name if present (an earlier run's result that this run does not make)."""
        target = self.path / slot / name
        if target.exists():
            shutil.rmtree(target)
            self._root = None
            faults.wrote()

    def write_sparse(self, slot: str, name: str, m) -> None:
        parent = _empty_dict_group(self.root, slot)
        shutil.rmtree(self.path / slot / (name + ".__new__"), ignore_errors=True)
        write_sparse(parent, name + ".__new__", m)
        _swap_dir(self.path / slot / (name + ".__new__"), self.path / slot / name)
        self._root = None
        faults.wrote()

    def write_dataset(self, slot: str, name: str, ds, encoding: dict | None = None) -> None:
        """Write an xarray Dataset under slot/name (xarray's Zarr v3 layout) atomically.
        anndata.read_zarr reads it back as a dict of arrays; read_dataset as a Dataset."""
        _empty_dict_group(self.root, slot)
        ds = ds.copy()  # anndata's encoding labels, so anndata reads it without warnings
        # fixed-width numpy strings have no Zarr v3 spec: store variable-length strings
        ds = ds.assign({k: v.astype(object) for k, v in ds.data_vars.items()
                        if v.dtype.kind == "U"})
        ds = ds.assign_coords({k: v.astype(object) for k, v in ds.coords.items()
                               if v.dtype.kind == "U"})
        ds.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
        for v in ds.variables.values():
            kind = "string-array" if v.dtype.kind in "UOT" else "array"
            v.attrs.update({"encoding-type": kind, "encoding-version": "0.2.0"})
        new = self.path / slot / (name + ".__new__")
        shutil.rmtree(new, ignore_errors=True)
        ds.to_zarr(new, mode="w", zarr_format=3, consolidated=False, encoding=encoding)
        _swap_dir(new, self.path / slot / name)
        self._root = None
        faults.wrote()

    def read_dataset(self, slot: str, name: str):
        """An xarray Dataset written by write_dataset (lazy: dask-backed variables)."""
        import xarray as xr

        ds = xr.open_zarr(self.path / slot / name, consolidated=False, zarr_format=3)
        for v in ds.variables.values():
            v.attrs.pop("encoding-type", None)
            v.attrs.pop("encoding-version", None)
        for k in ("encoding-type", "encoding-version"):
            ds.attrs.pop(k, None)
        # numpy StringDType (how zarr returns strings) -> object, which pandas and str() take
        ds = ds.assign({k: v.astype(object) for k, v in ds.data_vars.items()
                        if v.dtype.kind == "T"})
        return ds.assign_coords({k: v.astype(object) for k, v in ds.coords.items()
                                 if v.dtype.kind == "T"})

    def sparse_indptr(self, slot: str, name: str) -> np.ndarray:
        return self._ranged(slot, name, "indptr")[:]

    def sparse_entries(self, slot: str, name: str, a: int, b: int):
        """Entries a:b (indices, data) of the sparse matrix slot/name, without the rest."""
        return self._ranged(slot, name, "indices")[a:b], self._ranged(slot, name, "data")[a:b]

    def read_sparse(self, slot: str, name: str):
        g = self.root[slot][name]
        kind = g.attrs["encoding-type"]
        cls = sp.csr_matrix if kind == "csr_matrix" else sp.csc_matrix
        return cls((g["data"][:], g["indices"][:], g["indptr"][:]), shape=tuple(g.attrs["shape"]))

    # -- stage records (attributes of uns/cellmill, replaced atomically)
    def _meta_path(self) -> Path:
        return _attrs_path(self.path / "uns" / "cellmill")

    def _meta(self) -> dict:
        return json.loads(self._meta_path().read_text())

    def stage_records(self) -> dict[str, dict]:
        return dict(self._meta().get("attributes", {}).get("stages", {}))

    def drop_stage_records(self, names) -> None:
        """Remove the records of `names` in one atomic write."""
        meta = self._meta()
        stages = meta.setdefault("attributes", {}).setdefault("stages", {})
        for n in names:
            stages.pop(n, None)
        write_json_atomic(self._meta_path(), meta)
        self._root = None

    def set_stage_record(self, name: str, record: dict | None) -> None:
        meta = self._meta()
        stages = meta.setdefault("attributes", {}).setdefault("stages", {})
        if record is None:
            stages.pop(name, None)
        else:
            stages[name] = record
        write_json_atomic(self._meta_path(), meta)
        self._root = None

    # -- reading counts
    def read_rows(self, start: int, stop: int, genes: np.ndarray | None = None,
                  indptr: np.ndarray | None = None, buffers=None) -> sp.csr_matrix:
        """Cells start:stop as CSR (counts); optionally only the given gene columns.
        `buffers`: an object with `.get(name, n, dtype)` giving reusable arrays for the data
        and indices (the result then lives in them until the next read with the same ones)."""
        if indptr is None:
            ip = self._ranged("X", "indptr")[start: stop + 1]
        else:
            ip = indptr[start: stop + 1]
        a, b = int(ip[0]), int(ip[-1])
        rd, ri = self._ranged("X", "data"), self._ranged("X", "indices")
        if buffers is None:
            data, indices = rd[a:b], ri[a:b]
        else:
            data = rd.read(slice(a, b), buffers.get("data", b - a, rd.dtype))
            indices = ri.read(slice(a, b), buffers.get("indices", b - a, ri.dtype))
        m = sp.csr_matrix((data, indices, ip - a), shape=(stop - start, self.n_genes))
        if genes is not None:
            m = m[:, genes]
        return m

    def block_ranges(self, block_cells: int | None = None) -> list[tuple[int, int]]:
        """Cell ranges for a pass. Default: the storage blocks. Otherwise ranges of
        `block_cells` cells, rounded to a multiple of GRANULE."""
        if block_cells is None:
            b = self.blocks
            return [(int(b[i]), int(b[i + 1])) for i in range(len(b) - 1)]
        step = max(GRANULE, (int(block_cells) // GRANULE) * GRANULE)
        n = self.n_cells
        return [(s, min(s + step, n)) for s in range(0, n, step)]

    def iter_blocks(self, mask: np.ndarray | None = None, genes: np.ndarray | None = None,
                    block_cells: int | None = None):
        """Yield (start, stop, csr) per block; with a mask, only the masked cells' rows
        (start/stop still refer to the unmasked cell range)."""
        indptr = self.indptr
        for start, stop in self.block_ranges(block_cells):
            m = self.read_rows(start, stop, genes, indptr)
            if mask is not None:
                m = m[np.flatnonzero(mask[start:stop])]
            yield start, stop, m

    def to_dask(self, mask: np.ndarray | None = None, genes: np.ndarray | None = None,
                block_cells: int | None = None):
        """The counts as a dask array of scipy CSR chunks (one per block), read by the workers."""
        import dask
        import dask.array as da

        ranges = self.block_ranges(block_cells)
        n_genes = self.n_genes if genes is None else len(genes)
        parts = []
        for start, stop in ranges:
            rows = stop - start if mask is None else int(np.count_nonzero(mask[start:stop]))
            sub = None if mask is None else mask[start:stop]
            part = dask.delayed(_read_block)(self, start, stop, genes, sub)
            meta = sp.csr_matrix((0, n_genes), dtype=np.int32)
            parts.append(da.from_delayed(part, shape=(rows, n_genes), dtype=np.int32, meta=meta))
        return da.concatenate(parts, axis=0)

    # -- the gene-major copy
    def has_gene_major(self) -> bool:
        return self.has("layers", GENE_MAJOR)

    def read_genes(self, g0: int, g1: int, indptr: np.ndarray | None = None) -> sp.csc_matrix:
        """Genes g0:g1 of the gene-major copy as CSC (all cells)."""
        if indptr is None:
            ip = self.root["layers"][GENE_MAJOR]["indptr"][g0: g1 + 1]
        else:
            ip = indptr[g0: g1 + 1]
        a, b = int(ip[0]), int(ip[-1])
        data = self._ranged("layers", GENE_MAJOR, "data")[a:b]
        indices = self._ranged("layers", GENE_MAJOR, "indices")[a:b]
        return sp.csc_matrix((data, indices, ip - a), shape=(self.n_cells, g1 - g0))

    def gene_major_indptr(self) -> np.ndarray:
        return self.root["layers"][GENE_MAJOR]["indptr"][:]


class Appender:
    """Append to a 1-d zarr array, writing whole chunks only (no read-modify-write).

    In a local directory store with this package's codec (bytes, little-endian, then Blosc),
    the chunks are compressed and written as files here, on a few threads, and the array's
    shape is set once at close(): zarr's own writes took twice the CPU, mostly serial, and
    resized the array (rewrote its metadata) at every write. The files are zarr's chunks byte
    for byte (tested); anything else goes through zarr."""

    def __init__(self, group: zarr.Group, name: str, dtype, chunk: int):
        self.arr = group.create_array(name, shape=(0,), dtype=dtype, chunks=(chunk,),
                                      compressors=codec())
        self.chunk = chunk
        self.buf: list[np.ndarray] = []
        self.buffered = 0
        self.written = 0
        self._direct = _direct_chunks(self.arr)

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
        if self._direct is None:
            self.arr.resize((self.written + len(values),))
            self.arr[self.written: self.written + len(values)] = values
        else:  # done before returning: the caller may reuse its array
            first = self.written // self.chunk
            pieces = [(first + j, values[a:a + self.chunk])
                      for j, a in enumerate(range(0, len(values), self.chunk))]
            list(_chunk_pool().map(lambda piece: self._direct(*piece), pieces))
        self.written += len(values)

    def close(self) -> None:
        if self.buffered:
            self._write(np.concatenate(self.buf))
            self.buf, self.buffered = [], 0
        if self._direct is not None and self.arr.shape[0] != self.written:
            self.arr.resize((self.written,))


_POOL = None


def _chunk_pool():
    """Threads compressing chunks (Blosc releases the GIL); the bytes do not depend on them."""
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max(2, min(8, os.cpu_count() or 2)),
                                   thread_name_prefix="cellmill-chunks")
    return _POOL


def _direct_chunks(arr: zarr.Array):
    """A function (chunk number, values) writing that chunk's file as zarr would, or None
    when the array is not one this code knows how to write (a remote store, other codecs,
    chunks that split a row). Chunk i holds rows i * chunk .. of every column."""
    import numcodecs
    from zarr.codecs import BytesCodec
    from zarr.storage import LocalStore

    def name(x):  # an enum member in some zarr versions, a str in others
        return str(getattr(x, "value", x))

    codecs = arr.metadata.codecs if arr.metadata.zarr_format == 3 else ()
    if (not isinstance(arr.store, LocalStore) or len(codecs) != 2 or arr.ndim < 1
            or tuple(arr.chunks[1:]) != tuple(arr.shape[1:])):
        return None
    raw, blosc = codecs
    if not (isinstance(raw, BytesCodec) and name(raw.endian) == "little"
            and isinstance(blosc, BloscCodec) and blosc.typesize == arr.dtype.itemsize):
        return None
    shuffle = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE,
               "bitshuffle": numcodecs.Blosc.BITSHUFFLE}[name(blosc.shuffle)]
    comp = numcodecs.Blosc(cname=name(blosc.cname), clevel=blosc.clevel, shuffle=shuffle,
                           blocksize=blosc.blocksize)
    root = Path(arr.store.root) / arr.path
    size = arr.chunks[0]
    dtype = arr.dtype.newbyteorder("<")
    fill = arr.metadata.fill_value
    rest = (0,) * (arr.ndim - 1)

    def put(i: int, values: np.ndarray) -> None:
        if len(values) < size:  # the last chunk: zarr pads it with the fill value
            full = np.full((size,) + tuple(arr.shape[1:]), fill, dtype=dtype)
            full[:len(values)] = values
            values = full
        path = root / arr.metadata.encode_chunk_key((i,) + rest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(comp.encode(np.ascontiguousarray(values, dtype=dtype)))

    return put


def write_row_chunk(arr: zarr.Array, start: int, values: np.ndarray) -> None:
    """Rows start.. of `arr`, one whole chunk of rows (the last may be short) starting on a
    chunk boundary: the chunk's file written here where _direct_chunks can (zarr's own write
    took ~10 ms a 1,024-row block on two busy threads), else through zarr."""
    put = _direct_chunks(arr)
    if put is None:
        arr[start:start + len(values)] = values
    else:
        put(start // arr.chunks[0], values)


class SparseRowWriter:
    """A CSR matrix written under slot/name.__new__ row block by row block: `append` the
    indices and values of consecutive rows (whole chunks go to disk as they fill), `commit`
    with the full indptr writes it and swaps the matrix in. Only one chunk is buffered."""

    def __init__(self, store: Store, slot: str, name: str, shape: tuple[int, int], dtype):
        self.store, self.slot, self.name, self.shape = store, slot, name, tuple(shape)
        parent = _empty_dict_group(store.root, slot)
        shutil.rmtree(store.path / slot / (name + ".__new__"), ignore_errors=True)
        self.group = parent.create_group(name + ".__new__", overwrite=True)
        self.data = Appender(self.group, "data", dtype, CHUNK_NNZ)
        self.indices = Appender(self.group, "indices", np.int32, CHUNK_NNZ)

    def append(self, indices: np.ndarray, data: np.ndarray) -> None:
        self.indices.append(indices)
        self.data.append(data)

    def commit(self, indptr: np.ndarray) -> None:
        self.data.close()
        self.indices.close()
        if self.indices.written != int(indptr[-1]):
            raise ValueError(f"{self.slot}/{self.name}: {self.indices.written} entries "
                             f"written, indptr says {int(indptr[-1])}")
        ip = self.group.create_array("indptr", shape=indptr.shape, dtype=np.int64,
                                     chunks=(min(len(indptr), 1 << 20),), compressors=codec())
        ip[:] = indptr
        self.group.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                                 "shape": list(self.shape)})
        self.store.commit_array(self.slot, self.name)


def _read_block(store: Store, start: int, stop: int, genes, sub_mask):
    m = store.read_rows(start, stop, genes)
    if sub_mask is not None:
        m = m[np.flatnonzero(sub_mask)]
    return m


def open_store(path: str | Path) -> Store:
    return Store(path)
