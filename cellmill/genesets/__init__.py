"""Built-in gene sets, and the GMT file a `gsea.gmt` value names.

The MSigDB hallmark collections for mouse and human ship with cellmill as package data (CC BY
4.0; sources, versions and citation in README.md beside this file). `gsea.gmt` takes:

- "hallmark" (the default): the collection of the data's organism, told from its gene names
  (mouse symbols are capitalised, "Sigmar1"; human ones upper case, "SIGMAR1");
- "hallmark:mouse" / "hallmark:human": that collection;
- anything else: a GMT file, relative to the config file's folder.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable
from importlib.resources import files
from pathlib import Path

from cellmill.config import Config, ConfigError

BUILTIN = "hallmark"
FILES = {
    "mouse": "hallmark_mouse_msigdb_2025.Mm.symbols.gmt",
    "human": "hallmark_human_msigdb_v7.5.1.Hs.symbols.gmt",
}
# "hallmark" picks an organism when at least MIN_OVERLAP of the data's genes are in its
# collection and MARGIN times as many as in the other's. Exact (case-sensitive) matching keeps
# the two apart: only 12 symbols (C2, C3, F2, ...) are spelled alike in both collections.
MIN_OVERLAP = 100
MARGIN = 4


def builtin_path(organism: str) -> Path:
    """The built-in hallmark GMT file of 'mouse' or 'human'."""
    return Path(str(files(__name__).joinpath(FILES[organism])))


def builtin_organisms(value: str) -> tuple[str, ...] | None:
    """The organisms whose built-in collection a `gsea.gmt` value may name (None: a file)."""
    v = value.strip()
    if v == BUILTIN:
        return tuple(FILES)
    if v.startswith(BUILTIN + ":"):
        org = v.split(":", 1)[1].strip()
        if org not in FILES:
            raise ConfigError(f"gsea.gmt: {value!r} names no built-in gene sets; use "
                              f'"hallmark", "hallmark:mouse", "hallmark:human" or a GMT file',
                              ("gsea.gmt",))
        return (org,)
    return None


@functools.cache
def hallmark_genes(organism: str) -> frozenset[str]:
    """Every gene of the organism's built-in hallmark collection."""
    from cellmill.io.gmt import read_gmt

    return frozenset(g for genes in read_gmt(builtin_path(organism)).values() for g in genes)


def overlaps(genes: Iterable[str]) -> dict[str, int]:
    """{organism: how many of `genes` its hallmark collection holds (exact match)}."""
    names = {str(g) for g in genes}
    return {org: len(names & hallmark_genes(org)) for org in FILES}


def detect_organism(genes: Iterable[str], source: object = "the data") -> str:
    """'mouse' or 'human', from the genes' overlap with each hallmark collection; ConfigError
    naming gsea.gmt when neither wins clearly."""
    genes = list(genes)
    n = overlaps(genes)
    (best, top), (_, second) = sorted(n.items(), key=lambda kv: -kv[1])
    if top >= MIN_OVERLAP and top >= MARGIN * second:
        return best
    raise ConfigError(
        f'gsea.gmt = "hallmark": cannot tell the organism from the {len(genes):,} genes of '
        f"{source}: {n['mouse']:,} are in the mouse hallmark sets, {n['human']:,} in the human "
        f"ones (needs >= {MIN_OVERLAP} and {MARGIN}x the other); set gsea.gmt to "
        '"hallmark:mouse", "hallmark:human" or a GMT file', ("gsea.gmt",))


def gmt_path(cfg: Config, genes: Iterable[str] | None = None, source: object = "the data"
             ) -> Path:
    """The GMT file `cfg.gsea.gmt` names; "hallmark" needs the data's gene names (`genes`)."""
    orgs = builtin_organisms(cfg.gsea.gmt)
    if orgs is None:
        return cfg.resolve(cfg.gsea.gmt)
    if len(orgs) == 1:
        return builtin_path(orgs[0])
    if genes is None:
        raise ValueError('gsea.gmt = "hallmark" needs the gene names to pick the organism')
    return builtin_path(detect_organism(genes, source))


def gmt_digest(cfg: Config) -> str:
    """What `cfg.gsea.gmt` names, for a stage's params, from the config alone: the sha256 of
    every file it may resolve to ("hallmark": both collections, the data picks one), or the
    path of an absent file."""
    orgs = builtin_organisms(cfg.gsea.gmt)
    if orgs is None:
        path = cfg.resolve(cfg.gsea.gmt)
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else \
            f"absent: {path}"
    return "+".join(f"{o}:{hashlib.sha256(builtin_path(o).read_bytes()).hexdigest()}"
                    for o in orgs)
