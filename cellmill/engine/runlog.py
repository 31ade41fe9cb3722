"""The run log: one line per stage start and end, and a summary at the end of a run.

Lines go to the `cellmill.run` logger at INFO, so `cellmill run` shows them by default (with
timestamps when stderr is not a terminal: batch logs), `-q` hides them and `-v` adds the
stages' own INFO logs (the `cellmill` logger). The wording is stable, for grep:

    2026-12-04 20:31:02 stage hvg started (parameters changed: n_top)
    2026-12-04 20:31:08 stage hvg done in 5.9 s, peak 648 MB, 19,874 cells
    2026-12-04 20:31:08 stage pca up to date (skipped: same parameters, inputs and code)
    2026-12-04 20:31:40 run done in 38.2 s, peak 1,204 MB: 12 stages, 3 ran, 9 up to date
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("cellmill.run")

DATEFMT = "%Y-%m-%d %H:%M:%S"


def why_run(rec: dict | None, new: dict) -> str:
    """Why a stage runs, from its old record and the new one's `hash`, `code`, `params`
    (per-key digests) and `inputs` (upstream hashes); `rec` None: there is no record."""
    if rec is None:
        return "no earlier result"
    if rec.get("hash") == new["hash"]:
        return "its outputs are missing in the output folder"
    reasons = []
    if "params" in rec:
        old, now = rec["params"], new["params"]
        keys = sorted(k for k in set(old) | set(now) if old.get(k) != now.get(k))
        if keys:
            reasons.append("parameters changed: " + ", ".join(keys))
    if "inputs" in rec:
        ups = [a for a in new["inputs"] if rec["inputs"].get(a) != new["inputs"][a]]
        if ups:
            reasons.append("inputs changed: " + ", ".join(ups))
    if rec.get("code") != new["code"]:
        reasons.append("code changed")
    if not reasons:
        return ("parameters or inputs changed" if "params" not in rec
                else "stage version changed")
    return "; ".join(reasons)


def started(name: str, reason: str) -> None:
    log.info("stage %s started (%s)", name, reason)


def skipped(name: str) -> None:
    log.info("stage %s up to date (skipped: same parameters, inputs and code)", name)


def done(name: str, seconds: float, peak_mb: float, cells: int | None) -> None:
    tail = f", {cells:,} cells" if cells is not None else ""
    log.info("stage %s done in %.1f s, peak %s MB%s", name, seconds, f"{peak_mb:,.0f}", tail)


def failed(name: str, seconds: float, error: BaseException) -> None:
    log.info("stage %s failed after %.1f s (%s)", name, seconds, type(error).__name__)


def summary(seconds: float, peak_mb: float, timings: dict[str, dict],
            paths: list[tuple[str, str]]) -> None:
    ran = sum(1 for t in timings.values() if not t.get("skipped"))
    log.info("run done in %.1f s, peak %s MB: %d stages, %d ran, %d up to date", seconds,
             f"{peak_mb:,.0f}", len(timings), ran, len(timings) - ran)
    for what, path in paths:
        log.info("output %s: %s", what, path)


class _Formatter(logging.Formatter):
    """Run lines as they are; other loggers' lines named (`cellmill.x: ...`), warnings marked."""

    def __init__(self, timestamps: bool):
        super().__init__(datefmt=DATEFMT)
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.name != log.name:
            level = "" if record.levelno < logging.WARNING else record.levelname.lower() + ": "
            text = f"{record.name}: {level}{text}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if self.timestamps:
            text = f"{self.formatTime(record, self.datefmt)} {text}"
        return text


def configure(verbosity: int = 0, stream=None) -> logging.Handler:
    """Logging for the command line: -1 (-q) warnings and errors only; 0 the run lines;
    1 (-v) the stages' INFO logs too; 2 (-vv) DEBUG. Timestamps when `stream` (stderr) is
    not a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_Formatter(timestamps=not tty))
    handler._cellmill = True
    root = logging.getLogger()
    for h in list(root.handlers):  # ours from an earlier call (main() called twice in a test)
        if getattr(h, "_cellmill", False):
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    levels = {-1: logging.WARNING, 0: logging.WARNING, 1: logging.INFO}
    logging.getLogger("cellmill").setLevel(levels.get(verbosity, logging.DEBUG))
    log.setLevel(logging.WARNING if verbosity < 0 else logging.INFO)
    return handler


def unconfigure(handler: logging.Handler) -> None:
    """Undo `configure`: the handler goes, the loggers' levels are reset."""
    logging.getLogger().removeHandler(handler)
    logging.getLogger("cellmill").setLevel(logging.NOTSET)
    log.setLevel(logging.NOTSET)


class notebook_lines:
    """While a run made from Python lasts: the run lines on stderr, when nothing is set up to
    show the `cellmill` loggers (a notebook); a no-op where logging is configured."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and not logging.getLogger().handlers and not _has_handler()
        self.handler = None

    def __enter__(self):
        if self.enabled:
            self.handler = logging.StreamHandler(sys.stderr)
            self.handler.setFormatter(_Formatter(timestamps=False))
            self.old_level = log.level
            log.setLevel(logging.INFO)
            log.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        if self.handler is not None:
            log.removeHandler(self.handler)
            log.setLevel(self.old_level)
        return False


def _has_handler() -> bool:
    lg = log
    while lg is not None:
        if lg.handlers:
            return True
        lg = lg.parent
    return False
