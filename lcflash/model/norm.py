"""RMSNorm, as HF computes it: normalise in fp32, cast back, then apply the weight."""

import jax
import jax.numpy as jnp
from flax import nnx

from lcflash.model.common import ones_param


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w.astype(x.dtype) * y.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype, axis: str = "norm"):
        self.eps = eps
        self.weight = ones_param((dim,), (axis,), param_dtype)

    def __call__(self, x):
        return rms_norm(x, self.weight[...], self.eps)
