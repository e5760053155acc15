"""LongCat-Flash's training losses (reference §7.2, §7.4), as pure functions of arrays.

Each returns a scalar in fp32; the train step weights and logs each one on its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits_btv, targets_bt):
    """Negative log-likelihood of each target under fp32 logits [B, T]."""
    logits = logits_btv.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    return logz - jnp.take_along_axis(logits, targets_bt[..., None], axis=-1)[..., 0]


def cross_entropy(logits_btv, targets_bt, mask_bt, count=None):
    """Mean next-token NLL over the targets with mask 1 (packing boundaries have mask 0). `count`: the number of
    targets to divide by, when this batch is a part of the one the mean is over (gradient accumulation)."""
    nll = token_nll(logits_btv, targets_bt)
    count = jnp.sum(mask_bt) if count is None else count
    return jnp.sum(nll * mask_bt) / jnp.maximum(count, 1.0)


def mtp_targets(targets_bt, mask_bt):
    """The MTP head at position t reads token t+1 (= targets[t]) and predicts token t+2 (= targets[t+1]).

    Valid only where both targets[t] and targets[t+1] are in position t's document; the last position has no
    t+2 and is masked. Returns (mtp_targets [B, T], mtp_mask [B, T]).
    """
    pad_t = jnp.zeros_like(targets_bt[:, :1])
    pad_m = jnp.zeros_like(mask_bt[:, :1])
    tgt = jnp.concatenate([targets_bt[:, 1:], pad_t], axis=1)
    mask = jnp.concatenate([mask_bt[:, :-1] * mask_bt[:, 1:], pad_m], axis=1)
    return tgt, mask


def load_balance_loss(counts_lbe, prob_sum_lbe, *, n_ffn: int, top_k: int, target_ffn: float, groups: int):
    """Device-level load-balance loss with the zero-computation experts as one extra group (reference §7.2).

    The N FFN experts are split evenly, in id order, into D = `groups` groups G_1..G_D (one per EP device);
    the Z zero experts form group G_{D+1}. For each sequence of T tokens and each layer:

        P_j     = (1/T) * sum_t sum_{i in G_j} p_{t,i}                  (router probability mass, differentiable)
        f_j     = D / (K_e * T) * sum_t sum_{i in G_j} 1[i in TopK_t]     for j <= D
        f_{D+1} = 1 / ((K - K_e) * T) * sum_t sum_{i in G_{D+1}} 1[i in TopK_t]
        L_LB    = sum_{j=1..D+1} f_j * P_j

    averaged over sequences and layers (the coefficient alpha is applied by the caller). f is a count and
    carries no gradient. At the target split (K_e FFN slots per token, spread evenly over the D groups)
    every f_j = 1, so L_LB = sum_j P_j = 1: the loss only moves probability mass between groups. The zero
    group is dropped when Z = 0 or K_e = K (it then has no target share).

    counts_lbe / prob_sum_lbe: [L, B, N+Z] per-sequence slot counts and summed probabilities (`moe_stats`).
    """
    if n_ffn % groups:
        raise ValueError(f"loss.lb_groups = {groups} must divide model.n_routed_experts = {n_ffn}")
    L, B, E = counts_lbe.shape
    counts = jax.lax.stop_gradient(counts_lbe.astype(jnp.float32))
    probs = prob_sum_lbe.astype(jnp.float32)
    tokens = jnp.sum(counts, axis=-1, keepdims=True) / top_k           # T per sequence, [L, B, 1]
    c_g = counts[..., :n_ffn].reshape(L, B, groups, n_ffn // groups).sum(-1)
    p_g = probs[..., :n_ffn].reshape(L, B, groups, n_ffn // groups).sum(-1)
    loss_lb = jnp.sum((groups / (target_ffn * tokens)) * c_g * (p_g / tokens), axis=-1)
    n_zero_slots = top_k - target_ffn
    if E > n_ffn and n_zero_slots > 0:
        c_z = counts[..., n_ffn:].sum(-1, keepdims=True)
        p_z = probs[..., n_ffn:].sum(-1, keepdims=True)
        loss_lb = loss_lb + jnp.sum(c_z / (n_zero_slots * tokens) * (p_z / tokens), axis=-1)
    return jnp.mean(loss_lb)


def hidden_z_loss(h_lbtd):
    """Hidden z-loss (reference §7.4): mean over layers and tokens of  log^2( sum_i exp|h_{t,i}| ).

    Applied to each layer's output (the residual stream), where massive activations appear; log-sum-exp of
    |h| tracks the largest |h_i|, so the square penalises outlier channels. Multiply by a small coefficient.
    """
    return hidden_z_loss_from_lse(abs_logsumexp(h_lbtd))


def abs_logsumexp(h_td):
    """log sum_i exp|h_i| over the last axis, in fp32: hidden_z_loss's inner term. The train step takes it per
    layer inside the layer scan (model.forward's layer_fn), so the stack of every layer's output is never built."""
    return jax.nn.logsumexp(jnp.abs(h_td.astype(jnp.float32)), axis=-1)


def hidden_z_loss_from_lse(lse_lbt):
    return jnp.mean(jnp.square(lse_lbt))


def router_grad_norm(grads, path=("layers", "moe", "w_router")):
    """L2 norm over all layers of the gradient on the router weights (a pure-dict param tree)."""
    g = grads
    for k in path:
        g = g[k]
    return jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
