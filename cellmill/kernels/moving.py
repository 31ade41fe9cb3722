"""Modularity local moving over row blocks of a graph (the first level of Louvain / Leiden).

The graph is symmetric CSR (node ids 0..N-1 in `indices`, rows in node order); a block is rows
r0..r0+len(indptr)-2. Node state is O(N): community labels, node strengths k, community
strengths K. A node is moved to the neighbouring community c with the largest gain
w(i, c) - gamma * k_i * K_c / 2m (its own community, with i removed, wins ties), which is how
the modularity with resolution gamma (igraph's and leidenalg's objective) grows by a move.
Diagonal entries are skipped (the objective is defined on the graph without self-loops).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def row_strengths(indptr, indices, data, r0, out):
    """out[r0 + r] = sum of row r's weights off the diagonal."""
    for r in range(len(indptr) - 1):
        i = r0 + r
        s = 0.0
        for p in range(indptr[r], indptr[r + 1]):
            if indices[p] != i:
                s += data[p]
        out[i] = s


@njit(nogil=True, cache=True)
def move_rows(indptr, indices, data, r0, labels, k, comm, gamma_2m, dirty, w, touched):
    """One sweep of local moving over the block's rows whose `dirty` flag is set.

    A visited node is cleared; when it moves, its neighbours outside its new community are
    marked dirty (Leiden's queue rule), so a sweep over all blocks that finds no dirty node
    has reached a local optimum. `w` (float64, N) must be zero on entry and is left zero;
    `touched` (int64, N) is scratch. Returns the number of moves.
    """
    moves = 0
    for r in range(len(indptr) - 1):
        i = r0 + r
        if not dirty[i]:
            continue
        dirty[i] = False
        own = labels[i]
        ki = k[i]
        n_t = 0
        for p in range(indptr[r], indptr[r + 1]):
            j = indices[p]
            if j == i:
                continue
            c = labels[j]
            if w[c] == 0.0:
                touched[n_t] = c
                n_t += 1
            w[c] += data[p]
        comm[own] -= ki
        best = own
        best_gain = w[own] - gamma_2m * ki * comm[own]
        for t in range(n_t):
            c = touched[t]
            gain = w[c] - gamma_2m * ki * comm[c]
            if gain > best_gain:
                best_gain = gain
                best = c
        comm[best] += ki
        for t in range(n_t):
            w[touched[t]] = 0.0
        if best != own:
            labels[i] = best
            moves += 1
            for p in range(indptr[r], indptr[r + 1]):
                j = indices[p]
                if j != i and labels[j] != best:
                    dirty[j] = True
    return moves


@njit(nogil=True, cache=True)
def community_edges(indptr, indices, data, r0, labels):
    """The block's entries above the diagonal as edges between communities: (a, b, w) with
    a = min and b = max of the two labels (a == b: an edge inside a community)."""
    n = 0
    for r in range(len(indptr) - 1):
        i = r0 + r
        for p in range(indptr[r], indptr[r + 1]):
            if indices[p] > i:
                n += 1
    a = np.empty(n, np.int64)
    b = np.empty(n, np.int64)
    wt = np.empty(n, np.float64)
    n = 0
    for r in range(len(indptr) - 1):
        i = r0 + r
        for p in range(indptr[r], indptr[r + 1]):
            j = indices[p]
            if j > i:
                ci, cj = labels[i], labels[j]
                a[n] = min(ci, cj)
                b[n] = max(ci, cj)
                wt[n] = data[p]
                n += 1
    return a, b, wt
