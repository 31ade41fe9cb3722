"""The study's figures as PNG files (matplotlib, headless).

Every figure reads what the stages left in the store and in `tables/`. A figure whose inputs are
missing (a partial run, a stage that found nothing) raises `Missing`; `draw_figure` turns that
into a note for the report instead of failing the run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import patheffects
from matplotlib.collections import LineCollection, PolyCollection
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from cellmill.config import Config, ConfigError
from cellmill.io.heap import trim_heap
from cellmill.report.raster import dot_image

log = logging.getLogger("cellmill")

DPI = 110
SIG = 0.05  # padj / p threshold for "significant" marks
CASE_COLOR = "#c0392b"
CONTROL_COLOR = "#2e86c1"
MAX_CURVES = 12
MIN_GROUP_CELLS = 30  # cluster-of-interest candidates need this many cells in both groups
MAX_GSEA_ROWS = 30
N_FIG3_GENES = 6
UMAP_RASTER = (600, 600)  # (rows, columns) of the image the UMAP dots are painted into: about
# the axes' size in pixels (a larger image costs matplotlib ~60 bytes a pixel to resample)


class Missing(Exception):
    """The inputs of a figure or table are not there; the message says which."""


@dataclass
class Coded:
    """A categorical column: codes[i] indexes levels (-1: missing)."""
    codes: np.ndarray
    levels: list[str]

    def __len__(self) -> int:
        return len(self.codes)

    def is_(self, level: str) -> np.ndarray:
        """Boolean mask of the cells at `level` (all False for an absent level)."""
        if level not in self.levels:
            return np.zeros(len(self.codes), dtype=bool)
        return self.codes == self.levels.index(level)

    def present(self) -> list[str]:
        counts = np.bincount(self.codes[self.codes >= 0], minlength=len(self.levels))
        return [lev for lev, c in zip(self.levels, counts, strict=True) if c]

    def reorder(self, levels: list[str]) -> Coded:
        """The same cells with `levels` as the level order (other levels become -1)."""
        remap = np.array([levels.index(x) if x in levels else -1 for x in self.levels] + [-1],
                         dtype=np.int32)
        return Coded(remap[self.codes].astype(self.codes.dtype), list(levels))


# ----------------------------------------------------------------------------- inputs


class ReportInputs:
    """Lazy, cached access to everything the report reads (store, tables, config)."""

    def __init__(self, cfg: Config, store, tables: Path, scheduler=None):
        self.cfg = cfg
        self.store = store
        self.scheduler = scheduler
        self.tables_dir = Path(tables)
        self._cache: dict = {}
        self._expr: dict[str, np.ndarray] = {}

    # -- store
    def _need_store(self):
        if self.store is None:
            raise Missing("no store (ingest has not run)")
        return self.store

    def column(self, name: str) -> pd.Series:
        """One obs column over all cells, read on its own (the whole obs holds every cell
        name as a Python string); not cached (per-cell memory: see `coded`)."""
        store = self._need_store()
        if name not in store.obs_columns():
            raise Missing(f"obs has no column {name!r}")
        return pd.Series(store.obs_column(name))

    @property
    def var_names(self) -> pd.Index:
        if "var" not in self._cache:
            self._cache["var"] = self._need_store().var().index
        return self._cache["var"]

    @property
    def qc(self) -> np.ndarray:
        if "qc" not in self._cache:
            store = self._need_store()
            self._cache["qc"] = (self.column("qc_pass").to_numpy().astype(bool)
                                 if "qc_pass" in store.obs_columns()
                                 else np.ones(store.n_cells, dtype=bool))
        return self._cache["qc"]

    def coded(self, column: str) -> Coded:
        """An obs column over the QC-passed cells as integer codes and their levels (str):
        1-2 bytes a cell, where a column of Python strings costs ~60."""
        key = ("coded", column)
        if key not in self._cache:
            store = self._need_store()
            if column not in store.obs_columns():
                raise Missing(f"obs has no column {column!r}")
            raw = store.obs_column(column)
            if isinstance(raw, pd.Categorical):
                codes, levels = raw.codes, [str(x) for x in raw.categories]
            else:
                codes, uniq = pd.factorize(np.asarray(raw), use_na_sentinel=True)
                levels = [str(x) for x in uniq]
            del raw
            codes = codes[self.qc]
            # merge levels that print the same (1 and "1"); -1 stays "missing"
            names = sorted(set(levels), key=levels.index)
            remap = np.array([names.index(x) for x in levels] + [-1], dtype=np.int32)
            self._cache[key] = Coded(remap[codes].astype(np.int16 if len(names) < 32000
                                                          else np.int32), names)
        return self._cache[key]

    def clusters(self) -> Coded:
        """Cluster labels of the QC-passed cells, levels in cluster order."""
        if "cluster" not in self._need_store().obs_columns():
            raise Missing("obs has no 'cluster' column (cluster stage not run)")
        key = ("clusters",)
        if key not in self._cache:
            lab = self.coded("cluster")
            if (lab.codes < 0).any():
                raise Missing("some QC-passed cells have no cluster label")
            present = np.flatnonzero(np.bincount(lab.codes, minlength=len(lab.levels)))
            order = sort_labels([lab.levels[i] for i in present])
            self._cache[key] = lab.reorder(order)
        return self._cache[key]

    def cluster_order(self) -> list[str]:
        return self.clusters().levels

    def meta(self, column: str) -> Coded:
        """An obs column over the QC-passed cells (levels that occur, in first-seen order)."""
        return self.coded(column)

    def timepoints(self) -> list[str]:
        present = set(self.meta(self.cfg.study.timepoint).present())
        order = [t for t in self.cfg.study.timepoints if t in present]
        return order + sorted(present - set(order))

    def array(self, slot: str, name: str) -> np.ndarray:
        store = self._need_store()
        if not store.has(slot, name):
            raise Missing(f"{slot}/{name} is not in the store")
        return store.read_array(slot, name)

    def expression(self, genes: list[str]) -> dict[str, np.ndarray]:
        """Log-normalised values ln(1 + x / n_counts * scale_factor) of `genes` over the
        QC-passed cells. Uses the gene-major copy when it exists, else one blockwise pass."""
        store = self._need_store()
        names = self.var_names
        absent = [g for g in genes if g not in names]
        if absent:
            raise Missing(f"gene(s) not in the data: {', '.join(absent)}")
        todo = [g for g in dict.fromkeys(genes) if g not in self._expr]
        out = {}
        if todo:
            idx = np.array([names.get_loc(g) for g in todo], dtype=np.int64)
            qc = self.qc
            n_counts = self.column("n_counts").to_numpy()[qc].astype(np.float64)
            scale = self.cfg.normalize.scale_factor
            if store.has_gene_major():  # one gene at a time: a few n-cell vectors alive
                cols = (store.read_genes(int(i), int(i) + 1).toarray().ravel()[qc] for i in idx)
            else:  # one streaming pass reading only these columns of each block
                from cellmill.engine.passes import map_blocks

                parts = map_blocks(store, _dense_block, mask=qc, genes=idx,
                                   scheduler=self.scheduler, desc="report", progress=False)
                counts = np.vstack(parts)
                del parts
                cols = (counts[:, j] for j in range(len(idx)))
            keep = set(self.cfg.study.target_genes)  # drawn by several figures
            for g, x in zip(todo, cols, strict=True):
                with np.errstate(divide="ignore", invalid="ignore"):
                    y = np.log1p(x / n_counts * scale)
                y[~np.isfinite(y)] = 0.0
                out[g] = y
                if g in keep:
                    self._expr[g] = y
        return {g: self._expr[g] if g in self._expr else out[g] for g in genes}

    # -- tables
    def table(self, name: str, required: tuple[str, ...] = (), cache: bool = True
              ) -> pd.DataFrame:
        if name not in self._cache:
            path = self.tables_dir / name
            if not path.is_file():
                raise Missing(f"tables/{name} not found")
            # per-cell tables (qc.csv): the report never uses the cell names, which would be
            # the largest part of the table in memory; samples as categories
            df = pd.read_csv(path, keep_default_na=True, usecols=lambda c: c != "cell",
                             dtype={"sample": "category"})
            for col in ("cluster", "timepoint", "gene", "pathway", "contrast"):
                if col in df:
                    df[col] = df[col].astype(str)
            if "sample" in df:
                df["sample"] = df["sample"].cat.rename_categories(str)
            if not cache:  # a per-cell table read for one figure
                return _require(df, name, required)
            self._cache[name] = df
        return _require(self._cache[name], name, required)
    def condition_tests(self) -> pd.DataFrame:
        """target_tests.csv rows that compare case with control (not time points)."""
        tt = self.table("target_tests.csv", ("gene", "cluster", "timepoint", "contrast",
                                             "mean_case", "mean_control", "p_value"))
        s = self.cfg.study
        mask = tt["contrast"].str.contains(s.case, regex=False) & \
            tt["contrast"].str.contains(s.control, regex=False)
        return tt[mask]

    def cluster_of_interest(self) -> tuple[str, str]:
        """(cluster, why): from the config, else the cluster with the strongest case > control
        increase of the first target gene at the last time point (smallest one-sided p)."""
        if "coi" in self._cache:
            return self._cache["coi"]
        s = self.cfg.study
        if s.cluster_of_interest:
            out = (str(s.cluster_of_interest),
                   "set in the configuration (study.cluster_of_interest)")
        else:
            tests = self.condition_tests()
            gene = s.target_genes[0] if s.target_genes else None
            last = s.timepoints[-1] if s.timepoints else None
            rows = tests[(tests["gene"] == gene) & (tests["timepoint"] == last)
                         & (tests["cluster"] != "all")]
            rows = rows[rows["mean_case"] > rows["mean_control"]]
            rows = rows[np.isfinite(rows["p_value"].to_numpy(dtype=float))]
            big = rows
            if "n_case" in rows and "n_control" in rows:
                big = rows[(rows["n_case"] >= MIN_GROUP_CELLS)
                           & (rows["n_control"] >= MIN_GROUP_CELLS)]
            rows = big if len(big) else rows
            if rows.empty:
                raise Missing(f"no cluster with {s.case} > {s.control} for {gene} at {last} "
                              "in tables/target_tests.csv")
            diff = (rows["mean_case"] - rows["mean_control"]).to_numpy()
            order = np.lexsort((-diff, rows["p_value"].to_numpy(dtype=float)))
            best = rows.iloc[order[0]]
            out = (str(best["cluster"]),
                   f"strongest {s.case} > {s.control} increase of {gene} at {last} "
                   f"(smallest one-sided p among clusters with at least {MIN_GROUP_CELLS} "
                   f"cells per group: p = {best['p_value']:.3g}, mean {best['mean_case']:.3f} "
                   f"vs {best['mean_control']:.3f})")
        self._cache["coi"] = out
        return out


def _require(df: pd.DataFrame, name: str, required: tuple[str, ...]) -> pd.DataFrame:
    lacking = [c for c in required if c not in df.columns]
    if lacking:
        raise Missing(f"tables/{name} lacks column(s) {', '.join(lacking)}")
    return df


def _dense_block(start, stop, csr, cells):
    return csr.toarray()


def sort_labels(labels) -> list[str]:
    """Cluster labels in numeric order when they are numbers ("0", "1", ..., "10")."""
    labels = [str(x) for x in labels]
    try:
        return sorted(labels, key=lambda x: (float(x), x))
    except ValueError:
        return sorted(labels)


# ----------------------------------------------------------------------------- drawing helpers


def cluster_colors(labels: list[str]) -> dict[str, tuple]:
    import matplotlib

    cmap = matplotlib.colormaps["tab20" if len(labels) <= 20 else "gist_ncar"]
    n = max(len(labels), 1)
    if len(labels) <= 20:
        # tab20 pairs a dark and a light shade: take the dark ones first
        idx = [2 * i for i in range(10)] + [2 * i + 1 for i in range(10)]
        return {lab: cmap(idx[i] / 19.999) for i, lab in enumerate(labels)}
    return {lab: cmap(i / n) for i, lab in enumerate(labels)}


class Violins:
    """Violins (binned Gaussian KDE, trimmed to the data range) with a mean marker and a few
    jittered points each, gathered for one axes and drawn as four collections: one artist
    per violin, its points and its mean (~1,200 artists at 32 clusters) was most of the time
    of the report's figures. Works for constant and zero-inflated data (Seurat-style)."""

    def __init__(self):
        self.polys, self.poly_colors = [], []
        self.flat, self.flat_colors = [], []  # constant data: a horizontal line
        self.px, self.py = [], []
        self.mx, self.my = [], []

    def add(self, pos: float, values: np.ndarray, width: float = 0.8, color="#888888",
            points: int = 150, rng: np.random.Generator | None = None) -> None:
        v = np.asarray(values, dtype=np.float64)
        v = v[np.isfinite(v)]
        if v.size == 0:
            return
        lo, hi = float(v.min()), float(v.max())
        half = width / 2
        if hi - lo < 1e-12:
            self.flat.append([(pos - half, lo), (pos + half, lo)])
            self.flat_colors.append(color)
        else:
            nb = 128
            hist, edges = np.histogram(v, bins=nb, range=(lo, hi))
            centers = (edges[:-1] + edges[1:]) / 2
            sd = v.std()
            bw = max(1.06 * sd * v.size ** (-0.2), (hi - lo) / 100) if sd > 0 else (hi - lo) / 20
            # binned KDE: every bin's count spread with a Gaussian (nb x nb, cheap)
            grid = np.linspace(lo, hi, nb)
            dens = np.exp(-0.5 * ((grid[:, None] - centers[None, :]) / bw) ** 2) @ hist
            dens = dens / dens.max() * half
            # the outline: up the left side, down the right (fill_betweenx's polygon)
            self.polys.append(np.column_stack([np.r_[pos - dens, (pos + dens)[::-1]],
                                               np.r_[grid, grid[::-1]]]))
            self.poly_colors.append(color)
        rng = rng or np.random.default_rng(0)
        if points:
            pick = v if v.size <= points else rng.choice(v, size=points, replace=False)
            self.px.append(pos + rng.uniform(-half * 0.6, half * 0.6, size=pick.size))
            self.py.append(pick)
        self.mx.append(pos)
        self.my.append(v.mean())

    def draw(self, ax) -> None:
        if self.polys:
            ax.add_collection(PolyCollection(self.polys, facecolors=self.poly_colors,
                                             edgecolors="black", linewidths=0.4, alpha=0.75))
        if self.flat:
            ax.add_collection(LineCollection(self.flat, colors=self.flat_colors, linewidths=2))
        if self.px:
            ax.scatter(np.concatenate(self.px), np.concatenate(self.py), s=0.8, c="black",
                       alpha=0.35, lw=0, rasterized=True)
        if self.mx:
            ax.scatter(self.mx, self.my, s=14, c="white", edgecolors="black", lw=0.6, zorder=3)
        ax.autoscale_view()


def stars(p: float) -> str:
    if not np.isfinite(p):
        return ""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else "ns"


def _figure(size: tuple[float, float]) -> Figure:
    return Figure(figsize=size, layout="constrained")


def _save(fig: Figure, path: Path) -> Path:
    from cellmill.io import faults

    tmp = path.with_name(path.name + ".tmp")  # a killed run leaves no half-drawn figure
    fig.savefig(tmp, dpi=DPI, facecolor="white", format=path.suffix.lstrip(".") or "png")
    # figure, axes and artists refer to each other: only the cyclic collector would free them
    # (and the per-cell arrays they hold); cleared, they go as the figure's function returns
    fig.clear()
    tmp.replace(path)
    faults.wrote()
    return path


# ----------------------------------------------------------------------------- figures


@dataclass
class FigureResult:
    key: str
    title: str
    caption: str = ""
    path: Path | None = None
    note: str = ""  # why it was skipped
    extra: dict = field(default_factory=dict)


def fig_umap(inp: ReportInputs, out: Path) -> FigureResult:
    emb = inp.array("obsm", "X_umap")[inp.qc]
    lab = inp.clusters()
    order = lab.levels
    colors = cluster_colors(order)
    n = len(lab)
    fig = _figure((7.5, 6.2))
    ax = fig.add_subplot()
    size = float(np.clip(30000 / max(n, 1), 0.3, 12))  # dot area in points^2, as scatter's s
    perm = np.random.default_rng(0).permutation(n)  # no cluster painted wholly on top
    lo, hi = emb.min(axis=0), emb.max(axis=0)
    pad = 0.05 * np.maximum(hi - lo, 1e-9)  # matplotlib's default margins
    limits = (lo[0] - pad[0], hi[0] + pad[0], lo[1] - pad[1], hi[1] + pad[1])
    palette = np.array([to_rgba(colors[c], 0.9) for c in order]) * 255
    img = dot_image(emb, lab.codes, np.round(palette), perm, UMAP_RASTER,
                    diameter_px=np.sqrt(size) * DPI / 72, limits=limits)
    ax.imshow(img, extent=limits, origin="upper", aspect="auto", interpolation="antialiased")
    del img, perm
    for c in order:
        sel = lab.is_(c)
        x, y = np.median(emb[sel, 0]), np.median(emb[sel, 1])
        ax.text(x, y, c, fontsize=10, weight="bold", ha="center", va="center",
                path_effects=[patheffects.withStroke(linewidth=2.5, foreground="white")])
        ax.scatter([], [], color=colors[c], label=f"{c} (n={int(sel.sum())})")
    ax.legend(title="cluster", loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False,
              markerscale=2.5, fontsize=8)
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_title(f"{n:,} cells, {len(order)} clusters")
    ax.set_xticks([])
    ax.set_yticks([])
    return FigureResult("fig1a", "Fig. 1a: UMAP of the cells, coloured by cluster",
                        f"{n:,} QC-passed cells; labels at each cluster's median position.",
                        _save(fig, out / "fig1a_umap_clusters.png"))


def _target_genes(inp: ReportInputs) -> list[str]:
    genes = [g for g in inp.cfg.study.target_genes if g in inp.var_names]
    if not genes:
        raise Missing(f"none of the target genes ({', '.join(inp.cfg.study.target_genes)}) "
                      "is in the data")
    return genes


def fig_target_by_cluster(inp: ReportInputs, out: Path) -> FigureResult:
    genes = _target_genes(inp)
    lab = inp.clusters()
    order = lab.levels
    colors = cluster_colors(order)
    expr = inp.expression(genes)
    fig = _figure((max(6, 0.6 * len(order) + 2), 3.2 * len(genes)))
    rng = np.random.default_rng(1)
    for i, g in enumerate(genes):
        ax = fig.add_subplot(len(genes), 1, i + 1)
        vs = Violins()
        for j, c in enumerate(order):
            vs.add(j, expr[g][lab.is_(c)], color=colors[c], rng=rng)
        vs.draw(ax)
        ax.set_xticks(range(len(order)), order)
        ax.set_xlim(-0.6, len(order) - 0.4)
        ax.set_ylabel(f"{g}\nlog-normalised")
        ax.set_xlabel("cluster")
    fig.suptitle("Target gene expression by cluster (white dot: mean)")
    return FigureResult("fig1b", "Fig. 1b: target gene(s) by cluster",
                        "Violins of log-normalised expression per cluster (QC-passed cells).",
                        _save(fig, out / "fig1b_target_by_cluster.png"))


def _split_violins(inp: ReportInputs, out: Path, column: str, levels: list[str],
                   palette: dict[str, str], key: str, title: str, fname: str,
                   pvals: dict | None = None) -> FigureResult:
    genes = _target_genes(inp)
    lab = inp.clusters()
    split = inp.meta(column)
    order = lab.levels
    expr = inp.expression(genes)
    k = len(levels)
    w = 0.8 / k
    fig = _figure((max(7, (0.35 * k + 0.3) * len(order) + 2), 3.4 * len(genes)))
    rng = np.random.default_rng(2)
    for i, g in enumerate(genes):
        ax = fig.add_subplot(len(genes), 1, i + 1)
        top = float(np.max(expr[g])) if expr[g].size else 1.0
        vs = Violins()
        for j, c in enumerate(order):
            in_c = lab.is_(c)
            for m, lev in enumerate(levels):
                pos = j - 0.4 + w * (m + 0.5)
                vs.add(pos, expr[g][in_c & split.is_(lev)], width=w * 0.95,
                       color=palette[lev], points=60, rng=rng)
            if pvals is not None and (g, c) in pvals:
                ax.text(j, top * 1.04, stars(pvals[(g, c)]), ha="center", va="bottom",
                        fontsize=8)
        vs.draw(ax)
        for lev in levels:
            ax.bar([0], [0], color=palette[lev], label=lev)
        ax.set_xticks(range(len(order)), order)
        ax.set_xlim(-0.6, len(order) - 0.4)
        ax.set_ylim(top=max(top * 1.15, 0.1))
        ax.set_ylabel(f"{g}\nlog-normalised")
        ax.set_xlabel("cluster")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=8)
    fig.suptitle(title)
    return FigureResult(key, "", "", _save(fig, out / fname))


def fig_target_by_condition(inp: ReportInputs, out: Path) -> FigureResult:
    s = inp.cfg.study
    present = set(inp.meta(s.condition).present())
    levels = [x for x in (s.control, s.case) if x in present]
    if len(levels) < 2:
        raise Missing(f"obs {s.condition!r} lacks {s.case!r} or {s.control!r}")
    pvals = None
    try:
        t = inp.condition_tests()
        t = t[t["timepoint"] == "pooled"]
        pvals = {(r.gene, r.cluster): float(r.p_value) for r in t.itertuples()}
    except Missing:
        pass
    res = _split_violins(inp, out, s.condition, levels,
                         {s.control: CONTROL_COLOR, s.case: CASE_COLOR}, "fig1c",
                         f"Target gene by cluster, {s.case} vs {s.control} (time points pooled)",
                         "fig1c_target_by_condition.png", pvals)
    res.title = f"Fig. 1c: target gene(s) by cluster, split by {s.condition}"
    res.caption = (f"Stars: one-sided Welch t-test {s.case} > {s.control}, time points pooled "
                   "(tables/target_tests.csv; * p < 0.05, ** < 0.01, *** < 0.001)."
                   if pvals else "")
    return res


def fig_target_by_timepoint(inp: ReportInputs, out: Path) -> FigureResult:
    s = inp.cfg.study
    levels = inp.timepoints()
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    palette = {t: cmap(0.15 + 0.7 * i / max(len(levels) - 1, 1)) for i, t in enumerate(levels)}
    res = _split_violins(inp, out, s.timepoint, levels, palette, "fig1d",
                         "Target gene by cluster and time point (conditions pooled)",
                         "fig1d_target_by_timepoint.png")
    res.title = f"Fig. 1d: target gene(s) by cluster, split by {s.timepoint}"
    return res


def fig_target_cluster_of_interest(inp: ReportInputs, out: Path) -> FigureResult:
    """The study's key comparison: the cluster of interest, case vs control at each time point."""
    s = inp.cfg.study
    coi, _ = inp.cluster_of_interest()
    genes = _target_genes(inp)
    lab = inp.clusters()
    if coi not in lab.levels:
        raise Missing(f"cluster of interest {coi!r} has no cells")
    cond = inp.meta(s.condition)
    tp = inp.meta(s.timepoint)
    tps = inp.timepoints()
    expr = inp.expression(genes)
    pv = {}
    try:
        t = inp.condition_tests()
        t = t[t["cluster"] == coi]
        pv = {(r.gene, r.timepoint): float(r.p_value) for r in t.itertuples()}
    except Missing:
        pass
    fig = _figure((max(5, 1.6 * len(tps) + 1.5), 3.4 * len(genes)))
    rng = np.random.default_rng(3)
    for i, g in enumerate(genes):
        ax = fig.add_subplot(len(genes), 1, i + 1)
        sel = lab.is_(coi)
        top = float(np.max(expr[g][sel])) if sel.any() else 1.0
        vs = Violins()
        for j, t in enumerate(tps):
            for m, (lev, col) in enumerate(((s.control, CONTROL_COLOR), (s.case, CASE_COLOR))):
                vs.add(j - 0.2 + 0.4 * m, expr[g][sel & tp.is_(t) & cond.is_(lev)],
                       width=0.38, color=col, points=80, rng=rng)
            p = pv.get((g, t), np.nan)
            if np.isfinite(p):
                ax.text(j, top * 1.04, f"p = {p:.2g} {stars(p)}", ha="center", va="bottom",
                        fontsize=8)
        vs.draw(ax)
        ax.bar([0], [0], color=CONTROL_COLOR, label=s.control)
        ax.bar([0], [0], color=CASE_COLOR, label=s.case)
        ax.set_xticks(range(len(tps)), tps)
        ax.set_ylim(top=max(top * 1.2, 0.1))
        ax.set_ylabel(f"{g}\nlog-normalised")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=8)
    fig.suptitle(f"Cluster {coi}: {s.case} vs {s.control} by time point")
    return FigureResult("fig1e", f"Fig. 1e: target gene(s) in cluster {coi} (cluster of interest)",
                        f"p: one-sided Welch t-test {s.case} > {s.control} within the cluster at "
                        "each time point (tables/target_tests.csv).",
                        _save(fig, out / "fig1e_target_cluster_of_interest.png"))


GSEA_COLS = ("pathway", "pval", "padj", "NES", "cluster", "timepoint")


def _gsea(inp: ReportInputs) -> pd.DataFrame:
    g = inp.table("gsea.csv", GSEA_COLS)
    if g.empty:
        raise Missing("tables/gsea.csv has no rows")
    return g


def _short(pathway: str) -> str:
    return pathway.removeprefix("HALLMARK_").replace("_", " ")


def _gsea_rows(g: pd.DataFrame, limit: int) -> list[str]:
    """Pathways to show: significant anywhere (by smallest padj), else the best few."""
    best = g.groupby("pathway")["padj"].min().sort_values(kind="stable")
    sig = best[best < SIG]
    pick = sig if len(sig) else best.head(min(limit, 15))
    return list(pick.index[:limit])


def fig_gsea_heatmap(inp: ReportInputs, out: Path) -> FigureResult:
    g = _gsea(inp)
    tps = [t for t in inp.cfg.study.timepoints if t in set(g["timepoint"])]
    tps += sorted(set(g["timepoint"]) - set(tps))
    cl = sort_labels(g["cluster"].unique())
    cols = [(c, t) for c in cl for t in tps]
    rows = _gsea_rows(g, MAX_GSEA_ROWS)
    nes = np.full((len(rows), len(cols)), np.nan)
    padj = np.full_like(nes, np.nan)
    ri = {p: i for i, p in enumerate(rows)}
    ci = {c: j for j, c in enumerate(cols)}
    for r in g[g["pathway"].isin(rows)].itertuples():
        j = ci.get((r.cluster, r.timepoint))
        if j is not None:
            nes[ri[r.pathway], j] = r.NES
            padj[ri[r.pathway], j] = r.padj
    lim = float(np.nanmax(np.abs(nes))) if np.isfinite(nes).any() else 1.0
    fig = _figure((max(6, 0.28 * len(cols) + 4), max(3, 0.3 * len(rows) + 1.8)))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(nes), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto",
                   interpolation="nearest")
    for i in range(len(rows)):
        for j in range(len(cols)):
            if np.isfinite(padj[i, j]) and padj[i, j] < SIG:
                dark = abs(nes[i, j]) > 0.6 * lim
                ax.text(j, i, stars(padj[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if dark else "black")
    ax.set_yticks(range(len(rows)), [_short(p) for p in rows], fontsize=7)
    ax.set_xticks(range(len(cols)), [f"{c} · {t}" for c, t in cols], rotation=90, fontsize=7)
    for j in range(len(tps), len(cols), len(tps)):
        ax.axvline(j - 0.5, color="black", lw=0.6)
    ax.set_xlabel("cluster · time point")
    fig.colorbar(im, ax=ax, label="NES", shrink=0.6)
    s = inp.cfg.study
    ax.set_title(f"GSEA {s.case} vs {s.control}: NES per cluster and time point")
    return FigureResult("fig2", "Fig. 2: GSEA normalised enrichment scores",
                        "NES of each pathway (rows) per cluster and time point (columns); "
                        "stars mark BH-adjusted p (padj < 0.05 *, < 0.01 **, < 0.001 ***). "
                        "Pathways shown: significant somewhere (up to 30), else the best 15.",
                        _save(fig, out / "fig2_gsea_nes_heatmap.png"))


def fig_gsea_bars(inp: ReportInputs, out: Path) -> FigureResult:
    g = _gsea(inp)
    tps = [t for t in inp.cfg.study.timepoints if t in set(g["timepoint"])]
    tps += sorted(set(g["timepoint"]) - set(tps))
    try:
        coi = inp.cluster_of_interest()[0]
    except Missing:
        coi = None
    sig = g[g["padj"] < SIG]
    clusters = sort_labels(sig["cluster"].unique())
    if coi is not None:
        clusters = [coi] + [c for c in clusters if c != coi]
    clusters = clusters[:6]
    if not clusters:
        raise Missing("no pathway is significant (padj < 0.05) in any cluster")
    heights = [max(1.6, 0.22 * len(_gsea_rows(g[g["cluster"] == c], 12)) + 0.8)
               for c in clusters]
    fig = _figure((3.3 * len(tps) + 2.5, 0.9 + sum(heights)))
    grid = fig.add_gridspec(len(clusters), len(tps), height_ratios=heights)
    lim = float(np.nanmax(np.abs(g["NES"]))) * 1.3
    for i, c in enumerate(clusters):
        gc = g[g["cluster"] == c]
        rows = _gsea_rows(gc, 12)
        for j, t in enumerate(tps):
            ax = fig.add_subplot(grid[i, j])
            sub = gc[gc["timepoint"] == t].set_index("pathway").reindex(rows)
            nes = sub["NES"].to_numpy(dtype=float)
            pa = sub["padj"].to_numpy(dtype=float)
            colors = [(CASE_COLOR if v > 0 else CONTROL_COLOR) if p < SIG else "#bbbbbb"
                      for v, p in zip(nes, pa, strict=True)]
            y = np.arange(len(rows))
            ax.barh(y, np.nan_to_num(nes), color=colors)
            for yy, v, p in zip(y, nes, pa, strict=True):
                if np.isfinite(p) and p < SIG:
                    ax.text(v + (0.05 if v > 0 else -0.05) * lim, yy, stars(p), va="center",
                            ha="left" if v > 0 else "right", fontsize=7)
            ax.axvline(0, color="black", lw=0.6)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(len(rows) - 0.5, -0.5)
            if j == 0:
                ax.set_yticks(y, [_short(p) for p in rows], fontsize=7)
                ax.set_ylabel(f"cluster {c}" + (" (of interest)" if c == coi else ""))
            else:
                ax.set_yticks(y, [])
            ax.set_title(t, fontsize=9)
            if i == len(clusters) - 1:
                ax.set_xlabel("NES")
    s = inp.cfg.study
    fig.suptitle(f"GSEA {s.case} vs {s.control}: pathways significant in each cluster")
    return FigureResult("fig2b", "Fig. 2b: GSEA NES bars per cluster and time point",
                        "Clusters with a significant pathway (cluster of interest first, at most "
                        "6). Coloured bars: padj < 0.05 (red: up in "
                        f"{s.case}, blue: down); grey: not significant.",
                        _save(fig, out / "fig2b_gsea_nes_bars.png"))


def running_es(stats: pd.Series, genes: set[str]) -> tuple[np.ndarray, np.ndarray]:
    """GSEA running enrichment score (weights |stat|, ranking decreasing) and hit positions."""
    order = np.argsort(-stats.to_numpy(dtype=float), kind="stable")
    names = stats.index.to_numpy()[order]
    w = np.abs(stats.to_numpy(dtype=float)[order])
    hit = np.isin(names, list(genes))
    n, m = len(names), int(hit.sum())
    if m == 0 or m == n:
        return np.zeros(n), np.flatnonzero(hit)
    nr = w[hit].sum()
    step = np.where(hit, w / nr if nr > 0 else 1.0 / m, -1.0 / (n - m))
    return np.cumsum(step), np.flatnonzero(hit)


def fig_enrichment_curves(inp: ReportInputs, out: Path) -> FigureResult:
    from cellmill.genesets import gmt_path
    from cellmill.io.gmt import GmtError, read_gmt

    g = _gsea(inp)
    sig = g[g["padj"] < SIG].copy()
    if sig.empty:
        raise Missing("no significant pathway (padj < 0.05) to draw")
    rank_dir = inp.tables_dir / "gsea_ranks"
    if not rank_dir.is_dir():
        raise Missing("tables/gsea_ranks/ not found (the gsea stage did not write rankings)")
    try:
        sets = read_gmt(gmt_path(inp.cfg, inp.var_names, "the store"))
    except (GmtError, ConfigError) as e:
        raise Missing(f"gene sets not readable: {e}") from None
    try:
        coi = inp.cluster_of_interest()[0]
    except Missing:
        coi = None
    sig["_coi"] = sig["cluster"] != coi
    sig = sig.sort_values(["_coi", "padj"], kind="stable")
    shown = sig[sig["pathway"].isin(sets.keys())].head(MAX_CURVES)
    panels = []
    for r in shown.itertuples():
        f = rank_dir / f"{r.cluster}_{r.timepoint}.csv"
        if f.is_file():
            panels.append((r, f))
    if not panels:
        raise Missing("no ranking file in tables/gsea_ranks/ for the significant pathways")
    ncol = min(3, len(panels))
    nrow = (len(panels) + ncol - 1) // ncol
    fig = _figure((4.2 * ncol, 3.4 * nrow))
    grid = fig.add_gridspec(nrow, ncol)
    for k, (r, f) in enumerate(panels):
        ranks = pd.read_csv(f, dtype={"gene": str})
        stats = pd.Series(ranks["stat"].to_numpy(dtype=float), index=ranks["gene"].to_numpy())
        es, hits = running_es(stats, set(sets[r.pathway]))
        sub = grid[k // ncol, k % ncol].subgridspec(2, 1, height_ratios=[4, 1])
        ax = fig.add_subplot(sub[0])
        color = CASE_COLOR if r.NES > 0 else CONTROL_COLOR
        ax.plot(np.arange(len(es)), es, color=color, lw=1.2)
        ax.axhline(0, color="black", lw=0.5)
        ax.vlines(hits, -0.04 * np.abs(es).max() - 1e-9, 0, color="black", lw=0.3)
        ax.set_xticks([])
        ax.set_ylabel("running ES", fontsize=8)
        ax.set_title(f"{_short(r.pathway)}\ncluster {r.cluster} · {r.timepoint}: "
                     f"NES {r.NES:.2f}, padj {r.padj:.2g}", fontsize=8)
        ax2 = fig.add_subplot(sub[1])
        sorted_stats = np.sort(stats.to_numpy(dtype=float))[::-1]
        ax2.fill_between(np.arange(len(sorted_stats)), sorted_stats, color="#999999", lw=0)
        ax2.set_ylabel("stat", fontsize=7)
        ax2.tick_params(labelsize=6)
        ax2.set_xlabel("gene rank", fontsize=7)
    more = len(sig) - len(panels)
    return FigureResult("fig2c", "Fig. 2c: enrichment curves of the significant pathways",
                        "Running enrichment score along the ranking (cluster of interest first). "
                        + (f"{more} further significant pathway(s) not drawn." if more > 0 else ""),
                        _save(fig, out / "fig2c_enrichment_curves.png"))


def top_markers(inp: ReportInputs, cluster: str, n: int) -> pd.DataFrame:
    mk = inp.table("markers.csv", ("gene", "cluster", "p_val", "avg_log2FC", "p_val_adj"))
    m = mk[mk["cluster"] == cluster]
    if m.empty:
        raise Missing(f"tables/markers.csv has no markers for cluster {cluster}")
    sig = m[m["p_val_adj"] < SIG]
    m = sig if len(sig) else m
    return m.sort_values(["avg_log2FC", "p_val"], ascending=[False, True], kind="stable").head(n)


def fig_markers(inp: ReportInputs, out: Path) -> FigureResult:
    coi, _ = inp.cluster_of_interest()
    genes = [g for g in top_markers(inp, coi, N_FIG3_GENES)["gene"] if g in inp.var_names]
    if not genes:
        raise Missing("the top markers are not in the store's genes")
    lab = inp.clusters()
    order = lab.levels
    colors = cluster_colors(order)
    ncol = 2 if len(genes) > 3 else 1
    nrow = (len(genes) + ncol - 1) // ncol
    fig = _figure((max(6, 0.45 * len(order) + 1.5) * ncol, 2.6 * nrow))
    rng = np.random.default_rng(4)
    for i, g in enumerate(genes):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        vs = Violins()
        y = inp.expression([g])[g]  # one gene's n-cell vector alive at a time
        for j, c in enumerate(order):
            vs.add(j, y[lab.is_(c)], color=colors[c], points=60, rng=rng)
        del y
        vs.draw(ax)
        if coi in order:
            ax.axvspan(order.index(coi) - 0.5, order.index(coi) + 0.5, color="#f4d03f",
                       alpha=0.25, lw=0)
        ax.set_xticks(range(len(order)), order, fontsize=8)
        ax.set_xlim(-0.6, len(order) - 0.4)
        ax.set_title(g, fontsize=10)
        ax.set_ylabel("log-normalised", fontsize=8)
    fig.suptitle(f"Top markers of cluster {coi} (highlighted)")
    return FigureResult("fig3", f"Fig. 3: top markers of cluster {coi}",
                        f"The {len(genes)} markers of cluster {coi} with the largest avg_log2FC "
                        "among those with p_val_adj < 0.05 (tables/markers.csv), by cluster.",
                        _save(fig, out / "fig3_markers_cluster_of_interest.png"))


def fig_qc(inp: ReportInputs, out: Path) -> FigureResult:
    qc = inp.table("qc.csv", ("sample", "n_counts", "n_features", "pass"), cache=False)
    lo, hi = inp.cfg.qc.min_features, inp.cfg.qc.max_features
    flag = qc["pass"]
    # pandas reads True/False as bool: no string a cell (1M cells: ~70 MB of them)
    ok = flag.to_numpy(dtype=bool) if flag.dtype == bool else \
        flag.astype(str).str.lower().isin(["true", "1"]).to_numpy()
    nf = qc["n_features"].to_numpy(dtype=float)
    nc = qc["n_counts"].to_numpy(dtype=float)
    fig = _figure((15, 4.2))
    ax = fig.add_subplot(1, 3, 1)
    bins = np.linspace(0, max(nf.max(), hi) * 1.05, 80)
    ax.hist(nf[ok], bins=bins, color="#5d6d7e", label=f"pass ({ok.sum():,})")
    ax.hist(nf[~ok], bins=bins, color="#e67e22", label=f"fail ({(~ok).sum():,})")
    for x in (lo, hi):
        ax.axvline(x, color="red", ls="--", lw=1)
    ax.set_xlabel("genes detected per cell (nFeature)")
    ax.set_ylabel("cells")
    ax.legend(frameon=False, fontsize=8)
    ax = fig.add_subplot(1, 3, 2)
    pick = np.random.default_rng(5).permutation(len(nf))[:50000]
    ax.scatter(nc[pick], nf[pick], s=1, c=np.where(ok[pick], "#5d6d7e", "#e67e22"), lw=0,
               rasterized=True)
    for y in (lo, hi):
        ax.axhline(y, color="red", ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("UMIs per cell (nCount)")
    ax.set_ylabel("nFeature")
    ax = fig.add_subplot(1, 3, 3)
    samples = list(dict.fromkeys(qc["sample"]))
    s_arr = qc["sample"].to_numpy()
    rng = np.random.default_rng(6)
    vs = Violins()
    for j, s in enumerate(samples):
        vs.add(j, nf[s_arr == s], color="#aab7b8", points=50, rng=rng)
    vs.draw(ax)
    for y in (lo, hi):
        ax.axhline(y, color="red", ls="--", lw=1)
    ax.set_xticks(range(len(samples)), samples, rotation=90, fontsize=7)
    ax.set_ylabel("nFeature")
    rule = "<=" if inp.cfg.qc.inclusive else "<"
    fig.suptitle(f"QC: keep cells with {lo} {rule} nFeature {rule} {hi} (red lines)")
    return FigureResult("qc", "QC distributions",
                        f"{ok.sum():,} of {len(ok):,} cells pass "
                        f"({100 * ok.mean():.1f}%).", _save(fig, out / "qc_distributions.png"))


def fig_hvg(inp: ReportInputs, out: Path) -> FigureResult:
    hvg = inp.table("hvg.csv", ("gene", "mean", "variance_standardized", "highly_variable"))
    hv = hvg["highly_variable"].astype(str).str.lower().isin(["true", "1"]).to_numpy()
    mean = hvg["mean"].to_numpy(dtype=float)
    vs = hvg["variance_standardized"].to_numpy(dtype=float)
    keep = mean > 0
    fig = _figure((7, 5))
    ax = fig.add_subplot()
    ax.scatter(mean[keep & ~hv], vs[keep & ~hv], s=2, c="#999999", lw=0, rasterized=True,
               label=f"other ({int((keep & ~hv).sum()):,})")
    ax.scatter(mean[keep & hv], vs[keep & hv], s=3, c=CASE_COLOR, lw=0, rasterized=True,
               label=f"variable ({int(hv.sum()):,})")
    ax.set_xscale("log")
    if "rank" in hvg:
        top = hvg[hv].sort_values("rank").head(10)
    else:
        top = hvg[hv].sort_values("variance_standardized", ascending=False).head(10)
    for r in top.itertuples():
        ax.annotate(r.gene, (r.mean, r.variance_standardized), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("average expression (mean count)")
    ax.set_ylabel("standardised variance (vst)")
    ax.legend(frameon=False, fontsize=8)
    ax.set_title("Highly variable genes (Seurat vst)")
    return FigureResult("hvg", "Highly variable genes: mean-variance plot",
                        "Seurat's VariableFeaturePlot: the ten most variable genes labelled.",
                        _save(fig, out / "hvg_mean_variance.png"))


def fig_pca_elbow(inp: ReportInputs, out: Path) -> FigureResult:
    sd = np.asarray(inp.array("uns", "pca_stdev"), dtype=float).ravel()
    n_pcs = inp.cfg.neighbors.n_pcs
    fig = _figure((6, 4))
    ax = fig.add_subplot()
    ax.plot(np.arange(1, len(sd) + 1), sd, "o", ms=3.5, color="#34495e")
    ax.axvline(n_pcs + 0.5, color="red", ls="--", lw=1, label=f"PCs used: 1..{n_pcs}")
    ax.set_xlabel("PC")
    ax.set_ylabel("standard deviation")
    ax.legend(frameon=False)
    ax.set_title("PCA elbow plot")
    return FigureResult("pca", "PCA elbow plot",
                        "Standard deviation of each principal component; the neighbour graph "
                        f"uses PCs 1..{n_pcs}.", _save(fig, out / "pca_elbow.png"))


def qq_points(p: np.ndarray, max_points: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """(expected, observed) -log10 p of a uniform QQ plot; thinned evenly along the sorted
    values beyond max_points (the tail, where the eye looks, is always kept)."""
    p = np.sort(np.asarray(p, dtype=float)[np.isfinite(p)])
    n = p.size
    expected = (np.arange(1, n + 1) - 0.5) / n
    if n > max_points:
        keep = np.unique(np.r_[np.arange(min(n, 500)),
                               np.linspace(0, n - 1, max_points - 500).astype(int)])
        p, expected = p[keep], expected[keep]
    return -np.log10(expected), -np.log10(np.maximum(p, 1e-300))


def pseudobulk_pairs(inp: ReportInputs) -> pd.DataFrame:
    """pseudobulk.csv rows of case vs control per cluster x time point that ran, with both
    p-values (P.Value: samples as replicates; p_value_cells: cells). Only the columns the
    figure needs are read: the table has a row per gene and contrast."""
    path = inp.tables_dir / "pseudobulk.csv"
    if not path.is_file():
        raise Missing("tables/pseudobulk.csv not found")
    cols = ["cluster", "timepoint", "contrast", "P.Value", "p_value_cells"]
    pb = pd.read_csv(path, usecols=cols, dtype={"cluster": str, "timepoint": str,
                                                "contrast": str})
    s = inp.cfg.study
    rows = pb[(pb["contrast"] == f"{s.case}_vs_{s.control}") & (pb["cluster"] != "all")
              & (pb["timepoint"] != "pooled")]
    rows = rows[np.isfinite(rows["P.Value"].to_numpy(float))]
    if rows.empty:
        raise Missing("tables/pseudobulk.csv has no tested cluster x time point contrast")
    return rows


def fig_calibration(inp: ReportInputs, out: Path) -> FigureResult:
    rows = pseudobulk_pairs(inp)
    s = inp.cfg.study
    fig = _figure((5.5, 5))
    ax = fig.add_subplot()
    top = 1.0
    for col, label, color in (("p_value_cells", "cells as replicates (Welch)", CASE_COLOR),
                              ("P.Value", "animals as replicates (pseudobulk voom)",
                               CONTROL_COLOR)):
        p = rows[col].to_numpy(float)
        p = p[np.isfinite(p)]
        x, y = qq_points(p)
        ax.plot(x, y, ".", ms=2.5, color=color,
                label=f"{label}: {np.mean(p < SIG):.1%} with p < {SIG}")
        top = max(top, x.max())
    ax.plot([0, top], [0, top], color="black", lw=0.8, ls="--", label="uniform (no effect)")
    ax.set_xlabel("expected -log10 p")
    ax.set_ylabel("observed -log10 p")
    ax.legend(frameon=False, fontsize=8, loc="upper left")
    ax.set_title(f"{s.case} vs {s.control}: p-value calibration")
    n_contrasts = rows.groupby(["cluster", "timepoint"]).ngroups
    return FigureResult(
        "calib", "P-value calibration: cells vs animals as replicates",
        f"QQ plot of the two-sided p-values of every tested gene in {n_contrasts} cluster x "
        f"time point contrasts ({s.case} vs {s.control}; tables/pseudobulk.csv). Points on the "
        "diagonal are what genes without an effect give; real effects lift the tail of both. "
        "A cell-level curve far above the pseudobulk one is the inflation of treating cells "
        "of one animal as independent.", _save(fig, out / "calibration_qq.png"))


FIGURES = [
    ("fig1a", "Fig. 1a: UMAP by cluster", fig_umap),
    ("fig1b", "Fig. 1b: target gene(s) by cluster", fig_target_by_cluster),
    ("fig1c", "Fig. 1c: target gene(s) by cluster and condition", fig_target_by_condition),
    ("fig1d", "Fig. 1d: target gene(s) by cluster and time point", fig_target_by_timepoint),
    ("fig1e", "Fig. 1e: target gene(s) in the cluster of interest",
     fig_target_cluster_of_interest),
    ("fig2", "Fig. 2: GSEA NES per cluster and time point", fig_gsea_heatmap),
    ("fig2b", "Fig. 2b: GSEA NES bars", fig_gsea_bars),
    ("fig2c", "Fig. 2c: enrichment curves", fig_enrichment_curves),
    ("fig3", "Fig. 3: top markers of the cluster of interest", fig_markers),
    ("calib", "P-value calibration: cells vs animals as replicates", fig_calibration),
    ("qc", "QC distributions", fig_qc),
    ("hvg", "Highly variable genes", fig_hvg),
    ("pca", "PCA elbow plot", fig_pca_elbow),
]


TRIM_FROM = 32 * 2**20  # freed heap bytes worth handing back between figures

FILE_PREFIX = {"fig1a": "fig1a_", "fig1b": "fig1b_", "fig1c": "fig1c_", "fig1d": "fig1d_",
               "fig1e": "fig1e_", "fig2": "fig2_", "fig2b": "fig2b_", "fig2c": "fig2c_",
               "fig3": "fig3_", "calib": "calibration_", "qc": "qc_", "hvg": "hvg_", "pca": "pca_"}
FIGURE_FUNCS = {key: (title, func) for key, title, func in FIGURES}


def draw_figure(inp: ReportInputs, key: str, out: Path) -> FigureResult:
    """One figure of FIGURES; skipped (inputs missing) or failed, a note says why (and any file
    an earlier run left for it is removed, so figures/ matches the report)."""
    title, func = FIGURE_FUNCS[key]
    try:
        res = func(inp, out)
    except Missing as e:
        res = FigureResult(key, title, note=f"skipped: {e}")
    except Exception as e:  # a figure must never sink the run; say what went wrong
        log.warning("figure %s failed", key, exc_info=True)
        res = FigureResult(key, title, note=f"failed: {type(e).__name__}: {e}")
    if res.path is None:
        for stale in Path(out).glob(FILE_PREFIX[key] + "*.png"):
            stale.unlink()
    # what a figure freed goes back to the system before the next one when it is much:
    # glibc keeps it otherwise, and the per-cell figures' leftovers (~100 MB at 1M cells)
    # were then under every later figure's peak
    trim_heap(TRIM_FROM)
    return res
