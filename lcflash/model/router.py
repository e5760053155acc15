"""Top-k router over FFN experts and zero-computation experts (reference §3.6).

Softmax in fp32 over all N + Z experts; the correction bias only chooses, the unbiased probabilities weigh,
times `routed_scaling_factor`, not renormalised. Ids < N are FFN experts, ids >= N are identity experts.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from lcflash.model.common import ROUTING_CHOICES


class Routing(NamedTuple):
    probs_te: jax.Array     # fp32 softmax over all experts
    experts_tk: jax.Array   # chosen expert ids (sorted by biased score, highest first)
    weights_tk: jax.Array   # fp32 probs[chosen] * routed_scaling_factor


# model.router_precision -> how the forward, which picks the experts, forms the fp32 logits: "highest" an fp32
# product (on a GPU, fp32 FMA kernels); "bf16_split" one bf16 tensor-core product of the bf16 activations against the
# fp32 weights split into three bf16 parts side by side. Three parts hold all 24 bits of an fp32 value and a
# bf16 x bf16 product is exact in fp32, so only the fp32 accumulation rounds, as in the fp32 product. It needs bf16
# activations (model.dtype "bfloat16"); so does the "bf16_split" backward.
ROUTER_PRECISIONS = ("highest", "bf16_split")


def split_bf16(a):
    """Three bf16 parts whose fp32 sum is the fp32 `a` exactly: each is the next 8 significant bits, cut off by a bit
    mask (a remainder a - hi is exact and has 8 fewer bits). Not by a bf16 round trip: XLA on a GPU drops f32 ->
    bf16 -> f32 convert pairs (excess precision is allowed), which made the remainders a - a = 0 (session 17,
    experiments/HISTORY.md)."""
    parts = []
    for _ in range(2):
        bits = jax.lax.bitcast_convert_type(a, jnp.uint32) & jnp.uint32(0xFFFF0000)
        parts.append(jax.lax.bitcast_convert_type(bits, jnp.float32))
        a = a - parts[-1]
    return [p.astype(jnp.bfloat16) for p in parts + [a]]   # every part is a bf16 value: exact casts


def _sum_thirds(p_tn):
    """[T, 3E] products of the three split parts side by side -> their fp32 sum [T, E], smallest parts first."""
    E = p_tn.shape[1] // 3
    return (p_tn[:, 2 * E:] + p_tn[:, E:2 * E]) + p_tn[:, :E]


def _need_bf16(x_td, field):
    if x_td.dtype != jnp.bfloat16:
        raise ValueError(f"{field}='bf16_split' needs bfloat16 activations, got {x_td.dtype}: set "
                         f"model.dtype='bfloat16' or {field}='highest'")


def _logits(x_td, w_de, precision: str = "highest"):
    if precision == "bf16_split":
        _need_bf16(x_td, "router_precision")
        return _sum_thirds(jnp.einsum("td,dn->tn", x_td, jnp.concatenate(split_bf16(w_de.astype(jnp.float32)), 1),
                                      preferred_element_type=jnp.float32))
    return jnp.einsum("td,de->te", x_td.astype(jnp.float32), w_de.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)


def _algorithm_grads(algorithm, x_td, w_de, g_te):
    """The backward products in fp32 operands with XLA's dot `algorithm` (a precision or an algorithm preset)."""
    dx = jnp.einsum("te,de->td", g_te, w_de.astype(jnp.float32), precision=algorithm)
    dw = jnp.einsum("td,te->de", x_td.astype(jnp.float32), g_te, precision=algorithm)
    return dx, dw


def _split_grads(x_td, w_de, g_te):
    """The backward in one bf16 product each. dw (fp32): the bf16 x against g's three parts, exact products.
    dx (bf16): g1 w1 + g1 w2 + g2 w1, ~16 bits where dx keeps 8, as one product over a 3x longer contraction."""
    _need_bf16(x_td, "router_grad_precision")
    g = split_bf16(g_te)
    dw = _sum_thirds(jnp.einsum("td,tn->dn", x_td, jnp.concatenate(g, 1), preferred_element_type=jnp.float32))
    w = split_bf16(w_de.astype(jnp.float32))
    dx = jnp.einsum("tk,dk->td", jnp.concatenate([g[0], g[0], g[1]], 1), jnp.concatenate([w[0], w[1], w[0]], 1),
                    preferred_element_type=jnp.float32)
    return dx, dw


# model.router_grad_precision -> the router's two backward products: "highest" fp32; "bf16_3x" on tensor cores
# (3 bf16 passes, fp32 accumulation: max rel err 4.2e-6 against fp64 where HIGHEST has 1.5e-6; H200, [16384, 1024]
# x [1024, 192], experiments/bench_router_dot_h200.json) instead of fp32 FMA kernels; "bf16_split" one bf16 product
# each, from split operands.
ROUTER_GRAD_PRECISIONS = {
    "highest": functools.partial(_algorithm_grads, jax.lax.Precision.HIGHEST),
    "bf16_3x": functools.partial(_algorithm_grads, jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3),
    "bf16_split": _split_grads,
}


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _logits_custom(x_td, w_de, precision: str, grad_precision: str):
    return _logits(x_td, w_de, precision)


def _logits_custom_fwd(x_td, w_de, precision, grad_precision):
    return _logits(x_td, w_de, precision), (x_td, w_de)


def _logits_custom_bwd(precision, grad_precision, res, g_te):
    x_td, w_de = res
    dx, dw = ROUTER_GRAD_PRECISIONS[grad_precision](x_td, w_de, g_te)
    return dx.astype(x_td.dtype), dw.astype(w_de.dtype)


_logits_custom.defvjp(_logits_custom_fwd, _logits_custom_bwd)


def router_logits(x_td, w_router_de, grad_precision: str = "highest", precision: str = "highest"):
    """fp32 logits [T, E]; precision picks the forward's product (ROUTER_PRECISIONS), grad_precision the
    backward's (ROUTER_GRAD_PRECISIONS)."""
    if grad_precision == "highest" and precision == "highest":
        return _logits(x_td, w_router_de)
    return _logits_custom(x_td, w_router_de, precision, grad_precision)


def route(x_td, w_router_de, bias_e, top_k: int, scaling: float, grad_precision: str = "highest",
          precision: str = "highest") -> Routing:
    return select_experts(router_logits(x_td, w_router_de, grad_precision, precision), bias_e, top_k, scaling)


# Few tokens (decode) on a GPU: top-k by counting ranks, two small fusions, instead of lax.top_k's sort (a 5 us
# kernel per layer on an H200, experiments/HISTORY.md); the compare matrix is [T, E, E], so only below this many
# elements.
RANK_TOP_K_MAX_ELEMENTS = 1 << 21


def top_k_padded(scores_te, k: int, width: int = 1024):
    """lax.top_k over the scores padded with -inf to `width` columns: XLA on a GPU runs its own TopK kernel from
    1024 columns on and a sort below (the pads are never chosen while k <= E and the scores are finite)."""
    E = scores_te.shape[-1]
    if E >= width:
        return jax.lax.top_k(scores_te, k)[1]
    return jax.lax.top_k(jnp.pad(scores_te, ((0, 0), (0, width - E)), constant_values=-jnp.inf), k)[1]


def top_k_select(scores_te, k: int, values_te):
    """(indices of lax.top_k(scores, k), values_te at them): highest score first, equal scores in index order.
    Counting ranks, the indices and the values are two sums over the same one-hot [T, E, k] (sibling reductions
    XLA can fuse: 57 fewer kernels per decode step with the gather change in lcflash/infer/decode.py); exact, since
    one expert holds each rank."""
    T, E = scores_te.shape
    if T * E * E > RANK_TOP_K_MAX_ELEMENTS:
        # Named so model.remat_keep "routing" can keep it, else run again in the backward pass.
        idx_tk = checkpoint_name(LARGE_TOP_K_IMPLS[LARGE_TOP_K](scores_te, k).astype(jnp.int32), ROUTING_CHOICES)
        return idx_tk, take_chosen(values_te, idx_tk)
    # XLA:CPU (jaxlib 0.10.2 and 0.11.2, default flags) miscompiles the rank count of softmax + bias inside a
    # loop such as the layer scan: two experts get one rank (tests/test_moe.py). CPUs take lax.top_k instead.
    return jax.lax.platform_dependent(scores_te, values_te, cpu=lambda s, v: top_k_sorted(s, k, v),
                                      default=lambda s, v: top_k_by_rank(s, k, v))


def top_k_sorted(scores_te, k: int, values_te):
    """top_k_select by lax.top_k (a sort)."""
    idx_tk = jax.lax.top_k(scores_te, k)[1].astype(jnp.int32)
    return idx_tk, take_chosen(values_te, idx_tk)


def top_k_by_rank(scores_te, k: int, values_te):
    """top_k_select by counting each expert's rank: compares over [T, E, E] summed in one fusion (no sort)."""
    E = scores_te.shape[1]
    e = jnp.arange(E, dtype=jnp.int32)
    a, b = scores_te[:, :, None], scores_te[:, None, :]           # a: the ranked expert, b: every other one
    ahead_tee = (b > a) | ((b == a) & (e[None, None, :] < e[:, None]))
    rank_te = jnp.sum(ahead_tee.astype(jnp.int32), axis=-1)
    hit_tek = rank_te[:, :, None] == jnp.arange(k, dtype=jnp.int32)
    idx_tk = jnp.sum(jnp.where(hit_tek, e[None, :, None], 0), axis=1)
    return idx_tk, jnp.sum(jnp.where(hit_tek, values_te[:, :, None], jnp.zeros((), values_te.dtype)), axis=1)


def top_k_by_argmax(scores_te, k: int):
    """lax.top_k's indices as k passes of argmax, each chosen expert masked out for the next: k reductions, against
    the sort a GPU runs for lax.top_k over [T, E] (LARGE_TOP_K "argmax"). Exact for finite scores: argmax takes the
    lowest index of equal scores, as lax.top_k orders them."""
    e = jnp.arange(scores_te.shape[-1], dtype=jnp.int32)
    taken_te = jnp.zeros(scores_te.shape, bool)
    idx = []
    for _ in range(k):
        i_t = jnp.argmax(jnp.where(taken_te, -jnp.inf, scores_te), axis=-1).astype(jnp.int32)
        taken_te = taken_te | (e == i_t[:, None])
        idx.append(i_t)
    return jnp.stack(idx, axis=-1)


# Many tokens (training): how the indices are found, all exact and in lax.top_k's order. "sort" is lax.top_k (on
# a GPU a sort of the [T, E] scores); "argmax" k argmax passes; "padded" top_k_padded. At 32k tokens x 192 experts,
# top-12, on an H200: 0.235 / 0.138 / 3.115 ms (experiments/bench_rows.py), and argmax took configs/small.py's
# training from 163,459 to 165,326 tokens/s at 32 x 1024, the loss bitwise equal (bench_train.py --top_k).
LARGE_TOP_K = "argmax"
LARGE_TOP_K_IMPLS = {"sort": lambda s, k: jax.lax.top_k(s, k)[1], "argmax": top_k_by_argmax, "padded": top_k_padded}


@jax.custom_vjp
def take_chosen(values_te, idx_tk):
    """values[t, idx[t, k]] whose gradient is an elementwise sum over the k choices instead of take_along_axis'
    scatter-add (0.2 ms per layer for a 16k-token batch on an H200, experiments/HISTORY.md)."""
    return jnp.take_along_axis(values_te, idx_tk, axis=-1)


def _take_chosen_fwd(values_te, idx_tk):
    return take_chosen(values_te, idx_tk), (idx_tk, values_te.shape[-1])


def _take_chosen_bwd(res, g_tk):
    idx_tk, E = res
    hit_tke = idx_tk[:, :, None] == jnp.arange(E, dtype=idx_tk.dtype)
    return jnp.sum(jnp.where(hit_tke, g_tk[:, :, None], jnp.zeros((), g_tk.dtype)), axis=1), None


take_chosen.defvjp(_take_chosen_fwd, _take_chosen_bwd)


def select_experts(logits_te, bias_e, top_k: int, scaling: float) -> Routing:
    """Routing from fp32 router logits (split from `route` so the decode path can keep its own weight layout)."""
    probs_te = jax.nn.softmax(logits_te, axis=-1)
    experts_tk, chosen_tk = top_k_select(probs_te + jax.lax.stop_gradient(bias_e.astype(jnp.float32)), top_k,
                                         probs_te)
    return Routing(probs_te, experts_tk, chosen_tk * scaling)


def zero_expert_output(x_td, routing: Routing, n_ffn: int):
    """Identity experts in closed form: (sum of their weights) * x, computed locally, never dispatched."""
    w_zero_t = jnp.sum(jnp.where(routing.experts_tk >= n_ffn, routing.weights_tk, 0.0), axis=-1)
    return (w_zero_t[:, None] * x_td.astype(jnp.float32))
