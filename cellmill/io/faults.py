"""Fault injection for tests: SIGKILL this process at a chosen point of a stage.

CELLMILL_FAULT="STAGE:write:N" kills at the N-th write of STAGE (a store element or an
output file); "STAGE:after:SECONDS" kills SECONDS after STAGE starts. Unset, every call is
a no-op. A real SIGKILL, not an exception: nothing of the dying process gets to tidy up.
"""

from __future__ import annotations

import os
import signal
import threading

_state = {"stage": None, "writes": 0, "timer": None}


def _spec() -> tuple[str, str, str] | None:
    text = os.environ.get("CELLMILL_FAULT", "")
    parts = text.split(":")
    return tuple(parts) if len(parts) == 3 else None


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def stage_started(name: str) -> None:
    _state["stage"], _state["writes"] = name, 0
    spec = _spec()
    if spec and spec[0] == name and spec[1] == "after":
        t = threading.Timer(float(spec[2]), _kill)
        t.daemon = True
        t.start()
        _state["timer"] = t


def stage_finished() -> None:
    """A timed fault fires inside its stage or not at all."""
    if _state["timer"] is not None:
        _state["timer"].cancel()
    _state.update(stage=None, writes=0, timer=None)


def wrote() -> None:
    """Called after each write of a stage's result (store element or output file)."""
    spec = _spec()
    if not spec or spec[1] != "write" or spec[0] != _state["stage"]:
        return
    _state["writes"] += 1
    if _state["writes"] >= int(spec[2]):
        _kill()
