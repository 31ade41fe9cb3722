"""`cellmill run` and `cellmill demo`: the whole workflow, with provenance in run.json."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from cellmill.config import Config, load_config
from cellmill.engine import runlog
from cellmill.engine.provenance import versions
from cellmill.engine.registry import ORDER, Context, run_stages
from cellmill.errors import InputError
from cellmill.io.progress import progress_enabled

log = logging.getLogger("cellmill")

def run_workflow(cfg: Config, outdir: Path, until: str | None = None) -> Context:
    from cellmill.engine.monitor import PeakMemory
    from cellmill.engine.preflight import preflight
    from cellmill.io.lock import StoreLock
    from cellmill.io.store import write_json_atomic

    preflight(cfg)  # every check that needs no heavy work, before anything is written
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise InputError(outdir, "output folder is a file")
    ctx = Context(cfg=cfg, outdir=outdir, progress=progress_enabled(cfg.compute.progress))
    if cfg.input.store:
        log.warning("input.store %s is used in place: stage results are written "
                    "into it; tables, figures and the report go to %s", ctx.store_path, outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with StoreLock(ctx.store_path), PeakMemory() as mem:
        _tidy(outdir)
        run_stages(ctx, until=until)
        if until is not None and until != ORDER[-1]:
            partial_report(ctx, until)
    run = {"cellmill": versions()["cellmill"], "versions": versions(), "config": cfg.to_dict(),
           "until": until, "stages": ctx.timings, "store": str(ctx.store_path.resolve()),
           "wall_seconds": round(time.perf_counter() - t0, 3),
           "peak_rss_mb": round(mem.peak / 2**20, 1), "finished": time.time()}
    write_json_atomic(outdir / "run.json", run)
    runlog.summary(run["wall_seconds"], run["peak_rss_mb"], ctx.timings, output_paths(ctx))
    return ctx


def output_paths(ctx: Context) -> list[tuple[str, str]]:
    """(what, path) of the results of a run that exist: report, tables, figures, store, run.json."""
    out = ctx.outdir.resolve()
    candidates = [("report", out / "report.html"), ("tables", out / "tables"),
                  ("figures", out / "figures"), ("store", ctx.store_path.resolve()),
                  ("run.json", out / "run.json")]
    return [(what, str(p) + ("/" if p.is_dir() and what in ("tables", "figures") else ""))
            for what, p in candidates if p.exists()]


def _tidy(outdir: Path) -> None:
    """Before a run: temporary files of a killed one go, and run.json, which describes a run
    that is over (it is written again when this one ends)."""
    (outdir / "run.json").unlink(missing_ok=True)
    for sub in ("tables", "figures"):
        for p in (outdir / sub).rglob("*.tmp*"):
            if p.is_file():
                p.unlink()
    for p in outdir.glob("*.tmp*"):
        if p.is_file():
            p.unlink()


def partial_report(ctx: Context, until: str) -> None:
    """A run stopped with --until still gets a report of what exists (not recorded as done)."""
    try:
        from cellmill.report.stage import build_report

        build_report(ctx, partial=until)
    except Exception:  # the stages did their job; a failed partial report must not undo that
        log.warning("partial report failed", exc_info=True)


def demo_config(sim_dir: Path) -> str:
    manifest = json.dumps(str(sim_dir / "manifest.csv"))
    gmt = json.dumps(str(sim_dir / "planted.gmt"))
    return f"""# cellmill demo: a simulated study shaped like the microglia study (study defaults)
[input]
manifest = {manifest}

[gsea]
gmt = {gmt}
"""


def timing_summary(ctx: Context) -> str:
    lines = [f"{'stage':<11} {'wall s':>8} {'peak MB':>8}"]
    for name in ORDER:
        t = ctx.timings.get(name)
        if t is None:
            continue
        state = "  (up to date)" if t.get("skipped") else ""
        lines.append(f"{name:<11} {t.get('seconds', 0):>8.1f} {t.get('peak_rss_mb', 0):>8.0f}"
                     + state)
    return "\n".join(lines)


def run_demo(outdir: Path, n_cells: int = 20000, seed: int = 0) -> Context:
    """Simulate a study with planted truth and run the whole workflow on it to report.html."""
    from cellmill.simulate import simulate_study

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    sim_dir = outdir / "simulated"
    t0 = time.perf_counter()
    if not (sim_dir / "planted.json").exists():
        print(f"cellmill demo: simulating {n_cells:,} cells (seed {seed}) into {sim_dir} ...",
              file=sys.stderr, flush=True)
        info = simulate_study(sim_dir, n_cells=n_cells, seed=seed, progress=True)
        print(f"cellmill demo: simulated {info['n_cells_total']:,} cells in "
              f"{info['seconds']:.0f} s", file=sys.stderr, flush=True)
    else:
        print(f"cellmill demo: reusing the simulated study in {sim_dir}", file=sys.stderr)
    cfg_path = outdir / "demo.toml"
    cfg_path.write_text(demo_config(sim_dir.resolve()))
    cfg = load_config(cfg_path)
    print("cellmill demo: running the workflow (cellmill run "
          f"{cfg_path} -o {outdir}) ...", file=sys.stderr, flush=True)
    ctx = run_workflow(cfg, outdir)
    print(timing_summary(ctx))
    print(f"total {time.perf_counter() - t0:.0f} s; planted truth: {sim_dir / 'planted.json'}")
    report = outdir / "report.html"
    if report.exists():
        print(f"report: {report.resolve()}")
    return ctx
