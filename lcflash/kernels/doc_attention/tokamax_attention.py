"""The ecosystem's peer for training attention: tokamax's flash attention (on Hopper, its Pallas Mosaic GPU kernels,
FA3's schedule with two compute warpgroups), `train_attn_impl="tokamax"`.

Packed documents reach it as each row's first visible key, its `Mask(k_start=..., is_causal=True)`; it skips the
blocks before that key, as ours do. That mask is past its public API (`tokamax.dot_product_attention` takes a dense
mask or sequence lengths), so the op is called directly. tokamax is optional (lcflash.kernels.load_tokamax).

Its VJP saves q, k, v, o and the softmax statistics, and a remat policy would recompute its forward for them (and
for o, which the output projection's gradient reads): here they and o are named KERNEL_OUTPUT inside the forward
rule, so the "kernels" policy keeps them, as it keeps the outputs of our kernels.
"""

import functools

import jax
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from lcflash.kernels import KERNEL_OUTPUT, load_tokamax

# tokamax's implementation: "mosaic_gpu" (its kernels) or "xla" (its XLA path, which the CPU tests use where
# tokamax is installed). Read at trace time.
IMPLEMENTATION = "mosaic_gpu"


def _call(q_bthk, k_bshk, v_bshv, first_bt, scale):
    load_tokamax("train_attn_impl 'tokamax'")
    from tokamax._src.ops.attention import api, base

    mask = base.Mask(k_start=None if first_bt is None else first_bt[:, None, :], is_causal=True)
    return api.IMPLEMENTATIONS[IMPLEMENTATION](q_bthk, k_bshk, v_bshv, mask=mask, logits_scale=scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q_bthk, k_bshk, v_bshv, first_bt, scale):
    return _call(q_bthk, k_bshk, v_bshv, first_bt, scale)


def _attention_fwd(q_bthk, k_bshk, v_bshv, first_bt, scale):
    o_bthv, vjp = jax.vjp(lambda q, k, v: _call(q, k, v, first_bt, scale), q_bthk, k_bshk, v_bshv)
    keep = lambda x: checkpoint_name(x, KERNEL_OUTPUT)  # noqa: E731
    return keep(o_bthv), (jax.tree.map(keep, vjp), first_bt)


def _attention_bwd(scale, res, do_bthv):
    vjp, first_bt = res
    return (*vjp(do_bthv), None if first_bt is None else np.zeros(first_bt.shape, jax.dtypes.float0))


_attention.defvjp(_attention_fwd, _attention_bwd)


def doc_attention(q_bthk, k_bshk, v_bshv, first_bt, *, scale: float):
    """Causal attention over packed documents (key j visible to query i iff first_bt[i] <= j <= i; first_bt None:
    plainly causal), per-head q, k [B, T, H, dk] and v [B, T, H, dv]."""
    return _attention(q_bthk, k_bshk, v_bshv, first_bt, float(scale))
