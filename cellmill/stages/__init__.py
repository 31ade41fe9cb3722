"""The workflow's stages, one module (or folder) per stage family, named as `cellmill run` shows
them: ingest (ingest + qc), preprocess (normalize + hvg), pca, neighbors, clustering, umap,
statistics, markers, gsea (the report stage lives in cellmill/report). `shared/` holds the
methods two stages use (kNN search, FindMarkers); stages never import each other."""
