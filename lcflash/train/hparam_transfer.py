"""Hyperparameter transfer from a narrow proxy to the target width (reference §7.7).

Standard parameterisation with the Adam width-scaling rules of Everett et al. (2024), as the LongCat report
describes it. With s = target_width / proxy_width (the model width `hidden_size`), for hyperparameters tuned on
the proxy (init std sigma = `model.initializer_range`, learning rate eta = `optim.lr`):

    group    what                                              init std        Adam LR
    embed    token embedding tables (main and MTP)             sigma           eta
    hidden   every other matrix (attention, MLPs, experts,     sigma / sqrt(s) eta / s
             router, MTP projection)
    head     the LM head (treated as a hidden matrix)          sigma / sqrt(s) eta / s
    vector   norm weights (initialised to 1)                   unchanged (1)   eta

So hidden-matrix init variance falls as 1/s and their Adam step as 1/s, keeping each layer's update to
its output O(1) as fan-in grows; embeddings (one-hot inputs) need neither. Decoupled weight decay is applied
as `lr * weight_decay`, so it follows each group's LR. The rules are unverified against the report.
"""

from __future__ import annotations

import math

import jax
import numpy as np

GROUPS = ("embed", "hidden", "head", "vector")


def param_group(path: tuple[str, ...], ndim: int) -> str:
    name = path[-1]
    if ndim <= 1:
        return "vector"
    if name == "embed":
        return "embed"
    if name == "lm_head":
        return "head"
    return "hidden"


def _path_names(kp) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in kp)


def param_groups(params):
    """Same tree as `params` (a pure dict), with each leaf's group name. Stacked layer axes are not fan-in."""
    def group(kp, x):
        names = _path_names(kp)
        ndim = x.ndim - (1 if names[0] == "layers" else 0)
        return param_group(names, ndim)
    return jax.tree_util.tree_map_with_path(group, params)


def rules(proxy_width: int, target_width: int) -> dict:
    """{group: (init std multiplier, LR multiplier)} for width ratio s = target / proxy."""
    if proxy_width <= 0 or target_width <= 0:
        raise ValueError(f"widths must be positive, got proxy={proxy_width}, target={target_width}")
    s = target_width / proxy_width
    return {"embed": (1.0, 1.0), "hidden": (1.0 / math.sqrt(s), 1.0 / s), "head": (1.0 / math.sqrt(s), 1.0 / s),
            "vector": (1.0, 1.0)}


def lr_multipliers(params, proxy_width: int, target_width: int):
    """Tree of python floats (static), one per parameter: the LR multiplier of its group."""
    r = rules(proxy_width, target_width)
    return jax.tree.map(lambda g: r[g][1], param_groups(params))


def scale_init(params, proxy_width: int, target_width: int):
    """Rescales freshly initialised parameters (drawn with std sigma) to each group's transferred std."""
    r = rules(proxy_width, target_width)
    return jax.tree.map(lambda x, g: x * np.asarray(r[g][0], x.dtype), params, param_groups(params))


def transfer(proxy_width: int, target_width: int, init_std: float, lr: float) -> dict:
    """Human-readable table: the std and LR each group gets at the target width."""
    r = rules(proxy_width, target_width)
    return {g: {"init_std": init_std * m_std, "lr": lr * m_lr} for g, (m_std, m_lr) in r.items()}
