"""Model-growth initialisation by layer stacking (reference §7.8).

A trained model of n layers becomes one of `factor * n` layers by repeating its whole stack:
layer order [1..n, 1..n] (for factor 2), i.e. new layer k is old layer k mod n. Every stacked variable is
repeated this way, the router correction bias included; embeddings, final norm, LM head and MTP head are
copied once. Optimizer moments and controller state start fresh. (The report's order is unverified; stacking
the whole block keeps each copy's input statistics as in the trained model.)
"""

from __future__ import annotations

import jax
import numpy as np


def stack_layers(tree, factor: int = 2, key: str = "layers"):
    """Pure transform: every leaf under `tree[key]` (leading axis = layer) is tiled `factor` times along it."""
    if factor < 1:
        raise ValueError(f"growth factor must be >= 1, got {factor}")
    out = dict(tree)
    if key in tree:
        out[key] = jax.tree.map(lambda x: np.concatenate([np.asarray(x)] * factor, axis=0), tree[key])
    return out


def grow(params, bias, factor: int = 2):
    """(params, bias) pure dicts of an n-layer model -> those of a factor*n-layer model."""
    return stack_layers(params, factor), stack_layers(bias, factor)


def check_compatible(grown, target, what: str):
    """Raises ValueError naming the first leaf whose shape differs from the target model's."""
    g = jax.tree_util.tree_flatten_with_path(grown)[0]
    t = dict(jax.tree_util.tree_flatten_with_path(target)[0])
    gk = {jax.tree_util.keystr(k) for k, _ in g}
    tk = {jax.tree_util.keystr(k) for k in t}
    if gk != tk:
        raise ValueError(f"{what}: parameter names differ from the target model: missing {sorted(tk - gk)[:5]}, "
                         f"unexpected {sorted(gk - tk)[:5]}")
    for k, x in g:
        if tuple(np.shape(x)) != tuple(t[k].shape):
            raise ValueError(f"{what}: {jax.tree_util.keystr(k)} has shape {np.shape(x)} after stacking, the target "
                             f"model needs {tuple(t[k].shape)}; the target must have model.num_layers = 2 x the "
                             f"checkpoint's and otherwise the same model fields")


def grown_from_checkpoint(path: str, target_params, target_bias):
    """Reads params and biases from a checkpoint (workdir, checkpoints dir or step dir), stacks them x2.

    Returns arrays placed like the target's leaves; raises ValueError if the shapes do not line up.
    """
    from lcflash.checkpoint import Checkpointer, resolve

    directory, step = resolve(path)
    saved, meta = Checkpointer(directory, read_only=True).restore_params(None, step)
    params, bias = grow(saved["params"], saved["bias"], factor=2)
    what = f"init.grow_from = {path!r} (step {meta.get('step')})"
    check_compatible(params, target_params, what)
    check_compatible(bias, target_bias, what)
    cast = lambda x, t: jax.device_put(np.asarray(x).astype(t.dtype), t.sharding)  # noqa: E731
    return jax.tree.map(cast, params, target_params), jax.tree.map(cast, bias, target_bias)
