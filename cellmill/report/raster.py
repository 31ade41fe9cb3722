"""Scatter plots of every cell drawn straight into an RGBA image.

matplotlib's scatter keeps offsets, colours and their transformed copies for each point
(~100 bytes a cell while it draws); painting the dots into a fixed-size image keeps the
report's memory independent of the number of cells.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def paint_dots(img, px, py, codes, order, palette, disk):
    """Paint cell order[i] (i = 0, 1, ...) as the disk of pixel offsets `disk` around
    (py, px) in colour palette[codes]; later cells cover earlier ones."""
    h, w = img.shape[0], img.shape[1]
    for i in range(len(order)):
        c = order[i]
        col = palette[codes[c]]
        for k in range(disk.shape[0]):
            y = py[c] + disk[k, 0]
            x = px[c] + disk[k, 1]
            if 0 <= y < h and 0 <= x < w:
                for j in range(4):
                    img[y, x, j] = col[j]
    return img


def disk_offsets(radius: float) -> np.ndarray:
    """(dy, dx) pixel offsets within `radius` of a pixel centre (at least the centre)."""
    r = int(np.ceil(radius))
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    keep = dy * dy + dx * dx <= max(radius, 0.5) ** 2
    return np.column_stack([dy[keep], dx[keep]]).astype(np.int32)


def dot_image(xy: np.ndarray, codes: np.ndarray, palette: np.ndarray, order: np.ndarray,
              shape: tuple[int, int], diameter_px: float,
              limits: tuple[float, float, float, float]) -> np.ndarray:
    """RGBA uint8 image (rows from the top) of the points `xy` within limits
    (x0, x1, y0, y1), transparent where no dot falls. `palette` is (levels, 4) uint8."""
    h, w = shape
    x0, x1, y0, y1 = limits
    px = np.floor((xy[:, 0] - x0) / (x1 - x0) * w).astype(np.int32)
    py = np.floor((y1 - xy[:, 1]) / (y1 - y0) * h).astype(np.int32)
    img = np.zeros((h, w, 4), np.uint8)
    return paint_dots(img, px, py, codes.astype(np.int32), order.astype(np.int64),
                      np.ascontiguousarray(palette, dtype=np.uint8),
                      disk_offsets(diameter_px / 2))
