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


MMAP_THRESHOLD = 8 << 20  # bytes: bigger allocations get their own memory map
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def fix_mmap_threshold(nbytes: int = MMAP_THRESHOLD) -> bool:
    """Serve allocations of nbytes and more from their own memory maps, returned to the OS when
    freed. glibc's default threshold is dynamic: it rises to the size of the largest mapped block
    freed so far (up to 32 MB), after which big temporaries come from the heap and fragment it,
    so the peak RSS of a pass grows with how many it makes, i.e. with the cells (the PCA's 32 MB
    Gram partials: 737 -> 797 MB from 196k to 400k cells; with this: 639 -> 683 MB, no slower).
    Returns False when not on glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, int(nbytes)))
    except (OSError, AttributeError):
        return False
