"""The `cellmill` command."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cellmill.config import ConfigError


def _cmd_ingest(args) -> None:
    from cellmill.io.ingest import ingest
    from cellmill.io.progress import progress_enabled

    ft = None if args.all_features else tuple(args.feature_type)
    store = ingest(args.source, args.output, overwrite=args.overwrite, feature_types=ft,
                   progress=progress_enabled(), workers=args.workers)
    print(f"{store.path}: {store.n_cells} cells x {store.n_genes} genes, {store.nnz} nonzeros")


def _cmd_fetch(args) -> None:
    from cellmill.io.fetch import fetch
    from cellmill.io.progress import progress_enabled

    res = fetch(args.accession, args.output, samples=args.samples, where=args.where,
                dry_run=args.dry_run, geo_url=args.geo_url, progress=progress_enabled(),
                on_list=lambda r: print(r.table(), flush=True))  # before the downloads
    if res.manifest is None:
        print(f"{res.accession}: {len(res.rows)} samples (dry run: nothing downloaded)")
    else:
        print(f"{res.manifest}: {len(res.rows)} samples; next: cellmill run {res.manifest}")


def _cmd_export(args) -> None:
    from cellmill.io.export import export_h5ad

    n, g = export_h5ad(args.store, args.output, cells=args.cells, layers=args.layers,
                       overwrite=args.overwrite)
    extra = f" (layers: {args.layers})" if args.layers else ""
    print(f"{args.output}: {n} cells x {g} genes{extra}")


def _cmd_info(args) -> None:
    from cellmill.io.info import describe

    print(describe(args.store))


DATA_SUFFIXES = (".h5", ".h5ad", ".csv")


def run_config(source: str | None, overrides: list[str]):
    """The config of `cellmill run SOURCE`: a TOML file, or data (a 10x .h5, .h5ad, Matrix
    Market folder or manifest .csv) run with the defaults; relative paths from the cwd."""
    from cellmill.config import load_config

    if source is None:
        return load_config(None, overrides)
    path = Path(source)
    if path.suffix.lower() == ".toml":
        return load_config(path, overrides)
    if path.is_dir() or path.suffix.lower() in DATA_SUFFIXES:
        key = "manifest" if path.suffix.lower() == ".csv" else "path"
        cfg = load_config(None, [f"input.{key}={_toml_string(str(path.resolve()))}"]
                          + list(overrides))
        cfg.base_dir = str(Path.cwd())
        return cfg
    if not path.exists():
        raise ConfigError(f"{path}: not found (give a .toml config, or data: a 10x .h5, "
                          ".h5ad, Matrix Market folder or manifest .csv)")
    return load_config(path, overrides)


def _toml_string(text: str) -> str:
    import json

    return json.dumps(text)  # a JSON string is a valid TOML basic string


def _cmd_run(args) -> None:
    from cellmill.engine.workflow import run_workflow

    cfg = run_config(args.config, args.set)
    if args.output:
        outdir = Path(args.output)
    elif args.config and Path(args.config).suffix.lower() == ".toml":
        outdir = Path(cfg.base_dir) / "results"
    else:
        outdir = Path("results")
    run_workflow(cfg, outdir, until=args.until)


def _cmd_simulate(args) -> None:
    from cellmill.simulate import simulate_study

    extra = {} if args.replicate_sd is None else {"replicate_sd": args.replicate_sd}
    if args.replicates < 1 or extra.get("replicate_sd", 0) < 0:
        raise ConfigError("simulate: --replicates must be >= 1 and --replicate-sd >= 0")
    info = simulate_study(args.output, n_cells=args.n, seed=args.seed, n_genes=args.genes,
                          gmt=args.gmt, progress=True, replicates=args.replicates, **extra)
    print(f"{args.output}: simulated {info.get('n_cells_total', args.n)} cells "
          f"in {info.get('n_samples', '?')} samples")


def _cmd_demo(args) -> None:
    from cellmill.engine.workflow import run_demo

    run_demo(Path(args.output), n_cells=args.n, seed=args.seed)


def _cmd_gsea(args) -> None:
    from cellmill.stages.gsea.fgsea import gsea_command

    gsea_command(args.ranks, args.gmt, args.output, min_size=args.min_size,
                 max_size=args.max_size, seed=args.seed, nperm_simple=args.nperm_simple,
                 sample_size=args.sample_size, eps=args.eps, score_type=args.score_type,
                 gsea_param=args.gsea_param)


def _cmd_bench(args) -> None:
    from cellmill.bench.suite import main as bench_main

    bench_main(args.rest)


def _output_options(suppress: bool) -> argparse.ArgumentParser:
    """-q / -v / --debug, accepted before and after the subcommand (after: SUPPRESS defaults,
    so that `cellmill -v run x` is not reset by the subcommand's parser)."""
    kw = {"default": argparse.SUPPRESS} if suppress else {}
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true",
                   help="only warnings and errors (no stage lines, no progress bars)", **kw)
    g.add_argument("-v", "--verbose", action="count",
                   help="the stages' own logs too (-vv: debug)", **kw)
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors", **kw)
    return p


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cellmill", description=__doc__,
                                parents=[_output_options(suppress=False)])
    p.set_defaults(verbose=0)
    sub = _SubParsers(p.add_subparsers(dest="command", required=True),
                      _output_options(suppress=True))

    s = sub.add_parser("ingest", help="10x .h5 / Matrix Market / .h5ad / manifest -> store")
    s.add_argument("source", help="manifest CSV (sample,path,...) or one .h5 / .h5ad / folder")
    s.add_argument("-o", "--output", required=True, help="the new store (study.zarr)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output")
    s.add_argument("--feature-type", action="append", default=None,
                   help='feature types to keep (default "Gene Expression"; repeatable)')
    s.add_argument("--all-features", action="store_true", help="keep every feature type")
    s.add_argument("--workers", type=_positive_int, default=1,
                   help="processes to use: one writes, the others (at most 4) decode samples "
                   "(default 1: decode in place, faster on 2 cores; the store is the same "
                   "for any)")
    s.set_defaults(func=_cmd_ingest)

    s = sub.add_parser("fetch", help="a GEO series' count files and a manifest.csv")
    s.add_argument("accession", help="the GEO series, e.g. GSE162807")
    s.add_argument("-o", "--output", required=True, help="folder for the files and manifest")
    s.add_argument("--samples", nargs="+", metavar="GSM", help="only these samples")
    s.add_argument("--where", help='only samples matching, e.g. "condition != Naive and '
                   'sex == female" (keys: the manifest columns)')
    s.add_argument("--dry-run", action="store_true", help="list the samples, download nothing")
    s.add_argument("--geo-url", default="https://ftp.ncbi.nlm.nih.gov/geo",
                   help="GEO's file tree (a mirror; default: %(default)s)")
    s.set_defaults(func=_cmd_fetch)

    s = sub.add_parser("info", help="what is in a store, which stages are done")
    s.add_argument("store")
    s.set_defaults(func=_cmd_info)

    s = sub.add_parser("export", help="store -> .h5ad (counts, obs, var, obsm) for scanpy / R")
    s.add_argument("store")
    s.add_argument("-o", "--output", required=True, help="the new .h5ad file")
    s.add_argument("--cells", default="all", metavar="all|qc-passed",
                   help="every cell (default), or only those passing QC (any case)")
    s.add_argument("--layers", default=None, metavar="lognorm",
                   help="extra layers, comma-separated: lognorm (LogNormalize values, CSR "
                   "float32); X always holds the raw counts")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output")
    s.set_defaults(func=_cmd_export)

    s = sub.add_parser("run", help="run the workflow: a TOML config, or data with defaults")
    s.add_argument("config", nargs="?", help="study.toml, or a 10x .h5 / .h5ad / Matrix "
                   "Market folder / manifest .csv to run with the default settings")
    s.add_argument("-o", "--output", help="output folder (default: results/ beside the config, "
                   "or ./results for data)")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    s.add_argument("--until", help="stop after this stage")
    s.set_defaults(func=_cmd_run)

    s = sub.add_parser("simulate", help="simulate a study shaped like the microglia study")
    s.add_argument("-n", type=int, default=20000, help="cells passing QC (default 20000)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--genes", type=int, default=27998)
    s.add_argument("--gmt", help="gene sets whose genes get real names (planted pathways)")
    s.add_argument("--replicates", type=int, default=1,
                   help="animals per condition x time point x sex (default 1: the study's 12 "
                        "samples; 3 gives a design with power)")
    s.add_argument("--replicate-sd", type=float, default=None,
                   help="animal-to-animal sd of each gene's log expression (biological CV; "
                        "default 0.2; 0 = none)")
    s.add_argument("-o", "--output", required=True)
    s.set_defaults(func=_cmd_simulate)

    s = sub.add_parser("demo", help="simulate a small study and run everything to a report")
    s.add_argument("-o", "--output", default="cellmill-demo")
    s.add_argument("-n", type=int, default=20000)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("gsea", help="preranked GSEA (fgsea 1.24.0 compatible)")
    s.add_argument("ranks", help="CSV with columns gene, stat")
    s.add_argument("--gmt", required=True, help="a GMT file, or the built-in hallmark sets: "
                   "hallmark (organism from the genes), hallmark:mouse, hallmark:human")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--min-size", type=int, default=1)
    s.add_argument("--max-size", type=int, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--nperm-simple", type=int, default=1000)
    s.add_argument("--sample-size", type=int, default=101)
    s.add_argument("--eps", type=float, default=1e-50)
    s.add_argument("--score-type", choices=["std", "pos", "neg"], default="std")
    s.add_argument("--gsea-param", type=float, default=1.0)
    s.set_defaults(func=_cmd_gsea)

    s = sub.add_parser("bench", help="the benchmark suite (see benchmarks/)")
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=_cmd_bench)
    return p


class _SubParsers:
    """add_parser with the output options as a parent of every subcommand."""

    def __init__(self, action, common: argparse.ArgumentParser):
        self.action, self.common = action, common

    def add_parser(self, name: str, **kw) -> argparse.ArgumentParser:
        return self.action.add_parser(name, parents=[self.common], **kw)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own parser: `cellmill bench --sizes 100k` as documented
        from cellmill.bench.suite import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "ingest" and args.feature_type is None:
        args.feature_type = ["Gene Expression"]
    if args.quiet and args.verbose:
        build_parser().error("-q and -v: pick one")
    quiet_env = os.environ.get("CELLMILL_QUIET")
    if args.quiet:
        os.environ["CELLMILL_QUIET"] = "1"  # no progress bars either (workers inherit it)
    from cellmill.engine.runlog import configure, unconfigure

    handler = configure(-1 if args.quiet else args.verbose or 0)
    try:
        return _call(args)
    finally:  # main() called in-process (tests) leaves logging and the environment as they were
        unconfigure(handler)
        if quiet_env is None:
            os.environ.pop("CELLMILL_QUIET", None)


def _call(args) -> int:
    if args.debug:
        args.func(args)
        return 0
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("cellmill: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure becomes one line
        code, line = explain(e)
        if code == 1:
            line += f" (traceback in {_save_traceback(e)}; --debug shows it)"
        print(f"cellmill: error: {line}", file=sys.stderr)
        return code
    return 0


def explain(e: BaseException) -> tuple[int, str]:
    """(exit code, one line) for an error: 2 for what the user can act on, 1 for a bug."""
    import errno

    from cellmill.errors import InputError

    if isinstance(e, (InputError, ConfigError)):
        return 2, " ".join(str(e).split())
    if isinstance(e, OSError):
        where = e.filename or ""
        why = e.strerror or str(e)
        if e.errno == errno.ENOSPC:
            why = "no space left on the device (free some, or write elsewhere with -o)"
        elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            why = f"{why} (check the folder's permissions, or write elsewhere with -o)"
        elif isinstance(e, FileNotFoundError):
            why = "file or folder not found (was it removed while cellmill ran?)"
        return 2, f"{where}: {why}" if where else why
    if isinstance(e, MemoryError):
        return 2, "out of memory: lower compute.memory or compute.workers"
    if isinstance(e, ValueError):  # argument values the checks above do not cover
        return 2, " ".join(str(e).split())
    return 1, f"internal error: {type(e).__name__}: {' '.join(str(e).split())[:300]}"


def _save_traceback(e: BaseException) -> str:
    import tempfile
    import traceback

    fd, path = tempfile.mkstemp(prefix="cellmill-error-", suffix=".log")
    with open(fd, "w") as f:
        f.write("".join(traceback.format_exception(e)))
    return path


if __name__ == "__main__":
    sys.exit(main())
