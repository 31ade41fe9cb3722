"""One typed configuration, loaded from TOML. Every key is optional; defaults are the study's.

`Config.check()` refuses every bad value with a one-line `ConfigError` that names the key
(`section.key: ...`); `load_config` puts where the value came from (the file, or `--set ...`)
in front of it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints


class ConfigError(Exception):
    """A bad configuration: unknown key, wrong type, value out of range. ``str(e)`` is one line;
    ``keys`` names the ``section.key``s involved, when known."""

    def __init__(self, message: str, keys: tuple[str, ...] = ()):
        self.keys = tuple(keys)
        # one line, always (a TOML string or a library's message may hold a newline)
        super().__init__(re.sub(r"\s*[\r\n]+\s*", " ", str(message)))


def _bad(key: str, text: str) -> ConfigError:
    return ConfigError(f"{key}: {text}", (key,))


# The allowed values of every number, picked from how cellmill/engine uses them. Intervals:
# "[" and "]" include the end, "(" and ")" leave it out, inf: no bound; a tuple: any of them.
# Floats must also be finite (nan / inf never), ints must be ints (1.5 and 2.0 are refused)
# that fit in 64 bits.
SEED = "[0, 4294967295]"  # numpy's RandomState takes 0 .. 2**32 - 1
RANGES = {
    "compute.workers": "[1, inf)",
    "qc.min_features": "[0, inf)",  # and < qc.max_features
    "qc.max_features": "[1, inf)",
    "normalize.scale_factor": "[1, inf)",  # Seurat truncates it to an int, which must be >= 1
    "hvg.n_top": "[1, inf)",
    "hvg.span": "(0, 1]",  # the loess span: a fraction of the genes
    "pca.n_components": "[1, inf)",
    "pca.clip": "(0, inf)",  # scaled values are clipped at +clip
    "neighbors.n_pcs": "[1, inf)",  # and <= pca.n_components
    "neighbors.k": "[2, inf)",  # the cell itself and at least one neighbour
    "neighbors.prune": "[0, 1)",  # SNN edges with Jaccard < prune go; 1 would drop them all
    "cluster.resolution": "(0, inf)",
    "cluster.seed": SEED,
    # -1: until stable (Seurat's 10 for louvain); 0 would leave every cell in its own cluster
    "cluster.n_iterations": ("[-1, -1]", "[1, inf)"),
    "umap.n_neighbors": "[2, inf)",
    "umap.min_dist": "[0, 1]",  # umap needs min_dist <= spread, which cellmill fixes at 1
    "umap.seed": SEED,
    "umap.n_epochs": "[0, inf)",  # 0: uwot's default
    "markers.logfc_threshold": "[0, inf)",
    "markers.min_pct": "[0, 1]",
    "markers.return_thresh": "(0, 1]",  # a p-value cut-off
    "markers.min_cells_group": "[1, inf)",
    "study.pseudobulk_min_cells": "[1, inf)",  # samples with fewer cells leave a contrast
    "gsea.min_size": "[1, inf)",  # and <= gsea.max_size
    "gsea.max_size": "[1, inf)",
    "gsea.seed": SEED,
    "gsea.nperm_simple": "[1, inf)",
}

# strings that name something (a metadata column, a condition level, a file): never blank
NAMES = ("study.condition", "study.case", "study.control", "study.timepoint", "gsea.gmt")

# lists of names: no blank entries, no repeats (a repeated target gene repeats its test rows
# and inflates the Benjamini-Hochberg count); True: the list may not be empty either
NAME_LISTS = {"input.feature_types": False, "study.timepoints": True,
              "study.target_genes": False, "study.group_by": False, "gsea.clusters": False}


def _interval(text: str) -> tuple[float, float, bool, bool]:
    """'[0, 1)' -> (0.0, 1.0, low end open?, high end open?)"""
    lo, hi = text[1:-1].split(",")
    return float(lo), float(hi), text[0] == "(", text[-1] == ")"


def _describe(rule: str | tuple[str, ...]) -> str:
    """'[1, inf)' -> '>= 1', '(0, 1]' -> 'in (0, 1]', '[-1, -1]' -> '-1'."""
    if isinstance(rule, tuple):
        return " or ".join(map(_describe, rule))
    lo, hi, lo_open, _ = _interval(rule)
    low = rule[1:].split(",")[0]
    if lo == hi:
        return low
    return f"in {rule}" if hi != math.inf else f"{'>' if lo_open else '>='} {low}"


def _in(value: int | float, rule: str | tuple[str, ...]) -> bool:
    if isinstance(rule, tuple):
        return any(_in(value, r) for r in rule)
    lo, hi, lo_open, hi_open = _interval(rule)
    return (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)


def _number_problem(key: str, value: Any, typ: type) -> str | None:
    """What is wrong with the int or float `value` of `key`, or None."""
    kind = "an integer" if typ is int else "a finite number"
    wanted = f"must be {kind} {_describe(RANGES[key])}, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, int if typ is int else (int, float)):
        return wanted
    if typ is int and not -(2**63) <= value < 2**63:
        return wanted + " (too large)"  # numpy and numba take int64
    try:
        return None if math.isfinite(value) and _in(value, RANGES[key]) else wanted
    except OverflowError:  # an int too big for a float
        return wanted


def _check_names(key: str, names: list[str], required: bool) -> None:
    if required and not names:
        raise _bad(key, "must list at least one name")
    blank = [i for i, name in enumerate(names) if not name.strip()]
    if blank:
        raise _bad(key, f"entry {blank[0] + 1} is empty; names must be non-empty")
    repeated = [name for name, n in Counter(names).items() if n > 1]
    if repeated:
        raise _bad(key, f"{', '.join(map(repr, repeated))} listed more than once; "
                        "give each name once")


def _check_fields(section: Any) -> None:
    """Types, finiteness, ranges and names of each value of one section."""
    name = _SECTION_NAMES[type(section)]
    for f, typ in get_type_hints(type(section)).items():
        key, value = f"{name}.{f}", getattr(section, f)
        if typ in (int, float):
            problem = _number_problem(key, value, typ)
            if problem:
                raise _bad(key, problem)
        elif typ is bool:
            if not isinstance(value, bool):
                raise _bad(key, f"must be true or false, got {value!r}")
        elif typ is str:
            if not isinstance(value, str):
                raise _bad(key, f"must be a string, got {value!r}")
            if key in NAMES and not value.strip():
                raise _bad(key, "must not be empty")
        elif not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _bad(key, f"must be a list of strings, got {value!r}")
        elif key in NAME_LISTS:
            _check_names(key, value, NAME_LISTS[key])


class _Section:
    def check(self) -> None:
        _check_fields(self)
        self._check_more()

    def _check_more(self) -> None:
        """Rules beyond one value's type and range (choices, values checked together)."""


@dataclass
class InputConfig(_Section):
    manifest: str = ""
    path: str = ""
    store: str = ""
    feature_types: list[str] = field(default_factory=lambda: ["Gene Expression"])

    def _check_more(self) -> None:
        given = [f"input.{k}" for k in ("manifest", "path", "store") if getattr(self, k)]
        if len(given) > 1:
            raise ConfigError(f"input: give only one of manifest, path, store (got "
                              f"{', '.join(given)})", tuple(given))


@dataclass
class ComputeConfig(_Section):
    scheduler: str = "threads"
    workers: int = 2
    memory: str = "2GB"
    progress: bool = True

    def _check_more(self) -> None:
        named = ("threads", "processes", "synchronous")
        if self.scheduler not in named and "://" not in self.scheduler:
            raise _bad("compute.scheduler", f"{self.scheduler!r} is not threads, processes, "
                       "synchronous or a scheduler address like tcp://host:8786")
        parse_bytes(self.memory)

    @property
    def memory_bytes(self) -> int:
        return parse_bytes(self.memory)

    @property
    def on_cluster(self) -> bool:
        return "://" in self.scheduler

    @property
    def local_workers(self) -> int:
        """Threads or processes of this machine's own work (ingest's decoders, the report's
        figures, thread pools beside a pass): `workers` on a local scheduler. With a cluster,
        `workers` and `memory` are the cluster's, so no more than the CPUs this process may
        use (64 cluster workers must not become 64 decoding processes on a login node)."""
        if not self.on_cluster:
            return int(self.workers)
        return int(max(1, min(self.workers, _usable_cpus())))

    @property
    def local_memory_bytes(self) -> int:
        """Memory for this machine's own work: `memory`, or with a cluster one worker's share
        of it for each local worker."""
        if not self.on_cluster:
            return self.memory_bytes
        return self.memory_bytes // max(1, self.workers) * self.local_workers


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass
class QCConfig(_Section):
    min_features: int = 500
    max_features: int = 4000
    inclusive: bool = False

    def _check_more(self) -> None:
        if self.max_features <= self.min_features:
            raise ConfigError(f"qc.min_features ({self.min_features}) must be below "
                              f"qc.max_features ({self.max_features}): need 0 <= min_features "
                              "< max_features", ("qc.min_features", "qc.max_features"))


@dataclass
class NormalizeConfig(_Section):
    scale_factor: float = 10000.0


@dataclass
class HVGConfig(_Section):
    n_top: int = 2000
    span: float = 0.3


@dataclass
class PCAConfig(_Section):
    n_components: int = 50
    clip: float = 10.0


@dataclass
class NeighborsConfig(_Section):
    n_pcs: int = 15
    k: int = 20
    prune: float = 1.0 / 15.0
    # "auto": exact search while it is the faster one (stages/shared/knn.py EXACT_UP_TO
    # cells), NN-descent with its recall checked above; "pynndescent" is the old name
    method: str = "auto"

    def _check_more(self) -> None:
        if self.method not in ("auto", "exact", "nndescent", "pynndescent"):
            raise _bad("neighbors.method", f"{self.method!r} is not auto, exact or nndescent")


@dataclass
class ClusterConfig(_Section):
    algorithm: str = "leiden"
    resolution: float = 0.3
    seed: int = 0
    n_iterations: int = -1
    # igraph's community_leiden and leidenalg's RBConfigurationVertexPartition optimise the same
    # objective (both by V. Traag) on the whole graph in memory, igraph's ~9x faster at 196k
    # cells; "streamed" (stages/clustering/streamed.py) reads the graph block by block and runs
    # leidenalg on the graph of its first-level communities
    leiden_backend: str = "streamed"

    def _check_more(self) -> None:
        if self.leiden_backend not in ("streamed", "igraph", "leidenalg"):
            raise _bad("cluster.leiden_backend", f"{self.leiden_backend!r} is not "
                       "streamed, igraph or leidenalg")
        if self.algorithm not in ("leiden", "louvain"):
            raise _bad("cluster.algorithm", f"{self.algorithm!r} is not leiden or louvain")


@dataclass
class UMAPConfig(_Section):
    n_neighbors: int = 30
    min_dist: float = 0.3
    seed: int = 42
    n_epochs: int = 0  # 0: as uwot (200 when N > 10,000, else 500)
    # "streamed": the graph on disk, O(cells) memory (stages/umap/streamed.py);
    # "umap-learn": in memory
    backend: str = "streamed"
    # the streamed backend's layout optimiser: "batch", on all workers and the same bits for
    # any number of them (kernels/layout_batch.py); "sequential", umap-learn's own updates on
    # one thread (kernels/layout.py)
    optimizer: str = "batch"

    def _check_more(self) -> None:
        if self.backend not in ("streamed", "umap-learn"):
            raise _bad("umap.backend", f"{self.backend!r} is not streamed or umap-learn")
        if self.optimizer not in ("batch", "sequential"):
            raise _bad("umap.optimizer", f"{self.optimizer!r} is not batch or sequential")


@dataclass
class StudyConfig(_Section):
    condition: str = "condition"
    case: str = "SNI"
    control: str = "Sham"
    timepoint: str = "timepoint"
    timepoints: list[str] = field(default_factory=lambda: ["3d", "14d", "5mo"])
    target_genes: list[str] = field(default_factory=lambda: ["Sigmar1"])
    cluster_of_interest: str = ""
    group_by: list[str] = field(
        default_factory=lambda: ["cluster", "condition", "timepoint", "sample"]
    )
    # edgeR + limma-voom on per-sample sums beside the cell-level tests (needs a "sample"
    # grouping column); a sample with fewer QC-passed cells in a cluster is left out there
    pseudobulk: bool = True
    pseudobulk_min_cells: int = 10

    def _check_more(self) -> None:
        if self.case == self.control:
            raise ConfigError(f"study.case and study.control are both {self.case!r}; the two "
                              "conditions compared must differ", ("study.case", "study.control"))
        if self.condition == self.timepoint:
            raise ConfigError(f"study.condition and study.timepoint are both {self.condition!r}; "
                              "they name two different metadata columns",
                              ("study.condition", "study.timepoint"))


@dataclass
class MarkersConfig(_Section):
    logfc_threshold: float = 0.25
    min_pct: float = 0.1
    only_pos: bool = True
    return_thresh: float = 0.01
    min_cells_group: int = 3


# avg_log2FC / signed_log10_p: from the cell-level FindMarkers table; pseudobulk_t: limma's
# moderated t of the pseudobulk contrast (animals as replicates)
RANKINGS = ("avg_log2FC", "signed_log10_p", "pseudobulk_t")


@dataclass
class GSEAConfig(_Section):
    gmt: str = "hallmark"  # built in (cellmill/genesets): "hallmark:mouse", ":human"; or a file
    ranking: str = "avg_log2FC"
    min_size: int = 15
    max_size: int = 500
    clusters: list[str] = field(default_factory=list)  # empty: all clusters
    seed: int = 0
    nperm_simple: int = 1000

    def _check_more(self) -> None:
        if self.gmt.strip().startswith("hallmark:") and \
                self.gmt.strip() not in ("hallmark:mouse", "hallmark:human"):
            raise _bad("gsea.gmt", f'{self.gmt!r} names no built-in gene sets; use "hallmark", '
                       '"hallmark:mouse", "hallmark:human" or a GMT file')
        if self.ranking not in RANKINGS:
            raise _bad("gsea.ranking", f"{self.ranking!r} is not one of {', '.join(RANKINGS)}")
        if self.max_size < self.min_size:
            raise ConfigError(f"gsea.min_size ({self.min_size}) must be <= gsea.max_size "
                              f"({self.max_size}): need 1 <= min_size <= max_size",
                              ("gsea.min_size", "gsea.max_size"))


@dataclass
class Config:
    input: InputConfig = field(default_factory=InputConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    qc: QCConfig = field(default_factory=QCConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    hvg: HVGConfig = field(default_factory=HVGConfig)
    pca: PCAConfig = field(default_factory=PCAConfig)
    neighbors: NeighborsConfig = field(default_factory=NeighborsConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    umap: UMAPConfig = field(default_factory=UMAPConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    markers: MarkersConfig = field(default_factory=MarkersConfig)
    gsea: GSEAConfig = field(default_factory=GSEAConfig)
    # folder that relative paths in the config are resolved against
    base_dir: str = "."

    def check(self) -> Config:
        for f in fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "check"):
                section.check()
        if self.gsea.ranking == "pseudobulk_t" and not self.study.pseudobulk:
            raise ConfigError('gsea.ranking = "pseudobulk_t" ranks by the pseudobulk tests, '
                              "which study.pseudobulk = false turns off",
                              ("gsea.ranking", "study.pseudobulk"))
        # the neighbour graph and the UMAP read the first n_pcs columns of the PCA
        if self.neighbors.n_pcs > self.pca.n_components:
            raise ConfigError(f"neighbors.n_pcs ({self.neighbors.n_pcs}) must be <= "
                              f"pca.n_components ({self.pca.n_components})",
                              ("neighbors.n_pcs", "pca.n_components"))
        return self

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("base_dir")
        return d


_SECTION_NAMES = {f.default_factory: f.name for f in fields(Config) if f.name != "base_dir"}

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str | int) -> int:
    """A size like '2GB', '1.5 GiB', '512MiB' (or a number of bytes) -> bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        n = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", str(text))
        n = float(m.group(1)) * _UNITS.get(m.group(2).upper(), math.nan) if m else math.nan
        if not math.isfinite(n):
            raise _bad("compute.memory", f"cannot read {text!r} as a size; give a number and "
                       "a unit, like '2GB' or '512MiB'")
    if n < 64 * 2**20:
        raise _bad("compute.memory", f"{text!r} is below the 64 MiB minimum")
    return int(n)


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = get_origin(typ)
    if origin is list:
        (item,) = get_args(typ)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, where) for v in value]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if typ is float:  # nan and inf pass here; check() refuses them, naming the range
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type")


def _apply(cfg: Config, data: dict[str, Any], origin: str,
           origins: dict[str, str] | None = None) -> None:
    """Set the values of `data` ({section: {key: value}}); `origins` records, for each key set,
    where it came from, the last one set last."""
    sections = {f.name: f for f in fields(cfg) if f.name != "base_dir"}
    for name, values in data.items():
        if name not in sections:
            raise ConfigError(f"{origin}: unknown section [{name}] (known: {', '.join(sections)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: [{name}] must be a table")
        section = getattr(cfg, name)
        hints = get_type_hints(type(section))
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(
                    f"{origin}: unknown key {name}.{key} (known: {', '.join(hints)})"
                )
            setattr(section, key, _coerce(value, hints[key], f"{origin}: {name}.{key}"))
            if origins is not None:
                origins.pop(f"{name}.{key}", None)
                origins[f"{name}.{key}"] = origin


def _parse_override(text: str) -> tuple[str, str, Any]:
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    lhs, rhs = text.split("=", 1)
    section, key = lhs.strip().split(".", 1)
    try:  # TOML literal (numbers, booleans, lists, quoted strings); else a bare string
        value = tomllib.loads(f"v = {rhs}")["v"]
    except tomllib.TOMLDecodeError:
        value = rhs
    return section, key, value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a TOML config (or defaults when path is None), apply `section.key=value` overrides."""
    if path is None:
        return _build(None, ".", "", overrides)
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    return _build(data, str(path.resolve().parent), str(path), overrides)


def config_from_dict(data: dict[str, Any], base_dir: str | Path = ".",
                     overrides: list[str] | None = None) -> Config:
    """A config from the TOML structure as a dict (``{"input": {"manifest": ...}}``), checked
    exactly like a file; relative paths are resolved against `base_dir`."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a dict of sections, got {type(data).__name__}")
    data = {name: ({k: os.fspath(v) if isinstance(v, os.PathLike) else v
                    for k, v in values.items()} if isinstance(values, dict) else values)
            for name, values in data.items()}  # Path values are paths, as strings in TOML
    return _build(data, str(Path(base_dir).resolve()), "config", overrides)


def _build(data: dict[str, Any] | None, base_dir: str, origin: str,
           overrides: list[str] | None) -> Config:
    cfg = Config()
    origins: dict[str, str] = {}
    cfg.base_dir = base_dir
    if data is not None:
        _apply(cfg, data, origin, origins)
    for text in overrides or []:
        section, key, value = _parse_override(text)
        _apply(cfg, {section: {key: value}}, f"--set {text}", origins)
    try:
        return cfg.check()
    except ConfigError as e:
        # blame the last place that set one of the keys involved (an override beats the file);
        # a value left at its default has no place to blame
        blamed = [origins[k] for k in origins if k in e.keys]
        if blamed:
            raise ConfigError(f"{blamed[-1]}: {e}", e.keys) from None
        raise
