"""Errors cellmill reports to users."""

from __future__ import annotations

import os


class InputError(Exception):
    """Bad user input. ``str(e)`` is one clear line naming the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        # one line, always: collapse any newline an underlying library put into its message
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{self.path}: {self.problem}")

    def __reduce__(self):  # picklable across processes (Dask workers)
        return (type(self), (self.path, self.problem))
