"""The stage graph: registration, parameter hashing, skip / resume, timings and memory."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellmill.config import Config

log = logging.getLogger("cellmill")

# The workflow, in order. Each name maps to a module that registers it.
ORDER = ["ingest", "qc", "normalize", "hvg", "pca", "neighbors", "cluster", "umap",
         "statistics", "markers", "gsea", "report"]
MODULES = {
    "ingest": "cellmill.engine.stage_ingest",
    "qc": "cellmill.engine.stage_ingest",
    "normalize": "cellmill.engine.preprocess",
    "hvg": "cellmill.engine.preprocess",
    "pca": "cellmill.engine.pca",
    "neighbors": "cellmill.engine.graph",
    "cluster": "cellmill.engine.graph",
    "umap": "cellmill.engine.graph",
    "statistics": "cellmill.engine.statistics",
    "markers": "cellmill.engine.markers",
    "gsea": "cellmill.engine.gsea_stage",
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
        """The dask scheduler settings for passes (see engine/cluster.py)."""
        from cellmill.engine.cluster import get_scheduler

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


def stage_hash(st: Stage, cfg: Config, upstream: dict[str, str]) -> str:
    doc = {"stage": st.name, "version": st.version, "params": st.params(cfg),
           "after": {a: upstream.get(a, "") for a in st.after}}
    text = json.dumps(doc, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_stages(ctx: Context, until: str | None = None) -> dict[str, dict]:
    """Run the workflow up to `until`, skipping stages whose recorded hash matches."""
    from cellmill.engine.monitor import PeakMemory
    from cellmill.io.store import Store

    stages = load_stages()
    if until is not None and until not in ORDER:
        raise ValueError(f"--until: unknown stage {until!r} (stages: {', '.join(ORDER)})")
    last = ORDER.index(until) if until else len(ORDER) - 1
    wanted = ORDER[: last + 1]
    missing = [n for n in wanted if n not in stages]
    if missing:
        raise RuntimeError(f"stage(s) not available in this build: {', '.join(missing)}")
    # every stage's parameters are read (and validated) before anything runs
    hashes: dict[str, str] = {}
    for name in wanted:
        hashes[name] = stage_hash(stages[name], ctx.cfg, hashes)
    for name in wanted:
        st = stages[name]
        h = hashes[name]
        if ctx.store is None and ctx.store_path.exists():
            try:
                ctx.store = Store(ctx.store_path)
            except FileNotFoundError:  # not a store (yet): ingest will write it
                ctx.store = None
        records = ctx.store.stage_records() if ctx.store is not None else {}
        if records.get(name, {}).get("hash") == h:
            ctx.timings[name] = {"skipped": True, **records[name]}
            log.info("stage %s: up to date", name)
            continue
        log.info("stage %s: running", name)
        t0, c0 = time.perf_counter(), time.process_time()
        with PeakMemory() as mem:
            st.func(ctx)
        rec = {"hash": h, "seconds": round(time.perf_counter() - t0, 3),
               "cpu_seconds": round(time.process_time() - c0, 3),
               "peak_rss_mb": round(mem.peak / 2**20, 1), "finished": time.time()}
        if ctx.store is None:
            ctx.store = Store(ctx.store_path)
        ctx.store.set_stage_record(name, rec)
        ctx.timings[name] = {"skipped": False, **rec}
    return ctx.timings
