"""The benchmark suite (`cellmill bench`, `python benchmarks/run_suite.py`)."""
