"""Shared fixtures: the read-only real data in ../shared/data (skipped when absent)."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
REFERENCE = ROOT / "tests" / "reference"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def seurat_reference() -> Path:
    """Outputs of tests/reference/seurat_reference.R (committed CSVs)."""
    if not REFERENCE.is_dir():
        pytest.skip("tests/reference has not been generated")
    return REFERENCE
