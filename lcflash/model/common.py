"""Parameter constructors shared by every module."""

import jax
import jax.numpy as jnp
from flax import nnx

from lcflash.kernels import COMPUTE_WEIGHTS, KERNEL_OUTPUT


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


# What the "kernels" remat policy keeps: outputs our kernels name KERNEL_OUTPUT (the Mosaic GPU grouped expert
# matmuls), cuDNN's flash attention forward (its output and softmax statistics, which its backward needs) and XLA's
# grouped matmul, matched by primitive.
KERNEL_PRIMITIVES = frozenset({"dot_product_attention_fwd", "dot_product_attention_fwd_wrapper",
                               "ragged_dot_general"})


def keep_kernel_outputs(prim, *_, **params) -> bool:
    # checkpoint_name binds the primitive "name" (what jax.checkpoint_policies.save_only_these_names matches).
    return prim.name in KERNEL_PRIMITIVES or (prim.name == "name" and params.get("name") == KERNEL_OUTPUT)


def keep_kernel_outputs_and_weights(prim, *args, **params) -> bool:
    is_weights = prim.name == "name" and params.get("name") == COMPUTE_WEIGHTS
    return is_weights or keep_kernel_outputs(prim, *args, **params)


# model.remat_policy (lcflash.config.REMAT_POLICIES) -> jax.checkpoint policy. "dots" also keeps every matmul
# output (dense projections and the fp32 router) and the expert weights cast to the compute dtype, leaving only
# elementwise work to recompute.
POLICY_FNS = {
    "nothing": jax.checkpoint_policies.nothing_saveable,
    "kernels": keep_kernel_outputs,
    "dots": jax.checkpoint_policies.save_from_both_policies(jax.checkpoint_policies.dots_saveable,
                                                            keep_kernel_outputs_and_weights),
}


# Names of activations that remat_keep can add to a policy (lcflash.config.REMAT_KEEP_NAMES).
SWIGLU_OUTPUT = "swiglu"
DISPATCH_ROWS = "dispatch"
ATTENTION_QUERIES = "queries"
NORM_OUTPUT = "norms"
ROUTING_CHOICES = "routing"


def remat_policy_fn(remat_policy: str, keep: tuple[str, ...] = ()):
    """POLICY_FNS[remat_policy], also saving the activations named in `keep`."""
    policy = POLICY_FNS[remat_policy]
    if not keep:
        return policy
    return jax.checkpoint_policies.save_from_both_policies(policy,
                                                           jax.checkpoint_policies.save_only_these_names(*keep))


def scan_modules(stacked, body, carry, xs=None, remat: bool = False, unroll: int = 1,
                 remat_policy: str = "nothing", remat_keep: tuple[str, ...] = ()):
    """Runs `body(module_i, carry, x_i) -> (carry, y_i)` over the stacked module's leading axis; with remat, the
    backward pass recomputes each step from its inputs, keeping what `remat_policy` names (POLICY_FNS) and the
    activations named in `remat_keep`."""
    graphdef, state = nnx.split(stacked)

    def step(c, inp):
        st, x = inp
        return body(nnx.merge(graphdef, st), c, x)

    if remat:
        step = jax.checkpoint(step, policy=remat_policy_fn(remat_policy, remat_keep))
    return jax.lax.scan(step, carry, (state, xs), unroll=unroll)
