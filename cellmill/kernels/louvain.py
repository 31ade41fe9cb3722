"""Louvain as Seurat 4.3.0's FindClusters(algorithm = 1) runs it (Waltman & van Eck's
ModularityOptimizer, as ported to C++ in Seurat), step for step: the same random numbers
(java.util.Random's generator), node order, move rule, tie-breaks, network reduction and
floating-point operation order. Own implementation from the published algorithm.

A network is CSR: first (n + 1), neighbor, edge_weight (both directions, no self links),
node_weight, and a scalar self_weight (total weight of self links; 0 for the SNN graph).
"""

import numba
import numpy as np

MULT = 0x5DEECE66D
MASK48 = (1 << 48) - 1


@numba.njit(nogil=True, cache=True)
def java_seed(seed):
    st = np.empty(1, dtype=np.uint64)
    st[0] = np.uint64((seed ^ MULT) & MASK48)
    return st


@numba.njit(nogil=True, cache=True)
def _next(st, bits):
    st[0] = (st[0] * np.uint64(MULT) + np.uint64(0xB)) & np.uint64(MASK48)
    return np.int64(st[0] >> np.uint64(48 - bits))


@numba.njit(nogil=True, cache=True)
def java_next_int(st, n):
    """java.util.Random.nextInt(n)."""
    if (n & -n) == n:
        return np.int64((n * _next(st, 31)) >> 31)
    while True:
        bits = _next(st, 31)
        val = bits % n
        if bits - val + (n - 1) < 2**31:  # no int32 overflow: accept
            return val


@numba.njit(nogil=True, cache=True)
def random_permutation(n, st):
    perm = np.arange(n)
    for i in range(n):
        j = java_next_int(st, n)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


@numba.njit(nogil=True, cache=True)
def local_moving(first, neighbor, edge_weight, node_weight, cluster, resolution, st):
    """Move nodes (random order, repeated until n nodes in a row stay) to the neighbouring
    cluster of the largest gain; renumbers `cluster` 0..K-1 in place. Returns (update, K)."""
    n = node_weight.shape[0]
    if n == 1:
        return False, 1
    cluster_weight = np.zeros(n)
    n_per = np.zeros(n, dtype=np.int64)
    for i in range(n):
        cluster_weight[cluster[i]] += node_weight[i]
        n_per[cluster[i]] += 1
    unused = np.empty(n, dtype=np.int64)
    n_unused = 0
    for i in range(n):
        if n_per[i] == 0:
            unused[n_unused] = i
            n_unused += 1
    perm = random_permutation(n, st)
    w_per = np.zeros(n)
    neigh = np.empty(n, dtype=np.int64)
    update = False
    n_stable = 0
    i = 0
    while n_stable < n:
        j = perm[i]
        nn = 0
        for k in range(first[j], first[j + 1]):
            c = cluster[neighbor[k]]
            if w_per[c] == 0:
                neigh[nn] = c
                nn += 1
            w_per[c] += edge_weight[k]
        cj = cluster[j]
        cluster_weight[cj] -= node_weight[j]
        n_per[cj] -= 1
        if n_per[cj] == 0:
            unused[n_unused] = cj
            n_unused += 1
        best = -1
        best_q = 0.0
        for t in range(nn):
            c = neigh[t]
            q = w_per[c] - node_weight[j] * cluster_weight[c] * resolution
            if q > best_q or (q == best_q and c < best):
                best = c
                best_q = q
            w_per[c] = 0.0
        if best_q == 0.0:
            best = unused[n_unused - 1]
            n_unused -= 1
        cluster_weight[best] += node_weight[j]
        n_per[best] += 1
        if best == cj:
            n_stable += 1
        else:
            cluster[j] = best
            n_stable = 1
            update = True
        i = i + 1 if i < n - 1 else 0
    new = np.empty(n, dtype=np.int64)
    k_clusters = 0
    for c in range(n):
        if n_per[c] > 0:
            new[c] = k_clusters
            k_clusters += 1
    for v in range(n):
        cluster[v] = new[cluster[v]]
    return update, k_clusters


@numba.njit(nogil=True, cache=True)
def reduce_network(first, neighbor, edge_weight, node_weight, self_weight, cluster, k):
    """The network of the clusters (node = cluster), neighbours in order of first encounter
    over the member nodes (ascending) and their neighbour lists; intra-cluster edge weight
    goes to self_weight."""
    n = node_weight.shape[0]
    members_ptr = np.zeros(k + 1, dtype=np.int64)
    for v in range(n):
        members_ptr[cluster[v] + 1] += 1
    for c in range(k):
        members_ptr[c + 1] += members_ptr[c]
    fill = members_ptr[:-1].copy()
    members = np.empty(n, dtype=np.int64)
    for v in range(n):
        members[fill[cluster[v]]] = v
        fill[cluster[v]] += 1
    r_first = np.zeros(k + 1, dtype=np.int64)
    r_neighbor = np.empty(neighbor.shape[0], dtype=np.int64)
    r_weight = np.empty(neighbor.shape[0])
    r_node_weight = np.zeros(k)
    r_self = self_weight
    acc = np.zeros(k)
    seen = np.empty(k, dtype=np.int64)
    n_edges = 0
    for c in range(k):
        ns = 0
        for t in range(members_ptr[c], members_ptr[c + 1]):
            v = members[t]
            r_node_weight[c] += node_weight[v]
            for e in range(first[v], first[v + 1]):
                d = cluster[neighbor[e]]
                if d != c:
                    if acc[d] == 0:
                        seen[ns] = d
                        ns += 1
                    acc[d] += edge_weight[e]
                else:
                    r_self += edge_weight[e]
        for t in range(ns):
            r_neighbor[n_edges + t] = seen[t]
            r_weight[n_edges + t] = acc[seen[t]]
            acc[seen[t]] = 0.0
        n_edges += ns
        r_first[c + 1] = n_edges
    return r_first, r_neighbor[:n_edges].copy(), r_weight[:n_edges].copy(), r_node_weight, r_self


@numba.njit(nogil=True, cache=True)
def louvain_run(first, neighbor, edge_weight, node_weight, self_weight, cluster, resolution,
                st):
    """One Louvain run from `cluster` (renumbered in place): local moving, then the same on
    the reduced network from singletons, level by level, merged back. True if anything
    moved (Seurat's runLouvainAlgorithm, unrolled)."""
    n = node_weight.shape[0]
    if n == 1:
        return False
    update, k = local_moving(first, neighbor, edge_weight, node_weight, cluster, resolution, st)
    if k == n:
        return update
    r_first, r_nb, r_w, r_nw, r_self = reduce_network(first, neighbor, edge_weight,
                                                      node_weight, self_weight, cluster, k)
    sub = np.arange(k)
    if louvain_run(r_first, r_nb, r_w, r_nw, r_self, sub, resolution, st):
        for v in range(n):
            cluster[v] = sub[cluster[v]]
        update = True
    return update


@numba.njit(nogil=True, cache=True)
def quality(first, neighbor, edge_weight, node_weight, self_weight, cluster, resolution):
    """Seurat's calcQualityFunction (modularity with the rescaled resolution)."""
    n = node_weight.shape[0]
    q = 0.0
    for i in range(n):
        c = cluster[i]
        for e in range(first[i], first[i + 1]):
            if cluster[neighbor[e]] == c:
                q += edge_weight[e]
    q += self_weight
    k = cluster.max() + 1
    cw = np.zeros(k)
    for i in range(n):
        cw[cluster[i]] += node_weight[i]
    for c in range(k):
        q -= cw[c] * cw[c] * resolution
    total = 0.0
    for e in range(edge_weight.shape[0]):
        total += edge_weight[e]
    return q / (2.0 * (total / 2.0) + self_weight)


@numba.njit(nogil=True, cache=True)
def seurat_louvain(first, neighbor, edge_weight, resolution, n_starts, n_iterations, seed):
    """Seurat's RunModularityClusteringCpp for algorithm 1 (modularity function 1): n_starts
    runs from singletons with one generator seeded once, each iterated up to n_iterations
    times while it improves; the clustering of the highest quality (first on ties).
    Returns (cluster labels 0..K-1 before ordering by size, quality)."""
    n = first.shape[0] - 1
    node_weight = np.zeros(n)
    for i in range(n):
        for e in range(first[i], first[i + 1]):
            node_weight[i] += edge_weight[e]
    total = 0.0
    for e in range(edge_weight.shape[0]):
        total += edge_weight[e]
    res2 = resolution / (2.0 * (total / 2.0) + 0.0)
    st = java_seed(seed)
    best = np.arange(n)
    best_q = -np.inf
    for _ in range(n_starts):
        cluster = np.arange(n)
        j = 0
        while True:
            update = louvain_run(first, neighbor, edge_weight, node_weight, 0.0, cluster,
                                 res2, st)
            j += 1
            q = quality(first, neighbor, edge_weight, node_weight, 0.0, cluster, res2)
            if not (j < n_iterations and update):
                break
        if q > best_q:
            best = cluster.copy()
            best_q = q
    return best, best_q
