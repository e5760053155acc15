"""The MoE branch of a ScMoE layer: router, zero-computation experts and dropless routed FFN experts.

Routed experts sort the token slots by expert (lcflash/model/slots.py) and run grouped matmuls
(`lcflash.kernels.gmm`); slots that chose a zero expert sort past every group, so they never take a place in
expert work. `moe_reference` is the per-expert loop the dropless path is tested against.

`dispatch` and `combine` split the branch so the ScMoE layer can run its dense path in between. Inside a
`lcflash.parallel` context they run expert-parallel under `shard_map` (lcflash/parallel/expert_parallel.py);
without one, the single-device dropless path below runs unchanged.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lcflash.config import ModelConfig
from lcflash.kernels import COMPUTE_WEIGHTS
from lcflash.kernels.gmm import gmm, gmm_swiglu_ffn, reads_groups_only
from lcflash.model.common import DISPATCH_ROWS, ROUTING_CHOICES, SWIGLU_OUTPUT, RouterBias, normal_param
from lcflash.model.router import Routing, route, zero_expert_output
from lcflash.model.slots import combine_rows, dispatch_rows, sort_slots
from lcflash.parallel.context import current as parallel_context


def expert_ffn(x_md, group_sizes_g, w_gate_gdf, w_up_gdf, w_down_gfd, impl: str, fuse_gate_up: bool = False,
               zero_tail: bool = True):
    """SwiGLU of each row with its group's expert; rows past sum(group_sizes) give zeros, or with zero_tail=False
    (for callers that read only the groups' rows) undefined values, and so does their gradient: our kernels skip
    storing those rows (the zero-expert slots: a third of the [T·K] row buffers at 8 FFN experts of 12 per token).

    fuse_gate_up: one grouped matmul against [gate | up] (the weights concatenated per step, then cast): the rows
    are read once, the backward has one d_lhs product instead of two plus their sum, and our kernels apply SwiGLU
    before the store and its backward in the down projection's d_lhs kernel (no pass over [g | u] either way;
    kernels.gmm.gmm_swiglu_ffn). Same products."""
    dtype = x_md.dtype

    def cast(w):  # named so the "dots" remat policy keeps it (lcflash/model/common.py)
        return checkpoint_name(w.astype(dtype), COMPUTE_WEIGHTS)

    if fuse_gate_up:  # h named so model.remat_keep can keep it (the epilogue's h is a kernel output too)
        w_gu = cast(jnp.concatenate([w_gate_gdf, w_up_gdf], axis=-1))
        return gmm_swiglu_ffn(x_md, w_gu, cast(w_down_gfd), group_sizes_g, impl=impl, zero_tail=zero_tail,
                              h_names=(SWIGLU_OUTPUT,))
    g = gmm(x_md, cast(w_gate_gdf), group_sizes_g, impl=impl)
    u = gmm(x_md, cast(w_up_gdf), group_sizes_g, impl=impl)
    h = checkpoint_name(jax.nn.silu(g) * u, SWIGLU_OUTPUT)
    return gmm(h, cast(w_down_gfd), group_sizes_g, impl=impl, zero_tail=zero_tail)


def routed_experts(x_td, routing: Routing, w_gate, w_up, w_down, impl: str, fuse_gate_up: bool = False,
                   out_dtype=None):
    """Dropless FFN-expert output [T, D] in fp32 (exact for any routing, empty experts included). out_dtype: the
    dtype the caller casts it to, if any (slots.combine_rows)."""
    # Named so model.remat_keep "routing" can keep it: a sort of T*K keys, else done again in the backward pass.
    slots = jax.tree.map(lambda a: checkpoint_name(a, ROUTING_CHOICES), sort_slots(routing.experts_tk, w_gate.shape[0]))
    # Whether the grouped matmuls read no row past the groups (then the row gathers may leave them unwritten).
    M, dt = x_td.shape[0] * routing.experts_tk.shape[1], x_td.dtype
    tail_unread = all(reads_groups_only(impl, jax.ShapeDtypeStruct((M, w.shape[1]), dt),
                                        jax.ShapeDtypeStruct(w.shape, dt)) for w in (w_gate, w_down))
    x_md = checkpoint_name(dispatch_rows(x_td, slots, tail_unread), DISPATCH_ROWS)  # model.remat_keep can keep it
    # combine_rows reads only the FFN rows (and selects, never multiplies, past them): no zero tail needed.
    y_md = expert_ffn(x_md, slots.group_sizes_g, w_gate, w_up, w_down, impl, fuse_gate_up, zero_tail=False)
    return combine_rows(y_md, jnp.where(slots.ffn_tk, routing.weights_tk, 0.0), slots, out_dtype, tail_unread)


def moe_reference(x_td, routing: Routing, w_gate, w_up, w_down):
    """Per-expert loop over all tokens; FFN experts plus zero experts, fp32 accumulation."""
    n_ffn = w_gate.shape[0]
    y = zero_expert_output(x_td, routing, n_ffn)
    for e in range(n_ffn):
        w_t = jnp.sum(jnp.where(routing.experts_tk == e, routing.weights_tk, 0.0), axis=-1)
        h = jax.nn.silu(x_td @ w_gate[e].astype(x_td.dtype)) * (x_td @ w_up[e].astype(x_td.dtype))
        y = y + w_t[:, None] * (h @ w_down[e].astype(x_td.dtype)).astype(jnp.float32)
    return y


def routing_stats(routing: Routing, batch: int, n_total: int):
    """Per-sequence expert counts and summed probabilities [B, N+Z], for the losses and the bias controller."""
    T = routing.probs_te.shape[0]
    # A compare-and-count that XLA fuses into one reduction, not a scatter-add (atomics into N+Z bins).
    e_bs = routing.experts_tk.reshape(batch, -1)
    counts_be = jnp.sum(e_bs[..., None] == jnp.arange(n_total, dtype=e_bs.dtype), axis=1, dtype=jnp.float32)
    prob_sum_be = routing.probs_te.reshape(batch, T // batch, n_total).sum(axis=1)
    return {"counts_be": counts_be, "prob_sum_be": prob_sum_be}


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, N, I, pd, std = (cfg.hidden_size, cfg.n_routed_experts, cfg.expert_ffn_hidden_size,
                            cfg.jnp_param_dtype, cfg.initializer_range)
        self.cfg = cfg
        # The router stays in fp32 whatever the parameter dtype (HF keeps `classifier.weight` in fp32).
        self.w_router = normal_param(rngs, (D, cfg.num_experts_total), ("embed", "router"), jnp.float32, std)
        self.bias = RouterBias(jnp.zeros((cfg.num_experts_total,), jnp.float32), logical_axes=("router",))
        self.w_gate = normal_param(rngs, (N, D, I), ("expert", "embed", "expert_mlp"), pd, std)
        self.w_up = normal_param(rngs, (N, D, I), ("expert", "embed", "expert_mlp"), pd, std)
        self.w_down = normal_param(rngs, (N, I, D), ("expert", "expert_mlp", "embed"), pd, std)

    def router(self, x_td) -> Routing:
        return route(x_td, self.w_router[...], self.bias[...], self.cfg.moe_topk, self.cfg.routed_scaling_factor,
                     self.cfg.router_grad_precision, self.cfg.router_precision)

    def dispatch(self, x_btd, reference: bool = False):
        """Routes and (expert-parallel) sends the FFN-expert slots; `combine` finishes. The reference loop and
        the single-device path only route here."""
        ctx = parallel_context()
        if ctx is not None and not reference:
            from lcflash.parallel import expert_parallel

            return ("ep", x_btd.dtype, expert_parallel.dispatch(x_btd, self.w_router[...], self.bias[...],
                                                                self.cfg, ctx))
        B, T, D = x_btd.shape
        x_td = x_btd.reshape(B * T, D)
        return ("local", x_btd, self.router(x_td), reference)

    def combine(self, pending):
        """Returns (MoE output [B, T, D], stats) for what `dispatch` returned."""
        if pending[0] == "ep":
            from lcflash.parallel import expert_parallel

            _, dtype, state = pending
            return expert_parallel.combine(state, self.w_gate[...], self.w_up[...], self.w_down[...], self.cfg,
                                           parallel_context(), dtype)
        _, x_btd, routing, reference = pending
        B, T, D = x_btd.shape
        x_td = x_btd.reshape(B * T, D)
        if reference:
            y_td = moe_reference(x_td, routing, self.w_gate[...], self.w_up[...], self.w_down[...])
        else:
            y_td = zero_expert_output(x_td, routing, self.cfg.n_routed_experts) + routed_experts(
                x_td, routing, self.w_gate[...], self.w_up[...], self.w_down[...], self.cfg.gmm_impl,
                self.cfg.moe_fuse_gate_up, out_dtype=x_btd.dtype)
        stats = routing_stats(routing, B, self.cfg.num_experts_total)
        stats["experts_btk"] = routing.experts_tk.reshape(B, T, -1)
        stats["weights_btk"] = routing.weights_tk.reshape(B, T, -1)
        stats["dropped_slots"] = jnp.zeros((), jnp.float32)
        return y_td.astype(x_btd.dtype).reshape(B, T, D), stats

    def __call__(self, x_btd, reference: bool = False):
        return self.combine(self.dispatch(x_btd, reference))
