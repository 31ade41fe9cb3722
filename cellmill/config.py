"""One typed configuration, loaded from TOML. Every key is optional; defaults are the study's."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints


class ConfigError(Exception):
    """A bad configuration: unknown key, wrong type, value out of range."""


@dataclass
class InputConfig:
    manifest: str = ""
    path: str = ""
    store: str = ""
    feature_types: list[str] = field(default_factory=lambda: ["Gene Expression"])

    def check(self) -> None:
        given = [k for k in ("manifest", "path", "store") if getattr(self, k)]
        if len(given) > 1:
            raise ConfigError(f"input: give only one of manifest, path, store (got {given})")


@dataclass
class ComputeConfig:
    scheduler: str = "threads"
    workers: int = 2
    memory: str = "2GB"
    progress: bool = True

    def check(self) -> None:
        named = ("threads", "processes", "synchronous")
        if self.scheduler not in named and "://" not in self.scheduler:
            raise ConfigError(
                f"compute.scheduler: {self.scheduler!r} is not threads, processes, "
                "synchronous or a scheduler address like tcp://host:8786"
            )
        if self.workers < 1:
            raise ConfigError("compute.workers must be >= 1")
        parse_bytes(self.memory)

    @property
    def memory_bytes(self) -> int:
        return parse_bytes(self.memory)


@dataclass
class QCConfig:
    min_features: int = 500
    max_features: int = 4000
    inclusive: bool = False

    def check(self) -> None:
        if self.min_features < 0 or self.max_features <= self.min_features:
            raise ConfigError("qc: need 0 <= min_features < max_features")


@dataclass
class NormalizeConfig:
    scale_factor: float = 10000.0

    def check(self) -> None:
        if self.scale_factor <= 0:
            raise ConfigError("normalize.scale_factor must be > 0")


@dataclass
class HVGConfig:
    n_top: int = 2000
    span: float = 0.3

    def check(self) -> None:
        if self.n_top < 1:
            raise ConfigError("hvg.n_top must be >= 1")
        if not 0 < self.span <= 1:
            raise ConfigError("hvg.span must be in (0, 1]")


@dataclass
class PCAConfig:
    n_components: int = 50
    clip: float = 10.0

    def check(self) -> None:
        if self.n_components < 1:
            raise ConfigError("pca.n_components must be >= 1")


@dataclass
class NeighborsConfig:
    n_pcs: int = 15
    k: int = 20
    prune: float = 1.0 / 15.0
    method: str = "exact"

    def check(self) -> None:
        if self.method not in ("exact", "pynndescent"):
            raise ConfigError(f"neighbors.method: {self.method!r} is not exact or pynndescent")
        if self.k < 2 or self.n_pcs < 1:
            raise ConfigError("neighbors: need k >= 2 and n_pcs >= 1")
        if not 0 <= self.prune < 1:
            raise ConfigError("neighbors.prune must be in [0, 1)")


@dataclass
class ClusterConfig:
    algorithm: str = "leiden"
    resolution: float = 0.3
    seed: int = 0
    n_iterations: int = -1
    # igraph's community_leiden and leidenalg's RBConfigurationVertexPartition optimise the same
    # objective (both by V. Traag) on the whole graph in memory, igraph's ~9x faster at 196k
    # cells; "streamed" (engine/communities.py) reads the graph block by block and runs
    # leidenalg on the graph of its first-level communities
    leiden_backend: str = "streamed"

    def check(self) -> None:
        if self.leiden_backend not in ("streamed", "igraph", "leidenalg"):
            raise ConfigError(f"cluster.leiden_backend: {self.leiden_backend!r} is not "
                              "streamed, igraph or leidenalg")
        if self.algorithm not in ("leiden", "louvain"):
            raise ConfigError(f"cluster.algorithm: {self.algorithm!r} is not leiden or louvain")
        if self.resolution <= 0:
            raise ConfigError("cluster.resolution must be > 0")


@dataclass
class UMAPConfig:
    n_neighbors: int = 30
    min_dist: float = 0.3
    seed: int = 42
    n_epochs: int = 0  # 0: as uwot (200 when N > 10,000, else 500)
    # "streamed": the graph on disk, O(cells) memory (engine/layout.py); "umap-learn": in memory
    backend: str = "streamed"

    def check(self) -> None:
        if self.n_neighbors < 2:
            raise ConfigError("umap.n_neighbors must be >= 2")
        if self.backend not in ("streamed", "umap-learn"):
            raise ConfigError(f"umap.backend: {self.backend!r} is not streamed or umap-learn")


@dataclass
class StudyConfig:
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


@dataclass
class MarkersConfig:
    logfc_threshold: float = 0.25
    min_pct: float = 0.1
    only_pos: bool = True
    return_thresh: float = 0.01
    min_cells_group: int = 3


@dataclass
class GSEAConfig:
    gmt: str = "mh.all.v2022.1.Mm.symbols.gmt"
    ranking: str = "avg_log2FC"
    min_size: int = 15
    max_size: int = 500
    clusters: list[str] = field(default_factory=list)  # empty: all clusters
    seed: int = 0
    nperm_simple: int = 1000

    def check(self) -> None:
        if self.ranking not in ("avg_log2FC", "signed_log10_p"):
            raise ConfigError(f"gsea.ranking: {self.ranking!r} is not avg_log2FC or signed_log10_p")
        if self.min_size < 1 or self.max_size < self.min_size:
            raise ConfigError("gsea: need 1 <= min_size <= max_size")


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
        return self

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("base_dir")
        return d


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str | int) -> int:
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ConfigError(f"compute.memory: cannot read {text!r} as a size like '2GB'")
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n < 64 * 2**20:
        raise ConfigError(f"compute.memory: {text!r} is below the 64 MiB minimum")
    return n


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
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type")


def _apply(cfg: Config, data: dict[str, Any], origin: str) -> None:
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
    cfg = Config()
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
        cfg.base_dir = str(path.resolve().parent)
        _apply(cfg, data, str(path))
    for text in overrides or []:
        section, key, value = _parse_override(text)
        _apply(cfg, {section: {key: value}}, f"--set {text}")
    return cfg.check()
