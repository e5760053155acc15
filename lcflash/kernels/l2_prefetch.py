"""Weights pulled into the GPU's L2 cache while the sublayer before theirs runs (batch-1 decode).

A batch-1 decode step is a chain of small matvecs, each reading 1-8 MB of weights cold from HBM. Session 36's
profile (experiments/decode_profile_s36_h200.json) timed them at 0.5-2.2 TB/s against ~3.3 TB/s: too short to
reach full bandwidth, and on the step's critical path. `prefetch` issues TMA L2 prefetches
(`cp.async.bulk.prefetch.tensor.L2`, `plgpu.async_prefetch`) for a set of arrays from a kernel of a few CTAs that
returns at once. It takes `after` only so that it starts once `after` exists: a decode step is a CUDA graph whose
nodes start when their inputs do (generation.DECODE_XLA_OPTIONS), so passing the previous sublayer's input puts
the prefetch beside that sublayer. Its output is a zero XLA cannot see through; `keep` adds it to a value the
caller returns (decode: the MoE branch's expert ids, off the critical path), so XLA keeps the call.

Implementations (`IMPLS`): "mosaic", the kernel (Hopper GPUs); "xla", a sum over each array, which reads it whole
through L2 on every SM (a stand-in that runs anywhere, and the A/B partner on the GPU); "off".
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from lcflash.kernels import interpret_params

IMPLS = ("off", "xla", "mosaic")
BOX = 256            # elements per dimension of one TMA box (the hardware's limit)
CTAS = 16            # CTAs issuing prefetches (each SM's TMA unit issues its own): a few SMs, briefly


def as_matrix(a: jax.Array) -> jax.Array:
    """a as [rows, last dim] (a bitcast for row-major arrays): TMA boxes are taken over two dimensions."""
    return a.reshape(-1, a.shape[-1]) if a.ndim != 2 else a


def box(extent: int, limit: int = BOX) -> int:
    """The largest divisor of extent up to limit: boxes tile a dimension exactly, none past its end."""
    return max(d for d in range(1, min(extent, limit) + 1) if extent % d == 0)


def supported(arrays) -> str | None:
    """None if the Mosaic kernel takes these arrays, else why not."""
    for i, a in enumerate(arrays):
        if a.ndim == 0 or a.size == 0:
            return f"array {i} has shape {a.shape}: the kernel prefetches non-empty arrays of rank >= 1"
        if box(a.shape[-1]) * a.dtype.itemsize % 16:
            return (f"array {i} ({a.shape}, {a.dtype}): a TMA box along its last dimension must span a multiple of "
                    f"16 bytes; its largest box is {box(a.shape[-1])} elements")
    return None


def box_grid(shape) -> tuple[int, int, int, int]:
    """(box rows, box columns, boxes per row of boxes, boxes) of a [rows, cols] matrix."""
    rb, cb = box(shape[0]), box(shape[1])
    return rb, cb, shape[1] // cb, shape[0] // rb * (shape[1] // cb)


def box_origins(cta, shape, ctas: int):
    """(valid, row, col) of the boxes CTA `cta` prefetches from a [rows, cols] matrix: its j-th is box k = j * ctas +
    cta (row-major over the boxes), valid while k < the number of boxes. Works on Python ints (tests) and on the
    kernel's traced CTA index alike."""
    rb, cb, n_c, n = box_grid(shape)
    for j in range(-(-n // ctas)):
        k = j * ctas + cta
        yield k < n, k // n_c * rb, k % n_c * cb


def _kernel(*refs, ctas):
    *w_refs, _after, zero_ref = refs
    cta = lax.axis_index("cta")

    @pl.when(cta == 0)
    def _():
        zero_ref[...] = jnp.zeros(zero_ref.shape, zero_ref.dtype)   # one per thread of the warpgroup

    for w_ref in w_refs:   # each matrix's boxes dealt round robin over the CTAs; a CTA issues its boxes and returns
        rb, cb, _, _ = box_grid(w_ref.shape)
        for valid, r, c in box_origins(cta, w_ref.shape, ctas):
            @pl.when(valid)
            def _(w_ref=w_ref, r=r, c=c, rb=rb, cb=cb):
                plgpu.async_prefetch(w_ref.at[pl.ds(r, rb), pl.ds(c, cb)])


@functools.partial(jax.jit, static_argnames=("ctas",))
def _mosaic(arrays, after, *, ctas: int = CTAS):
    mats = [as_matrix(a) for a in arrays]
    boxes = sum(box_grid(m.shape)[3] for m in mats)
    ctas = max(1, min(ctas, boxes))
    body = functools.partial(_kernel, ctas=ctas)
    body.__name__ = "l2_prefetch"   # the CUDA kernel's name in profiles: l2_prefetch_mosaic_gpu_kernel
    call = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((128,), jnp.int32), grid=(ctas,),
                        grid_names=("cta",), interpret=interpret_params(False))
    return call(*mats, after)


def _xla(arrays, after):
    # after * 0 (kept: XLA does not fold a float product with zero) makes the sums wait for it, as the kernel does;
    # "> inf" is false for every float, NaN included: a zero that depends on every sum.
    start = after.reshape(-1)[0].astype(jnp.float32) * 0
    total = start + sum(jnp.sum(a, dtype=jnp.float32) for a in arrays)
    return (total > jnp.inf).astype(jnp.int32).reshape(1)


def prefetch(arrays, after: jax.Array, impl: str = "mosaic"):
    """Start pulling `arrays` into L2 once `after` exists; returns an int32 zero for `keep` (None when "off")."""
    if impl not in IMPLS:
        raise ValueError(f"l2_prefetch impl {impl!r} is not one of {IMPLS}")
    arrays = [a for a in arrays if a is not None]
    if impl == "off" or not arrays:
        return None
    if impl == "xla":
        return _xla(arrays, after)
    why = supported(arrays)
    if why:
        raise ValueError(f"l2_prefetch(impl='mosaic'): {why}")
    return _mosaic(tuple(arrays), after)


def keep(x, zeros):
    """x plus the prefetches' zeros: a real use, so XLA keeps the calls (an optimization barrier might not, once XLA
    expands it), at the cost of one wait, by whatever reads x, for prefetches that return within microseconds."""
    zeros = [z for z in zeros if z is not None]
    return x if not zeros else x + sum(z[0] for z in zeros).astype(x.dtype)
