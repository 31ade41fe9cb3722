"""Samples (a manifest, one file or folder) -> a new store.

Each sample is streamed (``cellmill.io.sample.open_sample``): 10x HDF5 counts go from the file to
the store slice by slice, so peak memory does not grow with the cells of a sample. With
`workers` > 1 the samples are decoded in `workers` - 1 worker processes, a part of a sample at
a time, and written here in sample order (``cellmill.io.decode``): the same store, byte for
byte.
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


# obs columns cellmill writes itself (ingest, qc, cluster) and the name anndata gives the obs
# index: a manifest column of one of these names would overwrite them or be dropped
RESERVED_OBS = ("barcode", "sample", "n_counts", "n_features", "qc_pass", "cluster", "_index")


def read_manifest(path: str | Path) -> list[SampleSpec]:
    """The samples of a manifest CSV (columns sample, path, then any metadata columns).

    Refused (InputError naming the manifest): a missing or unreadable file, no sample/path
    column, no rows, a duplicate or empty sample id, an empty path, two samples with the same
    file (it would count its cells twice, as if from two animals), a metadata column whose name
    cellmill writes itself (RESERVED_OBS). Whether the sample files exist is not checked here.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "manifest not found" if not path.exists()
                         else "manifest is a folder, expected a CSV file")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise InputError(path, f"not a readable CSV manifest ({e})") from None
    missing = [c for c in ("sample", "path") if c not in df.columns]
    if missing:
        have = ", ".join(map(str, df.columns[:8])) or "none"
        raise InputError(path, f"manifest lacks column(s) {', '.join(missing)} "
                         f"(columns: {have}); expected a CSV with columns sample,path,...")
    if df.empty:
        raise InputError(path, "manifest lists no samples")
    dup = df["sample"][df["sample"].duplicated()]
    if len(dup):
        raise InputError(path, f"duplicate sample id {dup.iloc[0]!r}")
    meta_cols = [c for c in df.columns if c not in ("sample", "path")]
    reserved = [c for c in meta_cols if c in RESERVED_OBS]
    if reserved:
        raise InputError(path, f"column {reserved[0]!r} is a name cellmill writes itself "
                         f"(reserved: {', '.join(RESERVED_OBS)}); rename the column")
    specs, seen = [], {}
    for i, row in enumerate(df.itertuples(index=False), start=2):  # line 1 is the header
        name, text = str(row[df.columns.get_loc("sample")]), row[df.columns.get_loc("path")]
        if not name.strip():
            raise InputError(path, f"line {i}: empty sample id")
        if not str(text).strip():
            raise InputError(path, f"line {i} (sample {name!r}): empty path")
        p = Path(str(text).strip()).expanduser()
        if not p.is_absolute():
            p = path.resolve().parent / p
        key = p.resolve()
        if key in seen:
            raise InputError(path, f"samples {seen[key]!r} and {name!r} have the same path "
                             f"{text!r}")
        seen[key] = name
        meta = {c: row[df.columns.get_loc(c)] for c in meta_cols}
        specs.append(SampleSpec(name, p, meta))
    return specs


def is_store(path: Path) -> bool:
    return (path / "zarr.json").exists() and (path / "X").exists()


def ingest(source: str | Path, out: str | Path, overwrite: bool = False,
           feature_types: tuple[str, ...] | None = ("Gene Expression",),
           block_cells: int = DEFAULT_BLOCK_CELLS, progress: bool = False,
           workers: int = 1, threads: int = 1) -> Store:
    """Ingest a manifest CSV, or a single .h5 / .h5ad / Matrix Market folder, into a store.

    workers: processes busy: this one writes, `workers` - 1 (at most
    ``cellmill.io.decode.MAX_WORKERS``) decode samples; 1: this process reads too, one slice at
    a time. This process then holds up to `workers` parts of ``PART_NNZ`` nonzeros (~34 MB
    each) beside the writer's chunk buffers and the O(cells) obs, and each decoding process
    ~200 MB (its imports and one part's read buffers; measured).
    threads: with workers = 1, the compressed chunks of 10x HDF5 files are inflated by this
    many threads (io/h5chunks.py); the bytes, and so the store, are the same for any count."""
    from cellmill.io.h5chunks import decode_threads
    from cellmill.io.progress import bar

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
    _import_in_background("anndata.io")  # finish() writes obs and var with it: ~1 s of imports
    try:
        if workers > 1:  # this process writes: workers - 1 processes decode
            _add_decoded(writer, specs, feature_types, prefix, workers - 1, progress)
        else:
            with decode_threads(threads):
                for s in bar(specs, desc="ingest", unit="sample", enabled=progress):
                    _add(writer, s, feature_types, prefix)
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


def _import_in_background(module: str) -> None:
    """Import `module` on a thread while the samples are read (a later import waits for it)."""
    import importlib
    import threading

    threading.Thread(target=importlib.import_module, args=(module,), daemon=True,
                     name="cellmill-import").start()


def _add(writer: StoreWriter, spec: SampleSpec, feature_types, prefix: bool) -> None:
    """Stream one sample into the writer (its barcodes and genes are freed on return)."""
    from cellmill.io.prefetch import prefetched
    from cellmill.io.readers import open_sample
    from cellmill.io.sample import SampleStream

    with open_sample(spec.path, feature_types=feature_types) as sample:
        if sample.n_cells == 0 or sample.n_genes == 0:
            raise InputError(spec.path, f"sample {spec.name!r} is empty")
        if isinstance(sample, SampleStream):  # the next slice is read while this one is written
            slices = prefetched(sample.slices)
            sample = SampleStream(sample.barcodes, sample.var, sample.source, slices)
            try:
                writer.add_sample(spec.name, sample, spec.metadata, prefix_cells=prefix)
            finally:
                slices.close()  # no read in flight once the file closes
        else:
            writer.add_sample(spec.name, sample, spec.metadata, prefix_cells=prefix)


def _add_decoded(writer: StoreWriter, specs: list[SampleSpec], feature_types, prefix: bool,
                 workers: int, progress: bool) -> None:
    """Write the samples decoded by worker processes, in manifest order."""
    import shutil

    from cellmill.io.decode import decoded, tasks
    from cellmill.io.progress import bar
    from cellmill.io.sample import SampleStream
    from cellmill.io.scratch import scratch_dir

    spill = scratch_dir(writer.path, "ingest")  # decoded parts come back through files here
    shutil.rmtree(spill, ignore_errors=True)  # a killed run's
    spill.mkdir(parents=True)
    parts = decoded(tasks([s.path for s in specs], feature_types, spill=spill), workers)
    try:
        for i, spec in enumerate(bar(specs, desc="ingest", unit="sample", enabled=progress)):
            first = next(parts)
            assert (first.sample, first.index) == (i, 0), "parts out of order"
            barcodes, var, source = first.header
            if len(barcodes) == 0 or len(var) == 0:
                raise InputError(spec.path, f"sample {spec.name!r} is empty")
            stream = SampleStream(barcodes, var, source, _sample_slices(first, parts))
            del first
            writer.add_sample(spec.name, stream, spec.metadata, prefix_cells=prefix)
    finally:
        parts.close()  # shuts the pool down, also when the writer failed
        shutil.rmtree(spill, ignore_errors=True)


def _sample_slices(first, parts):
    """The slices of a sample whose first part is `first`, then of its further parts, each
    dropped once the writer has taken it."""
    n_parts, i = first.n_parts, first.sample
    slices = first.slices
    first.slices = []
    for k in range(1, n_parts + 1):
        while slices:
            yield slices.pop(0)
        if k < n_parts:
            part = next(parts)
            assert (part.sample, part.index) == (i, k), "parts out of order"
            slices = part.slices
            del part


def _sample_name(path: Path) -> str:
    name = path.name
    for suffix in (".h5ad", ".h5"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name
