"""Feature-name rules of R / Seurat: ``make.unique`` and SeuratObject's character clean-up."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def make_unique(names: Iterable[str], sep: str = ".") -> np.ndarray:
    """R's ``make.unique(names, sep)``, element for element.

    The first occurrence of a name keeps it. Every later occurrence of a name ``x`` gets
    ``x<sep>k`` with the smallest ``k >= 1`` (counting on from the last ``k`` used for ``x``)
    that is not already taken, neither by an original name anywhere in the vector nor by a
    name created earlier. ``make_unique(["a", "a", "a", "a.1"])`` -> ``a, a.2, a.3, a.1``.
    Returns an object array of str.
    """
    names = [str(x) for x in names]
    out = np.array(names, dtype=object)
    if len(set(names)) == len(names):
        return out
    taken = set(names)
    seen: set[str] = set()
    next_k: dict[str, int] = {}
    for i, name in enumerate(names):
        if name not in seen:
            seen.add(name)
            continue
        k = next_k.get(name, 1)
        candidate = f"{name}{sep}{k}"
        while candidate in taken:
            k += 1
            candidate = f"{name}{sep}{k}"
        taken.add(candidate)
        next_k[name] = k + 1
        out[i] = candidate
    return out


def seurat_clean(names: Iterable[str]) -> np.ndarray:
    """What SeuratObject 4.1 (``CreateAssayObject``) does to feature names it is given.

    In its order: ``make.unique`` if there are duplicates, then ``_`` -> ``-`` and ``|`` -> ``-``.
    SeuratObject stops there, so a clean-up that creates a duplicate (``A_B`` next to ``A-B``)
    leaves it with duplicate row names; we apply ``make.unique`` once more so that the names
    stay a valid unique index (a no-op whenever Seurat's own result is unique).
    """
    cleaned = [n.replace("_", "-").replace("|", "-") for n in make_unique(names)]
    return make_unique(cleaned)


def seurat_feature_names(names: Iterable[str], keep: np.ndarray | None = None) -> np.ndarray:
    """Names as Seurat has them after ``Read10X[_h5]`` + ``CreateSeuratObject``.

    ``Read10X``/``Read10X_h5`` run ``make.unique`` over the whole feature vector of a matrix (all
    feature types together); the reader then keeps a subset (``keep``: a boolean mask or index
    array, e.g. the "Gene Expression" rows), and ``CreateAssayObject`` cleans that subset.
    """
    unique = make_unique(names)
    if keep is not None:
        unique = unique[keep]
    return seurat_clean(unique)


def fill_empty(names: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Name a feature by its id where its name is empty (as Seurat's ``Read10X`` does for NA)."""
    names = np.asarray(names, dtype=object)
    empty = names == ""
    if empty.any():
        names = names.copy()
        names[empty] = np.asarray(ids, dtype=object)[empty]
    return names
