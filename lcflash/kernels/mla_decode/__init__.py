"""Absorbed MLA decode attention over the latent cache (XLA reference, split-K reference, Mosaic GPU kernel)."""

from lcflash.kernels.mla_decode.api import IMPLS, mla_decode  # noqa: F401
