"""A sample's slices read one ahead, on a thread of their own, while the caller writes the
previous one: ingest's reading (HDF5 chunks, inflation, checks) and writing (gene remap,
compression) overlap instead of taking turns. Same slices, same order: the same store."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

_END = object()


def prefetched(items: Iterable) -> Iterator:
    """`items` in order, the next one computed on a reader thread while the caller holds this
    one (one more item in memory). The reader inflates with the caller's pool
    (``h5chunks.decode_threads``). An error while reading is raised at its turn; closing the
    generator waits for the read in flight, so the caller may then close the file."""
    from cellmill.io.h5chunks import current_pool, using_pool

    it, pool = iter(items), current_pool()

    def step():
        with using_pool(pool):
            return next(it, _END)

    with ThreadPoolExecutor(1, thread_name_prefix="cellmill-read") as reader:
        ahead = reader.submit(step)
        while True:
            item = ahead.result()
            if item is _END:
                return
            ahead = reader.submit(step)
            yield item
            del item
