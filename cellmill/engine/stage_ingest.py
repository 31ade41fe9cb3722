"""Stages `ingest` (files -> store) and `qc` (the nFeature filter)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from cellmill.config import Config
from cellmill.engine.stages import Context, stage
from cellmill.errors import InputError
from cellmill.io import faults


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
    ctx.store = ingest(src, ctx.store_path, overwrite=True, feature_types=ft,
                       progress=ctx.progress)


QC_ROWS = 65536  # cells per piece of tables/qc.csv


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


def write_table(df: pd.DataFrame, path: Path) -> None:
    """Write a CSV atomically (a crash never leaves half a table)."""
    tmp = path.with_name(path.name + ".tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(path)
    faults.wrote()


def write_cell_table(store, path: Path, columns: dict, cells: np.ndarray | None = None) -> None:
    """A CSV of cells (all, or the ascending indices `cells`): their names, then `columns`
    (one value per listed cell). Written atomically, in pieces of QC_ROWS store cells, so
    the names of the whole study are never all in memory."""
    tmp = path.with_name(path.name + ".tmp")
    n = store.n_cells
    lo = 0  # position in `cells` of the first cell of the piece
    for a in range(0, n, QC_ROWS):
        b = min(a + QC_ROWS, n)
        if cells is None:
            rows, pos = np.arange(b - a), slice(a, b)
        else:
            hi = int(np.searchsorted(cells, b))
            rows, pos, lo = cells[lo:hi] - a, slice(lo, hi), hi
        part = {"cell": store.obs_names(a, b)[rows]}
        part.update({k: np.asarray(v[pos]).astype(str) if isinstance(v, pd.Categorical)
                     else np.asarray(v[pos]) for k, v in columns.items()})
        pd.DataFrame(part).to_csv(tmp, index=False, header=a == 0, mode="w" if a == 0 else "a")
    tmp.replace(path)
    faults.wrote()


def qc_passed(store) -> np.ndarray:
    """The QC mask stored by the qc stage (all cells if qc has not run)."""
    if "qc_pass" in store.obs_columns():
        return np.asarray(store.obs_column("qc_pass")).astype(bool)
    return np.ones(store.n_cells, dtype=bool)
