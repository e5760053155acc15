"""Dense SwiGLU FFN."""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lcflash.model.common import SWIGLU_OUTPUT, normal_param
from lcflash.model.moe import expert_ffn
from lcflash.parallel.context import multi_device


def swiglu(x_btd, w_gate_df, w_up_df, w_down_fd, gmm_impl: str | None = None):
    """gmm_impl: the same FFN as one group of all rows through that grouped-matmul implementation's expert FFN
    (ModelConfig.dense_ffn_gmm), for its fused SwiGLU epilogues."""
    if gmm_impl is not None:
        return _swiglu_one_group(x_btd, w_gate_df, w_up_df, w_down_fd, gmm_impl)
    dtype = x_btd.dtype
    g = jnp.einsum("...d,df->...f", x_btd, w_gate_df.astype(dtype))
    u = jnp.einsum("...d,df->...f", x_btd, w_up_df.astype(dtype))
    h = checkpoint_name(jax.nn.silu(g) * u, SWIGLU_OUTPUT)  # model.remat_keep can keep it
    return jnp.einsum("...f,fd->...d", h, w_down_fd.astype(dtype))


def _swiglu_one_group(x_btd, w_gate_df, w_up_df, w_down_fd, gmm_impl):
    if multi_device():
        raise ValueError("model.dense_ffn_gmm = True runs on one device (the grouped-matmul kernels have no "
                         "sharding rule here); set it False on a multi-device mesh")
    x_md = x_btd.reshape(-1, x_btd.shape[-1])
    y_md = expert_ffn(x_md, jnp.full((1,), x_md.shape[0], jnp.int32), w_gate_df[None], w_up_df[None],
                      w_down_fd[None], gmm_impl, fuse_gate_up=True)
    return y_md.reshape(x_btd.shape).astype(x_btd.dtype)


class MLP(nnx.Module):
    def __init__(self, hidden: int, inner: int, param_dtype, std: float, rngs: nnx.Rngs,
                 gmm_impl: str | None = None):
        self.w_gate = normal_param(rngs, (hidden, inner), ("embed", "mlp"), param_dtype, std)
        self.w_up = normal_param(rngs, (hidden, inner), ("embed", "mlp"), param_dtype, std)
        self.w_down = normal_param(rngs, (inner, hidden), ("mlp", "embed"), param_dtype, std)
        self.gmm_impl = gmm_impl

    def __call__(self, x_btd):
        return swiglu(x_btd, self.w_gate[...], self.w_up[...], self.w_down[...], self.gmm_impl)
