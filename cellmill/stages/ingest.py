"""Stages `ingest` (files -> store) and `qc` (the nFeature filter)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from cellmill.config import Config
from cellmill.engine.registry import Context, stage
from cellmill.engine.tables import write_cell_table
from cellmill.errors import InputError


def _source(cfg: Config) -> Path | None:
    if cfg.input.manifest:
        return cfg.resolve(cfg.input.manifest)
    if cfg.input.path:
        return cfg.resolve(cfg.input.path)
    return None


def _fingerprint(path: Path) -> list:
    """Name, size and mtime of every input file: a changed input re-ingests."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    out = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    if path.suffix.lower() == ".csv":
        from cellmill.io.ingest import read_manifest

        out.append(hashlib.sha256(path.read_bytes()).hexdigest())
        for s in read_manifest(path):
            if s.path.exists():
                out.extend(_fingerprint(s.path))
    return out


def _ingest_params(cfg: Config):
    src = _source(cfg)
    if src is None:
        return {"store": cfg.input.store}
    if not src.exists():
        raise InputError(src, "input not found")
    return {"source": str(src), "files": _fingerprint(src),
            "feature_types": cfg.input.feature_types}


@stage("ingest", params=_ingest_params)
def run_ingest(ctx: Context) -> None:
    from cellmill.io.ingest import ingest
    from cellmill.io.store import Store

    src = _source(ctx.cfg)
    if src is None:
        if not ctx.cfg.input.store:
            raise InputError("config", "no input: set input.manifest, input.path or input.store")
        ctx.store = Store(ctx.store_path)
        return
    ctx.outdir.mkdir(parents=True, exist_ok=True)
    ft = tuple(ctx.cfg.input.feature_types) or None
    c = ctx.cfg.compute  # samples decoded by worker processes: the same store for any count
    # on 2 workers one decoder beside the writer measured slower than decoding in place
    # with the next slice read on a thread (196k cells: 30 against 20 s), so it needs
    # spare cores
    local = c.local_workers  # ingest runs on this machine, a cluster or not
    workers = local if local >= PARALLEL_DECODE_MIN_WORKERS and \
        c.scheduler not in ("synchronous", "sync") else 1
    ctx.store = ingest(src, ctx.store_path, overwrite=True, feature_types=ft,
                       progress=ctx.progress, workers=workers, threads=max(1, local))


PARALLEL_DECODE_MIN_WORKERS = 3


def qc_mask(n_features: np.ndarray, cfg: Config) -> np.ndarray:
    lo, hi = cfg.qc.min_features, cfg.qc.max_features
    if cfg.qc.inclusive:
        return (n_features >= lo) & (n_features <= hi)
    return (n_features > lo) & (n_features < hi)


@stage("qc", after=("ingest",), params=lambda cfg: {
    "min": cfg.qc.min_features, "max": cfg.qc.max_features, "inclusive": cfg.qc.inclusive})
def run_qc(ctx: Context) -> None:
    store = ctx.store
    n_features = np.asarray(store.obs_column("n_features"))
    keep = qc_mask(n_features, ctx.cfg)
    if not keep.any():
        raise InputError(ctx.store_path, "no cell passes QC with these thresholds")
    store.update_obs(qc_pass=keep)
    sample = store.obs_column("sample")
    n_counts = np.asarray(store.obs_column("n_counts"))
    write_cell_table(store, ctx.tables / "qc.csv", {
        "sample": sample, "n_counts": n_counts, "n_features": n_features, "pass": keep})
