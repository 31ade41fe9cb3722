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
