"""Ingest work on a slice of cells: remap gene columns and count QC metrics in one sweep;
re-sort rows whose genes the remap put out of order."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def remap_and_count(data, indices, indptr, cols, gene_cells, gene_counts):
    """Map sample columns to study columns (int32), return per-cell totals and detected
    genes, and add per-gene detected cells / total counts into the given arrays."""
    n = len(indptr) - 1
    out = np.empty(len(indices), dtype=np.int32)
    n_counts = np.zeros(n, dtype=np.int64)
    n_features = np.zeros(n, dtype=np.int32)
    for i in range(n):
        total = 0
        for p in range(indptr[i], indptr[i + 1]):
            c = cols[indices[p]]
            out[p] = c
            v = np.int64(data[p])
            total += v
            gene_cells[c] += 1
            gene_counts[c] += v
        n_counts[i] = total
        n_features[i] = indptr[i + 1] - indptr[i]
    return out, n_counts, n_features


@numba.njit(nogil=True, cache=True)
def sort_rows(data, indices, indptr):
    """Sort the column indices of each CSR row in place, moving the values along (the
    indices of a row are distinct, so the order is unique)."""
    for i in range(len(indptr) - 1):
        a, b = indptr[i], indptr[i + 1]
        if b - a < 2:
            continue
        order = np.argsort(indices[a:b], kind="mergesort")
        indices[a:b] = indices[a:b][order]
        data[a:b] = data[a:b][order]


# what check_counts / check_slice found, in the order the messages take precedence
OK, BAD_INDEX, NOT_FINITE, NOT_INTEGER, NEGATIVE, TOO_LARGE = 0, 1, 2, 3, 4, 5
INT32_MAX = 2**31 - 1


@numba.njit(nogil=True, cache=True, inline="always")
def _count_problem(x):
    """What is wrong with a count (OK when it is an integer in 0..INT32_MAX)."""
    xf = np.float64(x)  # exact for floats; an integer type gives an integral value
    if not (xf - xf == 0.0):  # NaN or infinite
        return NOT_FINITE
    if xf != np.floor(xf):
        return NOT_INTEGER
    if xf < 0.0:
        return NEGATIVE
    if xf > INT32_MAX:
        return TOO_LARGE
    return OK


@numba.njit(nogil=True, cache=True, inline="always")
def _worse(problem, where, found, p):
    """The problem to report: the first occurrence of the one of highest precedence."""
    if found != OK and (problem == OK or found < problem):
        return found, p
    return problem, where


@numba.njit(nogil=True, cache=True)
def check_counts(data, out_data):
    """check_slice's checks of counts alone (1-D), copied into out_data (int32) when it is
    not empty. Returns (problem, position)."""
    problem = OK
    where = -1
    copy = len(out_data) > 0
    for p in range(len(data)):
        found = _count_problem(data[p])
        problem, where = _worse(problem, where, found, p)
        if copy and found == OK:
            out_data[p] = np.int32(data[p])
    return problem, where


@numba.njit(nogil=True, cache=True)
def check_slice(data, indices, indptr, n_cols, out_indices, out_data):
    """The checks of a slice's CSR arrays in one sweep, with its indices copied into
    out_indices (int32) and, when out_data is not empty, its counts into out_data (int32).

    Returns (problem, position, canonical, zeros): the first problem in precedence order
    (an index out of 0..n_cols-1, then a non-finite, non-integer, negative or too large count)
    and where it first occurs; whether every row's indices increase strictly (sorted, no
    duplicates); and how many stored counts are 0."""
    problem = OK
    where = -1
    canonical = True
    zeros = 0
    copy = len(out_data) > 0
    for i in range(len(indptr) - 1):
        prev = -1
        for p in range(indptr[i], indptr[i + 1]):
            j = indices[p]
            if j < 0 or j >= n_cols:
                problem, where = _worse(problem, where, BAD_INDEX, p)
                continue
            out_indices[p] = j
            if j <= prev:
                canonical = False
            prev = j
            x = data[p]
            found = _count_problem(x)
            if found != OK:
                problem, where = _worse(problem, where, found, p)
                continue
            if x == 0:
                zeros += 1
            if copy:
                out_data[p] = np.int32(x)
    return problem, where, canonical, zeros
