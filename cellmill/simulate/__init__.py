"""The study simulator: synthetic 10x studies shaped like the microglia study, planted truth."""

from .study import simulate_study

__all__ = ["simulate_study"]
