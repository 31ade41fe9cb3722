"""cellmill: an out-of-core engine for single-cell RNA-seq (see README.md and CONTRIBUTING.md).

The Python API (`cellmill/api.py`): `run`, `simulate`, `fetch`, `open_store`, `to_anndata`,
`load`, `Result`; its modules are imported on first use, so `import cellmill` stays light.
"""

__version__ = "0.1.0"

__all__ = ["Result", "fetch", "load", "open_store", "run", "simulate", "to_anndata",
           "__version__"]

_API = {"Result", "fetch", "load", "open_store", "run", "to_anndata"}


def __getattr__(name: str):
    if name in _API:
        from cellmill import api

        return getattr(api, name)
    if name == "simulate":  # the subpackage cellmill.simulate, callable (see its __init__)
        import cellmill.simulate

        return cellmill.simulate
    raise AttributeError(f"module 'cellmill' has no attribute {name!r}")
