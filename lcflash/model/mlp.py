"""Dense SwiGLU FFN."""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lcflash.kernels import on_hopper
from lcflash.model.common import SWIGLU_OUTPUT, normal_param


def swiglu(x_btd, w_gate_df, w_up_df, w_down_fd, impl: str = "xla"):
    """impl (ModelConfig.dense_ffn_impl): "pallas" runs SwiGLU and its backward in our kernels' epilogues
    (lcflash/kernels/gmm/dense_ffn.py) where they take the operands; "auto" does so on a Hopper GPU."""
    dtype = x_btd.dtype
    if impl == "pallas" or (impl == "auto" and on_hopper()):
        from lcflash.kernels.gmm import dense_ffn

        x_td = x_btd.reshape(-1, x_btd.shape[-1])
        w_gu = jnp.concatenate([w_gate_df, w_up_df], axis=-1).astype(dtype)
        if dense_ffn.supports(x_td, w_gu, w_down_fd):
            y_td = dense_ffn.swiglu_ffn(x_td, w_gu, w_down_fd.astype(dtype), h_names=(SWIGLU_OUTPUT,))
            return y_td.reshape(x_btd.shape)
    g = jnp.einsum("...d,df->...f", x_btd, w_gate_df.astype(dtype))
    u = jnp.einsum("...d,df->...f", x_btd, w_up_df.astype(dtype))
    h = checkpoint_name(jax.nn.silu(g) * u, SWIGLU_OUTPUT)  # model.remat_keep can keep it
    return jnp.einsum("...f,fd->...d", h, w_down_fd.astype(dtype))


class MLP(nnx.Module):
    def __init__(self, hidden: int, inner: int, param_dtype, std: float, rngs: nnx.Rngs, impl: str = "xla"):
        self.w_gate = normal_param(rngs, (hidden, inner), ("embed", "mlp"), param_dtype, std)
        self.w_up = normal_param(rngs, (hidden, inner), ("embed", "mlp"), param_dtype, std)
        self.w_down = normal_param(rngs, (inner, hidden), ("mlp", "embed"), param_dtype, std)
        self.impl = impl

    def __call__(self, x_btd):
        return swiglu(x_btd, self.w_gate[...], self.w_up[...], self.w_down[...], self.impl)
