"""Dense SwiGLU FFN."""

import jax
import jax.numpy as jnp
from flax import nnx

from lcflash.model.common import normal_param


def swiglu(x_btd, w_gate_df, w_up_df, w_down_fd):
    dtype = x_btd.dtype
    g = jnp.einsum("...d,df->...f", x_btd, w_gate_df.astype(dtype))
    u = jnp.einsum("...d,df->...f", x_btd, w_up_df.astype(dtype))
    return jnp.einsum("...f,fd->...d", jax.nn.silu(g) * u, w_down_fd.astype(dtype))


def _swiglu_pair(g, u):
    return jax.nn.silu(g) * u


@jax.custom_vjp
def swiglu_halves(gu_mf):
    """silu(g) * u for gu = [g | u] (one matmul against [gate | up]). The gradient is one [d_g | d_u] array:
    slicing the halves made XLA pad each half's gradient to full width and add the two (596 us per layer at
    32 x 1024 tokens on an H200; 348 us as one concatenate). Same values as slicing."""
    return _swiglu_pair(*_halves(gu_mf))


def _halves(gu_mf):
    f = gu_mf.shape[-1] // 2
    return gu_mf[..., :f], gu_mf[..., f:]


def _swiglu_halves_fwd(gu_mf):
    return swiglu_halves(gu_mf), gu_mf


def _swiglu_halves_bwd(gu_mf, dh_mf):
    dg, du = jax.vjp(_swiglu_pair, *_halves(gu_mf))[1](dh_mf)
    return (jnp.concatenate([dg, du], axis=-1),)


swiglu_halves.defvjp(_swiglu_halves_fwd, _swiglu_halves_bwd)


class MLP(nnx.Module):
    def __init__(self, hidden: int, inner: int, param_dtype, std: float, rngs: nnx.Rngs):
        self.w_gate = normal_param(rngs, (hidden, inner), ("embed", "mlp"), param_dtype, std)
        self.w_up = normal_param(rngs, (hidden, inner), ("embed", "mlp"), param_dtype, std)
        self.w_down = normal_param(rngs, (inner, hidden), ("mlp", "embed"), param_dtype, std)

    def __call__(self, x_btd):
        return swiglu(x_btd, self.w_gate[...], self.w_up[...], self.w_down[...])
