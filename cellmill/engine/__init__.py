"""The runtime: stage registry and records, passes and where they run, per-cell helpers and
tables, memory monitor, preflight checks and the workflow driver. No science here: that is in
cellmill/stages."""
