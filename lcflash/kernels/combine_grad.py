"""The MoE combine's backward for the FFN slots' rows, as a Pallas Mosaic GPU kernel (Hopper TMA).

The combine sums w[t, k] y[row of slot (t, k)] over each token's FFN slots, so its gradients in sorted row order
are d_y[m] = w[m] g[tok[m]] and d_w[m] = <g[tok[m]], y[m]>. XLA computes them in two passes over [T·K, D] rows,
one of which writes every row (0.607 ms per layer at 32 x 1024 tokens on an H200, 1.64x the bytes' floor:
experiments/bench_rows.py). This kernel reads each FFN row once with its token's gradient and writes both results,
only for the rows up to the FFN-slot count rounded up to `align` (the rest are left unwritten, as in
`row_gather.take_rows`: the grouped matmuls never read them).

Each CTA takes 64 rows: per 256-column chunk it loads their y block with one TMA copy and their tokens' gradient
rows with one copy each, forms d_w's partial sums and d_y in registers, 64 columns at a time, and stores d_y's
chunk from the y buffer.
CTAs whose first row is past the bound return at once.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from lcflash.kernels import interpret_params
from lcflash.kernels.row_gather import written

ROWS = 64        # rows per CTA: one warpgroup's register tile
CHUNK = 256      # columns per step: a TMA box holds at most 256 per dimension
SUB = 64         # columns per register tile


def supported(g_td, y_md) -> str | None:
    """None if the kernel takes these operands, else why not."""
    if g_td.ndim != 2 or y_md.ndim != 2 or g_td.shape[1] != y_md.shape[1]:
        return f"g [T, D] and y [M, D] with one D; got {g_td.shape} and {y_md.shape}"
    if g_td.shape[1] % CHUNK:
        return f"D = {g_td.shape[1]} must be a multiple of {CHUNK}"
    if y_md.shape[0] % ROWS:
        return f"the row count {y_md.shape[0]} must be a multiple of {ROWS}"
    if jnp.dtype(g_td.dtype) != jnp.float32 or jnp.dtype(y_md.dtype) != jnp.bfloat16:
        return f"g float32 and y bfloat16 (the training path's); got {g_td.dtype} and {y_md.dtype}"
    return None


def _kernel(n_ref, tok_ref, g_gmem, y_gmem, w_gmem, dy_gmem, dw_gmem, scoped, *, chunks, align, interpret):
    g_smem, y_smem, w_smem, dw_smem, g_bar, y_bar = scoped
    first = lax.axis_index("blk") * ROWS
    rows = pl.ds(first, ROWS)

    def load(ref, layout):
        return ref[...] if interpret else plgpu.load(ref, (), layout=layout, optimized=False)

    @pl.when(written(first, n_ref, align))
    def _():
        plgpu.copy_gmem_to_smem(w_gmem.at[rows], w_smem, y_bar)
        plgpu.barrier_wait(y_bar)
        w = lax.broadcast_in_dim(load(w_smem, plgpu.Layout.WGMMA.reduce(1)), (ROWS, SUB), [0])
        dw = None
        for c in range(chunks):
            cols = pl.ds(c * CHUNK, CHUNK)
            for r in range(ROWS):
                plgpu.copy_gmem_to_smem(g_gmem.at[pl.ds(tok_ref[first + r], 1), cols], g_smem.at[pl.ds(r, 1)],
                                        g_bar)
            plgpu.copy_gmem_to_smem(y_gmem.at[rows, cols], y_smem, y_bar)
            plgpu.barrier_wait(g_bar)   # its arrival count is the number of row copies
            plgpu.barrier_wait(y_bar)
            for j in range(CHUNK // SUB):   # register tiles of SUB columns (a whole chunk in fp32 would spill)
                sub = (slice(None), pl.ds(j * SUB, SUB))
                g = load(g_smem.at[sub], plgpu.Layout.WGMMA)
                y = load(y_smem.at[sub], plgpu.Layout.WGMMA).astype(jnp.float32)
                part = (g * y).sum(axis=1)
                dw = part if dw is None else dw + part
                y_smem.at[sub][...] = (w * g).astype(y_smem.dtype)   # d_y, staged where y was
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(y_smem, dy_gmem.at[rows, cols])
            plgpu.wait_smem_to_gmem(0)   # before the next chunk's loads overwrite the buffers
        dw_smem[...] = dw
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(dw_smem, dw_gmem.at[rows])
        plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("align", "interpret"))
def combine_grads(g_td, y_md, tok_m, w_m, n, *, align: int = 128, interpret: bool = False):
    """(d_y [M, D] bf16, d_w [M] fp32): d_y[m] = w[m] g[tok[m]], d_w[m] = <g[tok[m]], y[m]> (fp32 products and sums)
    for m < roundup(n, align); the rows past that are left unwritten (undefined). g [T, D] fp32, y [M, D] bf16,
    tok [M] int32 (valid token rows), w [M] fp32, n a scalar on the device. Rows of y past n may hold anything
    (their d_w is then undefined too); their w must be 0, so that their d_y is 0."""
    why = supported(g_td, y_md)
    if why:
        raise ValueError(f"combine_grad.combine_grads: {why}")
    if align % ROWS:
        raise ValueError(f"combine_grad.combine_grads: align {align} must be a multiple of {ROWS}")
    (m, d), t = y_md.shape, g_td.shape[0]
    if tok_m.shape != (m,) or w_m.shape != (m,):
        raise ValueError(f"combine_grad.combine_grads: tok {tok_m.shape} and w {w_m.shape} must be [{m}]")
    scratch = (plgpu.SMEM((ROWS, CHUNK), jnp.float32), plgpu.SMEM((ROWS, CHUNK), y_md.dtype),
               plgpu.SMEM((ROWS,), jnp.float32), plgpu.SMEM((ROWS,), jnp.float32),
               plgpu.Barrier(num_arrivals=ROWS), plgpu.Barrier())
    kernel = functools.partial(_kernel, chunks=d // CHUNK, align=align, interpret=interpret)
    return plgpu.kernel(lambda *refs: pl.run_scoped(lambda *s: kernel(*refs, s), *scratch),
                        out_type=(jax.ShapeDtypeStruct((m, d), y_md.dtype), jax.ShapeDtypeStruct((m,), jnp.float32)),
                        grid=(m // ROWS,), grid_names=("blk",), interpret=interpret_params(interpret))(
        jnp.reshape(n, (1,)).astype(jnp.int32), tok_m.astype(jnp.int32), g_td, y_md, w_m.astype(jnp.float32))
