"""SwiGLU of a fused [gate | up] product, with a gradient written as one [d_gate | d_up] array."""

import jax
import jax.numpy as jnp


def _halves(gu_mf):
    f = gu_mf.shape[-1] // 2
    return gu_mf[..., :f], gu_mf[..., f:]


def _swiglu(g, u):
    return jax.nn.silu(g) * u


def swiglu_halves_grad(gu_mf, dh_mf):
    """[d_g | d_u] of silu(g) * u at gu = [g | u]: the values autodiff gives through the slices, built by one
    concatenate (slicing made XLA pad each half's gradient to full width and add the two: 596 us per layer at
    32 x 1024 tokens on an H200; 348 us as one concatenate)."""
    dg, du = jax.vjp(_swiglu, *_halves(gu_mf))[1](dh_mf)
    return jnp.concatenate([dg, du], axis=-1)


@jax.custom_vjp
def swiglu_halves(gu_mf):
    """silu(g) * u for gu = [g | u] (one matmul against [gate | up])."""
    return _swiglu(*_halves(gu_mf))


swiglu_halves.defvjp(lambda gu: (swiglu_halves(gu), gu), lambda gu, dh: (swiglu_halves_grad(gu, dh),))
