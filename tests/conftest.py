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


class _FormatCheck:
    """A handler that formats every cellmill log record: logging only prints a message whose
    arguments do not fit its format ("--- Logging error ---") and goes on."""

    level = 0

    def __init__(self):
        self.errors = []

    def handle(self, record):
        try:
            record.getMessage()
        except Exception as e:  # noqa: BLE001 - any formatting failure is the finding
            self.errors.append(f"{record.msg!r} {record.args!r}: {e}")
        return True


@pytest.fixture(autouse=True)
def _log_messages_format():
    import logging

    check = _FormatCheck()
    logger = logging.getLogger("cellmill")
    level = logger.level
    logger.setLevel(logging.DEBUG)  # so that info and debug records are made and checked
    logger.addHandler(check)
    try:
        yield
    finally:
        logger.removeHandler(check)
        logger.setLevel(level)
    assert not check.errors, "log messages that do not format: " + "; ".join(check.errors)
