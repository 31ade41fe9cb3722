"""Expression parameters: gene means and dispersions, population programmes, sample shifts and the
planted biology. Everything here is small (populations x genes); the cells are drawn in kernels.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import genes as gn
from .design import NON_MICROGLIA, POPULATION_NAMES, POPULATIONS, TIMEPOINTS, Sample

REF_DEPTH = 5000.0  # base means are given as UMIs per cell at this depth
DEPTH_MEDIAN = 5200.0  # median library size of a normal cell
DEPTH_SD = 0.45  # sd of log library size
LOW_DEPTH_MEDIAN = 320.0  # near-empty droplets
DOUBLET_DEPTH_FACTOR = 2.0  # each partner of a doublet-like cell is this much deeper
DYING_MT_FACTOR = 6.0  # near-empty droplets are often broken cells with much mitochondrial RNA

# Base means (UMIs per cell at REF_DEPTH) of the named genes.
NAMED_MEANS = {
    "Malat1": 60.0, "AY036118": 8.0, "Neat1": 1.5, "Tnpo3": 0.4, "Tspo": 3.0, "Cacna1b": 0.003,
    "Eif4ebp1": 0.3, "Sigmar1": 0.133, "P2ry12": 6.0, "Tmem119": 4.0, "Cx3cr1": 5.0, "Hexb": 15.0,
    "Csf1r": 6.0, "Aif1": 10.0, "Apoe": 4.0, "Xist": 3.0, "Tsix": 0.1, "Ddx3y": 0.5,
    "Eif2s3y": 0.6, "Kdm5d": 0.3, "Uty": 0.25,
    "mt-Nd1": 12.0, "mt-Nd2": 10.0, "mt-Co1": 40.0, "mt-Co2": 25.0, "mt-Atp8": 6.0,
    "mt-Atp6": 30.0, "mt-Co3": 30.0, "mt-Nd3": 5.0, "mt-Nd4l": 3.0, "mt-Nd4": 12.0,
    "mt-Nd5": 4.0, "mt-Nd6": 0.5, "mt-Cytb": 25.0,
}
MICROGLIA_IDENTITY = ["P2ry12", "Tmem119", "Cx3cr1", "Hexb", "Csf1r"]

# Planted biology.
SIGMAR1_TIMEPOINT_LFC = {"3d": 0.3, "14d": 0.2, "5mo": -0.3}
SIGMAR1_LFC = 1.5
SET_LFC = 0.75
LATE_POPULATION = "MG_homeostatic_2"  # Sigmar1 and the inflammatory set, SNI > Sham at 5mo
EARLY_POPULATION = "MG_Apoe_high"  # Sigmar1 and the TNF-alpha/NF-kB set, SNI > Sham at 3d

N_MARKERS = 40  # anonymous up-regulated markers per population
N_MARKERS_NON_MG = 80
N_DOWN = 15
SAMPLE_SHIFT_FRACTION = 0.03  # genes with a per-sample shift (sd SAMPLE_SHIFT_SD, log2)
SAMPLE_SHIFT_SD = 0.2
SAMPLE_DEPTH_SD = 0.05
SAMPLE_PROPORTION_SD = 0.1
# Animal-to-animal variation of every gene: a per-sample offset of log expression, N(0, sd_g),
# with the gene's sd drawn as sd_g^2 = REPLICATE_SD^2 * d0 / chi2(d0). That is the
# scaled-inverse-chi-square prior of limma and edgeR's empirical Bayes (Smyth 2004; McCarthy et
# al. 2012), whose fits to bulk RNA-seq give prior df of a few to tens. sd on the natural-log
# scale is the biological coefficient of variation (BCV); edgeR's guide quotes ~0.1 for
# genetically identical model organisms and ~0.4 for people. 0.2 (inbred mice, plus dissection
# and sorting between animals) is the default.
REPLICATE_SD = 0.2
REPLICATE_PRIOR_DF = 10.0
REPLICATE_SD_MAX = 1.5


def dispersion_trend(mean):
    """Gamma-Poisson overdispersion phi (var = mu + phi mu^2) as a function of the base mean."""
    return 0.1 + 0.5 * np.power(mean, -0.3)


@dataclass
class ExpressionModel:
    universe: gn.GeneUniverse
    gene_sets: dict[str, list[str]]
    base_mean: np.ndarray  # (G,) UMIs per cell at REF_DEPTH
    phi: np.ndarray  # (G,) dispersion
    pop_lfc: np.ndarray  # (P, G) log2 programme of each population
    pop_props: np.ndarray  # (P,)
    markers: dict[str, list[str]]
    sample_shift_genes: list[str]
    sample_lfc: np.ndarray  # (S, G) log2 per-sample shifts
    sample_log_depth: np.ndarray  # (S,) natural-log depth factor
    sample_props: np.ndarray  # (S, P) expected population proportions per sample
    replicate_sd: float = 0.0  # median-ish animal sd (natural log); 0 = no animal variation
    gene_replicate_sd: np.ndarray | None = None  # (G,) each gene's animal sd (natural log)
    effects: list[dict] = field(default_factory=list)
    timepoint_effects: dict = field(default_factory=dict)


def _pick(rng, pool: np.ndarray, k: int, used: np.ndarray) -> np.ndarray:
    free = pool[~used[pool]]
    k = min(k, free.size)
    chosen = np.sort(rng.choice(free, size=k, replace=False))
    used[chosen] = True
    return chosen


def find_set(sets: dict[str, list[str]], key: str) -> str:
    """The name of a hallmark set in a GMT (exact, else a name containing the key's tail)."""
    if key in sets:
        return key
    tail = key.replace("HALLMARK_", "")
    hits = [s for s in sets if tail in s.upper()]
    if len(hits) != 1:
        raise ValueError(f"the GMT has no unique gene set named like {key}")
    return hits[0]


def planted_gene_sets(universe: gn.GeneUniverse, rng: np.random.Generator) -> dict[str, list[str]]:
    """Gene sets for planted.gmt when no GMT is given: the two planted hallmark-like sets (sharing
    genes, as the real ones do) plus null sets for calibration."""
    fixed = set(gn.named_genes()) | set(gn.MT_GENES)
    anon = np.array([g for g in universe.names if g not in fixed], dtype=object)
    anon = anon[rng.permutation(anon.size)]
    infl = list(anon[:190])
    tnfa = list(anon[:60]) + list(anon[190:320])
    sets = {
        gn.INFLAMMATORY_SET: gn.PLANTED_SET_SYMBOLS[gn.INFLAMMATORY_SET] + infl,
        gn.TNFA_SET: gn.PLANTED_SET_SYMBOLS[gn.TNFA_SET] + tnfa,
    }
    start = 320
    for i in range(1, 31):
        size = int(rng.integers(20, 200))
        sets[f"SIMULATED_NULL_SET_{i:02d}"] = list(anon[start:start + size])
        start += size // 2  # null sets overlap their neighbours a little
    return sets


def animal_offsets(n_samples: int, n_genes: int, replicate_sd: float,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Each gene's animal sd (natural log, (G,)) and each sample's offsets (log2, (S, G))."""
    if replicate_sd < 0 or not np.isfinite(replicate_sd):
        raise ValueError("replicate_sd must be a finite number >= 0")
    if replicate_sd == 0:
        return np.zeros(n_genes), np.zeros((n_samples, n_genes))
    d0 = REPLICATE_PRIOR_DF
    sd = replicate_sd * np.sqrt(d0 / rng.chisquare(d0, n_genes))
    sd = np.minimum(sd, REPLICATE_SD_MAX)
    offsets = rng.standard_normal((n_samples, n_genes)) * sd[None, :] / np.log(2.0)
    return sd, offsets


def build_model(universe: gn.GeneUniverse, gene_sets: dict[str, list[str]],
                samples: list[Sample], rng: np.random.Generator, replicate_sd: float = 0.0,
                animal_rng: np.random.Generator | None = None) -> ExpressionModel:
    G = len(universe)
    P = len(POPULATION_NAMES)
    names = np.array(universe.names, dtype=object)
    is_named = np.zeros(G, dtype=bool)
    is_named[universe.idx([g for g in gn.named_genes() if g in universe.index])] = True
    is_named[universe.idx(gn.MT_GENES)] = True

    infl_name = find_set(gene_sets, gn.INFLAMMATORY_SET)
    tnfa_name = find_set(gene_sets, gn.TNFA_SET)
    infl = [g for g in gene_sets[infl_name] if g in universe.index and g != "Sigmar1"]
    tnfa = [g for g in gene_sets[tnfa_name] if g in universe.index and g != "Sigmar1"]
    in_planted_set = np.zeros(G, dtype=bool)
    in_planted_set[universe.idx(infl + tnfa)] = True

    # Base means: named genes fixed; ribosomal genes high; the rest a mixture of near-silent and
    # log-normally expressed genes, scaled so a cell at REF_DEPTH has REF_DEPTH UMIs on average.
    base = np.zeros(G)
    generic = np.ones(G, dtype=bool)
    for g, m in NAMED_MEANS.items():
        base[universe.index[g]] = m
    generic[universe.idx(list(NAMED_MEANS))] = False
    ribo = universe.idx(gn.RIBOSOMAL_GENES)
    base[ribo] = 10.0 * np.exp(rng.normal(0.0, 0.5, ribo.size))
    generic[ribo] = False
    marker_sym = universe.idx(gn.MARKER_SYMBOLS + sorted(
        {g for s in gn.PLANTED_SET_SYMBOLS.values() for g in s}))
    marker_sym = marker_sym[generic[marker_sym]]
    base[marker_sym] = 0.3 * np.exp(rng.normal(0.0, 0.5, marker_sym.size))
    generic[marker_sym] = False
    gi = np.flatnonzero(generic)
    # a third of genes are near-silent in microglia; the planted pathways' genes are expressed
    silent = (rng.random(gi.size) < 0.3) & ~in_planted_set[gi]
    log10m = np.where(silent, rng.normal(-3.5, 0.5, gi.size), rng.normal(-1.4, 0.85, gi.size))
    m = 10.0 ** log10m
    m *= (REF_DEPTH - base.sum()) / m.sum()
    base[gi] = np.minimum(m, 50.0)
    phi = np.minimum(dispersion_trend(base) * np.exp(rng.normal(0.0, 0.3, G)), 30.0)

    # Population programmes.
    used = is_named | in_planted_set
    pop_lfc = np.zeros((P, G))
    markers: dict[str, list[str]] = {}
    up_pool = np.flatnonzero(~used & (base > 0.05) & (base < 2.0))
    down_pool = np.flatnonzero(~used & (base > 0.5) & (base < 5.0))
    ident = universe.idx(MICROGLIA_IDENTITY)
    shared_non_mg = _pick(rng, up_pool, 50, used)
    for k, pop in enumerate(POPULATION_NAMES):
        n_up = N_MARKERS_NON_MG if pop in NON_MICROGLIA else N_MARKERS
        up = _pick(rng, up_pool, n_up, used)
        down = _pick(rng, down_pool, N_DOWN, used)
        pop_lfc[k, up] = rng.uniform(1.5, 3.0, up.size)
        pop_lfc[k, down] = -rng.uniform(1.0, 2.0, down.size)
        real = gn.POPULATION_MARKERS.get(pop, [])
        if real:
            pop_lfc[k, universe.idx(real)] = rng.uniform(2.5, 4.0, len(real))
        if pop in NON_MICROGLIA:
            pop_lfc[k, ident] = -3.0
            pop_lfc[k, shared_non_mg] = 2.0
        if pop == "MG_ribosomal":
            pop_lfc[k, ribo] += 0.8
        markers[pop] = [str(names[g]) for g in np.sort(np.r_[up, universe.idx(real)])]
    pop_props = np.array([p for _, p in POPULATIONS])

    # Sample-level shifts: depth, population mix, and a few genes shifted per sample.
    S = len(samples)
    shift_pool = np.flatnonzero(~used & (base > 0.01))
    n_shift = int(round(SAMPLE_SHIFT_FRACTION * shift_pool.size))
    shift_genes = np.sort(rng.choice(shift_pool, size=n_shift, replace=False))
    sample_lfc = np.zeros((S, G))
    sample_lfc[:, shift_genes] = rng.normal(0.0, SAMPLE_SHIFT_SD, (S, n_shift))
    sample_log_depth = rng.normal(0.0, SAMPLE_DEPTH_SD, S)
    # its own random stream: replicate_sd = 0 leaves every other draw as it was
    gene_sd, animal = animal_offsets(S, G, replicate_sd,
                                     animal_rng or np.random.default_rng(0))
    sample_lfc += animal
    props = pop_props[None, :] * np.exp(rng.normal(0.0, SAMPLE_PROPORTION_SD, (S, P)))
    props /= props.sum(axis=1, keepdims=True)

    effects = [
        dict(kind="gene", name="Sigmar1", population=LATE_POPULATION, condition="SNI",
             control="Sham", timepoint="5mo", log2_fold_change=SIGMAR1_LFC, genes=["Sigmar1"]),
        dict(kind="gene", name="Sigmar1", population=EARLY_POPULATION, condition="SNI",
             control="Sham", timepoint="3d", log2_fold_change=SIGMAR1_LFC, genes=["Sigmar1"]),
        dict(kind="gene_set", name=infl_name, population=LATE_POPULATION, condition="SNI",
             control="Sham", timepoint="5mo", log2_fold_change=SET_LFC, genes=infl),
        dict(kind="gene_set", name=tnfa_name, population=EARLY_POPULATION, condition="SNI",
             control="Sham", timepoint="3d", log2_fold_change=SET_LFC, genes=tnfa),
    ]
    return ExpressionModel(
        universe=universe, gene_sets=gene_sets, base_mean=base, phi=phi, pop_lfc=pop_lfc,
        pop_props=pop_props, markers=markers,
        sample_shift_genes=[str(names[g]) for g in shift_genes], sample_lfc=sample_lfc,
        sample_log_depth=sample_log_depth, sample_props=props, effects=effects,
        replicate_sd=float(replicate_sd), gene_replicate_sd=gene_sd,
        timepoint_effects={"Sigmar1": {t: SIGMAR1_TIMEPOINT_LFC[t] for t in TIMEPOINTS}},
    )


def sample_profiles(model: ExpressionModel, s: int, sample: Sample) -> np.ndarray:
    """Expected counts per unit depth, (2P, G): rows 0..P-1 the populations in sample s, rows
    P..2P-1 the same as broken cells (near-empty droplets, mitochondrial RNA enriched)."""
    uni = model.universe
    lfc = model.pop_lfc + model.sample_lfc[s][None, :]
    sig = uni.index["Sigmar1"]
    lfc[:, sig] += model.timepoint_effects["Sigmar1"][sample.timepoint]
    for eff in model.effects:
        if eff["condition"] == sample.condition and eff["timepoint"] == sample.timepoint:
            k = POPULATION_NAMES.index(eff["population"])
            lfc[k, uni.idx(eff["genes"])] += eff["log2_fold_change"]
    rel = (model.base_mean / REF_DEPTH)[None, :] * np.exp2(lfc)
    off = gn.MALE_GENES if sample.sex == "female" else gn.FEMALE_GENES
    rel[:, uni.idx(off)] = 0.0
    dying = rel.copy()
    dying[:, uni.idx(gn.MT_GENES)] *= DYING_MT_FACTOR
    return np.ascontiguousarray(np.vstack([rel, dying]))
