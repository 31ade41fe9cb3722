"""Differential expression with samples as replicates: edgeR + limma-voom on pseudobulk counts.

`voom_de` runs, on a genes x samples count matrix, the standard R pipeline

    y <- DGEList(counts, group = group)
    keep <- filterByExpr(y, group = group)
    y <- y[keep, , keep.lib.sizes = FALSE]
    y <- calcNormFactors(y)
    v <- voom(y, design)
    fit <- eBayes(lmFit(v, design))
    topTable(fit, coef = coef + 1, number = Inf, sort.by = "none")

with edger.py and limma.py (edgeR 3.40 / limma 3.54 behaviour; parity tested against R in
tests/test_pseudobulk_de.py). ValueError when the design is not estimable, leaves no residual
df, or a sample has no counts (before or after the filter).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cellmill.stages.statistics.edger import filter_by_expr, library_sizes, tmm_factors
from cellmill.stages.statistics.limma import check_design, ebayes, lm_fit, top_table, voom


@dataclass
class VoomResult:
    """keep: filterByExpr mask over all genes; lib_size: column sums of the kept counts;
    norm_factors: TMM factors; table: topTable columns for the kept genes (gene order);
    df_prior, s2_prior: eBayes' prior."""

    keep: np.ndarray
    lib_size: np.ndarray
    norm_factors: np.ndarray
    table: pd.DataFrame
    df_prior: float
    s2_prior: float


def voom_de(counts, group, design, coef: int, genes=None) -> VoomResult:
    """edgeR filterByExpr + TMM, limma voom + lmFit + eBayes, topTable of coefficient `coef`
    (0-based column of `design`, samples x coefficients). counts: genes x samples."""
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError("counts must be a genes x samples matrix")
    d = check_design(design, c.shape[1])
    if not 0 <= int(coef) < d.shape[1]:
        raise ValueError(f"coef {coef} is not a column of the design (0..{d.shape[1] - 1})")
    if genes is not None and len(genes) != c.shape[0]:
        raise ValueError(f"{len(genes)} gene names for {c.shape[0]} genes")
    keep = filter_by_expr(c, group, lib_size=library_sizes(c))
    kept = c[keep]
    if kept.shape[0] < 2:
        raise ValueError(f"only {kept.shape[0]} gene(s) pass filterByExpr; voom needs two")
    lib = library_sizes(kept)  # keep.lib.sizes = FALSE
    nf = tmm_factors(kept, lib)
    v = voom(kept, d, lib * nf)
    fit = ebayes(lm_fit(v["E"], d, v["weights"]), coefs=[int(coef)])
    names = None if genes is None else np.asarray(genes)[keep]
    return VoomResult(keep=keep, lib_size=lib, norm_factors=nf,
                      table=top_table(fit, int(coef), names),
                      df_prior=float(fit["df_prior"]), s2_prior=float(fit["s2_prior"]))
