"""Absorbed MLA decode attention as a Pallas Mosaic GPU kernel (Hopper: TMA + wgmma), split over the context.

One CTA (one warpgroup) handles one (context split, batch row). All T*H query rows of the row (t-major, padded
to 64, the wgmma M) share the latent cache, so each block of `block_kv` cached tokens is read once from HBM by
TMA into shared memory and used twice: transposed as the key (q_lat . c + q_pe . k_pe) and as the value (p . c).
The loads run `depth` blocks ahead of the math. Only the T*H real query rows (rounded up to 8, a smem tile) are
loaded and stored; the wgmma's other rows hold whatever shared memory held, which touches only those rows' own
outputs (every row's softmax and products are its own), so no padded copy of the queries or slice of the output
costs a kernel of its own around the call. Each split keeps an online softmax in registers and writes its
normalised output and log2-sum-exp2; `reference.combine_splits` merges the splits (flash-decoding). With one split
the kernel writes the output in the compute dtype and nothing runs after it: at batch 1 a decode step is a chain of
~500 kernels of a few microseconds each, and the merge's three XLA kernels per attention are 72 of them.

Only the blocks holding a visible key are read: a split past the row's last position reads nothing, so a decode
step costs the filled part of the cache, not its capacity.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from lcflash.kernels import interpret_params
from lcflash.kernels.mla_decode.reference import LOG2E, NEG_INF, combine_splits, per_split_blocks

ROWS = 64               # wgmma M: query rows (heads x query tokens) per CTA
MAX_LATENT = 256        # the fp32 output accumulator [64, R] must fit one warpgroup's registers
TARGET_CTAS = 264       # two waves of 132 SMs
# At most this many splits (None: as many as TARGET_CTAS asks for). 1 trades the merge's kernels for one CTA walking
# the whole context: slower at batch 1 and 8 on an H200 (1.335 -> 1.590 ms per token at 1024; docs/inference.md).
MAX_SPLITS: int | None = None


def supported(q_len: int, heads: int, kv_lora_rank: int, rope_dim: int, cache_len: int, dtype,
              block_kv: int = 64) -> str | None:
    """None if the kernel handles these shapes, else the reason it does not."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {jnp.dtype(dtype).name}: the kernel needs bfloat16 or float16 (wgmma operands)"
    if q_len * heads > ROWS:
        return f"q_len * heads = {q_len * heads} > {ROWS} query rows per CTA"
    if kv_lora_rank % 64 or kv_lora_rank > MAX_LATENT:
        return f"kv_lora_rank = {kv_lora_rank} must be a multiple of 64 and <= {MAX_LATENT}"
    if rope_dim % 64:
        return f"qk_rope_head_dim = {rope_dim} must be a multiple of 64"
    if cache_len % block_kv:
        return f"cache length {cache_len} must be a multiple of block_kv = {block_kv}"
    return None


def choose_splits(batch: int, n_blocks: int) -> int:
    """Context splits for ~TARGET_CTAS CTAs (at least one block each), at most MAX_SPLITS."""
    want = max(1, -(-TARGET_CTAS // batch))
    return split_layout(n_blocks, want if MAX_SPLITS is None else min(want, MAX_SPLITS))[0]


def split_layout(n_blocks: int, num_splits: int) -> tuple[int, int]:
    """(splits, blocks per split): equal splits of ceil(n_blocks / splits) blocks, the last one may be shorter,
    none empty."""
    per = per_split_blocks(n_blocks, num_splits)
    return -(-n_blocks // per), per


def _kernel(start_ref, q_ref, qpe_ref, c_ref, kpe_ref, o_ref, lse_ref, scoped, *, heads, q_len, rows, block_kv,
            blocks_per_split, depth, scale, dtype, fused_pv, interpret):
    (q_smem, qpe_smem, c_smem, kpe_smem, o_smem, lse_smem), (q_bar, c_bar, kpe_bar) = scoped
    split = lax.axis_index("split")
    b = lax.axis_index("batch")
    start = start_ref[b]
    split_lo = split * (blocks_per_split * block_kv)
    # Keys < start + q_len are visible to some row; blocks past them are never read. The last split may be
    # shorter than the others, but start + q_len <= S keeps n inside the cache.
    n = jnp.clip(lax.div(start + q_len - split_lo + (block_kv - 1), jnp.int32(block_kv)), 0, blocks_per_split)

    def fetch(i, slot):
        keys = pl.ds(split_lo + i * block_kv, block_kv)
        plgpu.copy_gmem_to_smem(c_ref.at[b, keys], c_smem.at[slot], c_bar.at[slot])
        plgpu.copy_gmem_to_smem(kpe_ref.at[b, keys], kpe_smem.at[slot], kpe_bar.at[slot])

    real = pl.ds(0, rows)
    plgpu.copy_gmem_to_smem(q_ref.at[b], q_smem.at[real], q_bar.at[0])
    plgpu.copy_gmem_to_smem(qpe_ref.at[b], qpe_smem.at[real], q_bar.at[1])
    for i in range(depth):
        pl.when(i < n)(functools.partial(fetch, i, i))
    plgpu.barrier_wait(q_bar.at[0])
    plgpu.barrier_wait(q_bar.at[1])

    R = q_smem.shape[-1]
    if interpret:   # GPU interpret mode has no register layouts
        layout_cast = lambda x, layout: x                                                        # noqa: E731
        iota = lambda shape, dim: lax.broadcasted_iota(jnp.int32, shape, dim)                    # noqa: E731
    else:
        layout_cast = plgpu.layout_cast
        iota = lambda shape, dim: plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)  # noqa
    m_i = layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    l_i = layout_cast(jnp.full((ROWS,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    acc = layout_cast(jnp.full((ROWS, R), 0.0, jnp.float32), plgpu.Layout.WGMMA)
    row = iota((ROWS, block_kv), 0)
    col = iota((ROWS, block_kv), 1)
    # Row (t, h) is query t at index start + t; padding rows act as the last query.
    row_limit = jnp.full((ROWS, block_kv), start, jnp.int32)
    for t in range(1, q_len):
        row_limit = row_limit + jnp.where(row >= t * heads, 1, 0)
    qk_scale = scale * LOG2E

    def body(i, carry):
        acc, m_i, l_i = carry
        slot = lax.rem(i, jnp.int32(depth))
        plgpu.barrier_wait(c_bar.at[slot])
        plgpu.barrier_wait(kpe_bar.at[slot])

        def qk(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, c_smem.at[slot].transpose((1, 0)))
            plgpu.wgmma(acc_ref, qpe_smem, kpe_smem.at[slot].transpose((1, 0)))
            return acc_ref[...]

        if interpret:   # the interpreter's wgmma takes neither transposed refs nor register operands
            s = (jnp.dot(q_smem[...], c_smem[slot].T, preferred_element_type=jnp.float32)
                 + jnp.dot(qpe_smem[...], kpe_smem[slot].T, preferred_element_type=jnp.float32))
        else:
            s = pl.run_scoped(qk, plgpu.ACC((ROWS, block_kv), jnp.float32))
        s = s * qk_scale
        key = col + (split_lo + i * block_kv)
        s = jnp.where(key <= row_limit, s, NEG_INF)
        m_new = jnp.maximum(m_i, s.max(axis=1))
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
        l_i = l_i * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

        def pv(acc_ref):
            plgpu.wgmma(acc_ref, p.astype(dtype), c_smem.at[slot])
            if not fused_pv:
                return acc_ref[...]

        if interpret:
            acc = acc + jnp.dot(p.astype(dtype), c_smem[slot], preferred_element_type=jnp.float32)
        elif fused_pv:   # accumulate in place
            acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        else:
            acc = acc + pl.run_scoped(pv, plgpu.ACC((ROWS, R), jnp.float32))

        @pl.when(i + depth < n)
        def _():
            fetch(i + depth, slot)

        return acc, m_new, l_i

    acc, m_i, l_i = lax.fori_loop(0, n, body, (acc, m_i, l_i))
    o_smem[...] = (acc / lax.broadcast_in_dim(l_i, acc.shape, [0])).astype(o_smem.dtype)
    lse_smem[...] = m_i + jnp.log(l_i) * LOG2E
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem.at[real], o_ref.at[b, split])
    plgpu.copy_smem_to_gmem(lse_smem.at[real], lse_ref.at[b, split])
    plgpu.wait_smem_to_gmem(0)


def mla_decode_pallas(q_lat_bthr, q_pe_bthd, c_bsr, kpe_bsd, q_start_b, *, scale: float, block_kv: int = 64,
                      num_splits: int | None = None, depth: int = 4, fused_pv: bool = True,
                      interpret: bool = False):
    """Causal absorbed attention: query t of row b sits at cache index q_start_b[b] + t. Returns o_lat [B,T,H,R].
    num_splits: None picks them (choose_splits, here, outside the jit, so MAX_SPLITS applies to every trace)."""
    B, T, H, R = q_lat_bthr.shape
    why = supported(T, H, R, q_pe_bthd.shape[-1], c_bsr.shape[1], q_lat_bthr.dtype, block_kv)
    if why:
        raise NotImplementedError(f"mla_decode pallas kernel: {why}; use impl='xla'")
    n_blocks = c_bsr.shape[1] // block_kv
    return _mla_decode_pallas(q_lat_bthr, q_pe_bthd, c_bsr, kpe_bsd, q_start_b, scale=scale, block_kv=block_kv,
                              num_splits=num_splits or choose_splits(B, n_blocks), depth=depth, fused_pv=fused_pv,
                              interpret=interpret)


# Jitted so that the 2L identical calls of one decode step lower (Mosaic GPU) once, not once per sublayer.
@functools.partial(jax.jit, static_argnames=("scale", "block_kv", "num_splits", "depth", "fused_pv", "interpret"))
def _mla_decode_pallas(q_lat_bthr, q_pe_bthd, c_bsr, kpe_bsd, q_start_b, *, scale, block_kv, num_splits, depth,
                       fused_pv, interpret):
    B, T, H, R = q_lat_bthr.shape
    P = q_pe_bthd.shape[-1]
    S = c_bsr.shape[1]
    dtype = q_lat_bthr.dtype
    n_blocks = S // block_kv
    num_splits, per_split = split_layout(n_blocks, num_splits)
    depth = max(1, min(depth, per_split))
    out_dtype = dtype if num_splits == 1 else jnp.float32   # one split: the final output, nothing to merge

    rows = -(-T * H // 8) * 8   # whole smem tiles of 8 rows; a model with 8 | H passes q through as it is

    def pad_rows(x):
        x = x.reshape(B, T * H, x.shape[-1]).astype(dtype)
        return x if rows == T * H else jnp.pad(x, ((0, 0), (0, rows - T * H), (0, 0)))

    tiled = () if interpret else (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    kernel = functools.partial(_kernel, heads=H, q_len=T, rows=rows, block_kv=block_kv, blocks_per_split=per_split,
                               depth=depth, scale=scale, dtype=dtype, fused_pv=fused_pv, interpret=interpret)

    def entry(start_ref, q_ref, qpe_ref, c_ref, kpe_ref, o_ref, lse_ref):
        pl.run_scoped(
            lambda *scoped: kernel(start_ref, q_ref, qpe_ref, c_ref, kpe_ref, o_ref, lse_ref, scoped),
            (plgpu.SMEM((ROWS, R), dtype, transforms=tiled),
             plgpu.SMEM((ROWS, P), dtype, transforms=tiled),
             plgpu.SMEM((depth, block_kv, R), dtype, transforms=tiled),
             plgpu.SMEM((depth, block_kv, P), dtype, transforms=tiled),
             plgpu.SMEM((ROWS, R), out_dtype),
             plgpu.SMEM((ROWS,), jnp.float32)),
            (plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=depth), plgpu.Barrier(num_barriers=depth)),
        )

    entry.__name__ = "mla_decode"   # the CUDA kernel's name in a profile: mla_decode_mosaic_gpu_kernel
    o_part, lse2 = plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct((B, num_splits, rows, R), out_dtype),
                  jax.ShapeDtypeStruct((B, num_splits, rows), jnp.float32)),
        grid=(num_splits, B),
        grid_names=("split", "batch"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params(interpret),
    )(q_start_b.astype(jnp.int32), pad_rows(q_lat_bthr), pad_rows(q_pe_bthd), c_bsr.astype(dtype),
      kpe_bsd.astype(dtype))
    o = o_part[:, 0] if num_splits == 1 else combine_splits(o_part, lse2)
    o = o if rows == T * H else o[:, :T * H]
    return o.reshape(B, T, H, R).astype(dtype)


__all__ = ["mla_decode_pallas", "supported", "choose_splits"]
