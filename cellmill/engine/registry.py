"""The stage graph: registration, hashing, skip / resume, timings and memory.

A stage's record (in the store) holds the hash of its parameters, its inputs' hashes and
the code that computes it, and the digests of the files it wrote into the output folder.
Records cannot lie: before a stage writes anything, its own record and those of every
stage downstream are removed (with the output files they list), so a stage killed half
way leaves no record and runs again. A skipped stage's files are checked in OUTDIR (and
copied there from the folder they were written to, when they are not). A stage may return a
dict of what it did (e.g. which kNN search ran): it goes into the record as `info`, and so into
run.json and the report.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from cellmill.config import Config
from cellmill.engine import runlog

log = logging.getLogger("cellmill")

# The workflow, in order. Each name maps to a module that registers it.
ORDER = ["ingest", "qc", "normalize", "hvg", "pca", "neighbors", "cluster", "umap",
         "statistics", "markers", "gsea", "report"]
MODULES = {
    "ingest": "cellmill.stages.ingest",
    "qc": "cellmill.stages.ingest",
    "normalize": "cellmill.stages.preprocess",
    "hvg": "cellmill.stages.preprocess",
    "pca": "cellmill.stages.pca",
    "neighbors": "cellmill.stages.neighbors",
    "cluster": "cellmill.stages.clustering.stage",
    "umap": "cellmill.stages.umap.stage",
    "statistics": "cellmill.stages.statistics.stage",
    "markers": "cellmill.stages.markers",
    "gsea": "cellmill.stages.gsea.stage",
    "report": "cellmill.report.stage",
}


@dataclass
class Context:
    """What a stage gets: the config, the output folder and the store (after ingest)."""

    cfg: Config
    outdir: Path
    store: Any = None  # cellmill.io.store.Store
    progress: bool = True
    timings: dict[str, dict] = field(default_factory=dict)
    _client: Any = None

    @property
    def tables(self) -> Path:
        p = self.outdir / "tables"
        p.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def figures(self) -> Path:
        p = self.outdir / "figures"
        p.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def store_path(self) -> Path:
        if self.cfg.input.store:
            return self.cfg.resolve(self.cfg.input.store)
        return self.outdir / "study.zarr"

    def scheduler(self):
        """The dask scheduler settings for passes (see engine/schedulers.py)."""
        from cellmill.engine.schedulers import get_scheduler

        return get_scheduler(self)


@dataclass
class Stage:
    name: str
    func: Callable[[Context], None]
    params: Callable[[Config], Any]
    after: tuple[str, ...]
    version: int = 1


REGISTRY: dict[str, Stage] = {}


def stage(name: str, after: tuple[str, ...] = (), params: Callable[[Config], Any] | None = None,
          version: int = 1):
    """Register a stage. `params(cfg)` returns the parameters its result depends on."""
    if name not in ORDER:
        raise ValueError(f"unknown stage {name!r}")

    def register(func):
        REGISTRY[name] = Stage(name, func, params or (lambda cfg: {}), tuple(after), version)
        return func

    return register


def load_stages() -> dict[str, Stage]:
    import importlib

    for name in ORDER:
        if name not in REGISTRY:
            try:
                importlib.import_module(MODULES[name])
            except ModuleNotFoundError as e:
                if e.name != MODULES[name]:
                    raise
    return REGISTRY


# Modules that shape no result (configuration, plumbing, the CLI): left out of code digests
# so that, say, a clearer error message does not rerun a study.
PLUMBING = {"cellmill.config", "cellmill.errors", "cellmill.engine.registry",
            "cellmill.io.progress", "cellmill.engine.monitor", "cellmill.engine.preflight",
            "cellmill.engine.workflow", "cellmill.engine.provenance", "cellmill.io.faults",
            "cellmill.io.lock", "cellmill.cli", "cellmill.engine.runlog", "cellmill.api",
            "cellmill"}
# report.html names the folder it was written in: rebuilt, not copied, in a new OUTDIR
NOT_RELOCATABLE = {"report"}


def _imports(module: str) -> set[str]:
    """The cellmill modules `module` imports (anywhere in its source)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return set()
    tree = ast.parse(Path(spec.origin).read_bytes())
    pkg = module if spec.submodule_search_locations else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for a in node.names:  # `from pkg import module` imports the module
                full = f"{base}.{a.name}"
                out.add(full if full.startswith("cellmill") and _is_module(full) else base)
    return {m for m in out if m.startswith("cellmill") and _is_module(m)}


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # `from cellmill.x import function`: the parent is a module
        return False


@cache
def code_digest(module: str) -> str:
    """sha256 of the source of `module` and of every cellmill module it uses, transitively
    (plumbing left out), with the cellmill version: an upgrade reruns what it changed."""
    from importlib.metadata import PackageNotFoundError, version

    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m in seen or (m in PLUMBING and m != module):
            continue
        seen.add(m)
        todo.extend(_imports(m))
    h = hashlib.sha256()
    try:
        h.update(version("cellmill").encode())
    except PackageNotFoundError:
        pass
    for m in sorted(seen):
        origin = importlib.util.find_spec(m).origin
        h.update(m.encode() + b"\0" + Path(origin).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def stage_code(st: Stage) -> str:
    return code_digest(MODULES[st.name])


def _digest(value: Any, length: int = 12) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def stage_hash(st: Stage, cfg: Config, upstream: dict[str, str]) -> str:
    doc = {"stage": st.name, "version": st.version, "code": stage_code(st),
           "params": st.params(cfg), "after": {a: upstream.get(a, "") for a in st.after}}
    return _digest(doc, 16)


def param_digests(st: Stage, cfg: Config) -> dict[str, str]:
    """A digest per parameter (one for the lot where params is not a dict): stored in the
    record so that a rerun can say which parameters changed."""
    params = st.params(cfg)
    if isinstance(params, dict):
        return {str(k): _digest(v) for k, v in params.items()}
    return {"params": _digest(params)}


def _cells(ctx: Context, name: str) -> int | None:
    """The cells a stage worked on: all of them for ingest and qc, the QC-passed ones after."""
    store = ctx.store
    if store is None:
        return None
    try:
        if name in ("ingest", "qc") or "qc_pass" not in store.obs_columns():
            return int(store.n_cells)
        return int(np.count_nonzero(np.asarray(store.obs_column("qc_pass"), dtype=bool)))
    except Exception:  # a count for the log is never worth failing a run over
        log.debug("cell count of stage %s not available", name, exc_info=True)
        return None


def dependants(name: str, stages: dict[str, Stage]) -> list[str]:
    """`name` and every stage that depends on it, directly or not, in workflow order."""
    out = {name}
    for n in ORDER:
        if n in stages and out.intersection(stages[n].after):
            out.add(n)
    return [n for n in ORDER if n in out]


# ------------------------------------------------------------------- files in OUTDIR

def _output_files(outdir: Path) -> dict[str, tuple]:
    """Result files in OUTDIR (tables, figures, report) -> (size, mtime, inode)."""
    out = {}
    for p in [*(outdir / "tables").rglob("*"), *(outdir / "figures").rglob("*"),
              outdir / "report.html"]:
        if p.is_file() and ".tmp" not in p.name:
            st = p.stat()
            out[p.relative_to(outdir).as_posix()] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def _sha(path: Path) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except (FileNotFoundError, IsADirectoryError):
        return None
    return h.hexdigest()


def _outputs_in_place(ctx: Context, name: str, rec: dict) -> bool:
    """True when every file the record lists is in OUTDIR with its digest, copying it from
    the folder it was written to where needed; False when the stage must run again."""
    here = ctx.outdir.resolve()
    there = Path(rec.get("outdir", here))
    for rel, digest in rec.get("outputs", {}).items():
        dst = here / rel
        if _sha(dst) == digest:
            continue
        src = there / rel
        if name in NOT_RELOCATABLE or there == here or _sha(src) != digest:
            return False
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    return True


def _invalidate(ctx: Context, names: list[str]) -> None:
    """Remove the records of `names` (and the files they list in OUTDIR): files first, so
    a crash in between leaves a record whose files are missing, which reruns the stage."""
    if ctx.store is None:
        return
    records = ctx.store.stage_records()
    drop = [n for n in names if n in records]
    if not drop:
        return
    here = ctx.outdir.resolve()
    for n in drop:
        if Path(records[n].get("outdir", "")) != here:
            continue  # files of another folder are not this run's to delete
        for rel in records[n].get("outputs", {}):
            (here / rel).unlink(missing_ok=True)
    ctx.store.drop_stage_records(drop)


def _open_store(ctx: Context):
    """The store at ctx.store_path, or None where there is none yet (ingest writes it)."""
    from cellmill.io.store import Store

    try:
        return Store(ctx.store_path)
    except FileNotFoundError:
        return None


def run_stages(ctx: Context, until: str | None = None) -> dict[str, dict]:
    """Run the workflow up to `until`, skipping stages whose record matches."""
    from cellmill.engine.monitor import (
        PeakMemory,
        cpu_seconds,
        limit_malloc_arenas,
        release_free_memory,
    )
    from cellmill.io import faults
    from cellmill.io.store import Store

    limit_malloc_arenas(ctx.cfg.compute.local_workers)  # before the stages start their threads
    stages = load_stages()
    if until is not None and until not in ORDER:
        raise ValueError(f"--until: unknown stage {until!r} (stages: {', '.join(ORDER)})")
    last = ORDER.index(until) if until else len(ORDER) - 1
    wanted = ORDER[: last + 1]
    missing = [n for n in wanted if n not in stages]
    if missing:
        raise RuntimeError(f"stage(s) not available in this build: {', '.join(missing)}")
    if ctx.store is None:
        ctx.store = _open_store(ctx)
    before_run = ctx.store.stage_records() if ctx.store is not None else {}
    # the store as input: its own ingest record is its provenance
    ingested = before_run.get("ingest", {}).get("hash") if ctx.cfg.input.store else None
    # every stage's parameters are read (and validated) before anything runs
    hashes: dict[str, str] = {}
    for name in wanted:
        hashes[name] = stage_hash(stages[name], ctx.cfg, hashes)
        if name == "ingest" and ingested:
            hashes[name] = ingested
    for name in wanted:
        st = stages[name]
        h = hashes[name]
        records = ctx.store.stage_records() if ctx.store is not None else {}
        rec = records.get(name)
        if rec is not None and rec.get("hash") == h and _outputs_in_place(ctx, name, rec):
            ctx.timings[name] = {"skipped": True, **rec}
            runlog.skipped(name)
            continue
        new = {"hash": h, "code": stage_code(st), "params": param_digests(st, ctx.cfg),
               "inputs": {a: hashes.get(a, "") for a in st.after}}
        old = before_run.get(name)
        if rec is None and old is not None and old.get("hash") == h:
            reason = "an upstream stage ran again"
        else:
            reason = runlog.why_run(rec if rec is not None else old, new)
        _invalidate(ctx, dependants(name, stages))
        runlog.started(name, reason)
        faults.stage_started(name)
        before = _output_files(ctx.outdir)
        release_free_memory()  # what the stages before left freed is not this stage's
        t0, c0 = time.perf_counter(), cpu_seconds()  # children: ingest's decoders
        try:
            with PeakMemory() as mem:
                info = st.func(ctx)
        except BaseException as e:
            runlog.failed(name, time.perf_counter() - t0, e)
            raise
        after = _output_files(ctx.outdir)
        outputs = {rel: _sha(ctx.outdir / rel) for rel, sig in after.items()
                   if before.get(rel) != sig}
        seconds = time.perf_counter() - t0
        if ctx.store is None:
            ctx.store = Store(ctx.store_path)
        cells = _cells(ctx, name)
        rec = {**new, "seconds": round(seconds, 3),
               "cpu_seconds": round(cpu_seconds() - c0, 3),
               "peak_rss_mb": round(mem.peak / 2**20, 1), "finished": time.time(),
               "cells": cells, "outdir": str(ctx.outdir.resolve()), "outputs": outputs}
        if isinstance(info, dict):  # what the stage says it did (e.g. neighbors: the kNN search)
            rec["info"] = info
        ctx.store.set_stage_record(name, rec)
        faults.stage_finished()
        runlog.done(name, seconds, rec["peak_rss_mb"], cells)
        ctx.timings[name] = {"skipped": False, **rec}
    return ctx.timings
