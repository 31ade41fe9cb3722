"""Checks of the inputs against the config before any heavy work (issue 18)."""

from __future__ import annotations

from cellmill.config import Config


def preflight(cfg: Config) -> None:
    """Raise InputError / ConfigError for anything that would fail later; write nothing."""
    return None
