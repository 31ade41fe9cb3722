"""What produced a result: the versions of Python, cellmill and the packages it runs on."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ["cellmill", "numpy", "scipy", "pandas", "zarr", "numcodecs", "anndata", "dask",
            "distributed", "numba", "pynndescent", "igraph", "leidenalg", "umap-learn",
            "xarray", "scikit-misc", "h5py", "matplotlib"]


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
