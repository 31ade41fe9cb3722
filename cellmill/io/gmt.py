"""GMT gene-set files: NAME<TAB>DESCRIPTION<TAB>GENE<TAB>GENE..., one set a line."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd

from cellmill.errors import InputError


class GmtError(InputError, ValueError):
    """A GMT file that cannot be read: "FILE: line N: problem" (a ValueError too)."""


def read_gmt(path: str | Path) -> dict[str, list[str]]:
    """Read a GMT file into {set name: [genes in file order]}.

    Blank lines are skipped, empty gene fields (trailing tabs) are dropped and
    gene symbols are kept as written (matching is case-sensitive).
    """
    path = Path(path)
    if not path.is_file():
        raise GmtError(path, "GMT file not found")
    sets: dict[str, list[str]] = {}
    first_line: dict[str, int] = {}
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise GmtError(path, f"cannot read GMT file: {e}") from None
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        if "\t" not in line:
            raise GmtError(
                path, f"line {lineno}: no tab found; expected NAME<TAB>DESCRIPTION<TAB>GENES..."
            )
        fields = line.split("\t")
        name = fields[0].strip()
        if not name:
            raise GmtError(path, f"line {lineno}: empty gene set name")
        genes = [g.strip() for g in fields[2:]]
        genes = [g for g in genes if g]
        if not genes:
            raise GmtError(path, f"line {lineno}: gene set {name!r} has no genes")
        if name in sets:
            raise GmtError(
                path, f"line {lineno}: duplicate gene set name {name!r} "
                f"(first defined on line {first_line[name]})"
            )
        sets[name] = genes
        first_line[name] = lineno
    if not sets:
        raise GmtError(path, "no gene sets found")
    return sets


def matched_sizes(pathways: Mapping[str, list[str]], genes: Iterable[str]) -> pd.DataFrame:
    """Per set: genes listed, unique genes, and unique genes found in `genes` (case-sensitive).

    `matched` is the size fgsea uses (before minSize/maxSize filtering).
    """
    universe = set(genes)
    rows = []
    for name, members in pathways.items():
        uniq = set(members)
        rows.append((name, len(members), len(uniq), len(uniq & universe)))
    return pd.DataFrame(rows, columns=["pathway", "n_listed", "n_unique", "matched"])
