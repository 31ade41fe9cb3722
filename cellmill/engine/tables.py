"""Result tables in OUTDIR, written atomically (a crash never leaves half a table)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cellmill.io import faults
from cellmill.kernels import text

QC_ROWS = 65536  # cells per piece of a cell table
CSV_ROWS = 65536  # rows formatted at a time by write_csv


def _quoted(values: list[str]) -> list[str]:
    """csv's minimal quoting: a field with a comma, a quote or a line break is quoted."""
    joined = "".join(values)
    if not any(c in joined for c in ',"\n\r'):  # the usual case: one scan, no per-value work
        return values

    def q(v: str) -> str:
        if "," in v or '"' in v or "\n" in v or "\r" in v:
            return '"' + v.replace('"', '""') + '"'
        return v
    return [q(v) for v in values]


def _dictionary(texts: list[str], codes: np.ndarray):
    """Cells of a column whose row r shows texts[codes[r]] ("" for code -1)."""
    raw = [t.encode("utf-8") for t in texts] + [b""]
    offsets = np.zeros(len(raw) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in raw], out=offsets[1:])
    blob = np.frombuffer(b"".join(raw), dtype=np.uint8)
    ids = np.where(codes < 0, len(texts), codes).astype(np.int64)
    return blob, offsets, ids


def _cells(col: pd.Series):
    """A column's CSV texts as pandas' to_csv writes them (na_rep ""): (bytes, offsets of
    its texts, the text of each row), or None for a dtype left to pandas."""
    dtype = col.dtype
    n = len(col)
    if dtype == np.float64:  # repr's text, by kernels/text.py ("" for NaN)
        blob, offsets = text.float_text(col.to_numpy())
        return blob, offsets, np.arange(n, dtype=np.int64)
    if dtype == np.bool_:
        return _dictionary(["False", "True"], col.to_numpy().astype(np.int64))
    if isinstance(dtype, np.dtype) and dtype.kind in "iu":
        values = col.to_numpy()
        if dtype == np.uint64 and n and values.max() > np.iinfo(np.int64).max:
            return None
        blob, offsets = text.int_text(values.astype(np.int64))
        return blob, offsets, np.arange(n, dtype=np.int64)
    if dtype is np.dtype(object) or isinstance(dtype, pd.CategoricalDtype | pd.StringDtype):
        # each distinct value formatted once (tables repeat names and labels)
        codes, uniques = pd.factorize(col.astype(object), use_na_sentinel=True)
        return _dictionary(_quoted([str(v) for v in uniques.tolist()]), codes)
    return None


def _rows(cols) -> str:
    """The CSV lines of columns given as _cells."""
    blob = np.concatenate([c[0] for c in cols])
    starts, ends, ids = [], [], []
    byte0 = cell0 = 0
    for b, offsets, rows in cols:
        starts.append(offsets[:-1] + byte0)
        ends.append(offsets[1:] + byte0)
        ids.append(rows + cell0)
        byte0 += len(b)
        cell0 += len(offsets) - 1
    out = text.join_rows(blob, np.concatenate(starts), np.concatenate(ends), np.stack(ids))
    return out.tobytes().decode("utf-8")


def write_csv(df: pd.DataFrame, fh, header: bool = True) -> None:
    """df.to_csv(fh, index=False, header=header), the same text, 2-5x faster for the
    result tables: pandas formats every float through numpy's slower printing, and builds a
    string per field (here the texts are bytes, joined into rows by kernels/text.py)."""
    for start in range(0, max(len(df), 1), CSV_ROWS):
        part = df.iloc[start: start + CSV_ROWS]
        cols = [_cells(part[c]) for c in part.columns]
        # (pandas quotes an empty field of a one-column table)
        if any(c is None for c in cols) or not df.columns.is_unique or df.shape[1] < 2:
            part.to_csv(fh, index=False, header=header and start == 0)
            continue
        if header and start == 0:
            fh.write(",".join(_quoted([str(c) for c in df.columns])) + "\n")
        if len(part):
            fh.write(_rows(cols))


def write_table(df: pd.DataFrame, path: Path) -> None:
    """Write a CSV atomically (a crash never leaves half a table)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        write_csv(df, fh)
    tmp.replace(path)
    faults.wrote()


class TableWriter:
    """A CSV written a piece at a time (`write(df)`, same columns each time) and renamed into
    place on close; on an error the partial file is removed. Use as a context manager."""

    def __init__(self, path: Path, columns: list[str]):
        self.path, self.columns = Path(path), list(columns)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self._fh = None

    def __enter__(self):
        self._fh = open(self.tmp, "w", newline="")
        write_csv(pd.DataFrame(columns=self.columns), self._fh)
        return self

    def write(self, df: pd.DataFrame) -> None:
        write_csv(df.reindex(columns=self.columns), self._fh, header=False)

    def __exit__(self, kind, exc, tb):
        self._fh.close()
        if kind is not None:
            self.tmp.unlink(missing_ok=True)
            return False
        self.tmp.replace(self.path)
        faults.wrote()
        return False


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
        with open(tmp, "w" if a == 0 else "a", newline="") as fh:
            write_csv(pd.DataFrame(part), fh, header=a == 0)
    tmp.replace(path)
    faults.wrote()
