"""The ecosystem's peer: tokamax's `ragged_dot` behind `gmm` (on Hopper, its Pallas Mosaic GPU kernels; its own VJP).

tokamax is optional and imported on first use. Its releases since 0.0.13 need Python >= 3.12, and 0.0.17 JAX >=
0.11.1: the GPU image's, not the CPU machines' (0.0.12, the last for Python 3.11, fails on JAX 0.11.2). The GPU
calls carry it as wheels (experiments/gmm_notes.md, session 34).

Its kernel leaves the output rows past sum(group_sizes) unwritten, and so does its d_lhs product: `gmm` zeroes both,
as it does for JAX's example kernel (`jax_mgpu`), and zeroes the cotangent's rows there before tokamax's VJP, in case
its d_rhs product reads them. That is not what makes its d_rhs wrong on an H200: 4.5% off at LongCat's shapes with
groups that fill every row (experiments/gmm_notes.md, session 36; cause unknown). Its output and its VJP's residuals
(the operands and the output) are named KERNEL_OUTPUT, so the "kernels" remat policy keeps them, as it keeps our
kernels' outputs, instead of running its forward again in a rematerialised layer's backward.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax.ad_checkpoint import checkpoint_name

from lcflash.kernels import KERNEL_OUTPUT, load_tokamax

# tokamax's implementation: "mosaic" (its Mosaic GPU kernels; GPU only) or "xla" (its XLA path, which the CPU test
# uses to check this wrapper where tokamax is installed).
IMPLEMENTATION = "mosaic"
# None: tokamax's own choice (its autotuning cache where it holds the shape, else its heuristics: 64 x 64 tiles, 2
# stages on Hopper). A dict: the forward kernel's `Config` fields (the backward products keep tokamax's choice), as
# experiments/bench_moe_gemm.py --pick-tokamax picks them. Read at trace time.
CONFIG: dict | None = None


def load():
    return load_tokamax("gmm impl 'tokamax'")


def _implementation():
    if CONFIG is None or IMPLEMENTATION != "mosaic":
        return IMPLEMENTATION
    from tokamax._src.ops.ragged_dot import pallas_mosaic_gpu

    return [pallas_mosaic_gpu.PallasMosaicGpuRaggedDot(config=pallas_mosaic_gpu.Config(**CONFIG))]


def _rows_valid(m: int, group_sizes_g):
    return (jnp.arange(m) < jnp.sum(group_sizes_g))[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(lhs_mk, rhs_gkn, group_sizes_g, out_dtype):
    return _gmm_fwd(lhs_mk, rhs_gkn, group_sizes_g, out_dtype)[0]


def _gmm_fwd(lhs_mk, rhs_gkn, group_sizes_g, out_dtype):
    tokamax = load()
    out, vjp = jax.vjp(lambda a, b: tokamax.ragged_dot(a, b, group_sizes_g, preferred_element_type=out_dtype,
                                                       implementation=_implementation()), lhs_mk, rhs_gkn)
    valid = _rows_valid(lhs_mk.shape[0], group_sizes_g)
    keep = lambda x: checkpoint_name(x, KERNEL_OUTPUT)  # noqa: E731
    return keep(jnp.where(valid, out, 0)), (jax.tree.map(keep, vjp), valid, group_sizes_g)


def _gmm_bwd(out_dtype, res, dout_mn):
    vjp, valid, group_sizes_g = res
    # The forward zeroed tokamax's rows past the groups, so their cotangent is zero; passed through, they would reach
    # a d_rhs product that reads past the groups. (Session 35 took them for the cause of its 4.8% d_rhs error on an
    # H200; session 36 measured 4.5% with no such rows, so the cause lies elsewhere.)
    d_lhs, d_rhs = vjp(jnp.where(valid, dout_mn, 0).astype(out_dtype))
    return jnp.where(valid, d_lhs, 0), d_rhs, np.zeros(group_sizes_g.shape, jax.dtypes.float0)


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(lhs_mk, rhs_gkn, group_sizes_g, preferred_element_type=None):
    load()
    if IMPLEMENTATION == "mosaic" and jax.default_backend() != "gpu":
        raise RuntimeError("gmm impl 'tokamax' runs its Mosaic GPU kernels on a GPU only")
    if lhs_mk.dtype != rhs_gkn.dtype:
        raise TypeError(f"tokamax gmm: lhs {lhs_mk.dtype} and rhs {rhs_gkn.dtype} must have the same dtype")
    out_dtype = jnp.dtype(preferred_element_type or lhs_mk.dtype)
    return _gmm(lhs_mk, rhs_gkn, group_sizes_g.astype(jnp.int32), out_dtype)
