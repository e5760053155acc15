"""Expert parallelism for the MoE branch, inside `jax.shard_map`, as two steps the ScMoE layer places apart.

`dispatch` (right after the first post-attention norm): on every device, route the local tokens, compute the
zero-computation experts in closed form and the routing statistics, and send only the FFN-expert slots to
the devices that hold those experts. `combine` (at the end of the layer): run the local experts on what
arrived, send the results back and sum each token's slots. Between them the layer runs dense FFN 0,
attention 1 and dense FFN 1, which depend on neither, so XLA can overlap the collectives with that compute.

Transport (`ParallelContext.transport`): `all_to_all` (fixed capacity, ep_all_to_all.py) or
`ragged_all_to_all` (dropless, ep_ragged_all_to_all.py). With an expert axis of size 1 there is nothing to
send and each device runs the dropless grouped-matmul path on its own tokens.

Between the two shard_maps, per-device intermediates travel as global arrays whose leading axis is split
over the batch axes; the tensor axis (if any) splits the experts' inner width, and `combine` sums it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lcflash.config import ConfigError, ModelConfig
from lcflash.model.moe import routed_experts, routing_stats
from lcflash.model.router import Routing, route, zero_expert_output
from lcflash.parallel import ep_all_to_all, ep_ragged_all_to_all
from lcflash.parallel.context import ParallelContext


# The ragged collective; None = jax.lax.ragged_all_to_all. Tests swap in
# `ep_ragged_all_to_all.emulated_ragged_all_to_all` to run the dropless offsets on CPU.
RAGGED_ALL_TO_ALL = None


def _ragged_impl(ctx: ParallelContext):
    if RAGGED_ALL_TO_ALL is not None:
        return RAGGED_ALL_TO_ALL
    if ctx.mesh.devices.flat[0].platform == "cpu":
        raise ConfigError("moe.transport = 'ragged_all_to_all' needs GPU devices: XLA:CPU cannot compile "
                          "ragged_all_to_all; use moe.transport = 'all_to_all' (fixed capacity) on CPU")
    return jax.lax.ragged_all_to_all


def _axis(axes: tuple[str, ...]):
    return axes[0] if len(axes) == 1 else axes


def _spec_axes(axes: tuple[str, ...]):
    return None if not axes else _axis(axes)


def transport(ctx: ParallelContext) -> str:
    return "local" if ctx.size("expert") == 1 else ctx.transport


def dispatch(x_btd, w_router, bias, cfg: ModelConfig, ctx: ParallelContext):
    """Returns the in-flight state: a dict of global arrays (leading axis over the batch shards)."""
    bax, eax = ctx.axes("batch"), ctx.axes("expert")
    ep, N = ctx.size("expert"), cfg.n_routed_experts
    B, T, D = x_btd.shape
    nb = ctx.size("batch")
    if B % nb:
        raise ValueError(f"batch {B} is not divisible by the {nb} batch shards (mesh axes {bax})")
    mode = transport(ctx)
    t_local = B // nb * T
    cap = ep_all_to_all.capacity(t_local, cfg.moe_topk, N, ctx.capacity_factor)
    a2a = _ragged_impl(ctx) if mode == "ragged_all_to_all" else None

    def body(x, w_r, b):
        b_local = x.shape[0]
        x_td = x.reshape(-1, D)
        routing = route(x_td, w_r, b, cfg.moe_topk, cfg.routed_scaling_factor, cfg.router_grad_precision,
                        cfg.router_precision)
        out = dict(weights=routing.weights_tk, experts=routing.experts_tk,
                   zero=zero_expert_output(x_td, routing, N).reshape(b_local, T, D),
                   **routing_stats(routing, b_local, cfg.num_experts_total))
        dropped = jnp.zeros((), jnp.float32)
        if mode == "local":
            out["x"] = x_td
        elif mode == "all_to_all":
            out["recv"], out["row"], d = ep_all_to_all.dispatch(x_td, routing.experts_tk, N, cap, _axis(eax))
            dropped = d.astype(jnp.float32)
        elif mode == "ragged_all_to_all":
            out["recv"], (out["order"], counts_se) = ep_ragged_all_to_all.dispatch(
                x_td, routing.experts_tk, N, _axis(eax), ep, a2a)
            out["counts"] = counts_se[None]
        if bax:
            dropped = jax.lax.psum(dropped, _axis(bax))
        return out, dropped

    keys = ["weights", "experts", "zero", "counts_be", "prob_sum_be"]
    keys += {"all_to_all": ["recv", "row"], "ragged_all_to_all": ["recv", "order", "counts"], "local": ["x"]}[mode]
    bspec = P(_spec_axes(bax))
    out, dropped = jax.shard_map(body, mesh=ctx.mesh, in_specs=(bspec, P(), P()),
                                 out_specs=({k: bspec for k in keys}, P()))(x_btd, w_router, bias)
    out["dropped"] = dropped
    return out


def combine(state: dict, w_gate, w_up, w_down, cfg: ModelConfig, ctx: ParallelContext, dtype):
    """Returns (y [B, T, D] in `dtype`, moe stats) from `dispatch`'s state."""
    bax, eax, max_ = ctx.axes("batch"), ctx.axes("expert"), ctx.axes("expert_mlp")
    ep, N = ctx.size("expert"), cfg.n_routed_experts
    mode = transport(ctx)
    K = cfg.moe_topk
    a2a = _ragged_impl(ctx) if mode == "ragged_all_to_all" else None

    def body(st, wg, wu, wd):
        T_l = st["experts"].shape[0]
        if mode == "local":
            routing = Routing(None, st["experts"], st["weights"])
            y_td = routed_experts(st["x"], routing, wg, wu, wd, cfg.gmm_impl, cfg.moe_fuse_gate_up)
        else:
            if mode == "all_to_all":
                cap = st["recv"].shape[0] // N
                y = ep_all_to_all.expert_mlp(st["recv"], wg, wu, wd, ep, cap)
                y_md = ep_all_to_all.combine(y, st["row"], _axis(eax))
            else:
                rstate = (st["order"], st["counts"][0])
                y = ep_ragged_all_to_all.expert_mlp(st["recv"], rstate, wg, wu, wd, _axis(eax), cfg.gmm_impl,
                                                    cfg.moe_fuse_gate_up)
                y_md = ep_ragged_all_to_all.combine(y, rstate, T_l * K, _axis(eax), N // ep, a2a)
            is_ffn = st["experts"].reshape(-1) < N
            w_m = jnp.where(is_ffn, st["weights"].reshape(-1), 0.0)
            y_td = (y_md.astype(jnp.float32) * w_m[:, None]).reshape(T_l, K, -1).sum(axis=1)
        if max_:
            y_td = jax.lax.psum(y_td, _axis(max_))
        return (st["zero"] + y_td.reshape(st["zero"].shape)).astype(dtype)

    bspec = P(_spec_axes(bax))
    keys = [k for k in state if k not in ("counts_be", "prob_sum_be", "dropped")]
    wspec_in = P(_spec_axes(eax), None, _spec_axes(max_))
    wspec_out = P(_spec_axes(eax), _spec_axes(max_), None)
    y = jax.shard_map(body, mesh=ctx.mesh, in_specs=({k: bspec for k in keys}, wspec_in, wspec_in, wspec_out),
                      out_specs=bspec)({k: state[k] for k in keys}, w_gate, w_up, w_down)
    B, T, _ = y.shape
    stats = {"counts_be": state["counts_be"], "prob_sum_be": state["prob_sum_be"],
             "experts_btk": state["experts"].reshape(B, T, K), "weights_btk": state["weights"].reshape(B, T, K),
             "dropped_slots": state["dropped"]}
    return y, stats
