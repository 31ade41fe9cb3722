"""Stage `cluster`: its stage module and its backends (in memory, streamed)."""
