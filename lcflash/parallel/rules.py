"""The one table that maps logical axis names (on every parameter and the main activations) to mesh axes.

Every `nnx.Param` and `RouterBias` carries `logical_axes` metadata, e.g. ('layers', 'expert', 'embed',
'expert_mlp'). A rule maps each logical name to a tuple of mesh axes (empty: replicated). Within one array a
mesh axis is used at most once (the first dimension that asks for it gets it), and a dimension that the
mesh axes do not divide is left replicated, so every table gives a valid sharding for every shape.

The table is `DEFAULT_RULES`, overridable per name from the config (`cfg.mesh.rules.<name>`).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from jax.sharding import PartitionSpec as P

from lcflash.config import ConfigError

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# (logical name, mesh axes). Parameters: FSDP over the model width, TP over heads / FFN width / vocab,
# EP over experts. Activations: the batch is split over every axis but `tensor`.
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # parameters
    ("layers", ()),
    ("vocab", ("tensor",)),
    ("embed", ("fsdp",)),
    ("q_lora", ("fsdp",)),
    ("kv_lora", ("fsdp",)),
    ("heads", ("tensor",)),
    ("qk_head", ()),
    ("kv_head", ()),
    ("v_head", ()),
    ("mlp", ("tensor",)),
    ("expert", ("expert",)),
    ("expert_mlp", ("tensor",)),
    ("router", ()),
    ("norm", ()),
    ("mtp_concat", ()),
    # activations
    ("batch", ("data", "fsdp", "expert")),
    ("seq", ()),
    ("act_embed", ()),
    ("act_vocab", ("tensor",)),
)

Rules = tuple[tuple[str, tuple[str, ...]], ...]


def _as_axes(name: str, value) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        value = (value,)
    axes = tuple(value)
    bad = [a for a in axes if a not in MESH_AXES]
    if bad or len(set(axes)) != len(axes):
        raise ConfigError(f"mesh.rules.{name} = {value!r} is invalid: must be a tuple of distinct mesh axes "
                          f"from {MESH_AXES} (empty for replicated)")
    return axes


def make_rules(overrides: Mapping[str, object] | None = None) -> Rules:
    """DEFAULT_RULES with `overrides` (logical name -> mesh axes) applied; unknown names are an error."""
    table = dict(DEFAULT_RULES)
    for name, value in (overrides or {}).items():
        if name not in table:
            raise ConfigError(f"mesh.rules.{name}: unknown logical axis; known: {sorted(table)}")
        table[name] = _as_axes(name, value)
    return tuple(table.items())


def rules_config():
    """The rules table as a ConfigDict, for `cfg.mesh.rules` (each value a tuple of mesh axes)."""
    import ml_collections

    return ml_collections.ConfigDict({k: v for k, v in DEFAULT_RULES})


def rules_from_config(cfg) -> Rules:
    """Rules from `cfg.mesh.rules` when the config has it, else DEFAULT_RULES."""
    mesh = cfg.mesh if hasattr(cfg, "mesh") else cfg
    raw = mesh.get("rules") if hasattr(mesh, "get") else None
    if raw is None:
        return DEFAULT_RULES
    return make_rules(raw.to_dict() if hasattr(raw, "to_dict") else dict(raw))


def mesh_axes_for(rules: Rules, name: str) -> tuple[str, ...]:
    for k, v in rules:
        if k == name:
            return v
    raise ConfigError(f"logical axis {name!r} has no sharding rule; known: {sorted(k for k, _ in rules)}")


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules, mesh_shape: Mapping[str, int],
                    shape: Sequence[int] | None = None) -> P:
    """PartitionSpec for an array with these logical axes on a mesh of `mesh_shape` (axis -> size).

    Size-1 mesh axes are dropped; a mesh axis already used by an earlier dimension is skipped; if `shape` is
    given, trailing mesh axes are dropped from a dimension until they divide it.
    """
    if shape is not None and len(shape) != len(logical_axes):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    entries = []
    for i, name in enumerate(logical_axes):
        axes = () if name is None else mesh_axes_for(rules, name)
        axes = [a for a in axes if a not in used and mesh_shape.get(a, 1) > 1]
        if shape is not None:
            while axes and shape[i] % math.prod(mesh_shape[a] for a in axes):
                axes.pop()
        used.update(axes)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return P(*entries)
