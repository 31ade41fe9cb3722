"""The study design: samples, populations and how many cells each gets."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONDITIONS = ("SNI", "Sham")
TIMEPOINTS = ("3d", "14d", "5mo")
SEXES = ("female", "male")

# Cells after QC per condition x time point in the study (195,718 in total).
STUDY_CELLS = {
    ("SNI", "3d"): 31_852, ("SNI", "14d"): 35_560, ("SNI", "5mo"): 35_279,
    ("Sham", "3d"): 27_993, ("Sham", "14d"): 31_131, ("Sham", "5mo"): 33_903,
}
STUDY_TOTAL = 195_718

# Populations, largest first. Nine microglial states and three small non-microglial groups.
POPULATIONS = (
    ("MG_homeostatic_1", 0.200),
    ("MG_homeostatic_2", 0.160),
    ("MG_homeostatic_3", 0.130),
    ("MG_Apoe_high", 0.110),
    ("MG_immediate_early", 0.090),
    ("MG_ribosomal", 0.080),
    ("MG_interferon", 0.065),
    ("MG_inflammatory", 0.055),
    ("MG_proliferating", 0.040),
    ("BAM", 0.035),
    ("Monocyte", 0.025),
    ("Neutrophil", 0.010),
)
POPULATION_NAMES = tuple(p for p, _ in POPULATIONS)
NON_MICROGLIA = ("BAM", "Monocyte", "Neutrophil")

# QC bounds the extra cells must fail (Seurat: keep 500 < nFeature < 4000).
QC_MIN_FEATURES = 500
QC_MAX_FEATURES = 4000
QC_FAIL_FRACTION = 0.045      # extra cells, relative to the cells that pass
QC_FAIL_DOUBLET_SHARE = 0.35  # of the failing cells, doublet-like (too many genes); rest near-empty


@dataclass
class Sample:
    name: str
    condition: str
    timepoint: str
    sex: str
    n_pass: int   # cells that pass QC
    n_low: int    # near-empty droplets (< 500 genes)
    n_doublet: int  # doublet-like (> 4000 genes)

    @property
    def n_total(self) -> int:
        return self.n_pass + self.n_low + self.n_doublet


def largest_remainder(total: int, weights) -> np.ndarray:
    """Integer counts summing exactly to total, proportional to weights."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    out = np.floor(exact).astype(np.int64)
    short = total - int(out.sum())
    order = np.argsort(-(exact - out), kind="stable")
    out[order[:short]] += 1
    return out


def make_samples(n_cells: int, rng: np.random.Generator, replicates: int = 1) -> list[Sample]:
    """12 x `replicates` samples (condition x time point x sex x animal) with the study's
    proportions scaled to n_cells. One animal per cell of the design (the study's 12 samples)
    is named like SNI_3d_F; with more, SNI_3d_F1, SNI_3d_F2, ..."""
    if replicates < 1:
        raise ValueError("replicates must be at least 1")
    groups = [(c, t) for c in CONDITIONS for t in TIMEPOINTS]
    per_group = largest_remainder(n_cells, [STUDY_CELLS[g] for g in groups])
    samples = []
    for (cond, tp), n in zip(groups, per_group, strict=True):
        female_share = 0.5 + rng.uniform(-0.08, 0.08)  # sample sizes differ in a real study
        n_f = int(round(n * female_share))
        for sex, n_s in (("female", n_f), ("male", int(n) - n_f)):
            if replicates == 1:  # no extra draws: the study's design as before
                split = [n_s]
            else:
                split = largest_remainder(n_s, 1.0 + rng.uniform(-0.15, 0.15, replicates))
            for r, n_a in enumerate(split):
                n_a = int(n_a)
                n_fail = int(round(n_a * QC_FAIL_FRACTION))
                n_dbl = int(round(n_fail * QC_FAIL_DOUBLET_SHARE))
                name = f"{cond}_{tp}_{sex[0].upper()}" + (f"{r + 1}" if replicates > 1 else "")
                samples.append(Sample(name, cond, tp, sex, n_a, n_fail - n_dbl, n_dbl))
    return samples
