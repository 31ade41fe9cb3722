"""Resumable HTTP(S) downloads with the standard library (urllib).

A file is written to ``NAME.part`` and renamed to NAME only when its size matches the server's
(Content-Length, or the total of a Content-Range). A transfer cut short keeps the ``.part``:
the next call asks for the rest with an HTTP Range request and appends it. Errors are one-line
InputErrors naming the URL.
"""

from __future__ import annotations

import http.client
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from cellmill.errors import InputError

CHUNK = 1 << 20
TIMEOUT = 60.0  # seconds without a byte before a transfer counts as cut short
USER_AGENT = "cellmill-fetch (python urllib)"


class HTTPStatusError(InputError):
    """An HTTP error status (``code``), as one line naming the URL."""

    def __init__(self, path, problem, code: int = 0):
        super().__init__(path, problem)
        self.code = code


def open_url(url: str, headers: dict | None = None, method: str = "GET",
             what: str | None = None):
    """urlopen with one-line errors: HTTP 404 -> 'WHAT: not found at URL (HTTP 404)' (or
    'URL: not found (HTTP 404)'); other HTTP errors and unreachable hosts name the URL."""
    try:
        req = urllib.request.Request(url, method=method,
                                     headers={"User-Agent": USER_AGENT, **(headers or {})})
        return urllib.request.urlopen(req, timeout=TIMEOUT)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 404:
            where = f"not found at {url}" if what else "not found"
            raise HTTPStatusError(what or url, f"{where} (HTTP 404)", 404) from None
        raise HTTPStatusError(url, f"HTTP {e.code} {e.reason}", e.code) from None
    except urllib.error.URLError as e:
        raise InputError(url, f"cannot reach the server ({e.reason})") from None
    except ValueError:  # "unknown url type": a --geo-url without http(s)://
        raise InputError(url, "not a URL cellmill can fetch (give --geo-url as https://...)") \
            from None
    except (OSError, http.client.HTTPException) as e:  # timeouts, resets before any header
        raise InputError(url, f"cannot reach the server ({type(e).__name__}: {e})") from None


def remote_size(url: str) -> int | None:
    """The Content-Length of a HEAD request (None if the server gives none)."""
    with open_url(url, method="HEAD") as resp:
        n = resp.headers.get("Content-Length")
        return int(n) if n and n.isdigit() else None


def download(url: str, dest: str | os.PathLike, progress: bool = False) -> int:
    """Download `url` to `dest` (resuming ``dest.part``); returns the file's size. A `dest`
    that exists is taken as done (it is only ever created by a checked rename)."""
    from cellmill.io.progress import bar

    dest = Path(dest)
    if dest.exists():
        return dest.stat().st_size
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    try:
        resp = open_url(url, {"Range": f"bytes={have}-"} if have else None)
    except HTTPStatusError as e:
        if have and e.code == 416:  # the .part may hold the whole file already
            return _finish_416(url, dest, part, have)
        raise
    with resp:
        total, start = _extent(resp, have)
        if start == 0:
            have = 0
        name = dest.name if len(dest.name) <= 40 else dest.name[:37] + "..."
        with open(part, "ab" if start else "wb") as fh, \
                bar(desc=name, total=total, unit="B", enabled=progress, unit_scale=True,
                    initial=have) as pb:
            try:
                while chunk := resp.read(CHUNK):
                    fh.write(chunk)
                    pb.update(len(chunk))
            except (OSError, http.client.HTTPException):
                pass  # a reset or a timeout mid-body: the size check below reports it
    size = part.stat().st_size
    if total is not None and size > total:
        part.unlink()
        raise InputError(url, f"got {size:,} bytes, more than the {total:,} the server "
                         "announced; the partial file was removed, run again")
    if total is not None and size < total:
        raise InputError(url, f"download cut short: {size:,} of {total:,} bytes; {part} is "
                         "kept, run the same command again to resume")
    os.replace(part, dest)
    return size


def _extent(resp, have: int) -> tuple[int | None, int]:
    """(total size of the file or None, offset the body starts at) of a response."""
    if resp.status == 206:
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)",
                         (resp.headers.get("Content-Range") or "").strip())
        if not m or int(m.group(1)) != have:
            raise InputError(resp.url, "the server answered the resume request with a "
                             f"different range ({resp.headers.get('Content-Range')!r})")
        total = None if m.group(3) == "*" else int(m.group(3))
        return total, have
    n = resp.headers.get("Content-Length")  # 200: the whole file again (no Range support)
    return (int(n) if n and n.isdigit() else None), 0


def _finish_416(url: str, dest: Path, part: Path, have: int) -> int:
    """A Range past the end: the .part is complete when its size is the file's size."""
    total = remote_size(url)
    if total == have:
        os.replace(part, dest)
        return have
    part.unlink()
    raise InputError(url, f"the partial file ({have:,} bytes) does not fit the server's "
                     f"({total} bytes); it was removed, run again")
