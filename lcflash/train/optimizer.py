"""AdamW with the report's epsilon (1e-16, reference §7.5), LR schedules and global-norm clipping.

Master weights and optimizer moments are fp32 when `model.param_dtype` is float32; the model casts weights
to `model.dtype` (bf16 on GPU) where it computes. Weight decay skips vectors (norm weights) and the router bias
(which is not a parameter at all).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("wsd", "cosine", "constant")
MU_DTYPES = ("float32", "bfloat16")   # optim.mu_dtype: Adam's first moment


def make_schedule(ocfg, total_steps: int):
    """LR as a function of step.

    wsd:      linear warmup to lr, constant, then linear decay to lr*min_lr_ratio over the last
              `decay_fraction` of the steps.
    cosine:   linear warmup, then cosine decay to lr*min_lr_ratio at `total_steps`.
    constant: linear warmup, then lr.
    """
    lr, warm = ocfg.lr, min(ocfg.warmup_steps, total_steps)
    floor = lr * ocfg.min_lr_ratio
    warmup = optax.linear_schedule(0.0 if warm else lr, lr, max(warm, 1))
    if ocfg.schedule == "constant":
        return optax.join_schedules([warmup, optax.constant_schedule(lr)], [warm])
    if ocfg.schedule == "cosine":
        cos = optax.cosine_decay_schedule(lr, max(total_steps - warm, 1), alpha=ocfg.min_lr_ratio)
        return optax.join_schedules([warmup, cos], [warm])
    if ocfg.schedule == "wsd":
        decay = int(round(total_steps * ocfg.decay_fraction))
        stable = max(total_steps - decay - warm, 0)
        return optax.join_schedules(
            [warmup, optax.constant_schedule(lr), optax.linear_schedule(lr, floor, max(decay, 1))],
            [warm, warm + stable])
    raise ValueError(f"optim.schedule = {ocfg.schedule!r}; valid: {SCHEDULES}")


def _is_stacked(kp) -> bool:
    """A leaf of the stacked layers (leading axis: the layer)."""
    return getattr(kp[0], "key", None) == "layers"


def _decay_mask(params):
    def mask(kp, x):
        return x.ndim - (1 if _is_stacked(kp) else 0) >= 2
    return jax.tree_util.tree_map_with_path(mask, params)


# Whether the global norm sums a large stacked leaf's squares layer by layer. XLA builds such a gradient by
# concatenating the layers' pieces (the layer scan, unrolled); one reduction over the whole then computes every
# element's concatenation index, which took 2.3 ms per step at 1.4-1.7 TB/s (configs/small.py's expert gradients,
# 3.6 GB of bf16, H200, session 28). A slice per layer is one piece: no index. False: one sum per leaf, as
# optax.tree.norm (the A/B baseline).
NORM_BY_LAYER = True
# Layer slices smaller than this (elements) are not worth a reduction each.
NORM_SLICE_MIN = 1 << 22


def global_norm(tree) -> jax.Array:
    """optax.tree.norm in fp32, the large stacked leaves (NORM_BY_LAYER) summed slice by slice. The clip and the
    grad_norm metric both call it, so XLA computes it once."""
    def leaf(kp, x):
        sq = lambda y: jnp.sum(jnp.square(y.astype(jnp.float32)))  # noqa: E731
        if NORM_BY_LAYER and _is_stacked(kp) and x.ndim > 1 and x[0].size >= NORM_SLICE_MIN:
            return sum(sq(x[i]) for i in range(x.shape[0]))
        return sq(x)
    return jnp.sqrt(sum(jax.tree.leaves(jax.tree_util.tree_map_with_path(leaf, tree)), jnp.float32(0)))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """optax.clip_by_global_norm (the same clip) with our `global_norm`."""
    def update(updates, state, params=None):
        del params
        g_norm = global_norm(updates)
        trigger = g_norm < max_norm
        updates = jax.tree.map(lambda t: jax.lax.select(trigger, t, (t / g_norm.astype(t.dtype)) * max_norm), updates)
        return updates, state
    return optax.GradientTransformation(optax.init_empty_state, update)


def scale_by_tree(multipliers) -> optax.GradientTransformation:
    """Multiplies each update by a per-parameter constant (e.g. hyperparameter-transfer LR multipliers)."""
    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u if m == 1.0 else u * jnp.asarray(m, u.dtype), updates, multipliers), state
    return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def make_optimizer(ocfg, total_steps: int, params, lr_multipliers=None):
    """(optax transform, schedule). `params` may be abstract; it only fixes the tree for masks."""
    schedule = make_schedule(ocfg, total_steps)
    parts = []
    if ocfg.clip_norm > 0:
        parts.append(clip_by_global_norm(ocfg.clip_norm))
    mu_dtype = ocfg.get("mu_dtype", "float32")
    if mu_dtype not in MU_DTYPES:
        raise ValueError(f"optim.mu_dtype = {mu_dtype!r}; valid: {MU_DTYPES}")
    parts.append(optax.scale_by_adam(b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps, mu_dtype=jnp.dtype(mu_dtype)))
    if ocfg.weight_decay > 0:
        parts.append(optax.add_decayed_weights(ocfg.weight_decay, mask=_decay_mask(params)))
    if lr_multipliers is not None:
        parts.append(scale_by_tree(lr_multipliers))
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts), schedule
