"""Passes and stages on Dask's schedulers: threads, synchronous, a LocalCluster of worker
processes ("processes") and an existing scheduler given by its address.

- a map_blocks + ordered_sum pass gives bit-identical float64 sums on every scheduler and block
  size, equal (to rounding) to a dense brute-force sum;
- the stages up to pca, run through run_stages with `--set compute.scheduler=...`, write
  bit-identical results on threads and on the cluster;
- a worker SIGKILLed in the middle of a pass: the pass still completes, with the same result;
- tasks carry the store path and a cell range, not matrices: big constants go once per graph.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellmill.config import load_config
from cellmill.engine.passes import granules, map_blocks, ordered_sum
from cellmill.engine.registry import Context, load_stages, run_stages
from cellmill.engine.schedulers import (
    close_clients,
    compute,
    scheduler_for,
    share_constants,
    task_sizes,
)
from cellmill.io.sample import Sample
from cellmill.io.store import GRANULE, Store
from cellmill.io.writer import StoreWriter

# the pass functions below are defined here, in a module the workers cannot import
cloudpickle.register_pickle_by_value(sys.modules[__name__])

N_CELLS = 10 * GRANULE + 300  # the last block is partial
N_GENES = 2000


def synthetic_counts(seed: int = 3) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    depth = rng.lognormal(np.log(2500), 0.4, N_CELLS)
    p = rng.lognormal(0, 1.5, N_GENES)
    p /= p.sum()
    x = rng.poisson(rng.gamma(2.0, depth[:, None] * p[None, :] / 2.0))
    return sp.csr_matrix(x.astype(np.int32))


@pytest.fixture(scope="module")
def counts():
    return synthetic_counts()


@pytest.fixture(scope="module")
def store(tmp_path_factory, counts) -> Store:
    path = tmp_path_factory.mktemp("dist") / "study.zarr"
    var = pd.DataFrame({"gene_ids": [f"G{i}" for i in range(N_GENES)],
                        "feature_types": "Gene Expression", "genome": "mm10"},
                       index=[f"Gene{i}" for i in range(N_GENES)])
    sample = Sample(counts=counts, barcodes=np.array([f"C{i}-1" for i in range(N_CELLS)],
                                                     dtype=object), var=var, source="synthetic")
    w = StoreWriter(path, overwrite=True, block_cells=2 * GRANULE)
    w.add_sample("s1", sample, {}, prefix_cells=False)
    return w.finish()


@pytest.fixture(scope="module")
def cluster():
    """One LocalCluster of 2 worker processes, shared by the tests of this module; the
    "processes" setting reuses it and its address is the "existing scheduler"."""
    client = scheduler_for("processes", 2)
    client.wait_for_workers(2, timeout=120)
    yield client
    close_clients()


# ------------------------------------------------------------------------------ the pass

def moments_block(start, stop, m, cells, sf, weights):
    """Per-granule sums of y = log1p(x / total * sf) * w and of y^2, float64."""
    totals = np.asarray(m.sum(axis=1), dtype=np.float64).ravel()
    y = m.astype(np.float64).multiply(1.0 / np.maximum(totals, 1.0)[:, None] * sf).tocsr()
    y.data = np.log1p(y.data)
    out = np.zeros((granules(start, stop), 2, m.shape[1]))
    g = (cells - start) // GRANULE
    for k in range(out.shape[0]):
        rows = y[g == k]
        out[k, 0] = np.asarray(rows.sum(axis=0)).ravel() * weights[: m.shape[1]]
        out[k, 1] = np.asarray(rows.multiply(rows).sum(axis=0)).ravel()
    return out


def run_pass(store, scheduler, block_cells=None, mask=None, weights=None, func=moments_block):
    w = np.ones(N_GENES) if weights is None else weights
    parts = map_blocks(store, func, 1e4, w, mask=mask, block_cells=block_cells,
                       scheduler=scheduler, progress=False)
    return ordered_sum(parts)


def dense_reference(counts, mask):
    x = counts.toarray().astype(np.float64)[mask]
    y = np.log1p(x / np.maximum(x.sum(axis=1, keepdims=True), 1.0) * 1e4)
    return np.stack([y.sum(axis=0), (y * y).sum(axis=0)])


def qc_like_mask(n=N_CELLS):
    return (np.arange(n) % 7) != 3


def test_pass_identical_on_every_scheduler(store, counts, cluster):
    mask = qc_like_mask()
    ref = run_pass(store, scheduler_for("threads", 2), mask=mask)
    np.testing.assert_allclose(ref, dense_reference(counts, mask), rtol=1e-12)
    address = cluster.scheduler.address
    for sched, bc in ((scheduler_for("threads", 1), 3 * GRANULE),
                      (scheduler_for("synchronous"), None),
                      (scheduler_for("processes", 2), GRANULE),
                      (scheduler_for(address), 5 * GRANULE)):
        got = run_pass(store, sched, block_cells=bc, mask=mask)
        np.testing.assert_array_equal(got, ref, err_msg=f"{sched} block_cells={bc}")
    assert scheduler_for(address) is not cluster  # a second client, to the same scheduler


# ------------------------------------------------------------------------------ stages

def _stages_up_to(last: str) -> str | None:
    have = load_stages()
    order = ["ingest", "qc", "normalize", "hvg", "pca"]
    done = None
    for s in order[: order.index(last) + 1]:
        if s not in have:
            break
        done = s
    return done


def _run(store: Store, outdir: Path, scheduler: str, until: str) -> Store:
    copy = outdir / "study.zarr"
    shutil.copytree(store.path, copy)
    cfg = load_config(None, [f"input.store={copy}", f"compute.scheduler={scheduler}",
                             "compute.memory=64MiB", "compute.progress=false",
                             "hvg.n_top=500"])
    ctx = Context(cfg=cfg, outdir=outdir, progress=False)
    run_stages(ctx, until=until)
    return Store(copy)


def test_stages_identical_on_cluster(store, cluster, tmp_path):
    until = _stages_up_to("pca")
    if until is None or until in ("ingest", "qc"):
        pytest.skip("the normalize/hvg stages are not available in this build")
    ref = _run(store, tmp_path / "threads", "threads", until)
    results = [ref]
    for name, sched in (("processes", "processes"), ("address", cluster.scheduler.address)):
        other = _run(store, tmp_path / name, sched, until)
        results.append(other)
        pd.testing.assert_frame_equal(other.var(), ref.var(), check_exact=True)
        pd.testing.assert_frame_equal(other.obs(), ref.obs(), check_exact=True)
        if until == "pca":
            for slot, key in (("obsm", "X_pca"), ("varm", "PCs"), ("uns", "pca_stdev")):
                np.testing.assert_array_equal(other.read_array(slot, key),
                                              ref.read_array(slot, key), err_msg=key)
    assert ref.var()["highly_variable"].sum() == 500


# ------------------------------------------------------------------------------ a dead worker

def slow_block(start, stop, m, cells, sf, weights, marks):
    """moments_block, slowly, leaving a mark per (block, worker process) that started it."""
    Path(marks, f"{start}-{os.getpid()}").touch()
    time.sleep(0.6)
    return moments_block(start, stop, m, cells, sf, weights)


def test_worker_killed_mid_pass(store, cluster, tmp_path):
    mask = qc_like_mask()
    ref = run_pass(store, scheduler_for("threads", 2), mask=mask)
    marks = tmp_path / "marks"
    marks.mkdir()
    pids = cluster.run(os.getpid)
    killed = {}

    def kill_one():
        deadline = time.time() + 60
        while time.time() < deadline:
            busy = [a for a, keys in cluster.processing().items() if keys and a in pids]
            started = {p.name.split("-")[1] for p in marks.iterdir()}
            victims = [a for a in busy if str(pids[a]) in started]
            if victims:
                killed["pid"] = pids[victims[0]]
                os.kill(killed["pid"], signal.SIGKILL)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one)
    killer.start()
    try:
        got = run_pass(store, cluster, mask=mask,
                       func=lambda *a: slow_block(*a[:6], str(marks)))
    finally:
        killer.join()
    assert "pid" in killed, "no worker was killed during the pass"
    np.testing.assert_array_equal(got, ref)
    # the killed worker had started a block that another process then ran again
    by_block: dict[str, set] = {}
    for p in marks.iterdir():
        start, pid = p.name.split("-")
        by_block.setdefault(start, set()).add(int(pid))
    assert any(killed["pid"] in pids_ and len(pids_) > 1 for pids_ in by_block.values())
    cluster.wait_for_workers(2, timeout=120)  # the nanny restarted it
    assert killed["pid"] not in cluster.run(os.getpid).values()


# ------------------------------------------------------------------------------ task sizes

def _pass_tasks(store, mask, weights):
    import dask

    from cellmill.engine.passes import _run_block

    return [dask.delayed(_run_block, pure=False)(store, a, b, mask, None, moments_block,
                                                 (1e4, weights))
            for a, b in store.block_ranges()]


def test_big_constants_are_sent_once(store, counts):
    """share_constants turns an argument shared by all tasks into one graph node."""
    import dask
    from dask._task_spec import DataNode

    mask = np.ones(N_CELLS, dtype=bool)
    weights = np.ones(200_000)  # 1.6 MB, used by every task
    tasks = _pass_tasks(store, mask, weights)
    shared = share_constants(tasks)
    graph = dict(shared[0].__dask_graph__())
    nodes = [v for v in graph.values() if isinstance(v, DataNode) and v.value is weights]
    assert len(nodes) == 1
    for t in shared:
        assert len(cloudpickle.dumps(graph[t.key])) < 32 * 1024
    got = ordered_sum(dask.compute(*shared, scheduler="sync"))
    ref = ordered_sum(compute(tasks, scheduler=("sync", 1), progress=False))
    np.testing.assert_array_equal(got, ref)


def test_tasks_on_the_scheduler_are_small(store, cluster):
    """What the scheduler holds while a pass runs: small block tasks (store path + cell
    range), and the big shared argument once."""
    weights = np.ones(200_000)
    seen: dict[str, int] = {}

    def watch():
        deadline = time.time() + 30
        while time.time() < deadline and not any("slow_block" in k or "_run_block" in k
                                                  for k in seen):
            seen.update(task_sizes(cluster))
            time.sleep(0.1)

    marks = Path(store.path).parent / "marks-sizes"
    marks.mkdir(exist_ok=True)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        run_pass(store, cluster, weights=weights,
                 func=lambda *a: slow_block(*a[:6], str(marks)))
    finally:
        watcher.join()
    blocks = {k: v for k, v in seen.items() if "_run_block" in k}
    assert blocks, "no block task seen on the scheduler"
    assert max(blocks.values()) < 32 * 1024, blocks
    big = [k for k, v in seen.items() if v > 1_000_000]
    assert len(big) <= 1 and all(k.startswith("cellmill-shared-") for k in big), big


def test_streamed_umap_identical_on_cluster(cluster, tmp_path):
    """The streamed UMAP's kNN search runs as Dask tasks and its batch layout on as many
    threads as the scheduler has workers: the same layout, bit for bit, from one thread, two
    threads and the LocalCluster's two worker processes."""
    from cellmill.stages.umap.streamed import umap_streamed

    rng = np.random.default_rng(4)
    points = rng.normal(size=(3000, 15)) + rng.integers(0, 4, 3000)[:, None] * 2.0
    ref = umap_streamed(points, n_epochs=30, scratch=tmp_path / "a", scheduler=("threads", 2))
    got = umap_streamed(points, n_epochs=30, scratch=tmp_path / "b", scheduler=cluster)
    one = umap_streamed(points, n_epochs=30, scratch=tmp_path / "c", scheduler=("sync", 1))
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(one, ref)


def test_snn_graph_from_disk_identical_on_cluster(cluster, tmp_path):
    """The neighbors stage's SNN graph built from lists on disk: its tasks take the mapped
    lists (io/scratch.Mapped, which a worker process maps again from the file): the same
    graph from the LocalCluster as from threads, and as the in-memory search's graph."""
    from make_10x import barcodes, random_counts, write_10x_v3

    import cellmill.stages.neighbors as nb
    from cellmill.io.ingest import ingest
    from cellmill.stages.shared.knn import exact_knn, knn_index_from_blocks, row_blocks

    n, k = 1200, 10
    rng = np.random.default_rng(7)
    x = rng.normal(size=(n, 8)) + rng.integers(0, 3, n)[:, None] * 3.0
    write_10x_v3(tmp_path / "a.h5", random_counts(n, 10, seed=1), barcodes(n, seed=1),
                 [f"G{i}" for i in range(10)])
    root = tmp_path / "scratch"
    root.mkdir()
    index = knn_index_from_blocks(row_blocks(x, 256), n, root / "index", 256)
    cells = np.arange(n)

    class Ctx:
        progress = False

        def scheduler(self):
            return ("threads", 2)

    nb._search_to_disk(index, k, cells, root, Ctx(), block=512)
    col = cells[index.perm].astype(np.int32)
    graphs = []
    for i, sched in enumerate((("threads", 2), cluster)):
        store = ingest(tmp_path / "a.h5", tmp_path / f"s{i}.zarr")
        nb.write_snn_from_disk(store, root, n, k, col, 1 / 15, scheduler=sched, chunk=100)
        graphs.append(store.read_sparse("obsp", "snn"))
    ref = nb.snn_graph(exact_knn(x, k)[0], 1 / 15)
    for g in graphs:
        assert (g != ref).nnz == 0 and np.array_equal(g.indices, ref.indices)
