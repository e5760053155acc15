"""The device mesh from the config: axes data, fsdp, expert, tensor (`cfg.mesh.<axis>`, -1 = the rest).

Axis order puts `tensor` innermost (neighbouring devices: the fastest links carry the per-layer TP
reductions), then `expert`, `fsdp`, `data`. Axes are `AxisType.Auto`: XLA propagates shardings from the
parameters, the batch and the activation constraints; expert parallelism is explicit inside `shard_map`.
"""

from __future__ import annotations

import math
import warnings

import jax
from jax.sharding import AxisType, Mesh

from lcflash.config import ConfigError, ModelConfig
from lcflash.parallel.context import ParallelContext
from lcflash.parallel.rules import MESH_AXES, Rules, mesh_axes_for, rules_from_config


def mesh_shape(mesh_cfg, n_devices: int) -> dict[str, int]:
    """Resolves the config's axis sizes (one may be -1) against the device count; errors name the fields."""
    mesh_cfg = mesh_cfg.mesh if hasattr(mesh_cfg, "mesh") else mesh_cfg
    sizes = {}
    for a in MESH_AXES:
        v = mesh_cfg.get(a, 1) if hasattr(mesh_cfg, "get") else getattr(mesh_cfg, a, 1)
        if not isinstance(v, int) or isinstance(v, bool) or (v < 1 and v != -1):
            raise ConfigError(f"mesh.{a} = {v!r} is invalid: must be a positive integer or -1 (the remaining devices)")
        sizes[a] = v
    free = [a for a, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ConfigError(f"mesh.{free[0]} and mesh.{free[1]} are both -1: at most one axis can take the rest")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    desc = ", ".join(f"{a}={v}" for a, v in sizes.items())
    if free:
        if n_devices % fixed:
            raise ConfigError(f"mesh ({desc}): the fixed axes multiply to {fixed}, which does not divide the "
                              f"{n_devices} devices")
        sizes[free[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise ConfigError(f"mesh ({desc}): the axes multiply to {fixed} but there are {n_devices} devices; "
                          f"set one axis to -1 or make the product {n_devices}")
    return sizes


def check_model_fits(cfg: ModelConfig, shape: dict[str, int], rules: Rules, batch: int | None = None) -> None:
    """Mesh settings that cannot work for this model, caught before anything is traced."""
    def size(logical):
        return math.prod(shape.get(a, 1) for a in mesh_axes_for(rules, logical))

    ep, tp, bp = size("expert"), size("heads"), size("batch")
    if cfg.n_routed_experts % ep:
        raise ConfigError(f"model.n_routed_experts = {cfg.n_routed_experts} is not divisible by the expert-parallel "
                          f"size {ep} (mesh axes {mesh_axes_for(rules, 'expert')}); each device must hold whole experts")
    if cfg.num_attention_heads % tp:
        raise ConfigError(f"model.num_attention_heads = {cfg.num_attention_heads} is not divisible by the tensor-"
                          f"parallel size {tp} (mesh axes {mesh_axes_for(rules, 'heads')})")
    ep_axes, batch_axes = set(mesh_axes_for(rules, "expert")), set(mesh_axes_for(rules, "batch"))
    active_ep = {a for a in ep_axes if shape.get(a, 1) > 1}
    if not active_ep <= batch_axes:
        raise ConfigError(f"mesh.rules: the expert axes {sorted(active_ep)} must also split the batch "
                          f"(rule 'batch' = {sorted(batch_axes)}); expert parallelism moves tokens between them")
    mlp_axes = {a for a in mesh_axes_for(rules, "expert_mlp") if shape.get(a, 1) > 1}
    if mlp_axes & batch_axes:
        raise ConfigError(f"mesh.rules: 'expert_mlp' axes {sorted(mlp_axes)} must not split the batch "
                          f"(rule 'batch' = {sorted(batch_axes)})")
    if batch is not None and batch % bp:
        raise ConfigError(f"batch size {batch} is not divisible by the {bp} batch shards "
                          f"(mesh axes {mesh_axes_for(rules, 'batch')} = "
                          f"{[shape.get(a, 1) for a in mesh_axes_for(rules, 'batch')]}; with train.grad_accum_steps, "
                          f"each microbatch must be)")


def make_mesh(cfg, devices=None) -> Mesh:
    """`jax.make_mesh` over all (or the given) devices with the config's axis sizes."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    return jax.make_mesh(tuple(shape[a] for a in MESH_AXES), MESH_AXES,
                         axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def parallel_context(cfg, mesh: Mesh | None = None, model_cfg: ModelConfig | None = None,
                     batch: int | None = None) -> ParallelContext:
    """ParallelContext from the experiment config (`mesh`, `moe` sections); validates against the model."""
    mesh = make_mesh(cfg) if mesh is None else mesh
    rules = rules_from_config(cfg)
    if model_cfg is not None:
        check_model_fits(model_cfg, dict(mesh.shape), rules, batch)
    loss = cfg.get("loss") if hasattr(cfg, "get") else None
    ep = math.prod(mesh.shape[a] for a in mesh_axes_for(rules, "expert"))
    if loss is not None and ep > 1 and loss.get("lb_groups", ep) != ep:
        warnings.warn(f"loss.lb_groups = {loss.get('lb_groups')} but experts are split over {ep} devices: the "
                      f"device-level load-balance loss balances groups that are not the devices "
                      f"(set loss.lb_groups = {ep})", stacklevel=2)
    moe = cfg.get("moe", {}) if hasattr(cfg, "get") else {}
    return ParallelContext(mesh=mesh, rules=rules, transport=moe.get("transport", "all_to_all"),
                           capacity_factor=float(moe.get("capacity_factor", 2.0)))
