"""Expert-bias controller for the compute budget (reference §7.1).

The router's correction bias b (a `RouterBias` variable, [L, N+Z]) only chooses experts, so it gets no
gradient; this controller moves it after each step from that step's routing counts:

    e_i  = K_e / (K * N) - T_i / (K * T_all)        for FFN experts i < N, 0 for zero experts
    E    = mean_{i<N} e_i = (K_e - FFN slots per token) / (K * N)       (the layer's compute-budget error)
    I   <- clip(I + E, +-integral_clip)
    db_i = mu_t * (kp * e_i + ki * I + kd * (E - E_prev))               for i < N
    b   <- b + db                                    (zero-expert biases never move)

T_i is the number of slots that chose expert i, T_all the tokens of the step (each has K slots), K_e the
target FFN experts per token (`model.target_ffn_experts`). An overloaded FFN expert is pushed down; when FFN
experts together get more than K_e of the K slots, all FFN biases fall against the fixed zero-expert biases,
so one rule both balances the experts and holds the activated compute. mu_t decays per `controller.decay`.

The proportional term acts on each expert's own error; the integral and derivative terms act on the layer's
budget error E only (one value per layer, added to every FFN expert). An integral per expert winds up on
imbalance that no bias can remove within a step (it oscillated on configs/tiny.py); an integral of E removes
the steady-state offset of the FFN experts per token, which is what the budget needs. (The report documents
only the proportional rule; the I/D terms here are ours.)
"""

from __future__ import annotations

import jax.numpy as jnp

DECAYS = ("none", "exponential", "inverse")


def init_state(num_layers: int, num_experts: int) -> dict:
    del num_experts
    z = jnp.zeros((num_layers,), jnp.float32)
    return {"integral": z, "prev_error": z, "has_prev": jnp.zeros((), jnp.bool_)}


def rate(step, ccfg):
    """mu_t: `rate` decayed by `decay` over `decay_steps`, never below `min_rate`."""
    s = jnp.asarray(step, jnp.float32)
    if ccfg.decay == "none":
        mu = jnp.asarray(ccfg.rate, jnp.float32)
    elif ccfg.decay == "exponential":
        mu = ccfg.rate * jnp.exp2(-s / ccfg.decay_steps)
    elif ccfg.decay == "inverse":
        mu = ccfg.rate / (1.0 + s / ccfg.decay_steps)
    else:
        raise ValueError(f"controller.decay = {ccfg.decay!r}; valid: {DECAYS}")
    return jnp.maximum(mu, ccfg.min_rate)


def errors(counts_le, *, n_ffn: int, top_k: int, target_ffn: float):
    """e [L, N+Z]: target share minus observed share of the K*T slots, zero for zero experts."""
    counts = counts_le.astype(jnp.float32)
    slots = jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)   # K * T_all
    e = target_ffn / (top_k * n_ffn) - counts / slots
    return jnp.where(jnp.arange(counts.shape[-1]) < n_ffn, e, 0.0)


def update(bias_le, state: dict, counts_le, step, ccfg, *, n_ffn: int, top_k: int, target_ffn: float):
    """Returns (new bias, new controller state, applied delta). Pure; call outside the gradient."""
    e = errors(counts_le, n_ffn=n_ffn, top_k=top_k, target_ffn=target_ffn)
    budget_l = jnp.mean(e[:, :n_ffn], axis=-1)
    integral = jnp.clip(state["integral"] + budget_l, -ccfg.integral_clip, ccfg.integral_clip)
    deriv = jnp.where(state["has_prev"], budget_l - state["prev_error"], 0.0)
    delta = rate(step, ccfg) * (ccfg.kp * e + (ccfg.ki * integral + ccfg.kd * deriv)[:, None])
    is_ffn = jnp.arange(bias_le.shape[-1]) < n_ffn
    delta = jnp.where(is_ffn, delta, 0.0)
    if not ccfg.enabled:
        delta = jnp.zeros_like(delta)
        integral = state["integral"]
    new_state = {"integral": integral, "prev_error": budget_l, "has_prev": jnp.ones((), jnp.bool_)}
    return bias_le + delta.astype(bias_le.dtype), new_state, delta


def routing_metrics(counts_le, *, n_ffn: int, top_k: int) -> dict:
    """Per layer: mean FFN experts per token, and min/max FFN-expert load relative to the mean FFN load."""
    counts = counts_le.astype(jnp.float32)
    tokens = jnp.maximum(jnp.sum(counts, axis=-1) / top_k, 1.0)
    ffn = counts[:, :n_ffn]
    mean_load = jnp.maximum(jnp.mean(ffn, axis=-1), 1e-9)
    return {
        "ffn_experts_per_token": jnp.sum(ffn, axis=-1) / tokens,
        "expert_load_min": jnp.min(ffn, axis=-1) / mean_load,
        "expert_load_max": jnp.max(ffn, axis=-1) / mean_load,
    }
