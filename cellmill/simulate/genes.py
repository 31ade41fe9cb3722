"""The simulated gene universe: real mouse symbols where they matter, plausible names elsewhere.

The layout (names, ids, order) depends only on n_genes and the gene sets, not on the study seed,
so studies simulated with different seeds share one gene list.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Mitochondrially encoded genes in chrM order (Cell Ranger's mm10 lists them together at the end).
MT_GENES = [
    "mt-Nd1", "mt-Nd2", "mt-Co1", "mt-Co2", "mt-Atp8", "mt-Atp6", "mt-Co3", "mt-Nd3",
    "mt-Nd4l", "mt-Nd4", "mt-Nd5", "mt-Nd6", "mt-Cytb",
]

# Genes the study and its context name.
STUDY_GENES = [
    "Sigmar1", "Tspo", "Cacna1b", "Eif4ebp1", "Xist", "Tsix", "Neat1", "Malat1", "Tnpo3",
    "AY036118", "P2ry12", "Tmem119", "Cx3cr1", "Hexb", "Csf1r", "Aif1", "Apoe",
]

FEMALE_GENES = ["Xist", "Tsix"]
MALE_GENES = ["Ddx3y", "Eif2s3y", "Kdm5d", "Uty"]

RIBOSOMAL_GENES = (
    [f"Rpl{i}" for i in (3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 17, 18, 19, 21, 22, 23,
                         24, 26, 27, 28, 29, 30, 31, 32, 34, 35, 36, 37, 38, 39)]
    + ["Rpl7a", "Rpl10a", "Rpl13a", "Rpl18a", "Rpl23a", "Rpl27a", "Rpl35a", "Rpl36a", "Rpl37a",
       "Rplp0", "Rplp1", "Rplp2"]
    + [f"Rps{i}" for i in (2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21,
                           23, 24, 25, 26, 27, 28, 29)]
    + ["Rps3a1", "Rps4x", "Rps15a", "Rps27a"]
)

# Real marker symbols for the simulated populations (each population also gets anonymous markers).
POPULATION_MARKERS = {
    "MG_Apoe_high": ["Apoe", "Cd74", "Lpl", "Spp1", "Cst7"],
    "MG_immediate_early": ["Fos", "Jun", "Egr1", "Ier2", "Dusp1"],
    "MG_interferon": ["Ifit1", "Ifit3", "Isg15", "Irf7", "Rtp4"],
    "MG_inflammatory": ["Ccl3", "Ccl4", "Il1b", "Tnf", "Nfkbia"],
    "MG_proliferating": ["Mki67", "Top2a", "Cdk1", "Ccnb2", "Stmn1"],
    "BAM": ["Mrc1", "Lyve1", "Cd163", "Pf4", "Ms4a7"],
    "Monocyte": ["Ly6c2", "Ccr2", "Plac8", "Chil3", "Lyz2"],
    "Neutrophil": ["S100a8", "S100a9", "Retnlg", "Ngp", "Camp"],
}
MARKER_SYMBOLS = sorted({g for genes in POPULATION_MARKERS.values() for g in genes})

PLANTED_SET_SYMBOLS = {
    "HALLMARK_INFLAMMATORY_RESPONSE": ["Il1b", "Tnf", "Ccl3", "Ccl4", "Cxcl10", "Nfkbia"],
    "HALLMARK_TNFA_SIGNALING_VIA_NFKB": ["Il1b", "Tnf", "Ccl3", "Ccl4", "Nfkbia", "Cxcl2", "Ier3",
                                         "Junb", "Egr1", "Fos"],
}
INFLAMMATORY_SET = "HALLMARK_INFLAMMATORY_RESPONSE"
TNFA_SET = "HALLMARK_TNFA_SIGNALING_VIA_NFKB"

LAYOUT_SEED = 20_201_207  # fixed: the gene list does not depend on the study seed


@dataclass
class GeneUniverse:
    names: list[str]          # symbols in file order
    ids: list[str]            # ENSMUSG ids in file order
    index: dict[str, int]     # symbol -> position

    def __len__(self) -> int:
        return len(self.names)

    def idx(self, names) -> np.ndarray:
        return np.array([self.index[n] for n in names], dtype=np.int64)


def write_gmt(path, sets: dict[str, list[str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for name, genes in sets.items():
            fh.write("\t".join([name, "simulated by cellmill", *genes]) + "\n")


def named_genes(extra: list[str] = ()) -> list[str]:
    """Every real symbol the simulator uses plus `extra` (e.g. all genes of a GMT), deduplicated."""
    base = (STUDY_GENES + MALE_GENES + RIBOSOMAL_GENES + MARKER_SYMBOLS
            + [g for s in PLANTED_SET_SYMBOLS.values() for g in s] + list(extra))
    return [g for g in dict.fromkeys(base) if g not in MT_GENES]


def _anonymous_names(rng: np.random.Generator, n: int, taken: set[str]) -> list[str]:
    """Plausible unannotated mouse symbols: Gm12345, 4930402H24Rik, ..."""
    letters = np.array(list("ABCDEFGHIJKLMNOPRSTUVWXYZ"))
    taken_lower = {t.lower() for t in taken}
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        k = n - len(out)
        kind = rng.random(k)
        gm = rng.integers(1000, 50_000, size=k)
        rik_a = rng.choice([1110, 1700, 2010, 2310, 2610, 4921, 4930, 4933, 5730, 9530], size=k)
        rik_b = rng.integers(0, 1000, size=k)
        rik_l = letters[rng.integers(0, len(letters), size=k)]
        rik_c = rng.integers(1, 25, size=k)
        for i in range(k):
            if kind[i] < 0.75:
                name = f"Gm{gm[i]}"
            else:
                name = f"{rik_a[i]}{rik_b[i]:03d}{rik_l[i]}{rik_c[i]:02d}Rik"
            low = name.lower()
            if low in seen or low in taken_lower:
                continue
            seen.add(low)
            out.append(name)
    return out


def build_universe(n_genes: int, extra: list[str] = ()) -> GeneUniverse:
    """n_genes genes: the named ones (plus `extra`) and anonymous fillers, mt- genes at the end."""
    named = named_genes(extra)
    n_fixed = len(named) + len(MT_GENES)
    if n_genes < n_fixed:
        raise ValueError(f"n_genes={n_genes} is too small: the simulator needs at least {n_fixed} "
                         "genes (its named genes plus every gene of the gene sets)")
    rng = np.random.default_rng(LAYOUT_SEED)
    fillers = _anonymous_names(rng, n_genes - n_fixed, set(named) | set(MT_GENES))
    nuclear = np.array(named + fillers, dtype=object)
    nuclear = list(nuclear[rng.permutation(len(nuclear))])
    names = nuclear + MT_GENES
    ids_num = rng.choice(np.arange(1, 130_000), size=n_genes, replace=False)
    ids = [f"ENSMUSG{v:011d}" for v in ids_num]
    return GeneUniverse(names=names, ids=ids, index={n: i for i, n in enumerate(names)})


