"""Checks of the inputs against the configuration before any heavy work (issue 18).

`preflight(cfg)` reads headers only (gene names, manifest rows, a store's var and the metadata
columns the study needs), never counts, and raises on the first problem with one line:
InputError(file, problem) for a bad file, ConfigError("study.key: ... in FILE ...") for a
configuration value that does not fit the data. It writes nothing, so a refused run leaves no
output folder behind.

The study parts (target gene tests, per-condition GSEA and their figures) need the condition
column (study.condition) in the samples' metadata. Without it they are skipped (one warning
line, logged by the statistics stage when it skips them) and nothing study-specific is
required: no target genes in the data, no GMT file (a single 10x file, e.g. human PBMC, runs
QC to report with the default configuration). The stages decide from the store's obs columns
themselves (`study_columns`), so they behave the same when called without preflight. With it, the
case and control labels, the time points, the target genes and the GMT must fit the data.
A condition column without a time-point column: the target tests and GSEA pool all cells of
each condition (time point "pooled"); there are no time-point contrasts.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cellmill.config import Config, ConfigError
from cellmill.errors import InputError

log = logging.getLogger("cellmill")


@dataclass
class Inputs:
    """What preflight found: the file named in messages, the genes as the store will name
    them, and the samples' metadata (one row per sample of a manifest; for a store, one row
    per observed combination of the study's columns)."""

    source: Path
    kind: str  # "manifest", "file" or "store"
    meta: pd.DataFrame
    genes_of: object = None  # () -> gene names; read only when a check needs them
    study: bool = False  # condition column present: the study parts run
    timepoints: bool = False  # time-point column present too
    _genes: np.ndarray | None = field(default=None, repr=False)

    @property
    def genes(self) -> np.ndarray:
        if self._genes is None:
            self._genes = np.asarray(self.genes_of(), dtype=object)
        return self._genes


def study_columns(cfg: Config, columns: Iterable[str]) -> tuple[bool, bool]:
    """(condition column present, time-point column present) among metadata / obs columns."""
    columns = set(columns)
    return cfg.study.condition in columns, cfg.study.timepoint in columns


def preflight(cfg: Config) -> Inputs:
    """Raise InputError / ConfigError for anything that would fail later; write nothing."""
    inp = read_inputs(cfg)
    has_cond, has_tp = study_columns(cfg, inp.meta.columns)
    inp.study, inp.timepoints = has_cond, has_tp
    # the warning that the study parts are off (or pooled) is the statistics stage's, when
    # it skips them (`study_warning`): logged here it would join the one-line error of a run
    # that fails before then; here it is a -v line
    columns = [] if inp.kind == "file" else list(inp.meta.columns)
    msg = study_warning(cfg, columns, inp.source)
    if msg:
        log.info("preflight: %s", msg)
    if not has_cond:
        return inp
    check_labels(cfg, inp)
    if has_tp:
        check_timepoints(cfg, inp)
    check_target_genes(cfg, inp)
    check_gmt(cfg, inp)
    return inp


# ----------------------------------------------------------------------------- the inputs


def read_inputs(cfg: Config) -> Inputs:
    """The input named by the config, checked as far as headers allow."""
    ft = tuple(cfg.input.feature_types) or None
    if cfg.input.manifest:
        return _manifest(cfg.resolve(cfg.input.manifest), ft)
    if cfg.input.path:
        path = cfg.resolve(cfg.input.path)
        if not path.exists():
            raise InputError(path, "input not found (input.path)")
        if path.suffix.lower() == ".csv":  # ingest reads a .csv as a manifest
            return _manifest(path, ft)
        return _one_file(path, ft)
    if cfg.input.store:
        return _store(cfg.resolve(cfg.input.store), cfg)
    raise InputError("config", "no input: set input.manifest, input.path or input.store")


def _manifest(path: Path, ft) -> Inputs:
    from cellmill.io.headers import gene_names
    from cellmill.io.ingest import read_manifest

    specs = read_manifest(path)
    union: dict[str, None] = {}  # the store's genes: the union, in order of first appearance
    for s in specs:
        if not s.path.exists():
            raise InputError(s.path, f"file of sample {s.name!r} not found (listed in "
                             f"{path})")
        union.update(dict.fromkeys(gene_names(s.path, ft)))
    genes = np.array(list(union), dtype=object)
    meta = pd.DataFrame([s.metadata for s in specs], index=[s.name for s in specs])
    return Inputs(path, "manifest", meta.astype(str), genes_of=lambda: genes)


def _one_file(path: Path, ft) -> Inputs:
    from cellmill.io.headers import gene_names

    genes = gene_names(path, ft)
    return Inputs(path, "file", pd.DataFrame(index=[path.name]), genes_of=lambda: genes)


def _store(path: Path, cfg: Config) -> Inputs:
    from cellmill.io.store import Store

    if not path.exists():
        raise InputError(path, "store not found (input.store)")
    try:
        store = Store(path)
        columns = store.obs_columns()
        meta = _store_meta(store, columns, [cfg.study.condition, cfg.study.timepoint])
    except (FileNotFoundError, KeyError, ValueError, OSError) as e:
        raise InputError(path, f"not a readable cellmill store ({e})") from None
    return Inputs(path, "store", meta,
                  genes_of=lambda: np.asarray(store.var().index, dtype=object))


def _store_meta(store, columns: list[str], wanted: list[str]) -> pd.DataFrame:
    """One row per observed combination of the `wanted` obs columns' values ("" for missing);
    the other obs columns are listed, their values not read (the cell names never are)."""
    present = list(dict.fromkeys(c for c in wanted if c in columns))
    if present:
        df = pd.DataFrame({c: pd.Series(store.obs_column(c)) for c in present}).drop_duplicates()
        df = df.astype(object).where(df.notna(), "").astype(str).reset_index(drop=True)
    else:
        df = pd.DataFrame(index=range(1))
    for c in columns:
        if c not in df:
            df[c] = ""
    return df[list(columns)]


# ----------------------------------------------------------------------------- the checks


def check_labels(cfg: Config, inp: Inputs) -> None:
    """study.case and study.control are values of the condition column."""
    st = cfg.study
    if st.case == st.control:
        raise ConfigError(f"study.case and study.control are both {st.case!r}")
    values = _levels(inp.meta[st.condition])
    for key, label in (("case", st.case), ("control", st.control)):
        if label not in values:
            shown = _fmt(values) or "none"
            raise ConfigError(f"study.{key}: {label!r} is not a value of column "
                              f"{st.condition!r} in {inp.source} (values: {shown})"
                              f"{_hint(label, values)}")


def check_timepoints(cfg: Config, inp: Inputs) -> None:
    """The time points of the case and control samples are exactly study.timepoints (samples
    of other conditions, e.g. naive animals, take part in no test and are not checked)."""
    st = cfg.study
    rows = inp.meta[inp.meta[st.condition].isin([st.case, st.control])]
    values = _levels(rows[st.timepoint], keep_empty=True)
    listed = [str(t) for t in st.timepoints]
    extra = [v for v in values if v not in listed]
    absent = [t for t in listed if t not in values]
    if not extra and not absent:
        return
    parts = []
    if extra:
        parts.append("value(s) not listed: " + ", ".join(
            repr(v) + _hint(v, listed, " (listed as {!r}?)") for v in extra))
    if absent:
        parts.append(f"listed but absent: {_fmt(absent)}")
    raise ConfigError(f"study.timepoints: [{_fmt(listed)}] does not match column "
                      f"{st.timepoint!r} in {inp.source} ({st.case} and {st.control} samples): "
                      f"{'; '.join(parts)}; set study.timepoints to the data's "
                      f"[{_fmt(values)}]")


def check_target_genes(cfg: Config, inp: Inputs) -> None:
    """Every target gene is a gene of the data, as the store names it."""
    genes = inp.genes
    known = set(genes)
    missing = [g for g in cfg.study.target_genes if g not in known]
    if not missing:
        return
    which = ", ".join(repr(g) + _hint(g, genes, " (did you mean {!r}?)") for g in missing)
    raise ConfigError(f"study.target_genes: {which} not in the data ({len(genes):,} genes in "
                      f"{inp.source}; names as the features' names after Seurat's make.unique "
                      "and '_' -> '-')")


def check_gmt(cfg: Config, inp: Inputs) -> None:
    """The GMT is readable and at least one set has gsea.min_size..max_size genes of the data
    (fgsea's filter): else the per-condition GSEA would write an empty table."""
    from cellmill.genesets import gmt_path
    from cellmill.io.gmt import matched_sizes, read_gmt

    genes = inp.genes
    path = gmt_path(cfg, genes, inp.source)  # "hallmark": the organism of these genes
    if not path.is_file():
        raise InputError(path, "gsea.gmt: gene set file not found; set gsea.gmt to a GMT file "
                         "(the per-condition GSEA needs one)")
    sets = read_gmt(path)
    sizes = matched_sizes(sets, genes)
    lo, hi = cfg.gsea.min_size, cfg.gsea.max_size
    matched = sizes["matched"].to_numpy()
    if ((matched >= lo) & (matched <= hi)).any():
        return
    best = sizes.iloc[int(np.argmax(matched))]
    n_lo = int((matched >= lo).sum())
    msg = (f"{n_lo} of {len(sizes)} sets overlap the genes of {inp.source} with >= {lo} genes "
           f"(gsea.min_size); largest overlap {int(best['matched'])} genes "
           f"({best['pathway']}, {int(best['n_unique'])} listed)")
    if n_lo:
        msg += f", but all {n_lo} have more than {hi} (gsea.max_size)"
    lower = {str(g).lower() for g in genes}
    ci = max((len({m.lower() for m in members} & lower), name) for name, members in sets.items())
    if ci[0] >= lo:
        msg += (f"; ignoring case, {ci[0]} genes of {ci[1]} match: gene symbols of another "
                "species (human sets on mouse data)?")
    raise InputError(path, msg)


# ----------------------------------------------------------------------------- messages


def _levels(values: pd.Series, keep_empty: bool = False) -> list[str]:
    """Distinct values in order of appearance ('' = missing, left out unless keep_empty)."""
    out = list(dict.fromkeys(str(v) for v in values))
    return out if keep_empty else [v for v in out if v != ""]


def _fmt(values: list[str], limit: int = 20) -> str:
    shown = ", ".join(values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def _hint(value: str, choices, template: str = "; did you mean {!r}?") -> str:
    """A hint naming the choice equal to `value` ignoring case, else a close spelling."""
    low = str(value).lower()
    same = [c for c in choices if str(c).lower() == low]
    if not same:  # difflib over the choices that share a first letter (genes: ~30k choices)
        near = [str(c) for c in choices if str(c)[:1].lower() == low[:1]]
        same = difflib.get_close_matches(str(value), near, n=1, cutoff=0.75)
    return template.format(str(same[0])) if same else ""


def study_warning(cfg: Config, columns: Iterable[str], source=None) -> str | None:
    """The line saying the study parts are skipped (no condition column) or pool the time
    points (no time-point column), with the metadata columns there are and a near name;
    None when both columns are present. `columns`: metadata or obs columns (cellmill's own
    obs columns are left out of the list)."""
    from cellmill.io.ingest import RESERVED_OBS

    st = cfg.study
    cols = [str(c) for c in columns if c not in RESERVED_OBS]
    has_cond, has_tp = study_columns(cfg, cols)
    if has_cond and has_tp:
        return None
    column, key = (st.condition, "study.condition") if not has_cond else \
        (st.timepoint, "study.timepoint")
    where = f" of {source}" if source is not None and cols else ""
    hint = _hint(column, cols, "; did you mean {!r}")
    hint = f"{hint} (set {key})?" if hint else ""
    what = ("target tests and per-condition GSEA are skipped" if not has_cond
            else "target tests and GSEA pool all time points")
    return (f"no {column!r} column in the samples' metadata{where} (columns: "
            f"{_fmt(cols) or 'none'}{hint}): {what}")
