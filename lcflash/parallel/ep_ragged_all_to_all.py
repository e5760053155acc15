"""Dropless expert-parallel transport over `jax.lax.ragged_all_to_all` (GPU: XLA:CPU cannot compile it).

Every device sorts its slots by expert and sends one ragged slice per expert. Offsets come from the global
slot-count matrix G [ep, n_experts] (one small all_gather), chosen so that each receiver's buffer is already
grouped by local expert (then by source): the expert FFN is one grouped matmul, no second sort. The return trip
is the same exchange with the roles swapped. Experts are contiguous per device (expert e on rank e // n_local).

The receive buffer holds the worst case, ep * local_tokens * min(top_k, n_local) rows, which is what dropless
needs with static shapes; `lcflash.plan` counts it. All functions run per device inside `shard_map`.
"""

import jax
import jax.numpy as jnp

from lcflash.model.moe import expert_ffn


def _excl_cumsum(x, axis=-1):
    return jnp.cumsum(x, axis=axis) - x


def recv_rows(ep: int, local_tokens: int, top_k: int, n_local: int) -> int:
    return ep * local_tokens * min(top_k, n_local)


class Plan:
    """Offsets of both exchanges, from the slot-count matrix G [ep, n_experts] and this device's EP rank."""

    def __init__(self, counts_se, me, n_local: int):
        ep, n = counts_se.shape
        mine = jax.lax.dynamic_slice_in_dim(counts_se, me * n_local, n_local, axis=1)  # [ep, n_local]
        total_e = counts_se.sum(axis=0)
        start_e = _excl_cumsum(total_e.reshape(ep, n_local)).reshape(n)        # expert start on its device
        before_se = _excl_cumsum(counts_se, axis=0)                              # rows from lower sources
        my_start = jax.lax.dynamic_slice_in_dim(start_e, me * n_local, n_local)  # [n_local]
        # outbound: slice e of my sorted slots -> expert e's device, after the lower sources' rows
        self.send_in_offsets = _excl_cumsum(counts_se[me])
        self.send_sizes = counts_se[me]
        self.send_out_offsets = start_e + before_se[me]
        self.recv_sizes = mine.reshape(-1)                                       # index s * n_local + j
        # return trip: slice (s, j) of my buffer -> source s, where it sorted expert me * n_local + j
        self.back_in_offsets = (my_start[None, :] + jax.lax.dynamic_slice_in_dim(before_se, me * n_local, n_local, 1)
                                ).reshape(-1)
        self.back_sizes = self.recv_sizes
        self.back_out_offsets = jax.lax.dynamic_slice_in_dim(_excl_cumsum(counts_se), me * n_local, n_local,
                                                             1).reshape(-1)
        self.back_recv_sizes = self.send_sizes
        self.group_sizes = jax.lax.dynamic_slice_in_dim(total_e, me * n_local, n_local).astype(jnp.int32)


def dispatch(x_td, experts_tk, n_experts: int, axis, ep: int, ragged_all_to_all=jax.lax.ragged_all_to_all):
    """Returns (recv [R, D] grouped by local expert, (order_m, counts_se)). `ragged_all_to_all` is swappable
    so the offset logic can be tested where the primitive does not compile."""
    T, K = experts_tk.shape
    n_local = n_experts // ep
    e_m = jnp.where(experts_tk < n_experts, experts_tk, n_experts).reshape(-1)
    order_m = jnp.argsort(e_m, stable=True)
    sizes_e = jnp.bincount(e_m, length=n_experts + 1)[:n_experts].astype(jnp.int32)
    counts_se = jax.lax.all_gather(sizes_e, axis)
    plan = Plan(counts_se, jax.lax.axis_index(axis), n_local)
    x_md = x_td[order_m // K]
    out = jnp.zeros((recv_rows(ep, T, K, n_local), x_td.shape[-1]), x_td.dtype)
    recv = ragged_all_to_all(x_md, out, plan.send_in_offsets, plan.send_sizes, plan.send_out_offsets,
                             plan.recv_sizes, axis_name=axis)
    return recv, (order_m, counts_se)


def expert_mlp(recv_md, state, w_gate_ndf, w_up_ndf, w_down_nfd, axis, impl: str, fuse_gate_up: bool = False):
    """Grouped SwiGLU over the received rows (rows past the last group come back zero)."""
    _, counts_se = state
    plan = Plan(counts_se, jax.lax.axis_index(axis), w_gate_ndf.shape[0])
    return expert_ffn(recv_md, plan.group_sizes, w_gate_ndf, w_up_ndf, w_down_nfd, impl, fuse_gate_up)


def combine(y_md, state, n_slots: int, axis, n_local: int, ragged_all_to_all=jax.lax.ragged_all_to_all):
    """Returns each slot's expert output [T*K, D] in slot order (zero for zero-expert slots)."""
    order_m, counts_se = state
    plan = Plan(counts_se, jax.lax.axis_index(axis), n_local)
    out = jnp.zeros((n_slots, y_md.shape[-1]), y_md.dtype)
    back = ragged_all_to_all(y_md, out, plan.back_in_offsets, plan.back_sizes, plan.back_out_offsets,
                             plan.back_recv_sizes, axis_name=axis)
    return jnp.zeros_like(back).at[order_m].set(back, unique_indices=True)


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
    """`ragged_all_to_all`'s documented semantics from a dense `all_to_all` (every slice padded to the operand
    length). For testing the offset logic on CPU only: it moves n_slices * len(operand) rows."""
    m = operand.shape[0]
    r = jnp.arange(m)
    idx = jnp.minimum(input_offsets[:, None] + r[None, :], m - 1)
    chunks = jnp.where((r[None, :] < send_sizes[:, None])[..., None], operand[idx], 0)
    chunks = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=True)
    out_off = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
    rows = jnp.where(r[None, :] < recv_sizes[:, None], out_off[:, None] + r[None, :], output.shape[0])
    return output.at[rows.reshape(-1)].set(chunks.reshape(-1, *operand.shape[1:]), mode="drop")
