"""Where passes run: threads, processes, or a dask.distributed cluster (local or remote).

`compute.scheduler`:
- "threads" (default): Dask's threaded scheduler with `workers` threads (kernels are nogil);
- "synchronous": one thread, for debugging;
- "processes": a dask.distributed LocalCluster of `workers` single-threaded worker processes,
  each under a nanny that restarts it if it dies;
- "tcp://host:8786" (any address): an existing dask.distributed scheduler, e.g. one started by
  dask-jobqueue on an HPC cluster (see examples/hpc_slurm.md). The workers must see the store
  at the same path (a shared file system).

Tasks carry a `Store` (which pickles to its path only) and cell ranges; the workers read their
blocks from the store themselves. Large constants that callers put into many tasks (masks,
per-gene vectors, loadings) are lifted into one graph node each before a graph goes to a
distributed scheduler, so they travel once instead of once per task (`share_constants`).
A task lost with a killed worker is rerun elsewhere; passes are deterministic, so the results
are the same.
"""

from __future__ import annotations

import atexit
import logging
import threading
import uuid
from typing import Any

from cellmill.config import ConfigError

log = logging.getLogger("cellmill")

# Literal task arguments at least this big are sent once per graph, not once per task.
SHARE_MIN_BYTES = 64 * 1024
# A task may be on this many workers that died before it counts as the culprit.
ALLOWED_FAILURES = 6
CONNECT_TIMEOUT = "30s"
WORKER_EXIT_TIMEOUT = 30.0

_CLIENTS: dict[str, Any] = {}
_LOCK = threading.Lock()
_AT_EXIT = False


def get_scheduler(ctx) -> Any:
    """The scheduler for the run's `compute` settings (clients are cached per setting)."""
    c = ctx.cfg.compute
    sched = scheduler_for(c.scheduler, c.workers)
    if not isinstance(sched, tuple):
        ctx._client = sched
    return sched


def n_workers(scheduler) -> int:
    """Workers (threads) a scheduler runs tasks on: 2 when none is given (compute's default)."""
    if scheduler is None:
        return 2
    if isinstance(scheduler, tuple):
        return max(1, int(scheduler[1]))
    try:  # a distributed Client
        return max(1, sum(w.get("nthreads", 1)
                          for w in scheduler.scheduler_info()["workers"].values()))
    except (AttributeError, KeyError, TypeError):  # not a distributed Client: a modest window
        return 8


def is_distributed(scheduler) -> bool:
    return scheduler is not None and not isinstance(scheduler, tuple)


def scheduler_for(name: str, workers: int = 2) -> Any:
    """("threads", n) / ("sync", 1) for Dask's local schedulers, else a distributed Client."""
    if name == "threads":
        return ("threads", workers)
    if name in ("synchronous", "sync"):
        return ("sync", 1)
    key = f"{name}:{workers}" if name == "processes" else name
    with _LOCK:
        client = _CLIENTS.get(key)
        if client is not None and client.status in ("running", "connecting"):
            return client
        client = _local_cluster(workers) if name == "processes" else _connect(name)
        _CLIENTS[key] = client
    return client


def _quiet_distributed() -> None:
    """dask.distributed logs every worker start and stop at INFO; show them with -v only."""
    if not log.isEnabledFor(logging.INFO):
        logging.getLogger("distributed").setLevel(logging.ERROR)


def _local_cluster(workers: int):
    import dask
    from distributed import Client, LocalCluster

    _quiet_distributed()
    _close_at_exit()
    # The scheduler of a LocalCluster lives in this process, so its settings apply.
    with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES}):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=":0", silence_logs=logging.ERROR)
    log.info("started a LocalCluster with %d worker processes (%s)", workers,
             cluster.scheduler_address)
    return Client(cluster, set_as_default=False)


def _connect(address: str):
    from distributed import Client

    _quiet_distributed()
    _close_at_exit()
    try:
        client = Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)
    except OSError as e:
        raise ConfigError(f"compute.scheduler: cannot reach the Dask scheduler at "
                          f"{address} ({e})") from None
    log.info("connected to the Dask scheduler at %s (%d workers)", address,
             len(client.scheduler_info().get("workers", {})))
    return client


def close_clients() -> None:
    """Close every client; shut down the LocalClusters this process started."""
    with _LOCK:
        clients = list(_CLIENTS.values())
        _CLIENTS.clear()
    for client in clients:
        cluster = getattr(client, "cluster", None)
        try:
            client.close()
            if cluster is not None:  # ours (a LocalCluster); a remote scheduler is left alone
                _close_local(cluster)
        except Exception:  # already gone (interpreter exit, dead scheduler)
            log.debug("closing a Dask client failed", exc_info=True)


def _close_local(cluster, timeout: float = WORKER_EXIT_TIMEOUT) -> None:
    """Stop the worker processes, then the scheduler. A worker process that has loaded many
    compiled kernels can take a few seconds to exit on a busy machine; the nannies get more
    time than their default (4 s, then SIGKILL), so the processes end on their own."""
    import asyncio

    async def stop_workers():
        await asyncio.gather(*(w.close(timeout=timeout) for w in list(cluster.workers.values())
                               if hasattr(w, "close")), return_exceptions=True)

    try:
        cluster.sync(stop_workers)
    finally:
        cluster.close()


def _close_at_exit() -> None:
    """Register close_clients to run at exit before dask.distributed's own exit handlers (which
    close clusters with short timeouts): handlers run last-registered first, so register after
    distributed has been imported."""
    global _AT_EXIT
    if not _AT_EXIT:
        atexit.register(close_clients)
        _AT_EXIT = True


def compute(tasks: list, scheduler=None, desc: str = "pass", progress: bool = True) -> list:
    """Compute a list of dask.delayed tasks; results in task order, with a progress bar."""
    import dask

    from cellmill.io.progress import bar

    if not tasks:
        return []
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
    return _compute_distributed(scheduler, tasks, desc, progress)


def _compute_distributed(client, tasks: list, desc: str, progress: bool) -> list:
    from distributed import as_completed

    from cellmill.io.progress import bar

    futures = client.compute(share_constants(tasks))
    pbar = bar(total=len(futures), desc=desc, enabled=progress)
    try:
        for _ in as_completed(futures, loop=client.loop):
            pbar.update(1)
        return client.gather(futures)
    except BaseException:
        client.cancel(futures)
        raise
    finally:
        pbar.close()


# ----------------------------------------------------------------- constants sent once

def _nbytes(x) -> int:
    """Size of a task argument: dask's sizeof, plus the fields of plain objects."""
    from dask.sizeof import sizeof

    n = sizeof(x)
    fields = getattr(x, "__dict__", None)
    if isinstance(fields, dict) and not isinstance(x, type):
        n += sum(sizeof(v) for v in fields.values())
    return n


def share_constants(tasks: list, min_bytes: int = SHARE_MIN_BYTES) -> list:
    """The same delayed tasks, with every literal argument of `min_bytes` or more replaced by a
    reference to one graph node holding it (shared by all the tasks that use that object).

    Without this, a distributed scheduler ships such an argument inside every task: a pass over
    1M cells with a 1M-cell mask would send the mask once per block. Anything unexpected in the
    graph leaves the tasks as they are (correct, only slower)."""
    try:
        from dask._task_spec import DataNode, GraphNode, List, Task, TaskRef, Tuple
        from dask.delayed import Delayed
    except ImportError:  # a Dask without the task spec: nothing to rewrite
        return tasks
    try:
        graph: dict = {}
        for t in tasks:
            graph.update(t.__dask_graph__())
    except Exception:
        return tasks
    lifted: dict[int, str] = {}
    keep_alive = []

    def swap(x):
        if x is None or isinstance(x, (GraphNode, str, bytes, int, float, complex, type)):
            return x, False
        if type(x) in (tuple, list):
            items = [swap(i) for i in x]
            if not any(changed for _, changed in items):
                return x, False
            wrap = Tuple if type(x) is tuple else List
            return wrap(*(i for i, _ in items)), True
        if _nbytes(x) < min_bytes:
            return x, False
        key = lifted.get(id(x))
        if key is None:
            key = f"cellmill-shared-{type(x).__name__}-{uuid.uuid4().hex}"
            lifted[id(x)] = key
            keep_alive.append(x)
            graph[key] = DataNode(key, x)
        return TaskRef(key), True

    try:
        for key, node in list(graph.items()):
            if type(node) is not Task:
                continue
            args = [swap(a) for a in node.args]
            kwargs = {k: swap(v) for k, v in node.kwargs.items()}
            if any(c for _, c in args) or any(c for _, c in kwargs.values()):
                graph[key] = Task(key, node.func, *(a for a, _ in args),
                                  _data_producer=node.data_producer,
                                  **{k: v for k, (v, _) in kwargs.items()})
    except Exception:
        log.debug("share_constants: graph left as it is", exc_info=True)
        return tasks
    if not lifted:
        return tasks
    return [Delayed(t.key, graph) for t in tasks]


def task_sizes(client) -> dict[str, int]:
    """Pickled size of every task the scheduler holds now (for tests and diagnostics)."""

    def sizes(dask_scheduler):
        import cloudpickle

        out = {}
        for key, ts in dask_scheduler.tasks.items():
            try:
                out[str(key)] = len(cloudpickle.dumps(ts.run_spec))
            except Exception:
                out[str(key)] = -1
        return out

    return client.run_on_scheduler(sizes)


WAVE_PER_WORKER = 8  # tasks per worker computed at once when results are copied into one array


def ordered_stream(func, arg_tuples, scheduler, window: int):
    """Yield func(*args) for each args in order, with at most `window` calls in flight (running
    or done and not yet consumed): a thread pool for ("threads", n), inline for ("sync", 1),
    futures of a dask.distributed Client otherwise. With window > workers a worker whose task
    ends early takes the next one at once, instead of waiting for a whole wave to finish."""
    from collections import deque

    if scheduler is None:
        scheduler = ("threads", 2)
    if isinstance(scheduler, tuple) and scheduler[0] == "sync":
        for args in arg_tuples:
            yield func(*args)
        return
    it = iter(arg_tuples)
    if isinstance(scheduler, tuple):
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=max(1, scheduler[1]))
        submit, close = pool.submit, pool.shutdown
    else:  # a distributed Client
        def submit(f, *a):
            return scheduler.submit(f, *a, pure=False)

        def close(cancel_futures=False):
            pass
    pending = deque()
    try:
        for args in it:
            pending.append(submit(func, *args))
            if len(pending) >= window:
                break
        while pending:
            res = pending.popleft().result()
            for args in it:
                pending.append(submit(func, *args))
                break
            yield res
    finally:
        for f in pending:
            f.cancel()
        close(cancel_futures=True)


def _compute_one(task):
    return task.compute(scheduler="sync")


def in_waves(tasks: list, scheduler, desc: str, progress: bool,
             per_worker: int = WAVE_PER_WORKER):
    """The results of `tasks` in order, with about per_worker tasks per worker computed and
    not yet consumed at a time: callers copy each into a preallocated array, so only that
    many results are alive beside it (computing all tasks at once would hold a second copy of
    the whole output). Threads stream (a worker that finishes takes the next task; waves left
    one core idle at the end of each: the pca Gram pass used 1.7 of 2 cores); a distributed
    cluster computes the tasks a wave at a time (constants shared within a wave)."""
    from cellmill.io.progress import bar

    if scheduler is None:
        scheduler = ("threads", 2)
    if not isinstance(scheduler, tuple):
        step = per_worker * n_workers(scheduler)
        for w0 in range(0, len(tasks), step):
            yield from compute(tasks[w0:w0 + step], scheduler=scheduler, desc=desc,
                               progress=progress)
        return
    workers = n_workers(scheduler)
    window = max(per_worker * workers, workers + 1)
    pbar = bar(total=len(tasks), desc=desc, enabled=progress)
    try:
        for res in ordered_stream(_compute_one, ((t,) for t in tasks), scheduler, window):
            pbar.update(1)
            yield res
    finally:
        pbar.close()


def on_a_thread(func, *args):
    """Start func(*args) on a thread of its own; returns a function that waits for the
    result (raising the call's exception, if any)."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cellmill-bg")
    future = pool.submit(func, *args)
    pool.shutdown(wait=False)  # the thread ends with the call
    return future.result
