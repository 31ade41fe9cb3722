"""Progress bars on a terminal, silence in CI and logs."""

from __future__ import annotations

import os
import sys


def progress_enabled(requested: bool = True) -> bool:
    if not requested or os.environ.get("CI") or os.environ.get("CELLMILL_QUIET"):
        return False
    return sys.stderr.isatty()


def bar(iterable=None, desc: str = "", total: int | None = None, unit: str = "block",
        enabled: bool = True, **kw):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False,
                disable=not progress_enabled(enabled), **kw)
