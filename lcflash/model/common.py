"""Parameter constructors shared by every module."""

import jax
import jax.numpy as jnp
from flax import nnx


class RouterBias(nnx.Variable):
    """The expert-score correction bias: steered by the bias controller, never by the optimizer."""


def normal_param(rngs: nnx.Rngs, shape, axes, dtype, std: float) -> nnx.Param:
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param((std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype), logical_axes=axes)


def ones_param(shape, axes, dtype) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype), logical_axes=axes)


def stack_modules(factory, n: int, rngs: nnx.Rngs, axis_name: str = "layers"):
    """Builds n copies of `factory(rngs)` whose variables are stacked on a leading axis.

    The stacked module is run with `jax.lax.scan` (see `scan_modules`), so a 28-layer model compiles
    one layer body. Logical axes gain `axis_name` in front.
    """
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: factory(nnx.Rngs(0))))
    keys = jax.random.split(rngs.params(), n)
    state = jax.vmap(lambda k: nnx.state(factory(nnx.Rngs(params=k))))(keys)

    def add_axis(v):
        axes = v.get_metadata().get("logical_axes")
        if axes is not None:
            v.set_metadata("logical_axes", (axis_name,) + tuple(axes))
        return v

    state = jax.tree.map(add_axis, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, state)


def scan_modules(stacked, body, carry, xs=None, remat: bool = False, unroll: int = 1):
    """Runs `body(module_i, carry, x_i) -> (carry, y_i)` over the stacked module's leading axis."""
    graphdef, state = nnx.split(stacked)

    def step(c, inp):
        st, x = inp
        return body(nnx.merge(graphdef, st), c, x)

    if remat:
        step = jax.checkpoint(step, policy=jax.checkpoint_policies.nothing_saveable)
    return jax.lax.scan(step, carry, (state, xs), unroll=unroll)
