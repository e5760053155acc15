"""Fixed-capacity expert-parallel transport: one dense `all_to_all` out, one back (works on every backend).

Per device, each FFN expert gets `cap` slots for this device's tokens. A token slot's place among its expert's
slots is its rank in token order; slots past `cap` are dropped (counted, their output is zero). Experts are
contiguous per device (expert e lives on EP rank e // n_local), the grouping the device-level LB loss uses.
All functions run per device inside `shard_map`.
"""

import math

import jax
import jax.numpy as jnp


def capacity(local_tokens: int, top_k: int, n_experts: int, factor: float) -> int:
    """Slots per (source device, expert); local_tokens never drops since a token picks an expert once."""
    return max(1, min(local_tokens, math.ceil(factor * local_tokens * top_k / n_experts)))


def slot_ranks(experts_tk, n_experts: int):
    """Expert of each slot (n_experts for zero experts), its rank among its expert's slots, group sizes."""
    e_m = jnp.where(experts_tk < n_experts, experts_tk, n_experts).reshape(-1)
    order_m = jnp.argsort(e_m, stable=True)
    sizes = jnp.bincount(e_m, length=n_experts + 1).astype(jnp.int32)
    starts = jnp.cumsum(sizes) - sizes
    rank_sorted = jnp.arange(e_m.shape[0], dtype=jnp.int32) - starts[e_m[order_m]]
    rank_m = jnp.zeros_like(rank_sorted).at[order_m].set(rank_sorted, unique_indices=True)
    return e_m, order_m, sizes[:n_experts], starts[:n_experts], rank_m


def dispatch(x_td, experts_tk, n_experts: int, cap: int, axis):
    """Sends each kept slot's token to its expert's device.

    Returns (recv [ep * n_local * cap, D] ordered (source, local expert, slot), row_m [T*K] index of each slot's
    result in the returned buffer (n_experts * cap = dropped or zero expert), dropped slot count).
    """
    T, K = experts_tk.shape
    e_m, order_m, sizes_e, starts_e, rank_m = slot_ranks(experts_tk, n_experts)
    c = jnp.arange(cap, dtype=jnp.int32)
    src_ec = jnp.minimum(starts_e[:, None] + c[None, :], T * K - 1)
    valid_ec = c[None, :] < sizes_e[:, None]
    send_ecd = jnp.where(valid_ec[..., None], x_td[order_m[src_ec] // K], 0).astype(x_td.dtype)
    recv = jax.lax.all_to_all(send_ecd.reshape(n_experts * cap, -1), axis, 0, 0, tiled=True)
    kept_m = (e_m < n_experts) & (rank_m < cap)
    row_m = jnp.where(kept_m, e_m * cap + rank_m, n_experts * cap)
    dropped = jnp.sum(jnp.maximum(sizes_e - cap, 0))
    return recv, row_m, dropped


def expert_mlp(recv_md, w_gate_ndf, w_up_ndf, w_down_nfd, ep: int, cap: int):
    """SwiGLU of the received slots with this device's experts: one batched matmul per weight (empty slots are 0)."""
    n_local, D = w_gate_ndf.shape[0], recv_md.shape[-1]
    dtype = recv_md.dtype
    x_nmd = recv_md.reshape(ep, n_local, cap, D).transpose(1, 0, 2, 3).reshape(n_local, ep * cap, D)
    g = jnp.einsum("nmd,ndf->nmf", x_nmd, w_gate_ndf.astype(dtype))
    u = jnp.einsum("nmd,ndf->nmf", x_nmd, w_up_ndf.astype(dtype))
    y_nmd = jnp.einsum("nmf,nfd->nmd", jax.nn.silu(g) * u, w_down_nfd.astype(dtype))
    return y_nmd.reshape(n_local, ep, cap, D).transpose(1, 0, 2, 3).reshape(ep * n_local * cap, D)


def combine(y_md, row_m, axis):
    """Returns each slot's expert output [T*K, D] (zero for dropped and zero-expert slots)."""
    back = jax.lax.all_to_all(y_md, axis, 0, 0, tiled=True)
    back = jnp.concatenate([back, jnp.zeros((1, back.shape[-1]), back.dtype)])
    return back[row_m]
