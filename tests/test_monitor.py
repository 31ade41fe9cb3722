"""Stage records' CPU seconds count the worker processes a stage starts and joins."""

from __future__ import annotations

import multiprocessing as mp
import time

from cellmill.engine.monitor import cpu_seconds


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_cpu_seconds_include_joined_children():
    c0, p0 = cpu_seconds(), time.process_time()
    child = mp.get_context("spawn").Process(target=_burn, args=(0.4,))
    child.start()
    child.join()
    assert child.exitcode == 0
    assert time.process_time() - p0 < 0.2  # this process only waited
    assert cpu_seconds() - c0 >= 0.35  # the child's CPU time, once it was joined
