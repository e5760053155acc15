"""The dense SwiGLU FFN of a decode step on the raw residual stream: one switch, two implementations.

`decode_mlp(x [M, D], w_gate_up_normed [2F, D], w_down [D, F], eps=...)` returns w_down . (silu(g) * u) with
[g | u] = (w_gate_up_normed . x) / rms(x), where w_gate_up_normed is the gate|up rows times the FFN's norm weight
(`fold_norm`): the same map as the model's `swiglu(rms_norm(x, w))`, with the norm weight rounded into the rows
instead of into the normed vector.

* "xla": plain JAX; runs anywhere.
* "pallas": one Mosaic GPU kernel with a grid barrier (`pallas_mgpu`); Hopper GPUs, bf16/fp16, M <= 64.
"""

import jax
import jax.numpy as jnp

IMPLS = ("xla", "pallas")


def fold_norm(w_gate_up, norm_w):
    """The gate|up rows [2F, D] times the FFN's norm weight [D] along D (fp32 product, stored in the rows' dtype)."""
    return (w_gate_up.astype(jnp.float32) * norm_w.astype(jnp.float32)[None, :]).astype(w_gate_up.dtype)


def decode_mlp_reference(x_md, w_gate_up_normed, w_down, eps: float):
    """The kernel's arithmetic in JAX: products with fp32 accumulation, each result rounded to x's dtype."""
    dtype = x_md.dtype
    F = w_down.shape[1]
    xf = x_md.astype(jnp.float32)
    r = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    gu = jnp.einsum("md,fd->mf", x_md, w_gate_up_normed.astype(dtype), preferred_element_type=jnp.float32)
    gu = (gu * r).astype(dtype)
    h = jax.nn.silu(gu[:, :F]) * gu[:, F:]
    return jnp.einsum("mf,df->md", h, w_down.astype(dtype), preferred_element_type=jnp.float32).astype(dtype)


def decode_mlp(x_md, w_gate_up_normed, w_down, *, eps: float, impl: str = "xla"):
    if impl not in IMPLS:
        raise ValueError(f"decode_mlp impl {impl!r} is not one of {IMPLS}")
    if impl == "xla":
        return decode_mlp_reference(x_md, w_gate_up_normed, w_down, eps)
    from lcflash.kernels.decode_mlp import pallas_mgpu   # imports Mosaic GPU only when asked for

    return pallas_mgpu.decode_mlp_pallas(x_md, w_gate_up_normed, w_down, eps=eps)
