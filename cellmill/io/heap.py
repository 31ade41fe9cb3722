"""Hand freed heap memory back to the operating system."""

from __future__ import annotations

import ctypes
import gc


def release_heap() -> None:
    """Return freed heap to the OS (glibc keeps it otherwise): between the big steps of a stage,
    so the next step starts from a lower RSS, and at the end of a stage, so the next stage of the
    same `cellmill run` process does."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
