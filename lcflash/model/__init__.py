"""LongCat-Flash in flax.nnx: modules hold parameters, pure functions hold the math."""

from lcflash.model.transformer import LongcatFlash, ModelOutput  # noqa: F401
