"""Shared numeric helpers for the tests."""

import importlib.util

import numpy as np
import pytest

# tokamax, the peers' package, is optional (Python >= 3.12): the tests of its wrappers skip without it.
HAS_TOKAMAX = importlib.util.find_spec("tokamax") is not None
needs_tokamax = pytest.mark.skipif(not HAS_TOKAMAX, reason="tokamax is not installed (needs Python >= 3.12)")


def rel(a, b) -> float:
    """Relative L2 error of a against b, in float64; non-finite values (an unwritten output) fail loudly."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.isfinite(a).all(), "non-finite values"
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def random_model(mc, seed: int = 0):
    """(graphdef, params, other state) of LongcatFlash(mc) filled from numpy: the same values for every setting
    that leaves the shapes alone (and no eager initialisers to compile, ~10 s on 2 cores). Norm weights ~ 1,
    matrices scaled by their fan-in."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from lcflash.model import LongcatFlash

    gd, params, rest = nnx.split(nnx.eval_shape(lambda: LongcatFlash(mc, nnx.Rngs(0))), nnx.Param, ...)
    rng = np.random.RandomState(seed)
    fill = lambda x: jnp.asarray(  # noqa: E731
        rng.normal(1.0, 0.1, x.shape) if x.ndim == 1 else rng.normal(0, x.shape[-2] ** -0.5, x.shape), x.dtype)
    return gd, jax.tree.map(fill, params), jax.tree.map(fill, rest)
