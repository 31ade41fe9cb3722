"""Worker processes for Python work that holds the GIL (ingest's decoding, the report's
figures).

The 'spawn' start method: no fork of a process that holds threads or open HDF5 files (h5py
and numba do not survive that), and no process outlives its pool ('forkserver' would keep
its server, ~100 MB, beside every later stage of the run). Workers leave Ctrl-C to the parent
(which shuts the pool down) and exit when the parent is gone, so a killed run leaves no
orphans.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import types
from concurrent.futures import Future, ProcessPoolExecutor

WATCH_SECONDS = 1.0
_MAIN = threading.Lock()  # one swap of __main__ at a time (several threads may submit)


def spawn_pool(workers: int, initializer=None, initargs: tuple = ()) -> ProcessPoolExecutor:
    """A pool of `workers` spawned processes; each runs initializer(*initargs) once."""
    import multiprocessing as mp

    return ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                               initializer=_set_up,
                               initargs=(os.getpid(), initializer, initargs))


def submit(pool: ProcessPoolExecutor, fn, *args) -> Future:
    """pool.submit, which may start a worker: the worker gets a bare ``__main__``. Otherwise
    spawn re-runs the caller's script in each worker (a script without an
    ``if __name__ == "__main__":`` guard would then run its work again); workers need
    nothing of it."""
    with _MAIN:
        main = sys.modules.get("__main__")
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            return pool.submit(fn, *args)
        finally:
            sys.modules["__main__"] = main


def _set_up(pid: int, initializer, initargs: tuple) -> None:
    _watch_parent(pid)
    if initializer is not None:
        initializer(*initargs)


def _watch_parent(pid: int) -> None:
    """Ctrl-C is the parent's to handle; exit when the parent is gone or a zombie (killed by
    SIGKILL: nothing else stops a worker waiting for its next task)."""
    import signal

    import psutil

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = psutil.Process(pid)

    def watch():
        while True:
            time.sleep(WATCH_SECONDS)
            try:
                if not parent.is_running() or parent.status() == psutil.STATUS_ZOMBIE:
                    os._exit(0)
            except psutil.NoSuchProcess:
                os._exit(0)
            except psutil.Error:
                pass

    threading.Thread(target=watch, daemon=True).start()
