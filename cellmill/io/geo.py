"""GEO series metadata: the series matrix's ``!Sample_*`` lines -> one record per sample.

GEO's layout (https://www.ncbi.nlm.nih.gov/geo/info/download.html): a series' files live under
``BASE/series/GSE162nnn/GSE162807/`` (the accession with its last three digits replaced by
"nnn"; ``GSEnnn`` below 1000), the series matrix at ``matrix/GSE162807_series_matrix.txt.gz``,
series supplementary files (the ``_RAW.tar`` of all samples' files) under ``suppl/``, and a
sample's own supplementary files under ``BASE/samples/GSM4960nnn/GSM4960303/suppl/``.
The matrix is tab-separated, every value double-quoted; ``!Sample_characteristics_ch1`` lines
repeat, one cell per sample of the form "key: value". Links in the matrix are ``ftp://`` URLs;
``geo_url`` maps them under BASE (HTTPS, or a local mirror in tests).

Also here: characteristic keys -> manifest column names, and the ``--where`` filter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlparse

from cellmill.errors import InputError

GEO_URL = "https://ftp.ncbi.nlm.nih.gov/geo"

# characteristic keys whose meaning is clear -> the manifest names cellmill's configs use
SYNONYMS = {
    "sex": "sex", "gender": "sex",
    "surgery": "condition", "treatment": "condition", "condition": "condition",
    "time_point": "timepoint", "timepoint": "timepoint", "time": "timepoint",
}
# manifest columns fetch writes itself, plus the obs names ingest refuses (ingest.RESERVED_OBS)
TAKEN = ("sample", "path", "title", "barcode", "n_counts", "n_features", "qc_pass", "cluster",
         "_index")


@dataclass
class GeoSample:
    """One sample of a series: its accession, title, characteristics (raw key -> value, in
    file order) and supplementary file links (as the matrix gives them)."""

    accession: str
    title: str = ""
    characteristics: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


def series_accession(text: str) -> str:
    """'gse162807' -> 'GSE162807'; InputError for anything that is not GSE + digits."""
    acc = str(text).strip().upper()
    if not re.fullmatch(r"GSE[1-9]\d*", acc):
        raise InputError(str(text), "not a GEO series accession (expected GSE and digits, "
                         "e.g. GSE162807)")
    return acc


def stem_folder(accession: str) -> str:
    """GEO's folder of an accession: GSE162807 -> GSE162nnn, GSE1234 -> GSE1nnn,
    GSE123 -> GSEnnn (the same rule for GSM)."""
    prefix, digits = accession[:3], accession[3:]
    return f"{prefix}{digits[:-3]}nnn"


def series_url(base: str, accession: str) -> str:
    """BASE/series/GSE162nnn/GSE162807 (no trailing slash)."""
    return f"{base.rstrip('/')}/series/{stem_folder(accession)}/{accession}"


def matrix_url(base: str, accession: str) -> str:
    return f"{series_url(base, accession)}/matrix/{accession}_series_matrix.txt.gz"


def raw_tar_url(base: str, accession: str) -> str:
    return f"{series_url(base, accession)}/suppl/{accession}_RAW.tar"


def map_url(link: str, base: str) -> str:
    """A link of the matrix (``ftp://ftp.ncbi.nlm.nih.gov/geo/samples/...``) under BASE: the
    part of its path after ``/geo`` appended to BASE. Other links are returned unchanged."""
    parts = urlparse(link)
    path = parts.path
    if parts.netloc.lower() == "ftp.ncbi.nlm.nih.gov" and path.startswith("/geo/"):
        return base.rstrip("/") + path[len("/geo"):]
    return link


def _cells(line: str) -> list[str]:
    """The values of a matrix line after its tag, unquoted."""
    out = []
    for cell in line.rstrip("\r\n").split("\t")[1:]:
        if len(cell) >= 2 and cell[0] == cell[-1] == '"':
            cell = cell[1:-1]
        out.append(cell.strip())
    return out


def parse_series_matrix(lines, source: str) -> tuple[list[GeoSample], list[str]]:
    """(samples, series supplementary links) from the lines of a series matrix (str, any
    iterable; reading stops at the data table). `source` names the file in errors."""
    cols: dict[str, list[str]] = {}
    chars: list[tuple[int, list[str]]] = []
    files: list[list[str]] = []
    series_files: list[str] = []
    for no, line in enumerate(lines, start=1):
        if line.startswith("!series_matrix_table_begin"):
            break
        tag = line.split("\t", 1)[0].strip()
        if tag == "!Series_supplementary_file":
            series_files += [c for c in _cells(line) if c and c.upper() != "NONE"]
        elif tag in ("!Sample_geo_accession", "!Sample_title"):
            cols[tag] = _cells(line)
        elif tag == "!Sample_characteristics_ch1":
            chars.append((no, _cells(line)))
        elif tag.startswith("!Sample_supplementary_file"):
            files.append(_cells(line))
    accs = cols.get("!Sample_geo_accession")
    if not accs:
        raise InputError(source, "not a GEO series matrix: no !Sample_geo_accession line")
    for acc in accs:
        if not re.fullmatch(r"GSM\d+", acc):
            raise InputError(source, f"!Sample_geo_accession: {acc!r} is not a GSM accession")
    n = len(accs)
    titles = cols.get("!Sample_title", [""] * n)
    for name, row in [("!Sample_title", titles)] + [("!Sample_supplementary_file", r)
                                                      for r in files]:
        if len(row) != n:
            raise InputError(source, f"{name} has {len(row)} values for {n} samples")
    samples = [GeoSample(acc, titles[i]) for i, acc in enumerate(accs)]
    for no, row in chars:
        if len(row) != n:
            raise InputError(source, f"line {no}: !Sample_characteristics_ch1 has {len(row)} "
                             f"values for {n} samples")
        for s, cell in zip(samples, row, strict=True):
            if not cell:  # a sample without this characteristic
                continue
            key, sep, value = cell.partition(":")
            if not sep or not key.strip():
                raise InputError(source, f"line {no}: characteristic {cell!r} of {s.accession} "
                                 "is not 'key: value'")
            s.characteristics[key.strip()] = value.strip()
    for row in files:
        for s, link in zip(samples, row, strict=True):
            if link and link.upper() != "NONE":
                s.files.append(link)
    return samples, series_files


def snake(key: str) -> str:
    """'Time point' -> 'time_point', 'cell type' -> 'cell_type'."""
    return re.sub(r"[^0-9a-z]+", "_", key.strip().lower()).strip("_") or "characteristic"


def column_names(samples: list[GeoSample]) -> dict[str, str]:
    """Raw characteristic key -> manifest column (in first-seen order): a synonym's normal
    name (sex, condition, timepoint) when only one raw key maps to it, the snake_case key
    otherwise; names fetch writes itself get a ``char_`` prefix."""
    raw = list(dict.fromkeys(k for s in samples for k in s.characteristics))
    normal = {k: SYNONYMS.get(snake(k), snake(k)) for k in raw}
    out, used = {}, set()
    for k in raw:
        name = normal[k]
        if sum(1 for v in normal.values() if v == name) > 1:  # clash: keep the raw keys
            name = snake(k)
        if name in TAKEN:
            name = "char_" + name
        base, i = name, 2
        while name in used:  # 'Cell type' and 'cell-type': both kept, told apart
            name, i = f"{base}_{i}", i + 1
        out[k] = name
        used.add(name)
    return out


def sample_table(samples: list[GeoSample]) -> tuple[list[str], list[dict[str, str]]]:
    """(metadata column names, one row per sample: sample, title, then the columns)."""
    names = column_names(samples)
    cols = list(dict.fromkeys(names.values()))
    rows = []
    for s in samples:
        row = {"sample": s.accession, "title": s.title, **{c: "" for c in cols}}
        for k, v in s.characteristics.items():
            row[names[k]] = v
        rows.append(row)
    return cols, rows


def parse_where(text: str, columns: list[str]) -> list[tuple[str, str, str]]:
    """'condition != Naive and sex == female' -> [(column, op, value), ...]. A key may be a
    column or a raw key that normalises to one ('surgery' -> condition). Values may be quoted.
    InputError (naming --where) for a clause that does not parse or an unknown key."""
    clauses = []
    for part in re.split(r"\s+and\s+", text.strip()):
        m = re.fullmatch(r"\s*([A-Za-z_][\w ]*?)\s*(==|!=)\s*(.*?)\s*", part)
        if not m or not m.group(3) or re.search(r"[=!]=", m.group(3)):  # 'a == b or c == d'
            raise InputError("--where", f"cannot read {part!r} (expected 'key == value' or "
                             "'key != value', joined with 'and')")
        key, op, value = m.groups()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        col = key if key in columns else SYNONYMS.get(snake(key), snake(key))
        if col not in columns:
            raise InputError("--where", f"unknown key {key!r} (keys: {', '.join(columns)})")
        clauses.append((col, op, value))
    return clauses


def matches(row: dict[str, str], clauses: list[tuple[str, str, str]]) -> bool:
    return all((row.get(c, "") == v) == (op == "==") for c, op, v in clauses)
