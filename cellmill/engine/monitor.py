"""Peak resident memory of this process (and its children) while a block of code runs."""

from __future__ import annotations

import os
import threading

import psutil


def current_rss() -> int:
    """RSS of this process and all its descendants, in bytes."""
    proc = psutil.Process()
    rss = proc.memory_info().rss
    kids = _descendants(proc.pid) if _PROC_CHILDREN else \
        [c.pid for c in proc.children(recursive=True)]
    for pid in kids:
        try:
            rss += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return rss


def _descendants(pid: int) -> list[int]:
    """Descendant pids from Linux's /proc/<pid>/task/<tid>/children lists. psutil finds
    children by reading every process's stat file: ~1.4 ms a sample with 67 processes (a
    PeakMemory samples 20 times a second, holding the GIL), more on a busy HPC node."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:  # ended
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


# the children lists need CONFIG_PROC_CHILDREN (most Linux kernels have it)
_PROC_CHILDREN = os.path.exists(f"/proc/self/task/{os.getpid()}/children")


def _glibc(name: str, *args) -> None:
    """Call a glibc malloc function of this process; nothing where there is no glibc
    (macOS, musl, Windows)."""
    import ctypes

    try:
        getattr(ctypes.CDLL(None), name)(*args)
    except (OSError, AttributeError, TypeError):
        pass


def release_free_memory() -> None:
    """Hand memory freed by the last stage back to the system: a collection, then glibc's
    malloc_trim, which returns the free pages of every malloc arena (the worker threads' too).
    Without it a stage starts on what the stages before it left in the heap (196k cells in
    one process: gsea peaked at 1.29 GB, 0.8 GB in a fresh process)."""
    import gc

    gc.collect()
    _glibc("malloc_trim", 0)


M_ARENA_MAX = -8  # glibc's mallopt parameters
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 << 20


def cpu_seconds() -> float:
    """CPU seconds of this process and of its child processes that have ended (ingest's
    decoding processes are joined when it ends): process_time alone leaves them out."""
    import resource
    import time

    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + c.ru_utime + c.ru_stime


def limit_malloc_arenas(workers: int) -> None:
    """At most max(2, workers) glibc malloc arenas, and blocks of 4 MB or more always mapped
    on their own (given back when freed).

    By default every thread that meets a busy arena gets its own (up to 8 a core), and each
    keeps the memory freed in it: the statistics stage at 196k cells peaked at 930-935 MB in a
    fresh process, 811-846 MB with two, in the same time. glibc also raises its mapping
    threshold (up to 32 MB) each time a mapped block is freed, so from then on blocks of a few
    MB (decoded chunks, slabs, sort scratch) come from the heap and stay there when freed: a
    stage's peak then depended on the order its threads freed them. With the threshold fixed
    at 4 MB (196k cells, same run, 1 GB budget): statistics 635 -> 596 MB, markers 639 ->
    624, gsea 645 -> 608, ingest 524 -> 473, no stage higher."""
    _glibc("mallopt", M_ARENA_MAX, max(2, int(workers)))
    _glibc("mallopt", M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def _reset_high_water() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _high_water() -> int:
    """VmHWM of this process in bytes (0 where /proc is not available)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


_active: list[PeakMemory] = []  # open monitors, outermost first (a stage inside a run)


class PeakMemory:
    """`.peak`: the maximum RSS (bytes) of this process and its children during the block.

    A thread samples RSS every `interval` seconds (children included), and on Linux the
    kernel's own high-water mark of this process, reset on entry, is read on exit: the
    sampler cannot run while native code (igraph, BLAS) holds the GIL, and it missed
    ~0.5 GB peaks of the clustering that way. Nested monitors pass their peak outwards
    (an inner one resets the mark the outer one would read)."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._hwm = False

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._hwm = _reset_high_water()
        self.peak = current_rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        _active.append(self)
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss())
        if self._hwm:
            self.peak = max(self.peak, _high_water())
        if self in _active:
            _active.remove(self)
        for outer in _active:
            outer.peak = max(outer.peak, self.peak)
        return False
