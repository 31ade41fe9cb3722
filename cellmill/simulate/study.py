"""simulate_study: write a synthetic study (one 10x HDF5 per sample, manifest, truth, planted)."""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cellmill.io.gmt import read_gmt

from . import design as ds
from . import genes as gn
from . import model as md
from .kernels import simulate_chunk
from .tenx import TenxWriter, feature_arrays

CHUNK_CELLS = 1000  # cells per kernel call; fixed, so output does not depend on threads
DIRECT_MIN_MEAN = 2.0  # genes above this mean at twice the median depth get one NB draw each
DOUBLET = "doublet"
LOW_QUALITY = "low_quality"
N_BUCKETS = 8192  # lookup table of the cumulative-expression axis, per profile
MIN_LOW_FEATURES = 100
MAX_DOUBLET_FEATURES = 7000


def _barcodes(rng: np.random.Generator, n: int) -> list[str]:
    """n distinct 16-nt barcodes with the GEM group suffix, sorted as Cell Ranger lists them."""
    alphabet = np.frombuffer(b"ACGT", dtype=np.uint8)
    found: set[bytes] = set()
    while len(found) < n:
        k = n - len(found)
        codes = alphabet[rng.integers(0, 4, size=(k, 16))]
        found.update(bytes(row) for row in codes)
    return sorted(b.decode() + "-1" for b in found)


def _cell_plan(sample: ds.Sample, s: int, model: md.ExpressionModel, rng: np.random.Generator):
    """Per-cell profile(s), depth and detected-gene bounds, in barcode order."""
    P = len(ds.POPULATION_NAMES)
    props = model.sample_props[s]
    n_per_pop = ds.largest_remainder(sample.n_pass, props)
    pop_pass = np.repeat(np.arange(P), n_per_pop)
    pop_low = rng.choice(P, size=sample.n_low, p=props)
    dbl_a = rng.choice(P, size=sample.n_doublet, p=props)
    dbl_b = (dbl_a + rng.integers(1, P, size=sample.n_doublet)) % P  # a different population
    prof_a = np.concatenate([pop_pass, P + pop_low, dbl_a]).astype(np.int64)
    prof_b = np.concatenate([np.full(sample.n_pass + sample.n_low, -1), dbl_b]).astype(np.int64)
    kind = np.repeat([0, 1, 2], [sample.n_pass, sample.n_low, sample.n_doublet])
    base = np.log(md.DEPTH_MEDIAN) + model.sample_log_depth[s]
    log_depth = np.choose(kind, [base, np.log(md.LOW_DEPTH_MEDIAN),
                                 base + np.log(md.DOUBLET_DEPTH_FACTOR)]).astype(np.float64)
    lo = np.choose(kind, [ds.QC_MIN_FEATURES + 1, MIN_LOW_FEATURES, ds.QC_MAX_FEATURES + 1])
    hi = np.choose(kind, [ds.QC_MAX_FEATURES - 1, ds.QC_MIN_FEATURES - 1, MAX_DOUBLET_FEATURES])
    labels = np.array(list(ds.POPULATION_NAMES) + [LOW_QUALITY, DOUBLET], dtype=object)
    label = np.where(kind == 0, prof_a, np.where(kind == 1, P, P + 1))
    order = rng.permutation(sample.n_total)
    return dict(prof_a=prof_a[order], prof_b=prof_b[order], log_depth=log_depth[order],
                lo=lo[order].astype(np.int64), hi=hi[order].astype(np.int64),
                population=labels[label[order]])


def _profile_tables(rel: np.ndarray):
    """Per profile: which genes are drawn directly, and the cumulative rel of the others.
    Rows P.. are the near-empty droplets, so their reference depth is much lower."""
    P = len(ds.POPULATION_NAMES)
    depth_ref = np.where(np.arange(rel.shape[0]) < P, 2.0 * md.DEPTH_MEDIAN,
                         2.0 * md.LOW_DEPTH_MEDIAN)
    is_direct = rel * depth_ref[:, None] > DIRECT_MIN_MEAN
    n_direct = is_direct.sum(axis=1).astype(np.int64)
    direct = np.zeros((rel.shape[0], max(1, int(n_direct.max()))), dtype=np.int64)
    for p in range(rel.shape[0]):
        d = np.flatnonzero(is_direct[p])
        direct[p, :d.size] = d
    cum = np.cumsum(np.where(is_direct, 0.0, rel), axis=1)
    # equal-mass buckets of the cumulative axis: where to start looking for a candidate's gene
    step = cum[:, -1] / N_BUCKETS
    bucket = np.zeros((rel.shape[0], N_BUCKETS), dtype=np.int64)
    for p in range(rel.shape[0]):
        if step[p] > 0:
            edges = np.arange(N_BUCKETS) * step[p]
            bucket[p] = np.searchsorted(cum[p], edges, side="right")
        else:
            step[p] = 1.0
    return direct, n_direct, cum, bucket, step


def _write_sample(path: Path, sample: ds.Sample, s: int, model: md.ExpressionModel,
                  seq: np.random.SeedSequence, pool: ThreadPoolExecutor, n_threads: int,
                  truth_writer, features: dict[str, np.ndarray]):
    plan_seq, chunk_seq = seq.spawn(2)
    rng = np.random.default_rng(plan_seq)
    barcodes = _barcodes(rng, sample.n_total)
    plan = _cell_plan(sample, s, model, rng)
    rel = md.sample_profiles(model, s, sample)
    tables = _profile_tables(rel)
    phi = model.phi
    starts = list(range(0, sample.n_total, CHUNK_CELLS))
    seeds = chunk_seq.generate_state(max(1, len(starts)), dtype=np.uint64)

    def run(c: int):
        a, b = starts[c], min(starts[c] + CHUNK_CELLS, sample.n_total)
        return simulate_chunk(seeds[c], plan["prof_a"][a:b], plan["prof_b"][a:b],
                              plan["log_depth"][a:b], md.DEPTH_SD, plan["lo"][a:b],
                              plan["hi"][a:b], rel, phi, *tables)

    writer = TenxWriter(path, features, barcodes, library_id=sample.name)
    window = 2 * n_threads  # chunks in flight: a bounded look-ahead keeps memory flat
    futures = {}
    try:
        for c in range(len(starts)):
            for k in range(c, min(c + window, len(starts))):
                if k not in futures:
                    futures[k] = pool.submit(run, k)
            indptr, indices, data, _umis = futures.pop(c).result()
            writer.append(indptr, indices, data)
        writer.close()
    except BaseException:
        for f in futures.values():
            f.cancel()
        writer.abort()
        raise
    for bc, pop in zip(barcodes, plan["population"], strict=True):
        truth_writer.writerow([f"{sample.name}_{bc}", sample.name, pop])
    return writer.nnz


def simulate_study(out_dir, n_cells: int = 20_000, seed: int = 0, n_genes: int = 27_998,
                   gmt=None, progress: bool = False, threads: int | None = None,
                   replicates: int = 1, replicate_sd: float = md.REPLICATE_SD) -> dict:
    """Simulate a study shaped like the microglia SNI/Sham study into out_dir.

    n_cells cells pass QC (500 < detected genes < 4000); about 4.5% more fail it. Writes one Cell
    Ranger v3 HDF5 per sample, manifest.csv, truth.csv, planted.json and (without gmt) planted.gmt.
    `replicates`: animals (samples) per condition x time point x sex (1: the study's 12
    samples). `replicate_sd`: animal-to-animal sd of every gene's log expression (the typical
    gene's; each gene draws its own, see model.animal_offsets); 0 = none.
    The files are identical for a given seed whatever `threads` is. Doublet-like cells (some
    from a few hundred cells on) detect more than 4000 genes, so such studies need
    n_genes > 4000 (5000 or more runs fast); fewer is refused with a ValueError.
    """
    if int(replicates) != replicates or replicates < 1:
        raise ValueError(f"replicates must be a whole number >= 1, not {replicates!r}")
    replicates = int(replicates)
    if not (np.isfinite(replicate_sd) and replicate_sd >= 0):
        raise ValueError(f"replicate_sd must be a finite number >= 0, not {replicate_sd!r}")
    if n_cells < 12 * replicates:
        raise ValueError(f"n_cells must be at least {12 * replicates} (one cell per sample)")
    t0 = time.perf_counter()
    root = np.random.SeedSequence(seed)
    # a fourth child leaves the first three (and so a study without animal variation) as before
    design_seq, model_seq, samples_seq, animal_seq = root.spawn(4)
    samples = ds.make_samples(n_cells, np.random.default_rng(design_seq), replicates)
    if n_genes <= ds.QC_MAX_FEATURES and any(x.n_doublet for x in samples):
        # doublet-like cells must detect more than QC_MAX_FEATURES genes; with fewer genes the
        # kernel's redraws (depth nudged ever higher) would never meet that band
        raise ValueError(f"n_genes={n_genes} is too small for {n_cells} cells: the doublet-like "
                         f"cells need more than {ds.QC_MAX_FEATURES} detected genes (use "
                         "n_genes >= 5000, or fewer cells)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # planted.json is written last and marks a complete study: remove an old one first
    (out / "planted.json").unlink(missing_ok=True)

    gene_sets = read_gmt(gmt) if gmt is not None else None
    extra = [] if gene_sets is None else [g for s in gene_sets.values() for g in s]
    universe = gn.build_universe(n_genes, extra)
    gmt_path = None
    if gene_sets is None:
        gene_sets = md.planted_gene_sets(universe, np.random.default_rng(gn.LAYOUT_SEED + 1))
        gmt_path = out / "planted.gmt"
        gn.write_gmt(gmt_path, gene_sets)
    else:
        (out / "planted.gmt").unlink(missing_ok=True)  # a stale one would mislead
    model = md.build_model(universe, gene_sets, samples, np.random.default_rng(model_seq),
                           replicate_sd=replicate_sd,
                           animal_rng=np.random.default_rng(animal_seq))

    n_threads = threads or os.cpu_count() or 1
    seqs = samples_seq.spawn(len(samples))
    features = feature_arrays(universe.ids, universe.names)
    total_nnz = 0
    truth_path = out / "truth.csv"
    truth_tmp = out / "truth.csv.partial"
    with ThreadPoolExecutor(max_workers=n_threads) as pool, \
            open(truth_tmp, "w", newline="") as fh:
        tw = csv.writer(fh, lineterminator="\n")
        tw.writerow(["cell", "sample", "population"])
        for s, sample in enumerate(samples):
            ts = time.perf_counter()
            total_nnz += _write_sample(out / f"{sample.name}.h5", sample, s, model, seqs[s],
                                       pool, n_threads, tw, features)
            if progress:
                print(f"simulate: {sample.name}: {sample.n_total} cells "
                      f"({time.perf_counter() - ts:.1f} s)", file=sys.stderr, flush=True)
    os.replace(truth_tmp, truth_path)

    manifest = out / "manifest.csv"
    rows = [["sample", "path", "condition", "timepoint", "sex"]]
    rows += [[x.name, f"{x.name}.h5", x.condition, x.timepoint, x.sex] for x in samples]
    _write_atomic(manifest, "".join(",".join(r) + "\n" for r in rows))
    planted = out / "planted.json"
    doc = _planted_doc(model, samples, seed, n_cells, gmt, gmt_path)
    _write_atomic(planted, json.dumps(doc, indent=1) + "\n")
    return dict(
        out_dir=str(out), manifest=str(manifest), truth=str(truth_path), planted=str(planted),
        gmt=str(gmt_path if gmt_path is not None else gmt),
        samples=[dict(sample=x.name, path=str(out / f"{x.name}.h5"), n_pass=x.n_pass,
                      n_total=x.n_total) for x in samples],
        n_samples=len(samples), n_cells=n_cells, n_cells_total=sum(x.n_total for x in samples),
        n_genes=n_genes, nnz=int(total_nnz), seconds=time.perf_counter() - t0,
    )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _planted_doc(model: md.ExpressionModel, samples, seed, n_cells, gmt, gmt_path) -> dict:
    u = model.universe
    return dict(
        seed=seed, n_cells=n_cells, n_cells_total=sum(x.n_total for x in samples),
        n_genes=len(u),
        qc=dict(min_features=ds.QC_MIN_FEATURES, max_features=ds.QC_MAX_FEATURES,
                note="cells that should pass have 500 < nFeature < 4000; the extra cells have "
                     "fewer than 500 (low_quality) or more than 4000 (doublet) detected genes"),
        gmt=str(gmt) if gmt is not None else gmt_path.name,
        effects=model.effects,
        timepoint_effects=model.timepoint_effects,
        populations=[dict(name=n, proportion=p, markers=model.markers[n])
                     for n, p in ds.POPULATIONS],
        samples=[dict(sample=x.name, condition=x.condition, timepoint=x.timepoint, sex=x.sex,
                      n_pass=x.n_pass, n_low_quality=x.n_low, n_doublet=x.n_doublet,
                      log_depth_shift=float(model.sample_log_depth[i]),
                      population_proportions=[float(v) for v in model.sample_props[i]])
                 for i, x in enumerate(samples)],
        sex_genes=dict(female_only=gn.FEMALE_GENES, male_only=gn.MALE_GENES),
        sample_shift_genes=dict(genes=model.sample_shift_genes, sd_log2=md.SAMPLE_SHIFT_SD),
        replicates=dict(
            per_group=len(samples) // 12, replicate_sd=model.replicate_sd,
            prior_df=md.REPLICATE_PRIOR_DF, sd_max=md.REPLICATE_SD_MAX,
            note="every gene g gets a per-sample offset N(0, sd_g) of its natural-log "
                 "expression (the same in all of the sample's cells); sd_g^2 = "
                 "replicate_sd^2 * prior_df / chi2(prior_df), capped at sd_max; gene_sd "
                 "lists sd_g in gene order (var of the sample's store)",
            gene_sd=[round(float(v), 5) for v in model.gene_replicate_sd]),
        model=dict(ref_depth=md.REF_DEPTH, depth_median=md.DEPTH_MEDIAN, depth_sd_log=md.DEPTH_SD,
                   dispersion="phi = (0.1 + 0.5 * mean^-0.3) * lognormal(0, 0.3); "
                              "var = mu + phi mu^2",
                   counts="gamma-Poisson (negative binomial) per gene and cell"),
    )
