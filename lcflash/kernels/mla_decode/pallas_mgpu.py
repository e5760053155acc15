"""Absorbed MLA decode attention as a Pallas Mosaic GPU kernel (Hopper: TMA + wgmma), split over the context.

One CTA (one warpgroup) handles one (context split, batch row, part). All T*H query rows of the row (t-major,
padded to 64, the wgmma M) share the latent cache, so each block of `block_kv` cached tokens is read once from HBM
by TMA into shared memory and used twice: transposed as the key (q_lat . c + q_pe . k_pe) and as the value (p . c).
The loads run `depth` blocks ahead of the math. Up to 64 query rows, only the T*H real ones (rounded up to 8, a
smem tile) are loaded and stored; the wgmma's other rows hold whatever shared memory held, which touches only
those rows' own outputs (every row's softmax and products are its own), so no padded copy of the queries or slice
of the output costs a kernel of its own around the call.

LongCat-Flash's shapes (64 heads, a latent of 512) need more than one CTA per split: its fp32 output accumulator
[64, 512] would take all of a warpgroup's registers, and MTP's verify step has 2 x 64 query rows. So the `part` axis
runs each 64-row tile of the queries and each CHUNK-column chunk of the latent output in a CTA of its own. Each
computes the scores from the whole latent (in CHUNK-column pieces, loaded by one TMA copy each) and p . c for its
chunk; the CTAs of one split read the same cache blocks about at once, so the second read mostly hits L2.

Each split keeps an online softmax in registers and writes its normalised output and log2-sum-exp2;
`reference.combine_splits` merges the splits (flash-decoding). With one split the kernel writes the output in the
compute dtype and nothing runs after it: at batch 1 a decode step is a chain of ~500 kernels of a few microseconds
each, and the merge's three XLA kernels per attention are 72 of them.

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
CHUNK = 256             # latent output columns per CTA: the fp32 accumulator [64, CHUNK] fits a warpgroup's registers
TARGET_CTAS = 264       # two waves of 132 SMs
SMEM_BUDGET = 220 * 1024   # of the 227 KB of shared memory a CTA may have on Hopper, the rest for barriers
# At most this many splits (None: as many as TARGET_CTAS asks for). 1 trades the merge's kernels for one CTA walking
# the whole context: slower at batch 1 and 8 on an H200 (1.335 -> 1.590 ms per token at 1024; docs/inference.md).
MAX_SPLITS: int | None = None


def latent_chunk(kv_lora_rank: int) -> int:
    """The latent output columns one CTA computes: the whole latent up to CHUNK, else CHUNK."""
    return min(kv_lora_rank, CHUNK)


def smem_bytes(kv_lora_rank: int, rope_dim: int, block_kv: int, depth: int, out_bytes: int) -> int:
    """Shared memory of one CTA: the queries, `depth` cache blocks and the output chunk's staging."""
    return 2 * (ROWS * (kv_lora_rank + rope_dim) + depth * block_kv * (kv_lora_rank + rope_dim)) + ROWS * (
        latent_chunk(kv_lora_rank) * out_bytes + 4)


def out_dtype(dtype, num_splits: int):
    """What the kernel writes: with one split the final output in the compute dtype (nothing to merge), else fp32
    partials for `combine_splits`."""
    return dtype if num_splits == 1 else jnp.float32


def default_block_kv(kv_lora_rank: int, rope_dim: int) -> int:
    """64 cached tokens per block where two blocks fit in flight beside the queries and the staging, else 32
    (LongCat-Flash's latent of 512)."""
    return 64 if smem_bytes(kv_lora_rank, rope_dim, 64, 2, 4) <= SMEM_BUDGET else 32


def supported(q_len: int, heads: int, kv_lora_rank: int, rope_dim: int, cache_len: int, dtype,
              block_kv: int | None = None) -> str | None:
    """None if the kernel handles these shapes, else the reason it does not."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {jnp.dtype(dtype).name}: the kernel needs bfloat16 or float16 (wgmma operands)"
    if kv_lora_rank % 64 or kv_lora_rank % latent_chunk(kv_lora_rank):
        return f"kv_lora_rank = {kv_lora_rank} must be a multiple of 64, and of {CHUNK} above {CHUNK}"
    if rope_dim % 64:
        return f"qk_rope_head_dim = {rope_dim} must be a multiple of 64"
    block_kv = block_kv or default_block_kv(kv_lora_rank, rope_dim)
    if block_kv % 32 or smem_bytes(kv_lora_rank, rope_dim, block_kv, 1, 4) > SMEM_BUDGET:   # wgmma K groups of 32
        return (f"block_kv = {block_kv} must be a multiple of 32 whose cache block fits shared memory beside the "
                f"queries (kv_lora_rank {kv_lora_rank}, qk_rope_head_dim {rope_dim})")
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


def _kernel(start_ref, q_ref, qpe_ref, c_ref, kpe_ref, o_ref, lse_ref, scoped, *, heads, q_len, rows, chunks,
            block_kv, blocks_per_split, depth, scale, dtype, fused_pv, interpret):
    (q_smem, qpe_smem, c_smem, kpe_smem, o_smem, lse_smem), (q_bar, c_bar, kpe_bar) = scoped
    split = lax.axis_index("split")
    b = lax.axis_index("batch")
    tile, ck = lax.div(lax.axis_index("part"), chunks), lax.rem(lax.axis_index("part"), chunks)
    start = start_ref[b]
    split_lo = split * (blocks_per_split * block_kv)
    # Keys < start + q_len are visible to some row; blocks past them are never read. The last split may be
    # shorter than the others, but start + q_len <= S keeps n inside the cache.
    n = jnp.clip(lax.div(start + q_len - split_lo + (block_kv - 1), jnp.int32(block_kv)), 0, blocks_per_split)
    C = c_smem.shape[-1]   # latent columns per piece (CHUNK or the whole latent)

    def fetch(i, slot):
        keys = pl.ds(split_lo + i * block_kv, block_kv)
        for j in range(chunks):
            plgpu.copy_gmem_to_smem(c_ref.at[b, keys, pl.ds(j * C, C)], c_smem.at[j, slot], c_bar.at[j * depth + slot])
        plgpu.copy_gmem_to_smem(kpe_ref.at[b, keys], kpe_smem.at[slot], kpe_bar.at[slot])

    real, tile_rows = pl.ds(0, rows), pl.ds(tile * rows, rows)
    for j in range(chunks):
        plgpu.copy_gmem_to_smem(q_ref.at[b, tile_rows, pl.ds(j * C, C)], q_smem.at[j, real], q_bar.at[j])
    plgpu.copy_gmem_to_smem(qpe_ref.at[b, tile_rows], qpe_smem.at[real], q_bar.at[chunks])
    for i in range(depth):
        pl.when(i < n)(functools.partial(fetch, i, i))
    for j in range(chunks + 1):
        plgpu.barrier_wait(q_bar.at[j])

    if interpret:   # GPU interpret mode has no register layouts
        layout_cast = lambda x, layout: x                                                        # noqa: E731
        iota = lambda shape, dim: lax.broadcasted_iota(jnp.int32, shape, dim)                    # noqa: E731
    else:
        layout_cast = plgpu.layout_cast
        iota = lambda shape, dim: plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)  # noqa
    m_i = layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    l_i = layout_cast(jnp.full((ROWS,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    acc = layout_cast(jnp.full((ROWS, C), 0.0, jnp.float32), plgpu.Layout.WGMMA)
    row = iota((ROWS, block_kv), 0) + tile * ROWS
    col = iota((ROWS, block_kv), 1)
    # Row (t, h) is query t at index start + t; padding rows act as the last query.
    row_limit = jnp.full((ROWS, block_kv), start, jnp.int32)
    for t in range(1, q_len):
        row_limit = row_limit + jnp.where(row >= t * heads, 1, 0)
    qk_scale = scale * LOG2E

    def body(i, carry):
        acc, m_i, l_i = carry
        slot = lax.rem(i, jnp.int32(depth))
        for j in range(chunks):
            plgpu.barrier_wait(c_bar.at[j * depth + slot])
        plgpu.barrier_wait(kpe_bar.at[slot])

        def qk(acc_ref):
            for j in range(chunks):
                plgpu.wgmma(acc_ref, q_smem.at[j], c_smem.at[j, slot].transpose((1, 0)))
            plgpu.wgmma(acc_ref, qpe_smem, kpe_smem.at[slot].transpose((1, 0)))
            return acc_ref[...]

        if interpret:   # the interpreter's wgmma takes neither transposed refs nor register operands
            s = jnp.dot(qpe_smem[...], kpe_smem[slot].T, preferred_element_type=jnp.float32)
            for j in reversed(range(chunks)):
                s = jnp.dot(q_smem[j], c_smem[j, slot].T, preferred_element_type=jnp.float32) + s
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
        values = c_smem.at[ck, slot]   # this CTA's chunk of the latent

        def pv(acc_ref):
            plgpu.wgmma(acc_ref, p.astype(dtype), values)
            if not fused_pv:
                return acc_ref[...]

        if interpret:
            acc = acc + jnp.dot(p.astype(dtype), values[...], preferred_element_type=jnp.float32)
        elif fused_pv:   # accumulate in place
            acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        else:
            acc = acc + pl.run_scoped(pv, plgpu.ACC((ROWS, C), jnp.float32))

        @pl.when(i + depth < n)
        def _():
            fetch(i + depth, slot)

        return acc, m_new, l_i

    acc, m_i, l_i = lax.fori_loop(0, n, body, (acc, m_i, l_i))
    o_smem[...] = (acc / lax.broadcast_in_dim(l_i, acc.shape, [0])).astype(o_smem.dtype)
    lse_smem[...] = m_i + jnp.log(l_i) * LOG2E
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem.at[real], o_ref.at[b, split, tile_rows, pl.ds(ck * C, C)])
    pl.when(ck == 0)(lambda: plgpu.copy_smem_to_gmem(lse_smem.at[real], lse_ref.at[b, split, tile_rows]))
    plgpu.wait_smem_to_gmem(0)


def mla_decode_pallas(q_lat_bthr, q_pe_bthd, c_bsr, kpe_bsd, q_start_b, *, scale: float,
                      block_kv: int | None = None, num_splits: int | None = None, depth: int = 4,
                      fused_pv: bool = True, interpret: bool = False):
    """Causal absorbed attention: query t of row b sits at cache index q_start_b[b] + t. Returns o_lat [B,T,H,R].
    block_kv: cached tokens per block (None: `default_block_kv`); depth: blocks loaded ahead, at most what shared
    memory holds; num_splits: None picks them (choose_splits, here, outside the jit, so MAX_SPLITS applies to every
    trace)."""
    B, T, H, R = q_lat_bthr.shape
    P = q_pe_bthd.shape[-1]
    why = supported(T, H, R, P, c_bsr.shape[1], q_lat_bthr.dtype, block_kv)
    if why:
        raise NotImplementedError(f"mla_decode pallas kernel: {why}; use impl='xla'")
    block_kv = block_kv or default_block_kv(R, P)
    n_blocks = c_bsr.shape[1] // block_kv
    num_splits = num_splits or choose_splits(B, n_blocks)
    out_bytes = jnp.dtype(out_dtype(q_lat_bthr.dtype, num_splits)).itemsize
    while depth > 1 and smem_bytes(R, P, block_kv, depth, out_bytes) > SMEM_BUDGET:
        depth -= 1
    return _mla_decode_pallas(q_lat_bthr, q_pe_bthd, c_bsr, kpe_bsd, q_start_b, scale=scale, block_kv=block_kv,
                              num_splits=num_splits, depth=depth, fused_pv=fused_pv, interpret=interpret)


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
    o_dtype = out_dtype(dtype, num_splits)
    C = latent_chunk(R)
    chunks = R // C
    tiles = -(-T * H // ROWS)
    # Rows per tile: up to 64 query rows, whole smem tiles of 8 (a model with 8 | H passes q through as it is);
    # beyond, tiles of 64 (the queries padded to whole tiles).
    rows = -(-T * H // 8) * 8 if tiles == 1 else ROWS

    def pad_rows(x):
        x = x.reshape(B, T * H, x.shape[-1]).astype(dtype)
        return x if tiles * rows == T * H else jnp.pad(x, ((0, 0), (0, tiles * rows - T * H), (0, 0)))

    # wgmma's K comes in groups of the swizzle's width: p . c's K is block_kv, so blocks of 32 take 64-byte swizzles.
    swizzle = 128 if block_kv % 64 == 0 else 64
    tiled = () if interpret else (plgpu.TilingTransform((8, swizzle // 2)), plgpu.SwizzleTransform(swizzle))
    kernel = functools.partial(_kernel, heads=H, q_len=T, rows=rows, chunks=chunks, block_kv=block_kv,
                               blocks_per_split=per_split, depth=depth, scale=scale, dtype=dtype, fused_pv=fused_pv,
                               interpret=interpret)

    def entry(start_ref, q_ref, qpe_ref, c_ref, kpe_ref, o_ref, lse_ref):
        pl.run_scoped(
            lambda *scoped: kernel(start_ref, q_ref, qpe_ref, c_ref, kpe_ref, o_ref, lse_ref, scoped),
            (plgpu.SMEM((chunks, ROWS, C), dtype, transforms=tiled),
             plgpu.SMEM((ROWS, P), dtype, transforms=tiled),
             plgpu.SMEM((chunks, depth, block_kv, C), dtype, transforms=tiled),
             plgpu.SMEM((depth, block_kv, P), dtype, transforms=tiled),
             plgpu.SMEM((ROWS, C), o_dtype),
             plgpu.SMEM((ROWS,), jnp.float32)),
            (plgpu.Barrier(num_barriers=chunks + 1), plgpu.Barrier(num_barriers=chunks * depth),
             plgpu.Barrier(num_barriers=depth)),
        )

    entry.__name__ = "mla_decode"   # the CUDA kernel's name in a profile: mla_decode_mosaic_gpu_kernel
    o_part, lse2 = plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct((B, num_splits, tiles * rows, R), o_dtype),
                  jax.ShapeDtypeStruct((B, num_splits, tiles * rows), jnp.float32)),
        # A split's parts adjacent in launch order, so their reads of one cache block meet in L2.
        grid=(tiles * chunks, num_splits, B),
        grid_names=("part", "split", "batch"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params(interpret),
    )(q_start_b.astype(jnp.int32), pad_rows(q_lat_bthr), pad_rows(q_pe_bthd), c_bsr.astype(dtype),
      kpe_bsd.astype(dtype))
    o = o_part[:, 0] if num_splits == 1 else combine_splits(o_part, lse2)
    o = o if tiles * rows == T * H else o[:, :T * H]
    return o.reshape(B, T, H, R).astype(dtype)


__all__ = ["mla_decode_pallas", "supported", "choose_splits", "default_block_kv"]
