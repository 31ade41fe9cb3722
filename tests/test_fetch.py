"""`cellmill fetch` against GEO-layout trees built here and served from 127.0.0.1.

The trees follow GEO's documented layout (series/GSE162nnn/GSE162807/matrix/..._series_matrix
.txt.gz, samples/GSM4960nnn/GSM4960303/suppl/..., series/.../suppl/..._RAW.tar); the samples and
characteristics are GSE162807's (../shared/data/GSE162807/samples.csv); count files are written
with tests/make_10x.py and scipy.io.mmwrite, independent of cellmill's readers.
"""

from __future__ import annotations

import functools
import gzip
import io
import os
import re
import shutil
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp
from make_10x import barcodes, random_counts, write_10x_v3

import cellmill
from cellmill.cli import main
from cellmill.errors import InputError
from cellmill.io import geo
from cellmill.io.fetch import count_files
from cellmill.io.ingest import ingest, read_manifest

FTP = "ftp://ftp.ncbi.nlm.nih.gov/geo"
N_GENES = 40
# GSM, sex, surgery, time point, cells: four of GSE162807's samples
SAMPLES = [("GSM4960303", "Male", "Naive", "naive", 31),
           ("GSM4960305", "Female", "Naive", "naive", 24),
           ("GSM4960307", "Male", "SNI", "3d", 37),
           ("GSM4960313", "Female", "Sham", "3d", 28)]


# ------------------------------------------------------------------ the local GEO server


class RangeHandler(SimpleHTTPRequestHandler):
    """Static files with HTTP Range (bytes=N- and N-M) and a switch to cut a body short."""

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _serve(self, body: bool):
        srv = self.server
        rng = self.headers.get("Range")
        srv.requests.append((self.command, self.path, rng))
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start, stop, status = 0, len(data), 200
        if rng and not srv.ignore_range:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)
            start = int(m.group(1))
            stop = int(m.group(2)) + 1 if m.group(2) else len(data)
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(stop - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
        self.end_headers()
        if body:
            cut = srv.cut.get(path.name)
            chunk = data[start:stop] if cut is None else data[start:min(stop, start + cut)]
            self.wfile.write(chunk)
            self.wfile.flush()
            self.close_connection = True


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    (root / "geo").mkdir(parents=True)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0),
                                functools.partial(RangeHandler, directory=str(root)))
    httpd.requests, httpd.cut, httpd.root = [], {}, root / "geo"
    httpd.ignore_range = False
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/geo"
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


# ------------------------------------------------------------------ GEO-layout fixtures


def _quote(values) -> str:
    return "\t".join(f'"{v}"' for v in values)


def write_series(root: Path, acc: str, samples, files, series_files=(), chars=None) -> Path:
    """A series matrix under root (GEO's tree) with the samples' !Sample_ lines; `files`:
    per sample a list of supplementary links (padded with NONE)."""
    gsm = [s[0] for s in samples]
    if chars is None:
        chars = [["strain: C57BL/6J"] * len(gsm), ["tissue: spinal cord"] * len(gsm),
                 ["cell type: microglia"] * len(gsm),
                 [f"Sex: {s[1].lower()}" for s in samples],
                 [f"surgery: {s[2]}" for s in samples],
                 [f"time point: {s[3]}" for s in samples]]
    n_files = max(len(f) for f in files)
    lines = [f'!Series_title\t"Microglia of the spinal cord after nerve injury ({acc})"',
             f'!Series_geo_accession\t"{acc}"',
             *[f'!Series_supplementary_file\t"{link}"' for link in series_files],
             "!Sample_title\t" + _quote(f"{s[2]}_{s[3]}_{s[1][0]}" for s in samples),
             "!Sample_geo_accession\t" + _quote(gsm),
             "!Sample_status\t" + _quote(["Public on Dec 09 2020"] * len(gsm)),
             "!Sample_organism_ch1\t" + _quote(["Mus musculus"] * len(gsm)),
             *["!Sample_characteristics_ch1\t" + _quote(row) for row in chars],
             *[f"!Sample_supplementary_file_{i + 1}\t"
               + _quote(f[i] if i < len(f) else "NONE" for f in files) for i in range(n_files)],
             "!series_matrix_table_begin",
             '"ID_REF"\t' + _quote(gsm),
             "!series_matrix_table_end"]
    path = root / geo.matrix_url("", acc).lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    return path


def sample_dir(root: Path, gsm: str) -> Path:
    d = root / "samples" / geo.stem_folder(gsm) / gsm / "suppl"
    d.mkdir(parents=True, exist_ok=True)
    return d


def sample_link(gsm: str, name: str) -> str:
    return f"{FTP}/samples/{geo.stem_folder(gsm)}/{gsm}/suppl/{name}"


def counts_of(i: int, n_cells: int):
    return random_counts(n_cells, N_GENES, density=0.3, seed=100 + i), barcodes(n_cells, seed=i)


GENES = [f"Gene{g}" for g in range(N_GENES)]


def write_h5(path: Path, i: int, n_cells: int) -> sp.csr_matrix:
    m, bc = counts_of(i, n_cells)
    write_10x_v3(path, m, bc, GENES)
    return m


def write_mex(folder: Path, prefix: str, i: int, n_cells: int) -> sp.csr_matrix:
    m, bc = counts_of(i, n_cells)
    buf = io.BytesIO()
    scipy.io.mmwrite(buf, sp.coo_matrix(m.T), field="integer")
    (folder / f"{prefix}matrix.mtx.gz").write_bytes(gzip.compress(buf.getvalue()))
    (folder / f"{prefix}barcodes.tsv.gz").write_bytes(gzip.compress(("\n".join(bc) + "\n")
                                                                    .encode()))
    feats = "".join(f"ENSMUSG{g:011d}\t{name}\tGene Expression\n" for g, name in enumerate(GENES))
    (folder / f"{prefix}features.tsv.gz").write_bytes(gzip.compress(feats.encode()))
    return m


def h5_series(root: Path, acc: str = "GSE162807") -> dict[str, sp.csr_matrix]:
    """Each sample with its own Cell Ranger .h5 (and a second, non-count file)."""
    files, truth = [], {}
    for i, (gsm, _, surgery, tp, n) in enumerate(SAMPLES):
        name = f"{gsm}_{surgery}_{tp}_filtered_feature_bc_matrix.h5"
        truth[gsm] = write_h5(sample_dir(root, gsm) / name, i, n)
        (sample_dir(root, gsm) / f"{gsm}_{surgery}_metrics_summary.csv.gz").write_bytes(
            gzip.compress(b"Estimated Number of Cells\n1\n"))
        files.append([sample_link(gsm, name), sample_link(gsm, f"{gsm}_{surgery}_metrics_"
                                                               "summary.csv.gz")])
    write_series(root, acc, SAMPLES, files)
    return truth


def mex_series(root: Path, acc: str = "GSE1234") -> dict[str, sp.csr_matrix]:
    """Each sample with a GEO-prefixed Matrix Market triplet."""
    files, truth = [], {}
    for i, (gsm, _, surgery, tp, n) in enumerate(SAMPLES):
        prefix = f"{gsm}_{surgery}_{tp}_"
        truth[gsm] = write_mex(sample_dir(root, gsm), prefix, i, n)
        files.append([sample_link(gsm, prefix + p) for p in
                      ("barcodes.tsv.gz", "features.tsv.gz", "matrix.mtx.gz")])
    write_series(root, acc, SAMPLES, files)
    return truth


def tar_series(root: Path, acc: str = "GSE999") -> dict[str, sp.csr_matrix]:
    """No per-sample files; the series' RAW tar holds .h5 files and one Matrix Market set."""
    staging = root.parent / "staging"
    staging.mkdir()
    truth = {}
    suppl = root / geo.series_url("", acc).lstrip("/") / "suppl"
    suppl.mkdir(parents=True)
    with tarfile.open(suppl / f"{acc}_RAW.tar", "w") as tf:
        for i, (gsm, _, surgery, _, n) in enumerate(SAMPLES):
            if i == 1:
                truth[gsm] = write_mex(staging, f"{gsm}_{surgery}_", i, n)
                names = [f"{gsm}_{surgery}_{p}" for p in
                         ("matrix.mtx.gz", "barcodes.tsv.gz", "features.tsv.gz")]
            else:
                names = [f"{gsm}_{surgery}_filtered_feature_bc_matrix.h5"]
                truth[gsm] = write_h5(staging / names[0], i, n)
            for name in names:
                tf.add(staging / name, arcname=name)
    write_series(root, acc, SAMPLES, [[] for _ in SAMPLES],
                 series_files=[f"{FTP}/series/{geo.stem_folder(acc)}/{acc}/suppl/{acc}_RAW.tar"])
    return truth


def run_cli(*args) -> int:
    return main(["-q", "fetch", *map(str, args)])


def check_store(manifest: Path, truth: dict[str, sp.csr_matrix], tmp_path: Path) -> None:
    """Ingest the manifest: every sample's cells and counts are those the fixture wrote."""
    store = ingest(manifest, tmp_path / "study.zarr")
    obs = store.obs()
    assert store.n_cells == sum(m.shape[0] for m in truth.values())
    x = store.read_rows(0, store.n_cells)
    for gsm, m in truth.items():
        rows = np.flatnonzero(obs["sample"].astype(str).to_numpy() == gsm)
        assert len(rows) == m.shape[0]
        got = x[rows]
        order = [list(store.var().index).index(g) for g in GENES]
        assert (got[:, order] != m).nnz == 0


def files_outside_part(folder: Path) -> list[str]:
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and not p.name.endswith(".part"))


# ------------------------------------------------------------------ happy paths


def test_h5_series_is_fetched_and_ingested(server, tmp_path, capsys):
    truth = h5_series(server.root)
    out = tmp_path / "gse"
    assert main(["fetch", "GSE162807", "-o", str(out), "--geo-url", server.url]) == 0
    stdout = capsys.readouterr().out
    for gsm, *_ in SAMPLES:
        assert gsm in stdout
    specs = read_manifest(out / "manifest.csv")
    assert [s.name for s in specs] == [s[0] for s in SAMPLES]
    for spec, (gsm, sex, surgery, tp, _) in zip(specs, SAMPLES, strict=True):
        assert spec.path == (out / gsm / f"{gsm}_{surgery}_{tp}_filtered_feature_bc_matrix.h5"
                             ).resolve()
        assert spec.metadata["condition"] == surgery
        assert spec.metadata["sex"] == sex.lower()
        assert spec.metadata["timepoint"] == tp
        assert spec.metadata["cell_type"] == "microglia"
        assert spec.metadata["strain"] == "C57BL/6J"
        # the bytes are the server's
        src = sample_dir(server.root, gsm) / spec.path.name
        assert spec.path.read_bytes() == src.read_bytes()
    header = (out / "manifest.csv").read_text().splitlines()[0]
    assert header == "sample,path,title,strain,tissue,cell_type,sex,condition,timepoint"
    assert not list(out.rglob("*.part"))
    assert not list(out.rglob("*metrics_summary*"))  # only the count files
    check_store(out / "manifest.csv", truth, tmp_path)
    # the series matrix: the tree GEO documents, GSE162nnn
    assert ("GET", "/geo/series/GSE162nnn/GSE162807/matrix/GSE162807_series_matrix.txt.gz",
            None) in server.requests
    # a second call downloads nothing again
    n = len(server.requests)
    assert run_cli("GSE162807", "-o", out, "--geo-url", server.url) == 0
    assert len(server.requests) == n + 1  # the series matrix only


def test_matrix_market_series_with_short_accession(server, tmp_path):
    truth = mex_series(server.root, "GSE1234")
    out = tmp_path / "mex"
    res = cellmill.fetch("GSE1234", out, geo_url=server.url)
    assert res.manifest == out / "manifest.csv"
    assert {r["files"].split(":")[0] for r in res.rows} == {"mex"}
    assert sorted(os.listdir(out / "GSM4960303")) == [
        "GSM4960303_Naive_naive_barcodes.tsv.gz", "GSM4960303_Naive_naive_features.tsv.gz",
        "GSM4960303_Naive_naive_matrix.mtx.gz"]
    assert any(p.startswith("/geo/series/GSE1nnn/GSE1234/") for _, p, _ in server.requests)
    check_store(res.manifest, truth, tmp_path)
    df = res.frame()
    assert list(df["sample"]) == [s[0] for s in SAMPLES]


def test_raw_tar_series(server, tmp_path):
    truth = tar_series(server.root, "GSE999")
    out = tmp_path / "tar"
    assert run_cli("gse999", "-o", out, "--geo-url", server.url) == 0
    assert any(p == "/geo/series/GSEnnn/GSE999/suppl/GSE999_RAW.tar"
               for _, p, _ in server.requests)
    assert not (out / "GSE999_RAW.tar").exists()  # extracted, then removed
    specs = read_manifest(out / "manifest.csv")
    assert specs[1].path.name == "GSM4960305_Naive_matrix.mtx.gz"
    check_store(out / "manifest.csv", truth, tmp_path)


def test_samples_and_where_filters(server, tmp_path, capsys):
    h5_series(server.root)
    out = tmp_path / "f"
    assert run_cli("GSE162807", "-o", out, "--geo-url", server.url,
                   "--where", "condition != Naive") == 0
    assert [s.name for s in read_manifest(out / "manifest.csv")] == ["GSM4960307", "GSM4960313"]
    assert sorted(os.listdir(out)) == ["GSM4960307", "GSM4960313", "manifest.csv"]
    out2 = tmp_path / "f2"  # a raw key works too, clauses joined with and, quoted values
    assert run_cli("GSE162807", "-o", out2, "--geo-url", server.url,
                   "--where", "surgery != 'Naive' and sex == female") == 0
    assert [s.name for s in read_manifest(out2 / "manifest.csv")] == ["GSM4960313"]
    out3 = tmp_path / "f3"
    assert run_cli("GSE162807", "-o", out3, "--geo-url", server.url,
                   "--samples", "GSM4960305", "gsm4960307", "--where", "sex == female") == 0
    assert [s.name for s in read_manifest(out3 / "manifest.csv")] == ["GSM4960305"]


def test_dry_run_lists_and_writes_nothing(server, tmp_path, capsys):
    h5_series(server.root)
    out = tmp_path / "dry"
    assert main(["fetch", "GSE162807", "-o", str(out), "--geo-url", server.url,
                 "--dry-run", "--where", "timepoint == 3d"]) == 0
    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    assert lines[0].split() == ["sample", "title", "strain", "tissue", "cell_type", "sex",
                                "condition", "timepoint", "files"]
    assert [ln.split()[0] for ln in lines[1:3]] == ["GSM4960307", "GSM4960313"]
    assert "Sham" in lines[2] and "female" in lines[2]
    assert "dry run" in lines[3]
    assert not out.exists()
    assert [p for _, p, _ in server.requests if not p.endswith("matrix.txt.gz")] == []


def test_resume_after_a_cut(server, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("cellmill.io.progress.progress_enabled", lambda requested=True: requested)
    h5_series(server.root)
    gsm, name = "GSM4960307", "GSM4960307_SNI_3d_filtered_feature_bc_matrix.h5"
    src = sample_dir(server.root, gsm) / name
    size = src.stat().st_size
    server.cut[name] = 3000
    out = tmp_path / "cut"
    assert run_cli("GSE162807", "-o", out, "--geo-url", server.url) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert err.startswith("cellmill: error: ")
    assert f"cut short: 3,000 of {size:,} bytes" in err and "resume" in err
    part = out / gsm / (name + ".part")
    assert part.stat().st_size == 3000
    assert not (out / "manifest.csv").exists()
    assert not (out / gsm / name).exists()
    server.cut.clear()
    assert run_cli("GSE162807", "-o", out, "--geo-url", server.url) == 0
    assert (out / gsm / name).read_bytes() == src.read_bytes()
    assert not part.exists()
    ranged = [(p, r) for _, p, r in server.requests if r]
    assert ranged == [(f"/geo/samples/GSM4960nnn/{gsm}/suppl/{name}", "bytes=3000-")]
    assert (out / "manifest.csv").exists()


def test_resume_from_a_server_without_range_support_starts_over(server, tmp_path):
    h5_series(server.root)
    gsm, name = "GSM4960305", "GSM4960305_Naive_naive_filtered_feature_bc_matrix.h5"
    src = sample_dir(server.root, gsm) / name
    server.cut[name] = 1000
    out = tmp_path / "o"
    assert run_cli("GSE162807", "-o", out, "--geo-url", server.url, "--samples", gsm) == 2
    server.cut.clear()
    server.ignore_range = True  # answers 200 with the whole file: the .part is rewritten
    assert run_cli("GSE162807", "-o", out, "--geo-url", server.url, "--samples", gsm) == 0
    assert (out / gsm / name).read_bytes() == src.read_bytes()
    assert [r for _, _, r in server.requests if r] == ["bytes=1000-"]


def test_part_already_complete_is_finished_with_a_416(server, tmp_path):
    h5_series(server.root)
    gsm, name = "GSM4960303", "GSM4960303_Naive_naive_filtered_feature_bc_matrix.h5"
    src = sample_dir(server.root, gsm) / name
    (tmp_path / "o" / gsm).mkdir(parents=True)
    shutil.copy(src, tmp_path / "o" / gsm / (name + ".part"))
    assert run_cli("GSE162807", "-o", tmp_path / "o", "--geo-url", server.url) == 0
    assert (tmp_path / "o" / gsm / name).read_bytes() == src.read_bytes()


# ------------------------------------------------------------------ bad input


def _fails(capsys, out: Path, *args, match: str, complete=()) -> str:
    """Exit 2, one line matching `match`, no manifest, no files but .part ones and the
    `complete` (checked) downloads."""
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert re.search(match, err), err
    assert not (out / "manifest.csv").exists()
    assert files_outside_part(out) == sorted(complete)
    return err


def test_unknown_and_malformed_accessions(server, tmp_path, capsys):
    out = tmp_path / "o"
    err = _fails(capsys, out, "GSE999999", "-o", out, "--geo-url", server.url,
                 match="GSE999999: not found at http://127.0.0.1")
    assert "/geo/series/GSE999nnn/GSE999999/matrix/GSE999999_series_matrix.txt.gz" in err
    _fails(capsys, out, "GSE12x", "-o", out, "--geo-url", server.url,
           match="GSE12x: not a GEO series accession")
    _fails(capsys, out, "GSM4960303", "-o", out, "--geo-url", server.url,
           match="not a GEO series accession")
    assert not out.exists()


def test_network_unreachable_names_the_url(tmp_path, capsys):
    out = tmp_path / "o"
    _fails(capsys, out, "GSE162807", "-o", out, "--geo-url", "http://127.0.0.1:9/geo",
           match=r"http://127\.0\.0\.1:9/geo/series/GSE162nnn/GSE162807/matrix/"
                 r"GSE162807_series_matrix\.txt\.gz: cannot reach the server")


def test_geo_url_that_is_not_a_url(tmp_path, capsys):
    out = tmp_path / "o"
    _fails(capsys, out, "GSE162807", "-o", out, "--geo-url", "mirror/geo",
           match="mirror/geo/series/GSE162nnn/.*: not a URL cellmill can fetch")


def test_series_without_count_files(server, tmp_path, capsys):
    gsm = [s[0] for s in SAMPLES]
    for g in gsm:
        (sample_dir(server.root, g) / f"{g}_counts.csv.gz").write_bytes(gzip.compress(b"x\n"))
    write_series(server.root, "GSE162807", SAMPLES,
                 [[sample_link(g, f"{g}_counts.csv.gz")] for g in gsm])
    out = tmp_path / "o"
    _fails(capsys, out, "GSE162807", "-o", out, "--geo-url", server.url,
           match=r"GSE162807: no count files: sample GSM4960303 lists none "
                 r"\(GSM4960303_counts\.csv\.gz\) and there is no GSE162807_RAW\.tar")
    assert not out.exists()
    # a RAW tar without count files for a sample
    suppl = server.root / "series/GSE162nnn/GSE162807/suppl"
    suppl.mkdir(parents=True)
    with tarfile.open(suppl / "GSE162807_RAW.tar", "w") as tf:
        data = gzip.compress(b"x\n")
        info = tarfile.TarInfo("GSM4960303_counts.csv.gz")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    _fails(capsys, out, "GSE162807", "-o", out, "--geo-url", server.url,
           match="no count files for GSM4960303: .*GSM4960303_counts.csv.gz")


def test_unreadable_characteristic(server, tmp_path, capsys):
    chars = [["strain: C57BL/6J"] * 4, ["Sex: male", "Sex female", "Sex: male", "Sex: female"]]
    write_series(server.root, "GSE162807", SAMPLES, [[] for _ in SAMPLES], chars=chars)
    out = tmp_path / "o"
    _fails(capsys, out, "GSE162807", "-o", out, "--geo-url", server.url, "--dry-run",
           match=r"GSE162807_series_matrix\.txt\.gz: line \d+: characteristic 'Sex female' "
                 r"of GSM4960305 is not 'key: value'")


def test_bad_where_and_samples(server, tmp_path, capsys):
    h5_series(server.root)
    out = tmp_path / "o"
    base = ("GSE162807", "-o", out, "--geo-url", server.url)
    _fails(capsys, out, *base, "--where", "tissue_type == cord",
           match=r"--where: unknown key 'tissue_type' \(keys: sample, title, strain, tissue, "
                 r"cell_type, sex, condition, timepoint\)")
    _fails(capsys, out, *base, "--where", "condition = SNI", match="--where: cannot read")
    _fails(capsys, out, *base, "--where", "condition == SNI or sex == male",
           match="--where: cannot read")
    _fails(capsys, out, *base, "--where", "condition == naive",
           match=r"no sample of GSE162807 matches .*values of condition: Naive, SNI, Sham")
    _fails(capsys, out, *base, "--samples", "GSM1", match="--samples: GSM1 is not a sample")
    assert not out.exists()
    assert all(p.endswith("matrix.txt.gz") for _, p, _ in server.requests)


def test_bad_count_file_is_caught_by_its_header(server, tmp_path, capsys):
    h5_series(server.root)
    gsm, name = "GSM4960313", "GSM4960313_Sham_3d_filtered_feature_bc_matrix.h5"
    (sample_dir(server.root, gsm) / name).write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 500)
    out = tmp_path / "o"
    good = [f"{g}/{g}_{s}_{t}_filtered_feature_bc_matrix.h5" for g, _, s, t, _ in SAMPLES[:3]]
    _fails(capsys, out, "GSE162807", "-o", out, "--geo-url", server.url,
           match=f"{name}: sample {gsm}: .*removed; the manifest was not written",
           complete=good)
    assert not (out / gsm / name).exists()


def test_a_missing_sample_file_names_its_url(server, tmp_path, capsys):
    h5_series(server.root)
    gsm, name = "GSM4960305", "GSM4960305_Naive_naive_filtered_feature_bc_matrix.h5"
    (sample_dir(server.root, gsm) / name).unlink()
    out = tmp_path / "o"
    _fails(capsys, out, "GSE162807", "-o", out, "--geo-url", server.url,
           match=rf"/geo/samples/GSM4960nnn/{gsm}/suppl/{name}: not found \(HTTP 404\)$",
           complete=["GSM4960303/GSM4960303_Naive_naive_filtered_feature_bc_matrix.h5"])


def test_not_a_series_matrix(server, tmp_path, capsys):
    path = server.root / "series/GSE162nnn/GSE162807/matrix/GSE162807_series_matrix.txt.gz"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"<html>not here</html>")
    out = tmp_path / "o"
    _fails(capsys, out, "GSE162807", "-o", out, "--geo-url", server.url,
           match="not a readable gzipped series matrix")


# ------------------------------------------------------------------ GEO's rules


def test_folder_stems_and_links():
    assert geo.stem_folder("GSE162807") == "GSE162nnn"
    assert geo.stem_folder("GSE1234") == "GSE1nnn"
    assert geo.stem_folder("GSE999") == "GSEnnn"
    assert geo.stem_folder("GSE7") == "GSEnnn"
    assert geo.stem_folder("GSM4960303") == "GSM4960nnn"
    assert geo.matrix_url("https://ftp.ncbi.nlm.nih.gov/geo/", "GSE162807") == (
        "https://ftp.ncbi.nlm.nih.gov/geo/series/GSE162nnn/GSE162807/matrix/"
        "GSE162807_series_matrix.txt.gz")
    assert geo.map_url(f"{FTP}/samples/GSM4960nnn/GSM4960303/suppl/a.h5",
                       "http://h:1/mirror/geo") == (
        "http://h:1/mirror/geo/samples/GSM4960nnn/GSM4960303/suppl/a.h5")
    with pytest.raises(InputError, match="not a GEO series accession"):
        geo.series_accession("GSE")


def test_column_names_normalise_only_clear_keys():
    s1 = geo.GeoSample("GSM1", characteristics={"Sex": "F", "surgery": "SNI",
                                                "time point": "3d", "Cell Type": "mg"})
    assert list(geo.column_names([s1]).values()) == ["sex", "condition", "timepoint",
                                                     "cell_type"]
    # treatment and condition both present: which is "condition" is not clear, keep both
    s2 = geo.GeoSample("GSM2", characteristics={"gender": "M", "treatment": "drug",
                                                "condition": "sick", "sample": "x"})
    assert geo.column_names([s2]) == {"gender": "sex", "treatment": "treatment",
                                      "condition": "condition", "sample": "char_sample"}


def test_count_files_picks_one_set_per_sample():
    mex = ["G_filtered_matrix.mtx.gz", "G_filtered_barcodes.tsv.gz", "G_filtered_genes.tsv.gz"]
    cf = count_files(["G_raw_feature_bc_matrix.h5", "G_unfiltered_feature_bc_matrix.h5",
                      "G_filtered_feature_bc_matrix.h5", "G_metrics.csv"])
    assert (cf.kind, cf.names) == ("h5", ["G_filtered_feature_bc_matrix.h5"])
    cf = count_files(mex + ["G_loupe.cloupe"])
    assert (cf.kind, cf.main, sorted(cf.names)) == ("mex", mex[0], sorted(mex))
    assert count_files(mex[:2]) is None  # no features / genes table: not a triplet
    assert count_files(["G_counts.csv.gz"]) is None
    with pytest.raises(InputError, match="several count files"):
        count_files(["G_a.h5", "G_b.h5"])
