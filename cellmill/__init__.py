"""cellmill: an out-of-core engine for single-cell RNA-seq (see README.md and CONTRIBUTING.md)."""
__version__ = "0.1.0"
