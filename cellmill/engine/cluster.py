"""Where passes run: threads, processes, or a dask.distributed cluster (local or remote)."""

from __future__ import annotations

import atexit
from typing import Any

_CLIENTS: dict[str, Any] = {}


def get_scheduler(ctx) -> Any:
    """A scheduler for `compute`: "threads"/"sync" strings, or a distributed Client."""
    c = ctx.cfg.compute
    return scheduler_for(c.scheduler, c.workers)


def scheduler_for(name: str, workers: int = 2) -> Any:
    if name == "threads":
        return ("threads", workers)
    if name == "synchronous":
        return ("sync", 1)
    key = f"{name}:{workers}"
    if key not in _CLIENTS:
        from distributed import Client, LocalCluster

        if name == "processes":
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None, silence_logs=40)
            client = Client(cluster)
        else:
            client = Client(name)
        _CLIENTS[key] = client
    return _CLIENTS[key]


def close_clients() -> None:
    for client in _CLIENTS.values():
        cluster = getattr(client, "cluster", None)
        client.close()
        if cluster is not None:
            cluster.close()
    _CLIENTS.clear()


atexit.register(close_clients)


def compute(tasks: list, scheduler=None, desc: str = "pass", progress: bool = True) -> list:
    """Compute a list of dask.delayed tasks; results in task order, with a progress bar."""
    import dask

    from cellmill.engine.progress import bar

    if scheduler is None:
        scheduler = ("threads", 2)
    if isinstance(scheduler, tuple):
        kind, workers = scheduler
        from dask.callbacks import Callback

        pbar = bar(total=len(tasks), desc=desc, enabled=progress)
        keys = {t.key for t in tasks}

        class _Tick(Callback):
            def _posttask(self, key, result, dsk, state, id):
                if key in keys:
                    pbar.update(1)

        try:
            with _Tick():
                if kind == "sync":
                    out = dask.compute(*tasks, scheduler="sync")
                else:
                    out = dask.compute(*tasks, scheduler="threads", num_workers=workers)
        finally:
            pbar.close()
        return list(out)
    from distributed import as_completed

    futures = scheduler.compute(tasks)
    pbar = bar(total=len(futures), desc=desc, enabled=progress)
    for _ in as_completed(futures):
        pbar.update(1)
    pbar.close()
    return scheduler.gather(futures)
