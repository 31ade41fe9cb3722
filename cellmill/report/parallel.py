"""The report's figures (report/figures.py), drawn by several processes at once.

matplotlib holds the GIL while it draws, so threads would only take turns: the figures are
drawn by this process (matplotlib is loaded here already) and `workers - 1` spawned ones
(io/spawn.py), each reading its own inputs from the store and tables. Figures are handed
out costliest first, one at a time, to whichever process is free. A figure is drawn whole by
one process from the same inputs, so the figures are the same for any worker count (up to
the antialiasing of a few pixels, which varies from run to run in one process too). A
worker that dies (out of memory, killed) hands its figures back to this process.
"""

from __future__ import annotations

import threading
from collections import deque
from pathlib import Path

from cellmill.io.spawn import spawn_pool, submit
from cellmill.report.figures import FIGURE_FUNCS, FigureResult, ReportInputs, draw_figure

# Relative drawing time of each figure (196k cells, seconds): the costliest go first, so the
# last figure to finish is a short one.
COST = {"fig2c": 2.7, "fig3": 2.7, "calib": 1.7, "qc": 1.5, "fig1a": 1.5, "fig2b": 1.3,
        "fig2": 0.9, "hvg": 0.85, "fig1d": 0.5, "fig1c": 0.5, "fig1b": 0.4, "pca": 0.25,
        "fig1e": 0.2}

# Peak resident memory of this process drawing figures (435-478 MB from 196k to 1M cells) and
# of a spawned worker (imports and one figure's inputs: 256 MB at 21k cells, 323 MB at 1M),
# with room to spare.
PARENT_BYTES = 512 << 20
WORKER_BYTES = 384 << 20

_inputs: ReportInputs | None = None  # a worker's, made once by _open


def _open(cfg, store_path: str, tables: str) -> None:
    from cellmill.io.store import Store

    global _inputs
    # one thread: the worker is one of `workers` processes already
    _inputs = ReportInputs(cfg, Store(store_path), Path(tables), scheduler=("threads", 1))


def _draw(key: str, out: str) -> FigureResult:
    return draw_figure(_inputs, key, Path(out))


def make_figures(inp: ReportInputs, out: Path, workers: int = 1) -> list[FigureResult]:
    """Every figure it can draw, in FIGURES order, drawn by `workers` processes (this one
    and spawned ones); the others come back with a note saying why not."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if workers > 1 and inp.store is not None:
        done = draw_in_processes(inp, out, workers)
    else:
        done = {key: draw_figure(inp, key, out) for key in FIGURE_FUNCS}
    return [done[key] for key in FIGURE_FUNCS]


def draw_in_processes(inp: ReportInputs, out: Path, workers: int) -> dict[str, FigureResult]:
    """{key: FigureResult} of every figure, drawn by this process and workers - 1 others."""
    todo = deque(sorted(FIGURE_FUNCS, key=lambda k: -COST.get(k, 1.0)))
    lock = threading.Lock()
    done: dict[str, FigureResult] = {}

    def take() -> str | None:
        with lock:
            return todo.popleft() if todo else None

    pool = spawn_pool(workers - 1, _open, (inp.cfg, str(inp.store.path), str(inp.tables_dir)))

    def feed() -> None:
        while (key := take()) is not None:
            try:
                done[key] = submit(pool, _draw, key, str(out)).result()
            except BaseException:  # the worker died or the pool was shut down
                with lock:
                    todo.appendleft(key)
                return

    feeders = [threading.Thread(target=feed, daemon=True) for _ in range(workers - 1)]
    try:
        for t in feeders:
            t.start()
        while (key := take()) is not None:
            done[key] = draw_figure(inp, key, out)
        for t in feeders:
            t.join()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    for key in todo:  # what a dead worker left
        done[key] = draw_figure(inp, key, out)
    return done


def figure_workers(cfg) -> int:
    """Processes drawing the figures: compute.workers (this machine's share of them with a
    cluster), as many as compute.memory (idem) holds beside this process's share."""
    c = cfg.compute
    from_memory = 1 + max(0, c.local_memory_bytes - PARENT_BYTES) // WORKER_BYTES
    return int(max(1, min(c.local_workers, len(FIGURE_FUNCS), from_memory)))
