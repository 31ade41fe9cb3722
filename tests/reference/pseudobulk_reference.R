#!/usr/bin/env Rscript
# pseudobulk_reference.R -- reference outputs of the REAL edgeR + limma-voom pseudobulk pipeline
# for cellmill's parity tests (tests/test_pseudobulk_de.py).
#
# Usage:  Rscript tests/reference/pseudobulk_reference.R /path/to/shared/data tests/reference/pseudobulk
#         (argument 1: the shared data directory, or "-" to skip the real-data cases;
#          argument 2: the output directory; its sim/ folder holds the committed simulated input
#          made by tests/reference/make_pseudobulk_input.py)
#
# Written for and run with: R 4.2.2 (Debian bookworm), edgeR 3.40.2, limma 3.54.1, hdf5r, Matrix
#   apt-get install -y r-bioc-edger r-bioc-limma r-cran-hdf5r
# The exact versions of the run are written to <out>/versions.txt.
#
# The pipeline, for every case:
#   y <- DGEList(counts, group = group)
#   keep <- filterByExpr(y, group = group)                 # all defaults
#   y <- y[keep, , keep.lib.sizes = FALSE]
#   y <- calcNormFactors(y)                                # TMM, all defaults
#   v <- voom(y, design)                                   # span 0.5
#   fit <- eBayes(lmFit(v, design))
#   topTable(fit, coef = COEF, number = Inf, sort.by = "none")
#
# Cases (counts = genes x samples, raw count sums):
#  pbmc_*   10x/pbmc_1k_citeseq_v3.h5, "Gene Expression" features, every barcode in the file;
#           cell i (0-based, file order) goes to sample i %% 8; samples 0-3 "control", 4-7 "case";
#           batch = sample %% 2. pbmc_condition: ~ condition; pbmc_condition_batch: ~ condition + batch.
#  mouse_*  mex/mouse_brain_10k_x_1k (matrix.mtx.gz, features x cells), same made-up design.
#  sim_*    sim/counts_<population>.csv.gz (committed):
#           sim_homeo1_pooled: MG_homeostatic_1, all 12 samples, ~ condition + timepoint + sex
#           sim_apoe_3d:       MG_Apoe_high, the 4 samples at 3d, ~ condition
#           sim_homeo2_5mo:    MG_homeostatic_2, the 4 samples at 5mo, ~ condition + sex
#           condition levels Sham, SNI; timepoint levels 3d, 14d, 5mo; sex levels female, male.
#  group (filterByExpr, DGEList) = condition everywhere; COEF = 2 (the condition coefficient).
# Also: lowess.csv / lowess_input.csv (stats::lowess on a fixed vector) and ebayes_*.csv
# (lmFit + eBayes on tiny fixed matrices, one with df.prior = Inf).
#
# Numbers of type double are written exactly (shortest round-trip format, see fmt_num; the
# same helper as seurat_reference.R).

args <- commandArgs(trailingOnly = TRUE)
if (length(args) != 2) {
  stop("usage: Rscript pseudobulk_reference.R <shared data dir | -> <out dir>")
}
data_dir <- if (args[[1]] == "-") NA_character_ else normalizePath(args[[1]], mustWork = TRUE)
out_dir <- args[[2]]
dir.create(out_dir, showWarnings = FALSE, recursive = TRUE)

suppressPackageStartupMessages({
  library(edgeR)
  library(limma)
  library(Matrix)
})
if (packageVersion("edgeR") >= "4.0.0") {
  warning("this script was written for edgeR 3.40 (TMM refColumn rule changed in edgeR 4)")
}

# ---------------------------------------------------------------------------------------------
# helpers (fmt_num and write_ref as in seurat_reference.R)

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

write_ref <- function(df, path) {
  df <- as.data.frame(df, stringsAsFactors = FALSE)
  for (nm in names(df)) {
    col <- df[[nm]]
    if (is.factor(col)) col <- as.character(col)
    if (is.double(col)) col <- fmt_num(col)
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

# ---------------------------------------------------------------------------------------------
# versions
writeLines(c(
  paste0("R: ", R.version.string),
  paste0("edgeR: ", packageVersion("edgeR")),
  paste0("limma: ", packageVersion("limma")),
  paste0("Matrix: ", packageVersion("Matrix")),
  paste0("hdf5r: ", if (requireNamespace("hdf5r", quietly = TRUE)) packageVersion("hdf5r") else "absent"),
  paste0("BLAS: ", extSoftVersion()[["BLAS"]]),
  paste0("platform: ", R.version$platform)
), file.path(out_dir, "versions.txt"))

# ---------------------------------------------------------------------------------------------
# the pipeline, written out per case
run_case <- function(name, counts, group, design, coef = 2L) {
  case_dir <- file.path(out_dir, name)
  dir.create(case_dir, showWarnings = FALSE, recursive = TRUE)
  storage.mode(counts) <- "double"
  y <- DGEList(counts, group = group)
  keep <- filterByExpr(y, group = group)
  y <- y[keep, , keep.lib.sizes = FALSE]
  y <- calcNormFactors(y)
  v <- voom(y, design)
  fit <- eBayes(lmFit(v, design))
  tt <- topTable(fit, coef = coef, number = Inf, sort.by = "none")
  stopifnot(identical(rownames(tt), rownames(y)))

  write_ref(data.frame(index = seq_len(nrow(counts)), gene = rownames(counts), keep = keep),
            file.path(case_dir, "keep.csv.gz"))
  write_ref(data.frame(sample = colnames(counts), group = as.character(group),
                       lib_size_all = colSums(counts), lib_size = y$samples$lib.size,
                       norm_factors = y$samples$norm.factors),
            file.path(case_dir, "samples.csv"))
  write_ref(data.frame(sample = colnames(counts), design, check.names = FALSE),
            file.path(case_dir, "design.csv"))
  write_ref(data.frame(index = which(keep), gene = rownames(tt), tt[, c("logFC", "AveExpr", "t",
                       "P.Value", "adj.P.Val", "B")]),
            file.path(case_dir, "toptable.csv.gz"))
  first <- seq_len(min(5L, nrow(v)))
  write_ref(data.frame(gene = rownames(v)[first], v$weights[first, , drop = FALSE],
                       check.names = FALSE),
            file.path(case_dir, "voom_weights.csv"))
  write_ref(data.frame(coef = coef, n_kept = sum(keep), df_residual = fit$df.residual[1],
                       df_prior = fit$df.prior, s2_prior = fit$s2.prior,
                       var_prior = fit$var.prior[coef]),
            file.path(case_dir, "scalars.csv"))
  message(name, ": ", sum(keep), " of ", nrow(counts), " genes kept; df.prior = ",
          format(fit$df.prior), "; ", sum(tt$adj.P.Val < 0.05), " genes at adj.P.Val < 0.05")
}

made_up_design <- function(counts_by_cell, genes) {
  sample <- (seq_len(ncol(counts_by_cell)) - 1L) %% 8L
  ind <- sparseMatrix(i = seq_along(sample), j = sample + 1L, x = 1, dims = c(length(sample), 8L))
  pb <- as.matrix(counts_by_cell %*% ind)
  dimnames(pb) <- list(genes, paste0("s", 0:7))
  condition <- factor(ifelse(0:7 < 4, "control", "case"), levels = c("control", "case"))
  batch <- factor(0:7 %% 2L)
  list(counts = pb, condition = condition,
       d1 = model.matrix(~ condition), d2 = model.matrix(~ condition + batch))
}

# ---------------------------------------------------------------------------------------------
# real data
if (!is.na(data_dir)) {
  h5 <- hdf5r::H5File$new(file.path(data_dir, "10x", "pbmc_1k_citeseq_v3.h5"), mode = "r")
  shape <- h5[["matrix/shape"]][]
  m <- sparseMatrix(i = h5[["matrix/indices"]][] + 1L, p = h5[["matrix/indptr"]][],
                    x = as.numeric(h5[["matrix/data"]][]), dims = shape)
  ftype <- h5[["matrix/features/feature_type"]][]
  fname <- h5[["matrix/features/name"]][]
  h5$close_all()
  ge <- which(ftype == "Gene Expression")
  pb <- made_up_design(m[ge, , drop = FALSE], fname[ge])
  message("pbmc: ", length(ge), " genes, ", ncol(m), " barcodes")
  run_case("pbmc_condition", pb$counts, pb$condition, pb$d1)
  run_case("pbmc_condition_batch", pb$counts, pb$condition, pb$d2)

  mb <- file.path(data_dir, "mex", "mouse_brain_10k_x_1k")
  m <- as(readMM(gzfile(file.path(mb, "matrix.mtx.gz"))), "CsparseMatrix")
  feats <- read.delim(gzfile(file.path(mb, "features.tsv.gz")), header = FALSE,
                      stringsAsFactors = FALSE)
  pb <- made_up_design(m, feats[[2]])
  message("mouse brain: ", nrow(m), " genes, ", ncol(m), " cells")
  run_case("mouse_condition", pb$counts, pb$condition, pb$d1)
  run_case("mouse_condition_batch", pb$counts, pb$condition, pb$d2)
}

# ---------------------------------------------------------------------------------------------
# simulated study (committed input)
samples <- read.csv(file.path(out_dir, "sim", "samples.csv"), stringsAsFactors = FALSE)
sim_case <- function(name, population, timepoint, formula) {
  counts <- as.matrix(read.csv(gzfile(file.path(out_dir, "sim", paste0("counts_", population,
                                                                        ".csv.gz"))),
                               row.names = 1, check.names = FALSE))
  s <- samples[samples$population == population, ]
  stopifnot(identical(s$sample, colnames(counts)))
  if (!is.null(timepoint)) {
    s <- s[s$timepoint == timepoint, ]
    counts <- counts[, s$sample, drop = FALSE]
  }
  s$condition <- factor(s$condition, levels = c("Sham", "SNI"))
  s$timepoint <- factor(s$timepoint, levels = c("3d", "14d", "5mo"))
  s$sex <- factor(s$sex, levels = c("female", "male"))
  s <- droplevels(s)
  run_case(name, counts, s$condition, model.matrix(formula, data = s))
}
sim_case("sim_homeo1_pooled", "MG_homeostatic_1", NULL, ~ condition + timepoint + sex)
sim_case("sim_apoe_3d", "MG_Apoe_high", "3d", ~ condition)
sim_case("sim_homeo2_5mo", "MG_homeostatic_2", "5mo", ~ condition + sex)

# ---------------------------------------------------------------------------------------------
# lowess on a fixed vector: ties, an outlier, uneven spacing; voom's settings (f = 0.5, iter 3,
# delta 1% of the range) and a coarse delta (10%) that interpolates between fitted points.
x <- c(round(sin(1:60) * 3 + (1:60) / 10, 2), 2, 2, 2, 5.5, 5.5)
y <- cos(seq_along(x) / 3) + sqrt(seq_along(x)) / 4
y[17] <- 9
write_ref(data.frame(x = x, y = y), file.path(out_dir, "lowess_input.csv"))
l1 <- lowess(x, y, f = 0.5)
l2 <- lowess(x, y, f = 0.5, delta = 0.1 * diff(range(x)))
l3 <- lowess(x, y, f = 0.3, iter = 0)
af <- approxfun(l1, rule = 2, ties = list("ordered", mean))
xo <- c(-10, min(x), 0.123, 1.5, 2, 4.44, max(x), 99)
write_ref(data.frame(x = l1$x, fit_default = l1$y, fit_delta10 = l2$y, fit_f03_iter0 = l3$y),
          file.path(out_dir, "lowess.csv"))
write_ref(data.frame(x = xo, y = af(xo)), file.path(out_dir, "lowess_approx.csv"))

# ---------------------------------------------------------------------------------------------
# lmFit + eBayes on tiny fixed matrices (unweighted and weighted; one with df.prior = Inf)
ebayes_case <- function(name, E, design, weights = NULL, coef = 2L) {
  fit <- eBayes(lmFit(E, design, weights = weights))
  tt <- topTable(fit, coef = coef, number = Inf, sort.by = "none")
  write_ref(data.frame(gene = seq_len(nrow(E)), tt[, c("logFC", "AveExpr", "t", "P.Value",
                                                       "adj.P.Val", "B")],
                       sigma = fit$sigma, stdev_unscaled = fit$stdev.unscaled[, coef]),
            file.path(out_dir, paste0("ebayes_", name, ".csv")))
  write_ref(data.frame(df_prior = fit$df.prior, s2_prior = fit$s2.prior,
                       var_prior = fit$var.prior[coef]),
            file.path(out_dir, paste0("ebayes_", name, "_scalars.csv")))
}
g <- 40L
n <- 7L
E <- outer(seq_len(g), seq_len(n), function(i, j) sin(i * 1.7 + j * 2.3) * (1 + (i %% 5)) +
             (j > 3) * (i %% 7 == 0) * 3 + i / 10)
design <- cbind(1, c(0, 0, 0, 1, 1, 1, 1), c(0, 1, 0, 1, 0, 1, 0))
W <- outer(seq_len(g), seq_len(n), function(i, j) 0.5 + ((i * j) %% 5) / 4)
write_ref(data.frame(E), file.path(out_dir, "ebayes_input_E.csv"))
write_ref(data.frame(W), file.path(out_dir, "ebayes_input_W.csv"))
ebayes_case("plain", E, design)
ebayes_case("weighted", E, design, weights = W)
# identical residual variance for every gene: evar < 0, df.prior = Inf
res <- c(0.3, -0.1, -0.2, 0.25, -0.05, 0.4, -0.6)
res <- res - mean(res)
E2 <- outer(seq_len(g), seq_len(n), function(i, j) i / 7 + (j > 3) * (i %% 4 + 1) * 0.1) +
  matrix(res, g, n, byrow = TRUE)
write_ref(data.frame(E2), file.path(out_dir, "ebayes_input_E2.csv"))
ebayes_case("dfinf", E2, design[, 1:2])
message("done")
