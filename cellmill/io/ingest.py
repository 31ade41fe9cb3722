"""Samples (a manifest, one file or folder) -> a new store.

Each sample is streamed (``cellmill.io.sample.open_sample``): 10x HDF5 counts go from the file to
the store slice by slice, so peak memory does not grow with the cells of a sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cellmill.errors import InputError
from cellmill.io.store import DEFAULT_BLOCK_CELLS, Store
from cellmill.io.writer import StoreWriter


@dataclass
class SampleSpec:
    name: str
    path: Path
    metadata: dict = field(default_factory=dict)


def read_manifest(path: str | Path) -> list[SampleSpec]:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "manifest not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise InputError(path, f"not a readable CSV manifest ({e})") from None
    missing = [c for c in ("sample", "path") if c not in df.columns]
    if missing:
        raise InputError(path, f"manifest lacks column(s) {', '.join(missing)}")
    if df.empty:
        raise InputError(path, "manifest lists no samples")
    dup = df["sample"][df["sample"].duplicated()]
    if len(dup):
        raise InputError(path, f"duplicate sample id {dup.iloc[0]!r}")
    if (df["sample"].str.strip() == "").any():
        raise InputError(path, "empty sample id")
    meta_cols = [c for c in df.columns if c not in ("sample", "path")]
    specs = []
    for _, row in df.iterrows():
        p = Path(row["path"]).expanduser()
        if not p.is_absolute():
            p = path.resolve().parent / p
        specs.append(SampleSpec(row["sample"], p, {c: row[c] for c in meta_cols}))
    return specs


def is_store(path: Path) -> bool:
    return (path / "zarr.json").exists() and (path / "X").exists()


def ingest(source: str | Path, out: str | Path, overwrite: bool = False,
           feature_types: tuple[str, ...] | None = ("Gene Expression",),
           block_cells: int = DEFAULT_BLOCK_CELLS, progress: bool = False) -> Store:
    """Ingest a manifest CSV, or a single .h5 / .h5ad / Matrix Market folder, into a store."""
    from cellmill.engine.progress import bar

    source = Path(source)
    if not source.exists():
        raise InputError(source, "input not found")
    if source.suffix.lower() == ".csv":
        specs, prefix = read_manifest(source), True
    else:  # one sample: cells keep their barcodes, as Seurat names them
        specs, prefix = [SampleSpec(_sample_name(source), source)], False
    for s in specs:
        if not s.path.exists():
            raise InputError(s.path, f"file of sample {s.name!r} not found")
    writer = StoreWriter(out, overwrite=overwrite, block_cells=block_cells)
    try:
        for s in bar(specs, desc="ingest", unit="sample", enabled=progress):
            _add(writer, s, feature_types, prefix)
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


def _add(writer: StoreWriter, spec: SampleSpec, feature_types, prefix: bool) -> None:
    """Stream one sample into the writer (its barcodes and genes are freed on return)."""
    from cellmill.io.sample import open_sample

    with open_sample(spec.path, feature_types=feature_types) as sample:
        if sample.n_cells == 0 or sample.n_genes == 0:
            raise InputError(spec.path, f"sample {spec.name!r} is empty")
        writer.add_sample(spec.name, sample, spec.metadata, prefix_cells=prefix)


def _sample_name(path: Path) -> str:
    name = path.name
    for suffix in (".h5ad", ".h5"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name
