"""Stage `umap`: its stage module and its backends (umap-learn in memory, streamed)."""
