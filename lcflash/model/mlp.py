"""Dense SwiGLU FFN."""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lcflash.config import DENSE_FFN_IMPLS
from lcflash.kernels import on_hopper
from lcflash.model.common import SWIGLU_OUTPUT, normal_param
from lcflash.parallel.context import multi_device

# "auto" takes our kernels from this many rows (tokens) up: training and prefill; decode steps stay on XLA.
KERNEL_MIN_ROWS = 1024


def swiglu(x_btd, w_gate_df, w_up_df, w_down_fd, impl: str = "xla"):
    """impl (model.dense_ffn_impl): "xla", "pallas" (lcflash.kernels.gmm.pallas_gmm.dense_swiglu_ffn: SwiGLU and
    its backward in our kernels' epilogues, the other products cuBLAS; one device) or "auto" (resolve_impl)."""
    dtype = x_btd.dtype
    if resolve_impl(impl, x_btd, w_gate_df) == "pallas":
        from lcflash.kernels.gmm import pallas_gmm

        w_gu = jnp.concatenate([w_gate_df, w_up_df], axis=-1).astype(dtype)
        y_md = pallas_gmm.dense_swiglu_ffn(x_btd.reshape(-1, x_btd.shape[-1]), w_gu, w_down_fd.astype(dtype),
                                           h_names=(SWIGLU_OUTPUT,))
        return y_md.reshape(x_btd.shape)
    g = jnp.einsum("...d,df->...f", x_btd, w_gate_df.astype(dtype))
    u = jnp.einsum("...d,df->...f", x_btd, w_up_df.astype(dtype))
    h = checkpoint_name(jax.nn.silu(g) * u, SWIGLU_OUTPUT)  # model.remat_keep can keep it
    return jnp.einsum("...f,fd->...d", h, w_down_fd.astype(dtype))


def resolve_impl(impl: str, x_btd, w_gate_df, backend: str | None = None,
                 compute_capability: str | None = None) -> str:
    """"auto": "pallas" on one Hopper GPU for bf16/fp16 inputs of at least KERNEL_MIN_ROWS rows whose widths the
    kernels take, else "xla". backend and compute_capability: those of the default device unless given (tests)."""
    if impl not in DENSE_FFN_IMPLS:
        raise ValueError(f"dense_ffn_impl {impl!r}: must be one of {DENSE_FFN_IMPLS}")
    if impl != "auto":
        if impl == "pallas" and multi_device():
            raise ValueError("dense_ffn_impl 'pallas' runs on one device (its kernels have no sharding rule); use "
                             "'auto' or 'xla' on a multi-device mesh")
        return impl
    from lcflash.kernels.gmm.pallas_gmm import dense_supported

    rows = x_btd.size // x_btd.shape[-1]
    d, f = w_gate_df.shape
    sd = lambda *s: jax.ShapeDtypeStruct(s, x_btd.dtype)  # noqa: E731
    if (rows >= KERNEL_MIN_ROWS and on_hopper(backend, compute_capability) and not multi_device()
            and dense_supported(sd(rows, d), sd(d, 2 * f), sd(f, d)) is None):
        return "pallas"
    return "xla"


class MLP(nnx.Module):
    def __init__(self, hidden: int, inner: int, param_dtype, std: float, rngs: nnx.Rngs, impl: str = "xla"):
        self.w_gate = normal_param(rngs, (hidden, inner), ("embed", "mlp"), param_dtype, std)
        self.w_up = normal_param(rngs, (hidden, inner), ("embed", "mlp"), param_dtype, std)
        self.w_down = normal_param(rngs, (inner, hidden), ("mlp", "embed"), param_dtype, std)
        self.impl = impl

    def __call__(self, x_btd):
        return swiglu(x_btd, self.w_gate[...], self.w_up[...], self.w_down[...], self.impl)
