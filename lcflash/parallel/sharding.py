"""Shardings from abstract state, parameters created already sharded, sharded batches and jitted functions.

Nothing here materialises a full copy of the weights on one host: shardings are computed from abstract
shapes (`nnx.eval_shape`), and initialisation runs under `jax.jit(..., out_shardings=...)` so each device
only ever computes its own shards.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lcflash.parallel import context as pctx
from lcflash.parallel.context import ParallelContext


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def _value(x):
    return x.get_value() if _is_var(x) else x


def _path_key(path) -> tuple:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(getattr(k, attr))
                break
        else:
            out.append(str(k))
    return tuple(out)


def logical_axes_table(tree) -> dict[tuple, tuple]:
    """Path -> logical axes of every Variable that carries `logical_axes` metadata."""
    table = {}
    for path, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_var)[0]:
        if _is_var(v):
            axes = v.get_metadata().get("logical_axes")
            if axes is not None:
                table[_path_key(path)] = (tuple(axes), tuple(_value(v).shape))
    return table


def tree_shardings(tree, ctx: ParallelContext, params_like=None):
    """NamedSharding for every leaf of `tree` (Variables, arrays or ShapeDtypeStructs).

    A Variable with `logical_axes` is sharded by the rules. Any other array whose key path ends with the path
    of a parameter of the same shape in `params_like` (an optimizer's mu/nu for that parameter) gets the
    parameter's sharding. Everything else (step counters, scalars) is replicated.
    """
    table = logical_axes_table(params_like) if params_like is not None else {}
    replicated = NamedSharding(ctx.mesh, P())

    def one(path, leaf):
        if _is_var(leaf):
            axes = leaf.get_metadata().get("logical_axes")
            shape = tuple(_value(leaf).shape)
            if axes is not None:
                return ctx.sharding(axes, shape)
        shape = tuple(getattr(_value(leaf), "shape", ()))
        key = _path_key(path)
        for i in range(len(key)):
            hit = table.get(key[i:])
            if hit is not None and hit[1] == shape:
                return ctx.sharding(hit[0], shape)
        return replicated

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_var)


def variable_sharding_fn(model_cfg, mesh) -> Callable:
    """fn(path, shape) -> NamedSharding of the model variable at `path` (its flat nnx state path, or a key path of
    the same names) by the logical-axis rules; replicated where a variable has no axes. Raises ConfigError where the
    mesh cannot split the model (lcflash.parallel.mesh.check_model_fits)."""
    from lcflash.model import LongcatFlash
    from lcflash.parallel.mesh import check_model_fits

    ctx = ParallelContext(mesh)
    check_model_fits(model_cfg, ctx.mesh_shape, ctx.rules)
    table = logical_axes_table(nnx.state(nnx.eval_shape(lambda: LongcatFlash(model_cfg, nnx.Rngs(0)))))
    replicated = NamedSharding(mesh, P())

    def fn(path, shape):
        entry = table.get(_path_key(path))
        return replicated if entry is None else ctx.sharding(entry[0], shape)
    return fn


def create_sharded(factory: Callable[[], Any], ctx: ParallelContext):
    """Builds `factory()` (an nnx module or any pytree) with every array created on its own shards."""
    abstract = nnx.eval_shape(factory)
    if isinstance(abstract, nnx.Module):
        graphdef, abs_state = nnx.split(abstract)
        shardings = tree_shardings(abs_state, ctx)
        state = jax.jit(lambda: nnx.state(factory()), out_shardings=shardings)()
        return nnx.merge(graphdef, state)
    return jax.jit(factory, out_shardings=tree_shardings(abstract, ctx))()


def batch_sharding(ctx: ParallelContext, ndim: int) -> NamedSharding:
    return ctx.sharding(("batch",) + (None,) * (ndim - 1))


def shard_batch(batch, ctx: ParallelContext):
    """Host arrays of the global batch (identical on every process) -> global arrays split over the batch axes.

    Each process reads only the rows of its own devices, so this is the multi-process entry point too.
    """
    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, batch_sharding(ctx, x.ndim), lambda idx: x[idx])

    return jax.tree.map(put, batch)


def sharded(fn: Callable, ctx: ParallelContext) -> Callable:
    """`fn` with the parallel context active while it is traced (use inside `jax.jit`)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with pctx.use(ctx):
            return fn(*args, **kwargs)

    return wrapped
