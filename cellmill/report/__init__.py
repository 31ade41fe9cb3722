"""The report stage: figures (matplotlib) and one self-contained report.html."""
