"""Stage `gsea`: fgsea-compatible preranked GSEA and the stage that runs it per contrast."""
