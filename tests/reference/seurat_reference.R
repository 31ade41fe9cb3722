#!/usr/bin/env Rscript
# seurat_reference.R -- reference outputs of the REAL Seurat 4.3.0 for cellmill's parity tests.
#
# Usage:  Rscript tests/reference/seurat_reference.R /path/to/shared/data tests/reference
#         (argument 1: the shared data directory; argument 2: the output directory)
#
# Written for and run with: R 4.2.2 (Debian bookworm), Seurat 4.3.0, SeuratObject 4.1.3,
# Matrix, irlba, RcppAnnoy, hdf5r and limma 3.54.1 from Debian packages
#   apt-get install -y r-cran-seurat r-cran-hdf5r r-bioc-limma python3-leidenalg
# The exact versions of the run are written to <out>/versions.txt.
#
# limma matters: with limma installed, Seurat 4.3.0's Wilcoxon test (FindMarkers default) uses
# limma::rankSumTestWithCorrelation (normal approximation with tie + continuity correction;
# a gene whose values are all tied gets p = 1). Without limma it falls back to wilcox.test,
# which gives p = NaN for all-tied genes. The script refuses to run without limma.
# Leiden (FindClusters algorithm = 4) needs the Python module leidenalg through reticulate;
# by default /usr/bin/python3 (Debian python3-leidenalg) is used; if it is missing, the Leiden
# output is skipped (the rest does not depend on it).
#
# What it does (see tests/reference/README.md for every file and column):
#  pbmc1k (10x/pbmc_1k_citeseq_v3.h5, "Gene Expression" only):
#    CreateSeuratObject (min.cells 0, min.features 0) -> QC subset 500 < nFeature_RNA < 4000 ->
#    NormalizeData (LogNormalize, 1e4) -> FindVariableFeatures (vst, 2000) ->
#    ScaleData (variable features) -> RunPCA (50 PCs, seed 42) ->
#    FindNeighbors (dims 1:15, k 20, prune 1/15; plus return.neighbor = TRUE for the kNN lists) ->
#    FindClusters (resolution 0.3, Louvain, seed 0; Leiden too when available) ->
#    FindAllMarkers (only.pos TRUE and FALSE; logfc 0.25, min.pct 0.1) ->
#    FindMarkers cluster 0 vs 1 (all genes, thresholds 0) -> Welch t.test on some genes.
#  mouse_brain (mex/mouse_brain_10k_x_1k, Read10X):
#    CreateSeuratObject -> QC subset 20 < nFeature_RNA < 200 -> NormalizeData ->
#    FindVariableFeatures (vst, 500).
#
# Deterministic: Annoy uses its fixed default seed, irlba seed.use = 42, clustering random.seed = 0.
# Numbers of type double are written exactly: the shortest of %.15g/%.16g/%.17g that a correctly
# rounded parser (Python float(), numpy, pandas with float_precision="round_trip") reads back as
# the same float64 (see fmt_num).

args <- commandArgs(trailingOnly = TRUE)
if (length(args) != 2) {
  stop("usage: Rscript seurat_reference.R <shared data dir> <out dir>")
}
data_dir <- normalizePath(args[[1]], mustWork = TRUE)
out_dir <- args[[2]]
dir.create(out_dir, showWarnings = FALSE, recursive = TRUE)

if (Sys.getenv("RETICULATE_PYTHON") == "" && file.exists("/usr/bin/python3")) {
  Sys.setenv(RETICULATE_PYTHON = "/usr/bin/python3")
}

suppressPackageStartupMessages({
  library(Seurat)
  library(Matrix)
})
if (!requireNamespace("limma", quietly = TRUE)) {
  stop("limma is required (apt-get install -y r-bioc-limma): see the header comment")
}
if (packageVersion("Seurat") != "4.3.0") {
  warning("this script was written for Seurat 4.3.0, found ", packageVersion("Seurat"))
}
options(Seurat.object.assay.version = "v3", future.globals.maxSize = 4e9)
set.seed(42)

# ---------------------------------------------------------------------------------------------
# helpers

# Shortest of %.15g / %.16g / %.17g that provably parses back (with a correctly rounded parser,
# e.g. Python's float() or pandas' round_trip) to the same float64: 0.965 is written "0.965",
# not "0.96499999999999997". R's own as.numeric() is not correctly rounded, so the check is
# done on decimal digits: x25 = x to 25 significant digits (glibc printf is exact) and the
# shorter candidate s must satisfy |x25 - s| + 0.5 unit of the 25th digit < 0.999 x half the
# smaller gap between x and its neighbouring doubles. NA, NaN, Inf, -Inf are written as such.
fmt_num <- function(x) {
  out <- sprintf("%.17g", x)
  out[!is.na(x) & x == 0] <- "0"
  ok <- which(is.finite(x) & abs(x) >= 2.3e-308)  # normal, non-zero
  if (!length(ok)) return(out)
  v <- abs(x[ok])
  split_digits <- function(s, n) gsub(" ", "0", formatC(gsub("\\.", "", sub("e.*", "", s)),
                                                          width = n, flag = "-"))
  e25 <- sprintf("%.24e", v)
  ex <- as.integer(sub(".*e", "", e25))
  dig25 <- split_digits(e25, 25)
  E <- floor(log2(v))
  E <- E - (2^E > v) + (2^(E + 1) <= v)
  half_gap <- ifelse(v == 2^E, 2^(E - 54), 2^(E - 53)) / 10^(ex - 24)  # in 25th-digit units
  chunk <- function(d, a, b) as.numeric(substr(d, a, b))
  done <- rep(FALSE, length(ok))
  for (d in c(15, 16)) {
    ed <- sprintf(paste0("%.", d - 1, "e"), v)
    digd <- split_digits(ed, 25)
    diff <- (chunk(dig25, 1, 9) - chunk(digd, 1, 9)) * 1e16 +
      (chunk(dig25, 10, 17) - chunk(digd, 10, 17)) * 1e8 +
      (chunk(dig25, 18, 25) - chunk(digd, 18, 25))
    acc <- !done & as.integer(sub(".*e", "", ed)) == ex & (abs(diff) + 0.5) < 0.999 * half_gap
    out[ok[acc]] <- sprintf(paste0("%.", d, "g"), x[ok[acc]])
    done <- done | acc
  }
  out
}

# Write a data.frame as CSV: no quoting (asserted safe), no row names.
# A path ending in .gz is gzip-compressed.
# digits = NULL: exact (fmt_num); digits = k: sprintf("%.<k>g") (used only for PCA, whose Seurat
# values are themselves only accurate to ~1e-5 because irlba stops at tol 1e-5).
write_ref <- function(df, path, digits = NULL) {
  df <- as.data.frame(df, stringsAsFactors = FALSE)
  for (nm in names(df)) {
    col <- df[[nm]]
    if (is.factor(col)) col <- as.character(col)
    if (is.double(col)) {
      col <- if (is.null(digits)) fmt_num(col) else sprintf(paste0("%.", digits, "g"), col)
    }
    if (is.character(col) && any(grepl("[,\"\n]", col[!is.na(col)]))) {
      stop("column ", nm, " of ", path, " holds a comma or quote; refusing to write unquoted")
    }
    df[[nm]] <- col
  }
  con <- if (grepl("\\.gz$", path)) gzfile(path, open = "wb") else file(path, open = "wb")
  on.exit(close(con))
  write.table(df, con, sep = ",", quote = FALSE, row.names = FALSE, col.names = TRUE,
              na = "NA", eol = "\n")
  invisible(path)
}

write_json_params <- function(x, path) {
  writeLines(jsonlite::toJSON(x, auto_unbox = TRUE, pretty = TRUE, digits = NA), path)
}

vst_table <- function(obj) {
  mf <- obj[["RNA"]][[]]  # meta.features
  cols <- c("vst.mean", "vst.variance", "vst.variance.expected",
            "vst.variance.standardized", "vst.variable")
  stopifnot(all(cols %in% colnames(mf)), identical(rownames(mf), rownames(obj)))
  data.frame(gene = rownames(mf), mf[, cols],
             rank = match(rownames(mf), VariableFeatures(obj)),
             check.names = FALSE, stringsAsFactors = FALSE)
}

qc_table <- function(obj, pass) {
  data.frame(cell = colnames(obj), nCount_RNA = obj$nCount_RNA,
             nFeature_RNA = as.integer(obj$nFeature_RNA), pass = pass,
             stringsAsFactors = FALSE)
}

# ---------------------------------------------------------------------------------------------
# versions
py_leiden <- tryCatch({
  if (reticulate::py_module_available("leidenalg")) {
    la <- reticulate::import("leidenalg")
    ig <- reticulate::import("igraph")
    sprintf("leidenalg %s, python-igraph %s (python %s)", la$version, ig$`__version__`,
            reticulate::py_config()$version)
  } else {
    "not available"
  }
}, error = function(e) paste("not available:", conditionMessage(e)))
have_leiden <- !startsWith(py_leiden, "not available")

pkgs <- c("Seurat", "SeuratObject", "Matrix", "irlba", "RcppAnnoy", "hdf5r", "limma",
          "leiden", "reticulate", "future")
si <- sessionInfo()
version_lines <- c(
  paste("R:", R.version.string),
  paste0(pkgs, ": ", vapply(pkgs, function(p) {
    if (requireNamespace(p, quietly = TRUE)) as.character(packageVersion(p)) else "not installed"
  }, character(1))),
  paste("python leidenalg (for FindClusters algorithm = 4):", py_leiden),
  paste("BLAS:", si$BLAS), paste("LAPACK:", si$LAPACK),
  paste("platform:", si$platform), paste("running:", si$running),
  "", "sessionInfo():", capture.output(print(si))
)
writeLines(version_lines, file.path(out_dir, "versions.txt"))

# =============================================================================================
# pbmc1k
# =============================================================================================
message("== pbmc1k")
pb_dir <- file.path(out_dir, "pbmc1k")
dir.create(pb_dir, showWarnings = FALSE, recursive = TRUE)
h5_path <- file.path(data_dir, "10x", "pbmc_1k_citeseq_v3.h5")

p <- list(
  input = "10x/pbmc_1k_citeseq_v3.h5", modality = "Gene Expression",
  min.cells = 0, min.features = 0,
  qc = "nFeature_RNA > 500 & nFeature_RNA < 4000", qc_min_exclusive = 500,
  qc_max_exclusive = 4000,
  normalization.method = "LogNormalize", scale.factor = 10000,
  hvg_method = "vst", nfeatures = 2000, loess.span = 0.3, clip.max = "auto (sqrt(ncells))",
  scale_features = "VariableFeatures", scale.max = 10,
  npcs = 50, pca_seed = 42, dims = 15, k.param = 20, prune.SNN = 1 / 15, nn.method = "annoy",
  n.trees = 50, annoy.metric = "euclidean",
  cluster_algorithm = 1, resolution = 0.3, cluster_seed = 0, n.start = 10, n.iter = 10,
  markers_logfc.threshold = 0.25, markers_min.pct = 0.1, markers_return.thresh = 0.01,
  markers_test = "wilcox (limma::rankSumTestWithCorrelation)",
  markers_0_vs_1 = "ident.1 = 0, ident.2 = 1, logfc.threshold = 0, min.pct = 0"
)

counts_all <- Read10X_h5(h5_path)
counts <- counts_all[["Gene Expression"]]

# feature names as stored in the file, as returned by Read10X_h5, and in the Seurat object
h5 <- hdf5r::H5File$new(h5_path, mode = "r")
h5_names <- h5[["matrix/features/name"]][]
h5_types <- h5[["matrix/features/feature_type"]][]
h5$close_all()
h5_names <- h5_names[h5_types == "Gene Expression"]
stopifnot(length(h5_names) == nrow(counts))

obj <- CreateSeuratObject(counts = counts, project = "pbmc1k", min.cells = 0, min.features = 0)
stopifnot(nrow(obj) == nrow(counts))
renamed <- which(h5_names != rownames(counts) | rownames(counts) != rownames(obj))
write_ref(data.frame(index = renamed, h5_name = h5_names[renamed],
                     read10x_name = rownames(counts)[renamed], feature = rownames(obj)[renamed],
                     stringsAsFactors = FALSE),
          file.path(pb_dir, "features_renamed.csv"))
message("pbmc1k: ", length(renamed), " feature names differ from the file's")

qc_pass <- obj$nFeature_RNA > 500 & obj$nFeature_RNA < 4000
write_ref(qc_table(obj, qc_pass), file.path(pb_dir, "qc.csv"))
obj <- subset(obj, subset = nFeature_RNA > 500 & nFeature_RNA < 4000)
stopifnot(identical(colnames(obj), names(qc_pass)[qc_pass]))
message("pbmc1k: ", length(qc_pass), " barcodes, ", ncol(obj), " cells after QC, ",
        nrow(obj), " genes")
write_ref(data.frame(index = seq_len(ncol(obj)), cell = colnames(obj)),
          file.path(pb_dir, "cells.csv"))

obj <- NormalizeData(obj, normalization.method = "LogNormalize", scale.factor = 1e4,
                     verbose = FALSE)
obj <- FindVariableFeatures(obj, selection.method = "vst", nfeatures = 2000, verbose = FALSE)
hvg <- VariableFeatures(obj)
write_ref(vst_table(obj), file.path(pb_dir, "hvg.csv.gz"))

obj <- ScaleData(obj, features = hvg, verbose = FALSE)
sd_mat <- GetAssayData(obj, slot = "scale.data")
# note: scale.data rows come in the object's gene order, not in VariableFeatures() order
stopifnot(setequal(rownames(sd_mat), hvg))
write_ref(data.frame(cell = colnames(sd_mat), t(sd_mat[hvg[1:20], , drop = FALSE]),
                     check.names = FALSE),
          file.path(pb_dir, "scaled_sample.csv.gz"))

obj <- RunPCA(obj, features = hvg, npcs = 50, seed.use = 42, verbose = FALSE)
pca <- obj[["pca"]]
write_ref(data.frame(pc = seq_along(pca@stdev), stdev = pca@stdev),
          file.path(pb_dir, "pca_stdev.csv"))
emb <- Embeddings(pca)
stopifnot(identical(rownames(emb), colnames(obj)))
write_ref(data.frame(cell = rownames(emb), emb, check.names = FALSE),
          file.path(pb_dir, "pca_embeddings.csv.gz"), digits = 12)
load <- Loadings(pca)
write_ref(data.frame(gene = rownames(load), load, check.names = FALSE),
          file.path(pb_dir, "pca_loadings.csv.gz"), digits = 12)

# kNN graph + SNN graph (what clustering uses)
obj <- FindNeighbors(obj, reduction = "pca", dims = 1:15, k.param = 20, prune.SNN = 1 / 15,
                     verbose = FALSE)
# the neighbour lists themselves (same Annoy index build: fixed default seed)
obj <- FindNeighbors(obj, reduction = "pca", dims = 1:15, k.param = 20,
                     return.neighbor = TRUE, verbose = FALSE)
nn <- obj[["RNA.nn"]]
stopifnot(identical(Cells(nn), colnames(obj)))
nn_idx <- Indices(nn)
nn_dist <- Distances(nn)
colnames(nn_idx) <- paste0("nn_", seq_len(ncol(nn_idx)))
colnames(nn_dist) <- paste0("d_", seq_len(ncol(nn_dist)))
write_ref(data.frame(cell = colnames(obj), nn_idx, check.names = FALSE),
          file.path(pb_dir, "nn_idx.csv.gz"))
write_ref(data.frame(cell = colnames(obj), nn_dist, check.names = FALSE),
          file.path(pb_dir, "nn_dist.csv.gz"))

# consistency checks: the binary kNN graph and the SNN graph follow from these neighbour lists
n <- ncol(obj)
knn_from_idx <- sparseMatrix(i = rep(seq_len(n), ncol(nn_idx)), j = as.vector(nn_idx), x = 1,
                             dims = c(n, n))
knn_graph <- as(obj[["RNA_nn"]], "dgCMatrix")
dimnames(knn_graph) <- list(NULL, NULL)
stopifnot(max(abs(knn_graph - knn_from_idx)) == 0)
stopifnot(all(nn_idx[, 1] == seq_len(n)))  # self first
shared <- tcrossprod(knn_from_idx)
jac <- shared / (2 * 20 - shared)
jac@x[jac@x < 1 / 15] <- 0
jac <- drop0(jac)
snn <- as(obj[["RNA_snn"]], "dgCMatrix")
stopifnot(identical(rownames(snn), colnames(obj)), identical(colnames(snn), colnames(obj)))
snn_plain <- snn
dimnames(snn_plain) <- list(NULL, NULL)
stopifnot(max(abs(snn_plain - jac)) < 1e-12)
snn_trip <- summary(snn)
write_ref(data.frame(i = snn_trip$i, j = snn_trip$j, x = snn_trip$x),
          file.path(pb_dir, "snn.csv.gz"))

# clustering
obj <- FindClusters(obj, graph.name = "RNA_snn", resolution = 0.3, algorithm = 1,
                    random.seed = 0, verbose = FALSE)
louvain <- obj$seurat_clusters
write_ref(data.frame(cell = colnames(obj), seurat_clusters = as.character(louvain)),
          file.path(pb_dir, "clusters.csv"))
message("pbmc1k Louvain clusters: ", nlevels(louvain), "; sizes ",
        paste(names(table(louvain)), table(louvain), sep = ":", collapse = " "))

leiden_note <- "skipped: leidenalg not available"
# The leiden package sets options(scipen = 1e11) while it runs, which makes R emit hundreds of
# harmless "NAs introduced by coercion to integer range" warnings, some from R code called back
# from Python (outside any handler): warnings are switched off for this one call only.
if (have_leiden) {
  leiden_note <- tryCatch({
    old_warn <- options(warn = -1)
    tmp <- tryCatch(FindClusters(obj, graph.name = "RNA_snn", resolution = 0.3, algorithm = 4,
                                 random.seed = 0, verbose = FALSE),
                    finally = options(old_warn))
    lei <- tmp$seurat_clusters
    write_ref(data.frame(cell = colnames(tmp), seurat_clusters = as.character(lei)),
              file.path(pb_dir, "clusters_leiden.csv"))
    message("pbmc1k Leiden clusters: ", nlevels(lei), "; sizes ",
            paste(names(table(lei)), table(lei), sep = ":", collapse = " "))
    rm(tmp)
    paste("written:", py_leiden)
  }, error = function(e) paste("skipped:", conditionMessage(e)))
}
message("Leiden: ", leiden_note)
p$leiden <- leiden_note
Idents(obj) <- louvain
p$n_cells_after_qc <- ncol(obj)
p$n_genes <- nrow(obj)
p$n_clusters <- nlevels(louvain)
p$cluster_sizes <- as.list(table(louvain))

# markers (Wilcoxon through limma, on the log-normalised "data" slot)
m_pos <- FindAllMarkers(obj, only.pos = TRUE, logfc.threshold = 0.25, min.pct = 0.1,
                        verbose = FALSE)
m_all <- FindAllMarkers(obj, only.pos = FALSE, logfc.threshold = 0.25, min.pct = 0.1,
                        verbose = FALSE)
mk_cols <- c("p_val", "avg_log2FC", "pct.1", "pct.2", "p_val_adj", "cluster", "gene")
write_ref(m_pos[, mk_cols], file.path(pb_dir, "markers_all_pos.csv.gz"))
write_ref(m_all[, mk_cols], file.path(pb_dir, "markers_all.csv.gz"))
message("FindAllMarkers rows: only.pos ", nrow(m_pos), ", both signs ", nrow(m_all))

m01 <- FindMarkers(obj, ident.1 = "0", ident.2 = "1", logfc.threshold = 0, min.pct = 0,
                   verbose = FALSE)
write_ref(data.frame(gene = rownames(m01), m01[, c("p_val", "avg_log2FC", "pct.1", "pct.2",
                                                    "p_val_adj")]),
          file.path(pb_dir, "markers_0_vs_1.csv.gz"))
message("FindMarkers 0 vs 1 rows: ", nrow(m01))

# Welch t-tests on log-normalised values: cluster 0 vs all other cells (plus edge cases)
lognorm <- GetAssayData(obj, slot = "data")
in0 <- louvain == "0"
tt_row <- function(gene, case, x, y, alternative) {
  r <- tryCatch({
    tt <- t.test(x, y, alternative = alternative)
    list(t = unname(tt$statistic), df = unname(tt$parameter), p = tt$p.value, err = "")
  }, error = function(e) list(t = NA_real_, df = NA_real_, p = NA_real_,
                              err = gsub("[,\"\n]", " ", conditionMessage(e))))
  data.frame(gene = gene, case = case, alternative = alternative,
             n_x = length(x), n_y = length(y),
             mean_x = if (length(x)) mean(x) else NA_real_,
             mean_y = if (length(y)) mean(y) else NA_real_,
             t = r$t, df = r$df, p_value = r$p, error = r$err, stringsAsFactors = FALSE)
}
tt_rows <- list()
add_tests <- function(gene, case, x, y) {
  for (alt in c("greater", "two.sided")) {
    tt_rows[[length(tt_rows) + 1]] <<- tt_row(gene, case, x, y, alt)
  }
}
for (g in hvg[1:50]) {
  v <- lognorm[g, ]
  add_tests(g, "cluster0_vs_rest", v[in0], v[!in0])
}
# edge case 1: a gene that is zero in every QC cell. Both groups constant, yet R does NOT error:
# its "essentially constant" check is stderr < 10 * eps * max(|mean_x|, |mean_y|) = 0, false for
# stderr 0, so t = 0/0 = NaN, df = NaN, p = NaN.
g_zero <- rownames(lognorm)[which(Matrix::rowSums(lognorm) == 0)[1]]
add_tests(g_zero, "cluster0_vs_rest", lognorm[g_zero, in0], lognorm[g_zero, !in0])
# edge case 2: a gene zero in all of cluster 0 but expressed elsewhere (x constant: fine)
expr0 <- Matrix::rowSums(lognorm[, in0] > 0)
expr_rest <- Matrix::rowSums(lognorm[, !in0] > 0)
g_x_const <- names(which(expr0 == 0 & expr_rest >= 5))[1]
add_tests(g_x_const, "cluster0_vs_rest", lognorm[g_x_const, in0], lognorm[g_x_const, !in0])
# edge case 3: a gene expressed in exactly one cell of cluster 0
g_one <- names(which(expr0 == 1))[1]
add_tests(g_one, "cluster0_vs_rest", lognorm[g_one, in0], lognorm[g_one, !in0])
# edge case 4: a group of a single cell (-> R error "not enough 'x' observations")
first0 <- which(in0)[1]
add_tests(hvg[1], "first_cell_of_cluster0_vs_rest", lognorm[hvg[1], first0],
          lognorm[hvg[1], -first0])
# edge case 5 (synthetic): both groups constant at different values (-> R error "data are
# essentially constant"): x = five zeros, y = five copies of the gene's maximum
v1 <- lognorm[hvg[1], ]
add_tests(hvg[1], "synthetic_5_zeros_vs_5_max", rep(0, 5), rep(max(v1), 5))
tt <- do.call(rbind, tt_rows)
write_ref(tt, file.path(pb_dir, "ttest.csv"))

write_json_params(p, file.path(pb_dir, "params.json"))
rm(obj, counts, counts_all, lognorm, sd_mat, snn, shared, jac)
invisible(gc())

# =============================================================================================
# mouse_brain
# =============================================================================================
message("== mouse_brain")
mb_dir <- file.path(out_dir, "mouse_brain")
dir.create(mb_dir, showWarnings = FALSE, recursive = TRUE)
mex_dir <- file.path(data_dir, "mex", "mouse_brain_10k_x_1k")
mb_min <- 20
mb_max <- 200
mb_nfeatures <- 500
q <- list(
  input = "mex/mouse_brain_10k_x_1k", reader = "Read10X(gene.column = 2)",
  min.cells = 0, min.features = 0,
  qc = sprintf("nFeature_RNA > %d & nFeature_RNA < %d", mb_min, mb_max),
  qc_min_exclusive = mb_min, qc_max_exclusive = mb_max,
  qc_note = paste("only 1,000 genes: nFeature is 0..237 (median 65); these strict bounds keep",
                  "~99% and exercise both the lower and the upper bound"),
  normalization.method = "LogNormalize", scale.factor = 10000,
  hvg_method = "vst", nfeatures = mb_nfeatures, loess.span = 0.3
)
mb_counts <- Read10X(mex_dir)
feat <- read.delim(gzfile(file.path(mex_dir, "features.tsv.gz")), header = FALSE,
                   stringsAsFactors = FALSE)
mb <- CreateSeuratObject(counts = mb_counts, project = "mouse_brain", min.cells = 0,
                         min.features = 0)
write_ref(data.frame(gene_id = feat$V1, file_name = feat$V2, read10x_name = rownames(mb_counts),
                     feature = rownames(mb), stringsAsFactors = FALSE),
          file.path(mb_dir, "features.csv"))
mb_pass <- mb$nFeature_RNA > mb_min & mb$nFeature_RNA < mb_max
write_ref(qc_table(mb, mb_pass), file.path(mb_dir, "qc.csv.gz"))
mb <- subset(mb, cells = colnames(mb)[mb_pass])
stopifnot(identical(colnames(mb), names(mb_pass)[mb_pass]))
message("mouse_brain: ", length(mb_pass), " barcodes, ", ncol(mb), " cells after QC (",
        sprintf("%.2f%%", 100 * mean(mb_pass)), "), ", nrow(mb), " genes")
mb <- NormalizeData(mb, normalization.method = "LogNormalize", scale.factor = 1e4,
                    verbose = FALSE)
mb <- FindVariableFeatures(mb, selection.method = "vst", nfeatures = mb_nfeatures,
                           verbose = FALSE)
write_ref(vst_table(mb), file.path(mb_dir, "hvg.csv"))
q$n_barcodes <- length(mb_pass)
q$n_cells_after_qc <- ncol(mb)
q$n_genes <- nrow(mb)
q$n_genes_zero_after_qc <- sum(Matrix::rowSums(GetAssayData(mb, slot = "counts")) == 0)
write_json_params(q, file.path(mb_dir, "params.json"))

message("done")
