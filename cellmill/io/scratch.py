"""Raw scratch files for stages whose O(cells x k) intermediates go to disk (the streamed UMAP):
bucket files appended a chunk at a time, and a CSR graph read back a block of rows at a time.
Arrays in native byte order; the directory is the caller's to make and remove."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def scratch_dir(near: Path, what: str) -> Path:
    """A scratch folder beside `near` (e.g. the store), not inside it: the store stays a clean
    Zarr/AnnData tree while the scratch exists."""
    return Path(near).with_name(f"{Path(near).name}.{what}-scratch")


def group_rows(bucket_of_row: np.ndarray, n: int, **arrays) -> tuple:
    """The arrays' rows grouped by bucket (0..n-1, rows keeping their order within a bucket)
    and where each bucket's rows start (n + 1 cuts): Buckets.append's sort, which a worker
    can do before handing the rows to the one that writes them."""
    order = np.argsort(bucket_of_row, kind="stable")
    cuts = np.searchsorted(bucket_of_row[order], np.arange(n + 1))
    return cuts, {name: arr[order] for name, arr in arrays.items()}


class Buckets:
    """Append-only raw files, one set per block of rows."""

    def __init__(self, root: Path, prefix: str, n_buckets: int, fields: dict):
        self.root, self.prefix, self.fields = root, prefix, fields
        self.n = n_buckets
        self.files = {(b, f): open(self._path(b, f), "wb")
                      for b in range(n_buckets) for f in fields}

    def _path(self, b: int, field: str) -> Path:
        return self.root / f"{self.prefix}{b}.{field}"

    def append(self, bucket_of_row: np.ndarray, **arrays) -> None:
        self.append_grouped(*group_rows(bucket_of_row, self.n, **arrays))

    def append_grouped(self, cuts: np.ndarray, arrays: dict) -> None:
        """Append rows already grouped by bucket (group_rows: bucket b's are cuts[b]..cuts[b+1])."""
        for name, arr in arrays.items():
            for b in np.flatnonzero(cuts[1:] > cuts[:-1]):
                arr[cuts[b]:cuts[b + 1]].tofile(self.files[(b, name)])

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def read(self, b: int, fields=None) -> dict:
        """Bucket b's arrays (all, or those named in `fields`), their files deleted."""
        out = {}
        for name, (dtype, width) in self.fields.items():
            if fields is not None and name not in fields:
                continue
            path = self._path(b, name)
            arr = np.fromfile(path, dtype=dtype)
            out[name] = arr.reshape(-1, width) if width > 1 else arr
            path.unlink()
        return out


class DiskGraph:
    """A sparse n x n graph as CSR: indptr in memory, column indices (int32) and weights
    (float32) in two raw files, read a block of rows at a time."""

    def __init__(self, root: Path, n: int, rows: int):
        self.n, self.rows = n, rows
        self.indptr = np.zeros(n + 1, dtype=np.int64)
        self.cols_path, self.vals_path = root / "graph.cols", root / "graph.vals"
        self.w_max = 0.0
        self._held = None  # (cols, vals) once `hold` has read them into memory

    def nbytes(self) -> int:
        """Bytes of the column indices and weights."""
        return 8 * int(self.indptr[-1])

    def hold(self, max_bytes: int) -> bool:
        """Read the whole graph into memory when it takes at most max_bytes, so that every
        later `blocks()` is a view instead of a read (the same blocks either way)."""
        if self._held is None and self.nbytes() <= max_bytes:
            self._held = (np.fromfile(self.cols_path, dtype=np.int32),
                          np.fromfile(self.vals_path, dtype=np.float32))
        return self._held is not None

    def write(self, blocks) -> None:
        """Fill from (r0, local indptr, cols, vals) blocks given in row order."""
        with open(self.cols_path, "wb") as fc, open(self.vals_path, "wb") as fv:
            for r0, ptr, cols, vals in blocks:
                self.indptr[r0 + 1:r0 + len(ptr)] = self.indptr[r0] + ptr[1:]
                cols.astype(np.int32).tofile(fc)
                vals.astype(np.float32).tofile(fv)
                if len(vals):
                    self.w_max = max(self.w_max, float(vals.max()))

    def blocks(self, rows: int = 0):
        """(r0, local indptr, cols, vals, position of the first entry) per block of rows
        (`rows` of them, or the graph's own block size). Streamed, a block's arrays are views
        of the files mapped (``Mapped``), whose pages are handed back when the next block is
        taken: reading the files into fresh arrays ran at ~2 GB/s, a mapped page costs a
        minor fault. The arrays stay valid (pages come back from the page cache)."""
        rows = rows or self.rows
        starts = list(range(0, self.n, rows))
        if self._held is not None:
            cols, vals = self._held
        else:
            nnz = int(self.indptr[-1])
            cols_m = Mapped(self.cols_path, np.int32, (nnz,))
            vals_m = Mapped(self.vals_path, np.float32, (nnz,))
            cols, vals = cols_m.array, vals_m.array
        taken = None
        for r0 in starts:
            r1 = min(r0 + rows, self.n)
            a, b = int(self.indptr[r0]), int(self.indptr[r1])
            if taken is not None:
                cols_m.release(4 * taken[0], 4 * taken[1])
                vals_m.release(4 * taken[0], 4 * taken[1])
            yield r0, self.indptr[r0:r1 + 1] - a, cols[a:b], vals[a:b], a
            if self._held is None:
                taken = (a, b)
        if taken is not None:
            cols_m.release()
            vals_m.release()

    def to_csr(self):
        """The whole graph in memory (scipy CSR)."""
        import scipy.sparse as sp

        parts = [(c, v) for _, _, c, v, _ in self.blocks()]
        cols = np.concatenate([c for c, _ in parts]) if parts else np.empty(0, np.int32)
        vals = np.concatenate([v for _, v in parts]) if parts else np.empty(0, np.float32)
        return sp.csr_matrix((vals, cols, self.indptr.copy()), shape=(self.n, self.n))


def write_raw(path: Path, arr: np.ndarray, offset: int = 0) -> None:
    """arr's bytes into the file `path` at byte `offset` (the file made if missing)."""
    import os

    view = memoryview(np.ascontiguousarray(arr)).cast("B")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        done = 0
        while done < len(view):  # pwrite may write less than asked
            done += os.pwrite(fd, view[done:], offset + done)
    finally:
        os.close(fd)


def sized_raw(path: Path, nbytes: int) -> None:
    """A raw file of `nbytes` (zeros, not written: sparse), made or cut to that size."""
    with open(path, "wb") as f:
        f.truncate(nbytes)


def read_raw(path: Path, dtype, count: int, offset: int = 0) -> np.ndarray:
    """`count` values of `dtype` from the file `path`, from byte `offset`."""
    return np.fromfile(path, dtype=dtype, count=count, offset=offset)


def read_raw_into(path: Path, out: np.ndarray, offset: int = 0) -> np.ndarray:
    """Fill `out` (C-contiguous) with the bytes of the file `path` from byte `offset`."""
    view = memoryview(out).cast("B")
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        done = 0
        while done < len(view):
            got = f.readinto(view[done:])
            if not got:
                raise EOFError(f"{path}: ends before byte {offset + len(view)}")
            done += got
    return out


RELEASE_SPAN = 1 << 21  # Mapped.release's unit (a multiple of the page size)


class Mapped:
    """A raw scratch file mapped read-only as an array (a private mapping: writable in numpy's
    and Numba's eyes, nothing written back). `release(start, stop)` drops the pages of a byte
    range from this process's address space; they stay in the page cache (evicted under
    pressure and read again when needed), so the process holds what it touched since, not
    the file: for lists read a part at a time (the SNN graph's reverse lists). Pickled, it
    maps its file again (a worker process on the same file system)."""

    def __init__(self, path: Path, dtype, shape: tuple):
        import mmap

        self.path, self.dtype, self.shape = Path(path), np.dtype(dtype), tuple(shape)
        size = int(np.prod(shape)) * self.dtype.itemsize
        self._mm = None
        if size == 0:
            self.array = np.zeros(shape, dtype=dtype)
            return
        with open(path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
        self.array = np.frombuffer(self._mm, dtype=dtype).reshape(shape)

    def __reduce__(self):  # a worker process maps the file itself (a shared file system)
        return Mapped, (self.path, self.dtype, self.shape)

    def release(self, start: int = 0, stop: int | None = None) -> None:
        """Hand back the pages of bytes start..stop (default: all) of the file, widened to
        whole 2 MB spans: the kernel may map a file's page cache 2 MB at a time (large
        folios), and handing back part of one leaves the rest of it mapped."""
        import mmap

        if self._mm is None or not hasattr(mmap, "MADV_DONTNEED"):  # (not on Windows)
            return
        size = len(self._mm)
        start -= start % RELEASE_SPAN
        stop = size if stop is None else min(-(-int(stop) // RELEASE_SPAN) * RELEASE_SPAN, size)
        if stop > start:
            self._mm.madvise(mmap.MADV_DONTNEED, start, stop - start)
