"""Write small Cell Ranger v3 HDF5 files for tests (independent of cellmill's code)."""

from __future__ import annotations

import h5py
import numpy as np
import scipy.sparse as sp


def write_10x_v3(path, counts: sp.csr_matrix, barcodes, genes, ids=None, types=None):
    """counts: cells x genes CSR. Written as Cell Ranger does: CSC features x barcodes."""
    counts = sp.csr_matrix(counts)
    n_cells, n_genes = counts.shape
    ids = ids if ids is not None else [f"ENSG{i:011d}" for i in range(n_genes)]
    types = types if types is not None else ["Gene Expression"] * n_genes
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["barcodes"] = np.array(barcodes, dtype="S")
        m["data"] = counts.data.astype(np.int32)
        m["indices"] = counts.indices.astype(np.int64)
        m["indptr"] = counts.indptr.astype(np.int64)
        m["shape"] = np.array([n_genes, n_cells], dtype=np.int32)
        ft = m.create_group("features")
        ft["id"] = np.array(ids, dtype="S")
        ft["name"] = np.array(genes, dtype="S")
        ft["feature_type"] = np.array(types, dtype="S")
        ft["genome"] = np.array(["mm10"] * n_genes, dtype="S")


def random_counts(n_cells, n_genes, density=0.2, seed=0, max_count=20):
    rng = np.random.default_rng(seed)
    m = sp.random(n_cells, n_genes, density=density, format="csr", random_state=rng,
                  data_rvs=lambda k: rng.integers(1, max_count, size=k))
    m.sort_indices()
    return m.astype(np.int64)


def barcodes(n, seed=0):
    rng = np.random.default_rng(seed)
    seen, out = set(), []
    while len(out) < n:
        b = "".join(rng.choice(list("ACGT"), 16)) + "-1"
        if b not in seen:
            seen.add(b)
            out.append(b)
    return out
