"""Dense SwiGLU FFN."""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lcflash.model.common import SWIGLU_OUTPUT, normal_param


def swiglu(x_btd, w_gate_df, w_up_df, w_down_fd):
    dtype = x_btd.dtype
    g = jnp.einsum("...d,df->...f", x_btd, w_gate_df.astype(dtype))
    u = jnp.einsum("...d,df->...f", x_btd, w_up_df.astype(dtype))
    h = checkpoint_name(jax.nn.silu(g) * u, SWIGLU_OUTPUT)  # model.remat_keep can keep it
    return jnp.einsum("...f,fd->...d", h, w_down_fd.astype(dtype))


class MLP(nnx.Module):
    def __init__(self, hidden: int, inner: int, param_dtype, std: float, rngs: nnx.Rngs):
        self.w_gate = normal_param(rngs, (hidden, inner), ("embed", "mlp"), param_dtype, std)
        self.w_up = normal_param(rngs, (hidden, inner), ("embed", "mlp"), param_dtype, std)
        self.w_down = normal_param(rngs, (inner, hidden), ("mlp", "embed"), param_dtype, std)

    def __call__(self, x_btd):
        return swiglu(x_btd, self.w_gate[...], self.w_up[...], self.w_down[...])
