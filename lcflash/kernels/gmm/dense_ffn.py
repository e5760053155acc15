"""The dense SwiGLU FFN with SwiGLU and its backward in our rows kernels' epilogues (model.dense_ffn_impl="pallas").

XLA computes silu(g) * u and its backward as separate passes over [T, F] arrays between cuBLAS matmuls (at 32 x
1024 tokens on an H200: ~100 us forward and ~190 us backward per FFN, 24 FFNs per step). Here the two matmuls whose
outputs feed them run in our grouped-matmul kernels with one group: x @ [w_gate | w_up] stores h (and [g | u] for
the backward), and the down projection's d_lhs stores [d_g | d_u]. The other three products stay with XLA (cuBLAS).
"""

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from lcflash.kernels import KERNEL_OUTPUT
from lcflash.kernels.gmm import pallas_gmm


def supports(x_td, w_gu_df2, w_down_fd) -> bool:
    """Whether the kernels take these operands: bf16/fp16, widths multiples of 128, at least a 128-row tile."""
    if x_td.ndim != 2 or w_gu_df2.ndim != 2 or w_down_fd.ndim != 2:
        return False
    sd = lambda *shape: jax.ShapeDtypeStruct(shape, x_td.dtype)  # noqa: E731
    (t, d), (f2, f) = x_td.shape, (w_gu_df2.shape[1], w_down_fd.shape[0])
    return (t >= 128 and f2 == 2 * f and f2 % 256 == 0 and w_gu_df2.dtype == x_td.dtype
            and pallas_gmm.supports(x_td, sd(1, d, f2)) and pallas_gmm.supports(sd(t, f), sd(1, f, d)))


def _one_group(x_td):
    return jnp.full((1,), x_td.shape[0], jnp.int32)


def _forward(x_td, w_gu_df2, w_down_fd):
    h, gu = pallas_gmm.rows_matmul(x_td, [w_gu_df2[None]], _one_group(x_td), swiglu="halves", chain=True)
    return jnp.dot(h, w_down_fd), h, gu


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _swiglu_ffn(x_td, w_gu_df2, w_down_fd, h_names):
    return _forward(x_td, w_gu_df2, w_down_fd)[0]


def _swiglu_ffn_fwd(x_td, w_gu_df2, w_down_fd, h_names):
    y, h, gu = _forward(x_td, w_gu_df2, w_down_fd)
    h, gu = (checkpoint_name(a, KERNEL_OUTPUT) for a in (h, gu))
    for name in h_names:
        h = checkpoint_name(h, name)
    return y, (x_td, w_gu_df2, w_down_fd, h, gu)


def _swiglu_ffn_bwd(h_names, res, dy_td):
    x_td, w_gu_df2, w_down_fd, h, gu = res
    dy_td = dy_td.astype(x_td.dtype)
    d_gu = pallas_gmm.rows_matmul(dy_td, [w_down_fd[None]], _one_group(x_td), transpose_rhs=True,
                                  swiglu="grad_halves", gu_mn2=gu, chain=True)
    return d_gu @ w_gu_df2.T, x_td.T @ d_gu, h.T @ dy_td


_swiglu_ffn.defvjp(_swiglu_ffn_fwd, _swiglu_ffn_bwd)


def swiglu_ffn(x_td, w_gu_df2, w_down_fd, h_names: tuple[str, ...] = ()):
    """silu(x @ w_gate) * (x @ w_up) @ w_down for w_gu = [w_gate | w_up] [D, 2F], all in x's dtype. h_names:
    checkpoint names for h (a remat policy's keep list)."""
    if not supports(x_td, w_gu_df2, w_down_fd):
        raise ValueError(f"dense_ffn: want bf16/fp16 x [T >= 128, D], w_gu [D, 2F], w_down [F, D] with D and F "
                         f"multiples of 128; got {x_td.dtype} {x_td.shape}, {w_gu_df2.shape}, {w_down_fd.shape}")
    return _swiglu_ffn(x_td, w_gu_df2, w_down_fd, tuple(h_names))
