"""Read one sample from any supported file: picks the reader (10x HDF5, Matrix Market, h5ad)
by what the path is. The readers depend on cellmill.io.sample; this module depends on them."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cellmill.io.h5ad import read_h5ad
from cellmill.io.mex import read_mex
from cellmill.io.sample import GENE_EXPRESSION, Sample, SampleStream, sample_kind
from cellmill.io.tenx import open_10x_h5, read_10x_h5


def read_sample(
    path: str | os.PathLike,
    feature_types: Iterable[str] | str | None = (GENE_EXPRESSION,),
    layer: str | None = None,
    genome: str | None = None,
) -> Sample:
    """Read one sample from a 10x HDF5 file, a Matrix Market folder or an ``.h5ad`` file.

    feature_types: feature types to keep (default "Gene Expression"); ``None`` keeps all.
    layer: ``.h5ad`` only; read counts from ``layers[layer]`` instead of ``X``.
    genome: keep the features of this genome only. ``None`` keeps every genome; for a v2 10x file
        with several genome groups that means the groups concatenated feature-wise in file order
        (they must share their barcodes), with the ``genome`` column telling them apart.
    Raises InputError (one line naming the file and the problem) for any bad input.
    """
    p = Path(path)
    kind = sample_kind(p, layer)
    if kind == "mex":
        return read_mex(p, feature_types=feature_types, genome=genome)
    if kind == "h5ad":
        return read_h5ad(p, layer=layer, feature_types=feature_types, genome=genome)
    return read_10x_h5(p, feature_types=feature_types, genome=genome)


@contextmanager
def open_sample(
    path: str | os.PathLike,
    feature_types: Iterable[str] | str | None = (GENE_EXPRESSION,),
    layer: str | None = None,
    genome: str | None = None,
) -> Iterator[SampleStream]:
    """Like :func:`read_sample`, as a context manager giving a :class:`SampleStream`; the file
    stays open until the block ends."""
    p = Path(path)
    if sample_kind(p, layer) != "10x":
        yield SampleStream.whole(read_sample(p, feature_types, layer, genome))
        return
    with open_10x_h5(p, feature_types=feature_types, genome=genome) as stream:
        yield stream
