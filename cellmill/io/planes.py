"""Planes written a row at a time to raw scratch files and read back a window at a time: the
grouped statistics' finished groups (stages/statistics/grouped.py), so that the pass holds only
the groups it has not finished. Float64 in native byte order."""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np

from cellmill.io.scratch import scratch_dir


def new_folder(near: Path, what: str) -> Path:
    """A fresh folder of this process beside `near`: <near>.<what>-scratch-<pid>-<random> (a
    pid each, so that folders still in use are told from a killed run's)."""
    base = scratch_dir(near, what)
    return Path(tempfile.mkdtemp(prefix=f"{base.name}-{os.getpid()}-", dir=base.parent))


def remove_stale(near: Path, what: str) -> None:
    """Remove the new_folder folders beside `near` whose process is gone (killed mid-stage);
    a live process's (planes still in use) stay."""
    import psutil

    base = scratch_dir(near, what)
    for path in base.parent.glob(f"{base.name}-*"):
        pid = path.name[len(base.name) + 1:].split("-")[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


class RowPlanes:
    """Named (rows, cols) float64 planes in raw files, each row written once, in any order
    (`write_row`), and read back as array-likes a window at a time (`plane`: for
    dask.array.from_array). The folder is removed once this object and every plane read from
    it are gone, or at exit."""

    def __init__(self, root: Path, names, shape: tuple[int, int]):
        Path(root).mkdir(parents=True, exist_ok=True)
        self.root, self.shape = Path(root), (int(shape[0]), int(shape[1]))
        self._fds = {}
        self._finalizer = weakref.finalize(self, _remove_folder, self.root, self._fds)
        for name in names:
            fd = os.open(self.root / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds[name] = fd
            os.ftruncate(fd, 8 * self.shape[0] * self.shape[1])

    def write_row(self, name: str, row: int, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=np.float64)
        os.pwrite(self._fds[name], memoryview(values).cast("B"), 8 * row * self.shape[1])

    def close(self) -> None:
        """Writing done (the files stay until the planes are gone)."""
        while self._fds:
            os.close(self._fds.popitem()[1])

    def plane(self, name: str, dtype=np.float64) -> PlaneFile:
        return PlaneFile(self.root / name, self.shape, dtype, owner=self)


class PlaneFile:
    """A read-only (rows, cols) array-like over a RowPlanes file, read as `dtype`. Indexing
    maps the file only for the copy it returns (the pages are not left in this process's
    resident memory). No .copy: dask.array.from_array would copy the whole plane."""

    ndim = 2

    def __init__(self, path: Path, shape: tuple[int, int], dtype, owner=None):
        self.path, self.shape, self.dtype = Path(path), tuple(shape), np.dtype(dtype)
        self._owner = owner  # keeps the folder while this plane is in use

    def __reduce__(self):  # a copy in another process does not own the folder
        return (PlaneFile, (self.path, self.shape, self.dtype))

    def __getitem__(self, key):
        if self.shape[0] * self.shape[1] == 0:
            return np.zeros(self.shape, dtype=self.dtype)[key]
        mm = np.memmap(self.path, dtype=np.float64, mode="r", shape=self.shape)
        try:
            return np.array(mm[key], dtype=self.dtype)
        finally:
            del mm


def _remove_folder(root: Path, fds: dict) -> None:
    for fd in fds.values():
        os.close(fd)
    shutil.rmtree(root, ignore_errors=True)
