"""The peer: JAX's example Mosaic GPU kernels (`ragged_dot_mgpu`, `transposed_ragged_dot_mgpu`) behind `gmm`.

They are examples, not a supported API: their signatures move between JAX releases, so keyword arguments are
filtered by the installed signature. Forward: `ragged_dot_mgpu.ragged_dot` (rows past sum(group_sizes) are left
unwritten by it and zeroed here). Backward: d_lhs with its `transpose_rhs` option and d_rhs with
`transposed_ragged_dot` where the installed example has them; otherwise XLA's ragged_dot (documented fallback).
GPU only: the examples hard-code a GPU grid.
"""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np

from lcflash.kernels.gmm import reference

# The example has no autotuner. Fastest of four configs timed by experiments/bench_moe_gemm.py (LongCat gate/up,
# T=512, H100, JAX 0.11.2): 1.97 ms against 2.66-3.18 ms for the others.
FWD_CONFIG = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=8)
TGMM_CONFIG = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)


def _filtered(fn, kwargs):
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def _ragged(lhs_mk, rhs, group_sizes_g, *, transpose_rhs=False):
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    kw = _filtered(ragged_dot_mgpu.ragged_dot, dict(FWD_CONFIG, transpose_rhs=transpose_rhs))
    if transpose_rhs and "transpose_rhs" not in kw:
        raise NotImplementedError("this JAX's ragged_dot_mgpu has no transpose_rhs")
    out = ragged_dot_mgpu.ragged_dot(lhs_mk, rhs, group_sizes=group_sizes_g, **kw)
    valid_m = jnp.arange(lhs_mk.shape[0]) < jnp.sum(group_sizes_g)
    return jnp.where(valid_m[:, None], out, 0)


def _tgmm(lhs_mk, dout_mn, group_sizes_g):
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu as t

    kw = _filtered(t.transposed_ragged_dot, TGMM_CONFIG)
    # The example contracts over the leading axis of both operands: lhs [M, K], rhs [M, N] -> [G, K, N].
    return t.transposed_ragged_dot(lhs_mk, dout_mn, group_sizes=group_sizes_g, **kw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(lhs_mk, rhs_gkn, group_sizes_g, out_dtype):
    return _ragged(lhs_mk, rhs_gkn, group_sizes_g).astype(out_dtype)


def _fwd(lhs_mk, rhs_gkn, group_sizes_g, out_dtype):
    return _gmm(lhs_mk, rhs_gkn, group_sizes_g, out_dtype), (lhs_mk, rhs_gkn, group_sizes_g)


def _bwd(out_dtype, res, dout_mn):
    lhs_mk, rhs_gkn, group_sizes_g = res
    dout_mn = dout_mn.astype(lhs_mk.dtype)
    try:
        d_lhs = _ragged(dout_mn, rhs_gkn, group_sizes_g, transpose_rhs=True)
        d_rhs = _tgmm(lhs_mk, dout_mn, group_sizes_g).astype(rhs_gkn.dtype)
    except (NotImplementedError, ImportError, AttributeError):
        _, vjp = jax.vjp(lambda a, b: reference.gmm_ragged_dot(a, b, group_sizes_g), lhs_mk, rhs_gkn)
        d_lhs, d_rhs = vjp(dout_mn)
    return d_lhs.astype(lhs_mk.dtype), d_rhs, np.zeros(group_sizes_g.shape, jax.dtypes.float0)


_gmm.defvjp(_fwd, _bwd)


def gmm(lhs_mk, rhs_gkn, group_sizes_g, preferred_element_type=None):
    if jax.default_backend() != "gpu":
        raise RuntimeError("gmm impl 'jax_mgpu' (JAX's example Mosaic GPU kernel) runs on a GPU only")
    if lhs_mk.dtype != rhs_gkn.dtype:
        raise TypeError(f"jax_mgpu gmm: lhs {lhs_mk.dtype} and rhs {rhs_gkn.dtype} must have the same dtype")
    out_dtype = jnp.dtype(preferred_element_type or lhs_mk.dtype)
    return _gmm(lhs_mk, rhs_gkn, group_sizes_g.astype(jnp.int32), out_dtype)
