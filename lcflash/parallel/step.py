"""The trainer's state and step (lcflash/train/step.py) on a device mesh.

    ctx = parallel_context(cfg, make_mesh(cfg), model_config(cfg), cfg.train.batch_size)
    state = init_state_sharded(cfg, key, ctx)               # every array created on its own shards
    step = make_sharded_train_step(cfg, ctx)               # jit with explicit in/out shardings
    state, metrics = step(state, shard_batch(batch, ctx))

Parameters follow the rules table; optimizer moments take their parameter's sharding; the router bias,
controller state, step and RNG are replicated. A checkpoint restores into any mesh: pass
`abstract_state_sharded(cfg, ctx)` to `Checkpointer.restore`.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from lcflash.config import ModelConfig, model_config
from lcflash.parallel.context import ParallelContext
from lcflash.parallel.sharding import _path_key, batch_sharding, sharded


def _axes_table(model_cfg: ModelConfig) -> dict[tuple, tuple]:
    from lcflash.train.step import param_logical_axes

    axes = param_logical_axes(model_cfg)
    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)  # noqa: E731
    flat = jax.tree_util.tree_flatten_with_path(axes, is_leaf=is_axes)[0]
    return {_path_key(p): a for p, a in flat}


def state_specs(cfg, rules, mesh_shape: dict, abstract=None):
    """PartitionSpec of every leaf of the trainer's state on a mesh of `mesh_shape` (no devices needed)."""
    from lcflash.parallel.rules import logical_to_spec
    from lcflash.train.step import abstract_state

    model_cfg = model_config(cfg)
    abstract = abstract_state(cfg) if abstract is None else abstract
    table = _axes_table(model_cfg)

    def one(path, leaf):
        key, shape = _path_key(path), tuple(leaf.shape)
        if key[:1] == ("params",) and key[1:] in table:
            return logical_to_spec(table[key[1:]], rules, mesh_shape, shape)
        if key[:1] == ("opt_state",):     # mu / nu of a parameter: the longest suffix that is a param path
            for i in range(1, len(key)):
                axes = table.get(key[i:])
                if axes is not None and len(axes) == len(shape):
                    return logical_to_spec(axes, rules, mesh_shape, shape)
        return P()

    return jax.tree_util.tree_map_with_path(one, abstract)


def state_shardings(cfg, ctx: ParallelContext, abstract=None):
    """NamedSharding for every leaf of the trainer's state (same tree as `abstract_state(cfg)`)."""
    specs = state_specs(cfg, ctx.rules, ctx.mesh_shape, abstract)
    return jax.tree.map(lambda s: NamedSharding(ctx.mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def abstract_state_sharded(cfg, ctx: ParallelContext):
    """`abstract_state(cfg)` with each leaf's sharding on this mesh (a restore target for any mesh)."""
    from lcflash.train.step import abstract_state

    abstract = abstract_state(cfg)
    sh = state_shardings(cfg, ctx, abstract)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, sh)


def init_state_sharded(cfg, key, ctx: ParallelContext):
    """The trainer's `init_state`, compiled with out_shardings so no device ever holds a full copy."""
    from lcflash.train.step import init_state

    sh = state_shardings(cfg, ctx)
    if cfg.get("init") is not None and cfg.init.get("grow_from"):
        # Growth reads a checkpoint on the host; place its result afterwards.
        return jax.device_put(init_state(cfg, key), sh)
    return jax.jit(functools.partial(init_state, cfg), out_shardings=sh)(key)


def batch_shardings(batch_like, ctx: ParallelContext):
    return jax.tree.map(lambda x: batch_sharding(ctx, len(x.shape)), batch_like)


def make_sharded_train_step(cfg, ctx: ParallelContext, model_cfg: ModelConfig | None = None,
                            donate: bool = True):
    """`make_train_step(cfg)` traced under the parallel context, jitted with explicit in/out shardings.

    Batches are dicts of [B, T] arrays split over the batch axes (`lcflash.parallel.sharding.shard_batch`);
    metrics come back replicated.
    """
    from lcflash.train.step import make_train_step

    model_cfg = model_cfg or model_config(cfg)
    step = sharded(make_train_step(cfg, model_cfg), ctx)
    st_sh = state_shardings(cfg, ctx)
    b_sh = batch_sharding(ctx, 2)
    return jax.jit(step, in_shardings=(st_sh, b_sh), out_shardings=(st_sh, NamedSharding(ctx.mesh, P())),
                   donate_argnums=(0,) if donate else ())


def trainer_context(cfg, model_cfg: ModelConfig | None = None) -> ParallelContext | None:
    """The trainer's parallel context from `cfg.mesh` over all devices, or None on a single device (where the
    trainer keeps its plain single-device path). Validates the mesh against the model and each microbatch of
    `train.batch_size` (train.grad_accum_steps of them)."""
    from lcflash.parallel.mesh import make_mesh, parallel_context
    from lcflash.train.step import micro_batch_size

    if jax.device_count() == 1:
        return None
    model_cfg = model_cfg or model_config(cfg)
    return parallel_context(cfg, make_mesh(cfg), model_cfg, micro_batch_size(cfg))
