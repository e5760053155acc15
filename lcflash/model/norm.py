"""RMSNorm, as HF computes it: normalise in fp32, cast back, then apply the weight."""

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lcflash.model.common import NORM_OUTPUT, ones_param


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w.astype(x.dtype) * y.astype(x.dtype)


def rms_scales(x: jax.Array, sizes: tuple, eps: float) -> tuple:
    """1 / rms of consecutive slices of x's last axis (fp32, [..., 1] each), with one reduction: squares are summed
    in chunks of gcd(sizes) and each slice adds its chunk sums elementwise. XLA then runs one reduction kernel for
    all slices instead of one each (a batch-1 decode step is a chain of small kernels)."""
    chunk = math.gcd(*sizes)
    xf = x[..., :sum(sizes)].astype(jnp.float32)
    sums = jnp.sum((xf * xf).reshape(*x.shape[:-1], -1, chunk), axis=-1)
    out, lo = [], 0
    for n in sizes:
        ss = sum(sums[..., i:i + 1] for i in range(lo // chunk, (lo + n) // chunk))
        out.append(jax.lax.rsqrt(ss / n + eps))
        lo += n
    return tuple(out)


def apply_rms_scale(x: jax.Array, w: jax.Array, r: jax.Array) -> jax.Array:
    """rms_norm(x, w) given r = 1 / rms(x) from `rms_scales`."""
    return w.astype(x.dtype) * (x.astype(jnp.float32) * r).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype, axis: str = "norm"):
        self.eps = eps
        self.weight = ones_param((dim,), (axis,), param_dtype)

    def __call__(self, x):
        return checkpoint_name(rms_norm(x, self.weight[...], self.eps), NORM_OUTPUT)  # model.remat_keep "norms"
