"""One run per store at a time: a lock file beside the store, taken over when stale."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import psutil

from cellmill.errors import InputError


def _alive(info: dict) -> bool:
    """Whether the process that wrote `info` still runs (on this host; elsewhere: assume so)."""
    if info.get("host") != socket.gethostname():
        return True
    try:
        proc = psutil.Process(int(info["pid"]))
        # a reused pid belongs to a process started after the lock was written
        return abs(proc.create_time() - float(info.get("started_at", 0))) < 1.0
    except (psutil.Error, KeyError, ValueError, TypeError):
        return False


class StoreLock:
    """`with StoreLock(store_path):` holds `<store>.lock` for the duration of a run."""

    def __init__(self, store_path: Path):
        self.path = Path(store_path).with_name(Path(store_path).name + ".lock")
        self.held = False

    def __enter__(self) -> StoreLock:
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started_at": psutil.Process().create_time(), "since": time.time()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    info = json.loads(self.path.read_text() or "{}")
                except (OSError, ValueError):
                    info = {}
                if info and _alive(info):
                    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.get("since", 0)))
                    raise InputError(self.path, f"another cellmill run (pid {info.get('pid')} "
                                     f"on {info.get('host')}, since {when}) is using this "
                                     "store; wait for it to end, or delete this file if that "
                                     "run is gone") from None
                if not info and time.time() - self.path.stat().st_mtime < 5:
                    time.sleep(1)  # being written by a run that just started
                    continue
                self.path.unlink(missing_ok=True)  # stale: its run died
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise InputError(self.path, "could not take the store's lock")

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
