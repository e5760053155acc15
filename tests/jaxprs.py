"""Walking a jaxpr into the jaxprs its equations hold (scan and cond bodies, pallas kernels, jit calls)."""

from jax.extend import core as jcore


def sub_jaxprs(eqn):
    """The jaxprs an equation holds in its params, each as a plain Jaxpr."""
    for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else [param]:
            if isinstance(sub, jcore.ClosedJaxpr):
                yield sub.jaxpr
            elif isinstance(sub, jcore.Jaxpr):
                yield sub
