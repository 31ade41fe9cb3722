"""Result tables in OUTDIR, written atomically (a crash never leaves half a table)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cellmill.io import faults

QC_ROWS = 65536  # cells per piece of a cell table


def write_table(df: pd.DataFrame, path: Path) -> None:
    """Write a CSV atomically (a crash never leaves half a table)."""
    tmp = path.with_name(path.name + ".tmp")
    df.to_csv(tmp, index=False)
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
        pd.DataFrame(columns=self.columns).to_csv(self._fh, index=False)
        return self

    def write(self, df: pd.DataFrame) -> None:
        df.reindex(columns=self.columns).to_csv(self._fh, index=False, header=False)

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
        pd.DataFrame(part).to_csv(tmp, index=False, header=a == 0, mode="w" if a == 0 else "a")
    tmp.replace(path)
    faults.wrote()
