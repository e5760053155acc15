"""out[m] = x[idx[m]] (times scale[m]) for the first n rows only, as a Pallas Mosaic GPU kernel (Hopper TMA).

The MoE dispatch gathers each token's row into its slots' sorted places: [T·K, D] rows of which only the first
sum(group_sizes) (the FFN-expert slots, about half in configs/small.py's training) are read by the expert
kernels. XLA's gather writes every row (533 us per layer at 32 x 1024 tokens on an H200, ~1.6 GB moved); this
kernel leaves rows >= n unwritten, so the bytes moved scale with the FFN slots. The MoE combine's backward is the
same gather of each token's gradient, scaled by the slot's routing weight.

Each CTA takes `rows` consecutive output rows: it reads their indices, loads every row in `CHUNK`-element pieces
by TMA (the rows are scattered, so each piece is its own copy, all counted by one barrier) and stores the block with
one TMA copy. CTAs whose first row is >= n return at once.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from lcflash.kernels import interpret_params

CHUNK = 256                 # elements per TMA piece: a TMA box holds at most 256 per dimension
MAX_ROWS = 32               # output rows per CTA (32 x 1024 bf16: 64 KB of shared memory)
SMEM_BUDGET = 128 * 1024    # a CTA's staged rows at most (LongCat-Flash's 6144-wide bf16 rows: 8 per CTA)


def supported(x_td, m: int) -> str | None:
    """None if the kernel takes x [T, D] and m output rows, else why not."""
    if x_td.ndim != 2 or x_td.shape[1] % CHUNK:
        return f"x must be [T, D] with D a multiple of {CHUNK}; got {x_td.shape}"
    if x_td.dtype.itemsize not in (2, 4):
        return f"dtype {x_td.dtype}: 16- or 32-bit rows only"
    if m % 8:
        return f"the output row count {m} must be a multiple of 8"
    if x_td.shape[1] * x_td.dtype.itemsize > SMEM_BUDGET:
        return f"rows of {x_td.shape[1]} x {x_td.dtype} do not fit the {SMEM_BUDGET}-byte shared-memory stage"
    return None


def _rows_per_cta(m: int, row_bytes: int) -> int:
    """The most rows, up to MAX_ROWS, that divide m and fit SMEM_BUDGET."""
    r = MAX_ROWS
    while m % r or r * row_bytes > SMEM_BUDGET:
        r //= 2
    return r


def written(first, n_ref, align: int):
    """Whether the block of rows from `first` is one this kernel writes: below roundup(n, align), n = n_ref[0]
    (the FFN slots' rows; the grouped matmuls read no further)."""
    return first < (n_ref[0] + align - 1) // align * align


def _kernel(n_ref, idx_ref, *refs, rows, chunks, align, scaled):
    scale_ref, x_gmem, out_gmem, (smem, bar) = refs if scaled else (None, *refs)
    first = lax.axis_index("blk") * rows

    @pl.when(written(first, n_ref, align))
    def _():
        for r in range(rows):
            src = idx_ref[first + r] * chunks
            for c in range(chunks):
                plgpu.copy_gmem_to_smem(x_gmem.at[pl.ds(src + c, 1)], smem.at[pl.ds(r * chunks + c, 1)], bar)
        plgpu.barrier_wait(bar)  # its arrival count is the number of copies
        if scaled:  # in fp32, rounded once, as XLA's (scale * x.astype(f32)).astype(x.dtype)
            for r in range(rows):
                piece = smem.at[pl.ds(r * chunks, chunks)]
                piece[...] = (piece[...].astype(jnp.float32) * scale_ref[first + r]).astype(smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(smem, out_gmem.at[pl.ds(first * chunks, rows * chunks)])
        plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("align", "interpret"))
def take_rows(x_td, idx_m, n, scale_m=None, *, align: int = 128, interpret: bool = False):
    """[M, D] with row m = x[idx[m]] for m < roundup(n, align); the rows past that are left unwritten (undefined).
    idx [M] int32 (valid row indices up to that bound), n a scalar on the device (e.g. sum(group_sizes)). The
    rows up to the next multiple of align are written so that a kernel tile straddling n reads finite values: the
    grouped-matmul weight gradient multiplies such rows by zeros, and NaN * 0 would not be 0. scale_m [M] (fp32):
    row m is (scale[m] * x[idx[m]]) in fp32, cast back to x's dtype."""
    why = supported(x_td, idx_m.shape[0])
    if why:
        raise ValueError(f"row_gather.take_rows: {why}")
    if scale_m is not None and scale_m.shape != idx_m.shape:
        raise ValueError(f"row_gather.take_rows: scale_m {scale_m.shape} must be one value per row, {idx_m.shape}")
    (t, d), m = x_td.shape, idx_m.shape[0]
    chunks, rows = d // CHUNK, _rows_per_cta(m, d * x_td.dtype.itemsize)
    if align % rows:
        raise ValueError(f"row_gather.take_rows: align {align} must be a multiple of {rows} rows per CTA")
    scratch = (plgpu.SMEM((rows * chunks, CHUNK), x_td.dtype), plgpu.Barrier(num_arrivals=rows * chunks))
    kernel = functools.partial(_kernel, rows=rows, chunks=chunks, align=align, scaled=scale_m is not None)
    scale = () if scale_m is None else (scale_m.astype(jnp.float32),)

    def row_gather(*refs):   # the CUDA kernel's name in a profile: row_gather_mosaic_gpu_kernel
        pl.run_scoped(lambda *s: kernel(*refs, s), *scratch)

    out = plgpu.kernel(row_gather, out_type=jax.ShapeDtypeStruct((m * chunks, CHUNK), x_td.dtype),
                       grid=(m // rows,), grid_names=("blk",), interpret=interpret_params(interpret))(
        jnp.reshape(n, (1,)).astype(jnp.int32), idx_m.astype(jnp.int32), *scale, x_td.reshape(t * chunks, CHUNK))
    return out.reshape(m, d)
