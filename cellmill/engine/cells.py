"""Per-cell helpers every stage uses: the QC mask, rows of an obsm array for some cells, and
all-cells arrays made or written from the rows of some cells, a block at a time."""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger("cellmill")
def obsm_row_blocks(store, name: str, cells: np.ndarray, n_cols: int, rows: int = 65536):
    """(a, b, rows cells[a:b] of obsm/name, first n_cols columns) in order, read one storage
    chunk at a time and handed out about `rows` at a time."""
    arr = store.root["obsm"][name]
    n, n_cols = arr.shape[0], min(n_cols, arr.shape[1])
    step = arr.chunks[0]
    parts, start, held = [], 0, 0
    for r0 in range(0, n, step):
        a, b = np.searchsorted(cells, [r0, r0 + step])
        if b > a:
            parts.append(arr[r0:min(r0 + step, n), :n_cols][cells[a:b] - r0])
            held += b - a
        if held >= rows or (r0 + step >= n and parts):
            yield start, start + held, np.concatenate(parts) if len(parts) > 1 else parts[0]
            parts, start, held = [], start + held, 0


def obsm_rows(store, name: str, cells: np.ndarray, n_cols: int,
              transposed: bool = False) -> np.ndarray:
    """Rows `cells` (ascending) and the first n_cols columns of obsm/name, read one storage
    chunk at a time: the whole n_cells x 50 float64 X_pca is never in memory. `transposed`:
    returned as n_cols x len(cells), C-contiguous."""
    arr = store.root["obsm"][name]
    n_cols = min(n_cols, arr.shape[1])
    out = np.empty((n_cols, len(cells)) if transposed else (len(cells), n_cols),
                   dtype=arr.dtype)
    for a, b, part in obsm_row_blocks(store, name, cells, n_cols, rows=arr.chunks[0]):
        if transposed:
            out[:, a:b] = part.T
        else:
            out[a:b] = part
    return out


def passed_pcs(store, n_pcs: int, transposed: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The QC-passed cells and their first n_pcs principal components (transposed: n_pcs x
    cells)."""
    cells = np.flatnonzero(qc_passed(store))
    return cells, obsm_rows(store, "X_pca", cells, n_pcs, transposed)


def all_cells(rows: np.ndarray, cells: np.ndarray, n_cells: int, fill,
              lookup: np.ndarray | None = None, block: int = 65536) -> np.ndarray:
    """An n_cells x ... array with `rows` (mapped through `lookup` when given) at `cells` and
    `fill` elsewhere, copied in blocks (no full-size temporary)."""
    dtype = rows.dtype if lookup is None else lookup.dtype
    out = np.full((n_cells,) + rows.shape[1:], fill, dtype=dtype)
    for a in range(0, len(cells), block):
        part = rows[a:a + block]
        out[cells[a:a + block]] = part if lookup is None else lookup[part]
    return out


def write_all_cells(store, slot: str, name: str, rows: np.ndarray, cells: np.ndarray, fill,
                    lookup: np.ndarray | None = None, block: int = 65536) -> None:
    """all_cells(...) written into slot/name a block of cells at a time: the n_cells x ...
    array is never whole in memory."""
    import zarr

    n_cells = store.n_cells
    dtype = rows.dtype if lookup is None else lookup.dtype  # as all_cells makes it
    path = store.begin_array(slot, name, (n_cells,) + rows.shape[1:], dtype, block,
                             fill_value=fill)
    arr = zarr.open_array(path, mode="r+")
    for r0 in range(0, n_cells, block):
        r1 = min(r0 + block, n_cells)
        a, b = np.searchsorted(cells, [r0, r1])
        arr[r0:r1] = all_cells(rows[a:b], cells[a:b] - r0, r1 - r0, fill, lookup)
    store.commit_array(slot, name)


def qc_passed(store) -> np.ndarray:
    """The QC mask stored by the qc stage (all cells if qc has not run)."""
    if "qc_pass" in store.obs_columns():
        return np.asarray(store.obs_column("qc_pass")).astype(bool)
    return np.ones(store.n_cells, dtype=bool)
