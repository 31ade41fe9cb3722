"""Matrix Market folders as written by Cell Ranger (``filtered_feature_bc_matrix/``).

A folder holds ``matrix.mtx[.gz]`` (coordinate format, features x barcodes, 1-based),
``barcodes.tsv[.gz]`` and either ``features.tsv[.gz]`` (v3: id, name, type, ...) or
``genes.tsv[.gz]`` (v2: id, name; every feature is "Gene Expression"). Files may be gzipped or
plain; GEO-style prefixed names (``GSM1_matrix.mtx.gz`` ...) are accepted when the folder holds
exactly one such set. Header comment lines (``%metadata_json: ...``) are skipped.

The body is parsed with pandas' C parser. Names follow Seurat's ``Read10X``: ``make.unique``
over all feature names, then the feature-type subset, then SeuratObject's clean-up.
"""

from __future__ import annotations

import csv
import gzip
import os
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellmill.errors import InputError
from cellmill.io.names import fill_empty, make_unique, seurat_clean
from cellmill.io.sample import (
    GENE_EXPRESSION,
    Sample,
    build_var,
    canonical,
    check_not_empty,
    integer_counts,
    keep_mask,
    make_sample,
    take_features,
)

READ_ERRORS = (OSError, EOFError, zlib.error, ValueError, UnicodeDecodeError, pd.errors.ParserError)


def read_mex(
    path: str | os.PathLike,
    feature_types: Iterable[str] | str | None = (GENE_EXPRESSION,),
    genome: str | None = None,
) -> Sample:
    """Read a Matrix Market folder (or the path of its ``matrix.mtx[.gz]``)."""
    folder, mtx, barcodes_file, features_file = _layout(path, genome)
    barcodes = _read_column_table(barcodes_file, 1)[0]
    table = _read_column_table(features_file, 3)
    counts = _read_mtx(mtx, n_features=table[0].size, n_barcodes=barcodes.size,
                       features_name=features_file.name, barcodes_name=barcodes_file.name)
    var, mask = _features(folder, table, feature_types)
    return make_sample(folder, take_features(counts, mask), barcodes, var)


def read_mex_header(
    path: str | os.PathLike,
    feature_types: Iterable[str] | str | None = (GENE_EXPRESSION,),
) -> pd.DataFrame:
    """The genes (``Sample.var``) of a Matrix Market folder without reading its entries: the
    feature and barcode tables and the matrix's header lines, checked against each other."""
    folder, mtx, barcodes_file, features_file = _layout(path, None)
    table = _read_column_table(features_file, 3)
    _, n_rows, n_cols, _, _ = _read_header(mtx)
    if n_rows != table[0].size:
        raise InputError(mtx, f"matrix has {n_rows} rows but {features_file.name} lists "
                         f"{table[0].size} features")
    n_barcodes = _read_column_table(barcodes_file, 1)[0].size
    if n_cols != n_barcodes:
        raise InputError(mtx, f"matrix has {n_cols} columns but {barcodes_file.name} lists "
                         f"{n_barcodes} barcodes")
    var, _ = _features(folder, table, feature_types)
    check_not_empty(folder, n_barcodes, len(var))
    return var


def _layout(path: str | os.PathLike, genome: str | None) -> tuple[Path, Path, Path, Path]:
    """(folder, matrix, barcodes, features) files of a folder or of its matrix file."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or folder")
    folder = path if path.is_dir() else path.parent
    mtx, barcodes_file, features_file = _find_files(folder, path if path.is_file() else None)
    if genome is not None:
        raise InputError(folder, f"genome={genome!r} given but Matrix Market folders record "
                         "no genome")
    return folder, mtx, barcodes_file, features_file


def _features(folder: Path, table: list[np.ndarray], feature_types):
    """(var, mask of the kept features) from the columns of features.tsv / genes.tsv."""
    ids = table[0]
    names = fill_empty(table[1], ids) if len(table) > 1 else ids
    if len(table) > 2:
        types = table[2]
    else:
        types = np.full(ids.size, GENE_EXPRESSION, dtype=object)
    mask = keep_mask(folder, types, feature_types)
    unique = make_unique(names)  # Read10X: over the whole feature vector
    if mask is not None:
        unique, ids, types = unique[mask], ids[mask], types[mask]
    return build_var(seurat_clean(unique), ids, types, None), mask


def _find_files(folder: Path, mtx: Path | None) -> tuple[Path, Path, Path]:
    files = {p.name: p for p in folder.iterdir() if p.is_file()}
    if mtx is None:
        candidates = [n for n in files if n.endswith(("matrix.mtx", "matrix.mtx.gz"))]
        plain = [n for n in candidates if n in ("matrix.mtx", "matrix.mtx.gz")]
        if plain:
            candidates = plain
        if not candidates:
            raise InputError(folder, "not a Matrix Market folder: no matrix.mtx or matrix.mtx.gz")
        if len(candidates) > 1:
            raise InputError(folder, f"several matrix files ({', '.join(sorted(candidates))})")
        mtx = files[candidates[0]]
    prefix = mtx.name[: mtx.name.rfind("matrix.mtx")]

    def find(*stems: str) -> Path | None:
        for stem in stems:
            for suffix in (".tsv.gz", ".tsv"):
                if prefix + stem + suffix in files:
                    return files[prefix + stem + suffix]
        return None

    barcodes = find("barcodes")
    if barcodes is None:
        raise InputError(folder, f"no {prefix}barcodes.tsv[.gz] next to {mtx.name}")
    features = find("features", "genes")
    if features is None:
        raise InputError(folder, f"no {prefix}features.tsv[.gz] or genes.tsv[.gz] next to "
                         f"{mtx.name}")
    return mtx, barcodes, features


def _open_text(path: Path):
    with open(path, "rb") as fh:
        gzipped = fh.read(2) == b"\x1f\x8b"
    if gzipped:
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_column_table(path: Path, max_cols: int) -> list[np.ndarray]:
    """The first ``max_cols`` tab-separated columns of a headerless table, as str arrays."""
    try:
        with _open_text(path) as fh:
            df = pd.read_csv(
                fh, sep="\t", header=None, dtype=str, na_filter=False,
                quoting=csv.QUOTE_NONE, engine="c",
            )
    except pd.errors.EmptyDataError:
        return [np.empty(0, dtype=object)]
    except READ_ERRORS as e:
        raise InputError(path, f"cannot read ({e})") from e
    return [df[c].to_numpy(dtype=object) for c in df.columns[:max_cols]]  # str already


def _read_header(path: Path):
    """(field, n_rows, n_cols, n_entries, header line count) of a Matrix Market file."""
    try:
        with _open_text(path) as fh:
            banner = fh.readline()
            parts = banner.strip().lower().split()
            if len(parts) != 5 or parts[0] != "%%matrixmarket" or parts[1] != "matrix":
                raise InputError(path, "not a Matrix Market file (bad %%MatrixMarket banner)")
            fmt, field, symmetry = parts[2:]
            if fmt != "coordinate":
                raise InputError(path, f"Matrix Market format {fmt!r} is not supported, "
                                 "expected 'coordinate'")
            if field not in ("integer", "real", "double", "pattern"):
                raise InputError(path, f"Matrix Market field {field!r} cannot hold counts")
            if symmetry != "general":
                raise InputError(path, f"Matrix Market symmetry {symmetry!r} is not supported, "
                                 "expected 'general'")
            n_lines = 1
            line = fh.readline()
            while line.startswith("%") or (line and not line.strip()):
                n_lines += 1
                line = fh.readline()
            size = line.split()
            n_lines += 1
    except InputError:
        raise
    except READ_ERRORS as e:
        raise InputError(path, f"cannot read ({e})") from e
    try:
        n_rows, n_cols, nnz = (int(x) for x in size)
    except ValueError:
        raise InputError(path, f"bad size line {line.strip()!r}") from None
    return field, n_rows, n_cols, nnz, n_lines


def _read_mtx(path: Path, n_features: int, n_barcodes: int, features_name: str,
              barcodes_name: str) -> sp.csr_matrix:
    field, n_rows, n_cols, nnz, n_header = _read_header(path)
    if n_rows != n_features:
        raise InputError(path, f"matrix has {n_rows} rows but {features_name} lists "
                         f"{n_features} features")
    if n_cols != n_barcodes:
        raise InputError(path, f"matrix has {n_cols} columns but {barcodes_name} lists "
                         f"{n_barcodes} barcodes")
    pattern = field == "pattern"
    # values as float64 (exact for any count below 2**53): integer_counts() then reports a
    # non-integer or negative value with the value itself, whatever the declared field
    body = _read_body(path, n_header, 2 if pattern else 3)
    if len(body) != nnz:
        raise InputError(path, f"header declares {nnz} entries but the file has {len(body)} "
                         "(truncated?)")
    rows = body[0].to_numpy()
    cols = body[1].to_numpy()
    if nnz and (rows.min() < 1 or rows.max() > n_rows or cols.min() < 1 or cols.max() > n_cols):
        raise InputError(path, "entry coordinates outside the declared dimensions")
    values = np.ones(nnz, dtype=np.int32) if pattern else integer_counts(path, body[2].to_numpy())
    del body
    # features x barcodes (1-based) -> barcodes x features
    coo = sp.coo_matrix((values, (cols - 1, rows - 1)), shape=(n_cols, n_rows))
    return canonical(coo.tocsr())


def _read_body(path: Path, n_header: int, ncol: int) -> pd.DataFrame:
    dtype = {0: np.int64, 1: np.int64, 2: np.float64}
    with open(path, "rb") as fh:
        compression = "gzip" if fh.read(2) == b"\x1f\x8b" else None
    try:
        return pd.read_csv(
            path, sep=r"\s+", header=None, skiprows=n_header, usecols=range(ncol),
            names=range(ncol), dtype={i: dtype[i] for i in range(ncol)}, engine="c",
            compression=compression,
        )
    except pd.errors.EmptyDataError:
        return pd.DataFrame({i: np.empty(0, dtype=dtype[i]) for i in range(ncol)})
    except READ_ERRORS as e:
        raise InputError(path, f"cannot parse the matrix entries ({e})") from e
