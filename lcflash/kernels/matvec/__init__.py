"""Few-row matrix-vector products with fused epilogues for decode (Mosaic GPU kernel and its XLA reference)."""
