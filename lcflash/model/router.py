"""Top-k router over FFN experts and zero-computation experts (reference §3.6).

Softmax in fp32 over all N + Z experts; the correction bias only chooses, the unbiased probabilities weigh,
times `routed_scaling_factor`, not renormalised. Ids < N are FFN experts, ids >= N are identity experts.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
    probs_te: jax.Array     # fp32 softmax over all experts
    experts_tk: jax.Array   # chosen expert ids (sorted by biased score, highest first)
    weights_tk: jax.Array   # fp32 probs[chosen] * routed_scaling_factor


def route(x_td, w_router_de, bias_e, top_k: int, scaling: float) -> Routing:
    logits_te = jnp.einsum("td,de->te", x_td.astype(jnp.float32), w_router_de.astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)
    return select_experts(logits_te, bias_e, top_k, scaling)


def select_experts(logits_te, bias_e, top_k: int, scaling: float) -> Routing:
    """Routing from fp32 router logits (split from `route` so the decode path can keep its own weight layout)."""
    probs_te = jax.nn.softmax(logits_te, axis=-1)
    _, experts_tk = jax.lax.top_k(probs_te + jax.lax.stop_gradient(bias_e.astype(jnp.float32)), top_k)
    weights_tk = jnp.take_along_axis(probs_te, experts_tk, axis=-1) * scaling
    return Routing(probs_te, experts_tk, weights_tk)


def zero_expert_output(x_td, routing: Routing, n_ffn: int):
    """Identity experts in closed form: (sum of their weights) * x, computed locally, never dispatched."""
    w_zero_t = jnp.sum(jnp.where(routing.experts_tk >= n_ffn, routing.weights_tk, 0.0), axis=-1)
    return (w_zero_t[:, None] * x_td.astype(jnp.float32))
