"""io/spawn.py: submissions from several threads leave __main__ as it was."""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import Future

from cellmill.io.spawn import submit


class _SlowPool:
    """Records the __main__ each submission saw; holds each submission a moment, so the
    threads' swaps would overlap without the lock."""

    def __init__(self):
        self.seen = []

    def submit(self, fn, *args):
        self.seen.append(sys.modules["__main__"])
        time.sleep(0.01)
        f = Future()
        f.set_result(fn(*args))
        return f


def test_submissions_from_threads_restore_main():
    main = sys.modules["__main__"]
    pool = _SlowPool()
    threads = [threading.Thread(target=lambda: [submit(pool, abs, -1) for _ in range(5)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sys.modules["__main__"] is main
    assert len(pool.seen) == 20
    # each submission saw a bare module of its own, never the real one
    assert all(m is not main and not hasattr(m, "__file__") for m in pool.seen)
