"""io/prefetch.py: a sample's slices read one ahead on a reader thread."""

import threading
import time

import numpy as np
import pytest

from cellmill.io.prefetch import prefetched
from cellmill.io.sample import decode_strings


def test_items_in_order_and_read_on_another_thread():
    threads = []

    def items():
        for i in range(50):
            threads.append(threading.get_ident())
            yield i

    assert list(prefetched(items())) == list(range(50))
    assert set(threads) == {threads[0]} and threads[0] != threading.get_ident()


def test_reads_one_ahead_of_the_caller():
    made = []

    def items():
        for i in range(5):
            made.append(i)
            yield i

    it = prefetched(items())
    assert next(it) == 0
    time.sleep(0.2)
    assert made == [0, 1]  # the next item is ready, no further one
    assert list(it) == [1, 2, 3, 4]


def test_error_raised_at_its_turn():
    def items():
        yield 1
        yield 2
        raise ValueError("bad slice")

    it = prefetched(items())
    assert next(it) == 1 and next(it) == 2
    with pytest.raises(ValueError, match="bad slice"):
        next(it)


def test_close_waits_for_the_read_in_flight():
    state = {"reading": False, "done": 0}

    def items():
        for i in range(3):
            state["reading"] = True
            time.sleep(0.3)
            state["reading"] = False
            state["done"] += 1
            yield i

    it = prefetched(items())
    assert next(it) == 0
    it.close()  # the second read is in flight: close returns after it
    assert not state["reading"] and state["done"] == 2


@pytest.mark.parametrize("values", [
    [b"AAACCTGAGAAACCAT-1", b"ENSMUSG00000051951", b"", b"Gm 1"],
    [b"Sox2-ot", "β-actin".encode(), "Ñ".encode()],
])
def test_decode_strings_matches_python(values):
    arr = np.array(values)
    out = decode_strings(arr)
    assert out.dtype == object
    assert list(out) == [v.decode("utf-8") for v in values]
    assert all(type(x) is str for x in out)
