"""The dense SwiGLU FFN of a decode step as one kernel (XLA reference, Mosaic GPU kernel with a grid barrier)."""

from lcflash.kernels.decode_mlp.api import IMPLS, decode_mlp, decode_mlp_reference, fold_norm  # noqa: F401
