"""`cellmill fetch`: a GEO series -> its samples' count files and a manifest.

The series matrix gives the samples (``cellmill.io.geo``); each selected sample's count files
are its own supplementary files (a Cell Ranger .h5, an .h5ad, or a Matrix Market triplet) or,
for samples without any, its members of the series' ``_RAW.tar``. Files go to
``DIR/<GSM>/<name>`` (resumable, size-checked: ``cellmill.io.download``); each sample's file is
header-checked as ingest would read it; ``DIR/manifest.csv`` is written last, atomically.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import os
import re
import shutil
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from cellmill.errors import InputError
from cellmill.io import geo
from cellmill.io.download import HTTPStatusError, download, open_url

log = logging.getLogger("cellmill.run")  # the lines `cellmill` shows by default (runlog)

MEX_PARTS = ("barcodes", "features", "genes")
KIND_ORDER = {"h5": 0, "mex": 1, "h5ad": 2}  # one sample, several formats: the first wins


@dataclass
class CountFiles:
    """The count files of one sample: kind ("h5", "h5ad", "mex"), the file names, and the one
    a manifest points at (the .h5 / .h5ad, or the matrix of a triplet)."""

    kind: str
    names: list[str]
    main: str


@dataclass
class FetchResult:
    """What `fetch` found and wrote: one row per selected sample (sample, title, the metadata
    columns, files: where its counts come from, path: relative to DIR once fetched), the
    metadata column names, and the manifest (None for a dry run)."""

    accession: str
    rows: list[dict[str, str]]
    columns: list[str]
    manifest: Path | None = None
    downloaded: list[Path] = field(default_factory=list)

    def frame(self):
        """The rows as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.rows)

    def table(self, width: int = 28) -> str:
        """The rows as a plain text table (what `cellmill fetch` prints)."""
        keys = ["sample", "title", *self.columns, "files"]
        cells = [list(keys)] + [[_clip(r.get(k, ""), width if k != "files" else 200)
                                 for k in keys] for r in self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(keys))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                         for row in cells)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def fetch(accession: str, outdir: str | os.PathLike, samples: list[str] | None = None,
          where: str | None = None, dry_run: bool = False, geo_url: str = geo.GEO_URL,
          progress: bool = False, on_list=None) -> FetchResult:
    """List a GEO series' samples, download the selected ones' count files into `outdir` and
    write ``outdir/manifest.csv`` (see the module docstring). `samples`: GSM accessions to
    keep; `where`: 'key == value' / 'key != value' joined with 'and' over the manifest
    columns; `dry_run`: list only, write nothing; `on_list`: called with the FetchResult once
    the samples are chosen, before any download. Raises InputError (one line) for bad input."""
    acc = geo.series_accession(accession)
    base = geo_url.rstrip("/")
    found, series_files = read_series(base, acc)
    columns, rows = geo.sample_table(found)
    chosen = _select(acc, found, rows, columns, samples, where)
    tar_url = _raw_tar_url(base, acc, series_files)
    plans = {s.accession: count_files([_basename(u) for u in s.files]) for s, _ in chosen}
    for s, row in chosen:
        cf = plans[s.accession]
        row["files"] = f"{cf.kind}: {cf.main}" if cf else f"{acc}_RAW.tar"
    result = FetchResult(acc, [row for _, row in chosen], columns)
    if on_list is not None:
        on_list(result)
    if dry_run:
        return result
    out = Path(outdir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        _fetch_files(acc, base, out, chosen, plans, tar_url, progress, result)
    except BaseException:
        _remove_empty(out, [s.accession for s, _ in chosen], created)
        raise
    result.manifest = write_manifest(out / "manifest.csv", result.rows, columns)
    (out / f"{acc}_RAW.tar").unlink(missing_ok=True)  # extracted; it can be gigabytes
    log.info("wrote %s (%d samples)", result.manifest, len(result.rows))
    return result


def _fetch_files(acc, base, out, chosen, plans, tar_url, progress, result) -> None:
    """Download (or extract) every chosen sample's count files and check their headers."""
    in_tar = [s for s, _ in chosen if plans[s.accession] is None]
    if in_tar:  # first: a series without count files fails before any other download
        _from_tar(acc, tar_url, out / f"{acc}_RAW.tar", in_tar, plans, out, progress, result)
    tarred = {s.accession for s in in_tar}
    for s, row in chosen:
        cf = plans[s.accession]
        if s.accession not in tarred:
            links = {_basename(u): geo.map_url(u, base) for u in s.files}
            for name in cf.names:
                dest = out / s.accession / name
                dest.parent.mkdir(exist_ok=True)
                had = dest.exists()
                size = download(links[name], dest, progress=progress)
                log.info("%s %s (%s bytes)", "have" if had else "fetched", dest, f"{size:,}")
                result.downloaded.append(dest)
        row["path"] = f"{s.accession}/{cf.main}"
        row["files"] = f"{cf.kind}: {cf.main}"
        _check(out / row["path"], cf, s.accession)  # before the next sample's download


def _remove_empty(out: Path, samples: list[str], created: bool) -> None:
    """After a failure: the sample folders this run left empty, and `out` if it made it and
    nothing is in it (a .part to resume from keeps its folder)."""
    for name in samples:
        try:
            (out / name).rmdir()
        except OSError:  # absent, or holds files
            pass
    if created:
        try:
            out.rmdir()
        except OSError:
            pass


def read_series(base: str, acc: str) -> tuple[list[geo.GeoSample], list[str]]:
    """(samples, series supplementary links) of a series' matrix; reading stops at the data
    table, so only the header part of the file is transferred."""
    url = geo.matrix_url(base, acc)
    with open_url(url, what=acc) as resp:
        try:
            text = io.TextIOWrapper(gzip.GzipFile(fileobj=resp), encoding="utf-8",
                                    errors="replace")
            return geo.parse_series_matrix(text, url)
        except (OSError, EOFError, zlib.error) as e:
            raise InputError(url, f"not a readable gzipped series matrix ({e})") from None


def _select(acc, found, rows, columns, samples, where):
    """[(GeoSample, row)] kept by --samples and --where (InputError when none is kept)."""
    pairs = list(zip(found, rows, strict=True))
    if samples:
        want = [x.strip().upper() for s in samples for x in str(s).split(",") if x.strip()]
        have = {s.accession for s in found}
        missing = [w for w in want if w not in have]
        if missing:
            raise InputError("--samples", f"{missing[0]} is not a sample of {acc} "
                             f"(its samples: {', '.join(sorted(have))})")
        pairs = [p for p in pairs if p[0].accession in want]
    if where:
        clauses = geo.parse_where(where, ["sample", "title", *columns])
        kept = [p for p in pairs if geo.matches(p[1], clauses)]
        if not kept:
            col = clauses[0][0]
            values = sorted({r.get(col, "") for _, r in pairs})
            raise InputError("--where", f"no sample of {acc} matches {where!r} (values of "
                             f"{col}: {', '.join(values)})")
        pairs = kept
    return pairs


def _basename(link: str) -> str:
    name = unquote(urlparse(link).path.rsplit("/", 1)[-1])
    if not name or name in (".", "..") or "\\" in name:
        raise InputError(link, "supplementary link without a file name")
    return name


def count_files(names: list[str]) -> CountFiles | None:
    """Which of a sample's file names hold its counts (None: none do). Several candidates:
    those named 'filtered' first, then .h5 over Matrix Market over .h5ad; still several of one
    kind -> InputError."""
    cands = []
    low = {n.lower(): n for n in names}
    for n in names:
        ln = n.lower()
        if ln.endswith(".h5"):
            cands.append(CountFiles("h5", [n], n))
        elif ln.endswith(".h5ad"):
            cands.append(CountFiles("h5ad", [n], n))
        elif ln.endswith(("matrix.mtx", "matrix.mtx.gz")):
            prefix = ln[: ln.rfind("matrix.mtx")]
            parts = [_find(low, prefix, stem) for stem in MEX_PARTS]
            if parts[0] and (parts[1] or parts[2]):
                cands.append(CountFiles("mex", [n, parts[0], parts[1] or parts[2]], n))
    if not cands:
        return None
    filtered = [c for c in cands if re.search(r"(?<!un)filtered", c.main.lower())]
    cands = filtered or cands
    best = min(KIND_ORDER[c.kind] for c in cands)
    cands = [c for c in cands if KIND_ORDER[c.kind] == best]
    if len(cands) > 1:
        raise InputError(cands[0].main, "several count files for one sample ("
                         + ", ".join(c.main for c in cands) + "); fetch it by hand")
    return cands[0]


def _find(low: dict[str, str], prefix: str, stem: str) -> str | None:
    for suffix in (".tsv.gz", ".tsv"):
        if prefix + stem + suffix in low:
            return low[prefix + stem + suffix]
    return None


def _raw_tar_url(base: str, acc: str, series_files: list[str]) -> str:
    for link in series_files:
        if _basename(link) == f"{acc}_RAW.tar":
            return geo.map_url(link, base)
    return geo.raw_tar_url(base, acc)


def _from_tar(acc, url, tar_path, need, plans, out, progress, result) -> None:
    """Download the series' RAW tar and extract the count files of the samples in `need`."""
    try:
        size = download(url, tar_path, progress=progress)
    except HTTPStatusError as e:
        if e.code != 404:
            raise
        raise InputError(acc, f"no count files: sample {need[0].accession} lists none "
                         f"({', '.join(map(_basename, need[0].files)) or 'no files'}) and "
                         f"there is no {acc}_RAW.tar at {url}") from None
    log.info("fetched %s (%s bytes)", tar_path, f"{size:,}")
    try:
        with tarfile.open(tar_path, "r:") as tf:
            members = [m for m in tf.getmembers() if m.isfile()]
            for s in need:
                own = {Path(m.name).name: m for m in members
                       if Path(m.name).name.startswith(s.accession + "_")}
                cf = count_files(list(own))
                if cf is None:
                    tar_path.unlink()  # complete, but of no use
                    raise InputError(acc, f"no count files for {s.accession}: neither its own "
                                     f"supplementary files nor {acc}_RAW.tar ("
                                     f"{', '.join(sorted(own)) or 'no member of it'}) hold "
                                     "a 10x .h5, .h5ad or Matrix Market triplet")
                plans[s.accession] = cf
                (out / s.accession).mkdir(exist_ok=True)
                for name in cf.names:
                    dest = out / s.accession / name
                    _extract(tf, own[name], dest)
                    result.downloaded.append(dest)
    except (tarfile.TarError, EOFError) as e:
        tar_path.unlink(missing_ok=True)  # complete by size, yet unreadable: fetch it anew
        raise InputError(tar_path, f"not a readable tar file ({e}); removed, run again") \
            from None


def _extract(tf: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".part")
    src = tf.extractfile(member)
    with src, open(tmp, "wb") as fh:
        shutil.copyfileobj(src, fh, 1 << 20)
    os.replace(tmp, dest)


def _check(path: Path, cf: CountFiles, sample: str) -> None:
    """Read the file's header as ingest will (a bad download is caught here, not at ingest);
    a file that fails is removed with its set, so a rerun downloads it again."""
    from cellmill.io.headers import gene_names

    try:
        gene_names(path)
    except InputError as e:
        for name in cf.names:
            (path.parent / name).unlink(missing_ok=True)
        raise InputError(path, f"sample {sample}: {e.problem} (removed; the manifest was "
                         "not written)") from None


def write_manifest(path: Path, rows: list[dict[str, str]], columns: list[str]) -> Path:
    """manifest.csv (sample, path, title, the metadata columns), written atomically."""
    keys = ["sample", "path", "title", *columns]
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(keys)
            for r in rows:
                w.writerow([r.get(k, "") for k in keys])
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
