"""Causal flash attention over packed documents for training (MLA's heads: qk 192, v 128)."""
