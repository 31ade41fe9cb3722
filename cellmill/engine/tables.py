"""Result tables in OUTDIR, written atomically (a crash never leaves half a table)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cellmill.io import faults

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


def _strings(col: pd.Series) -> list[str] | None:
    """The CSV text of a column as pandas' to_csv writes it (na_rep ""), or None for a
    dtype left to pandas."""
    dtype = col.dtype
    if dtype == np.float64:  # repr: the shortest round-trip text, as numpy's str
        vals = col.to_numpy()
        out = list(map(float.__repr__, vals.tolist()))
        for i in np.flatnonzero(np.isnan(vals)).tolist():
            out[i] = ""
        return out
    if isinstance(dtype, np.dtype) and dtype.kind in "iub":
        return list(map(str, col.to_numpy().tolist()))
    if dtype is np.dtype(object) or isinstance(dtype, pd.CategoricalDtype | pd.StringDtype):
        # each distinct value formatted once (tables repeat names and labels)
        codes, uniques = pd.factorize(col.astype(object), use_na_sentinel=True)
        text = _quoted([str(v) for v in uniques.tolist()]) + [""]
        return np.asarray(text, dtype=object)[codes].tolist()
    return None


def write_csv(df: pd.DataFrame, fh, header: bool = True) -> None:
    """df.to_csv(fh, index=False, header=header), the same text, about 2x faster for the
    numeric result tables: pandas formats every float through numpy's slower printing."""
    for start in range(0, max(len(df), 1), CSV_ROWS):
        part = df.iloc[start: start + CSV_ROWS]
        cols = [_strings(part[c]) for c in part.columns]
        # (pandas quotes an empty field of a one-column table)
        if any(c is None for c in cols) or not df.columns.is_unique or df.shape[1] < 2:
            part.to_csv(fh, index=False, header=header and start == 0)
            continue
        if header and start == 0:
            fh.write(",".join(_quoted([str(c) for c in df.columns])) + "\n")
        if len(part):
            fh.write("\n".join(map(",".join, zip(*cols, strict=True))) + "\n")


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
