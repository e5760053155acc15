"""Grouped-matmul kernels for Hopper written with Pallas Mosaic GPU (wgmma, TMA, warp-specialized pipeline).

Two kernels cover the forward and both backward products of `gmm`:

* `rows_kernel`: rows of `lhs [M, K]` are sorted into groups; group g multiplies `rhs[g]` (`[K, N]`, or `[N, K]`
  read transposed). Forward, d_lhs (rhs transposed), and fused SwiGLU forwards (silu(g) * u stored: from two rhs,
  or from one [gate | up] rhs).
* `contract_kernel`: `out[g] = lhs[rows of g]^T @ rhs[rows of g]`, the weight gradient ("transposed ragged dot").

Each CTA runs three warpgroups: one issues TMA loads into a `stages`-deep ring of shared-memory buffers, two run
wgmma on disjoint column halves of the output tile (`2 * tile_n` wide) with fp32 accumulators in registers. The
CTAs are persistent (one per SM) and walk a tile list; group boundaries are precomputed in XLA (`row_schedule`)
so a tile costs a few scalar loads, not a scan over the groups.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from lcflash.kernels import interpret_params

_MEMORY_REGISTERS = 40  # registers per thread left to the TMA warpgroup (the JAX Hopper examples use 40)
_SMEM_BYTES = 227 * 1024  # usable shared memory per block on H100 / H200
# Mosaic GPU's in-kernel profiler (experiments/gmm_profile.py): dict(profile_space=..., profile_dir=...) records
# the named scopes below ("mma", "next_tile", "epilogue" and within it "store_wait") per warpgroup, in the rows
# kernels and the flat d_rhs kernel; its buffer takes shared memory.
PROFILE: dict | None = None


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tile sizes. rows kernel: tile_m rows of lhs, 2 * tile_n output columns, tile_k contraction per step.

    contract kernel: tile_m rows of the [K, N] output, 2 * tile_n columns, tile_k rows of the group per step.
    """

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 64
    stages: int = 4
    epi_n: int = 64  # output columns per epilogue store
    # Both kernels: one flat pipeline over the CTA's whole (tile, step) sequence, so the TMA warpgroup loads the
    # next tile's first steps during this tile's last steps and epilogue (see rows_kernel, contract_kernel).
    chain: bool = False
    # rows kernel: whole tiles stage their output in a swizzled buffer (no bank conflicts); False stages every
    # tile in the plain buffer the ragged ones need (the earlier epilogue, kept for A/B timing).
    swizzle_epilogue: bool = True
    # flat pipelines (chain=True) only: keep each step's wgmma in flight while the next step's is issued
    # (wgmma_wait(1), buffers released one step later); the epilogue waits for all of them. Slower on an H200
    # (experiments/gmm_notes.md, run 8): kept off, as a switch for the A/B.
    overlap_mma: bool = False
    # Flat pipelines only (chain=True): the output tiles in column bands of this many n tiles (each band's tiles of
    # every row block, or of every K tile of a group in the contract kernel, before the next band's), so the CTAs
    # running at once read fewer rhs columns, each from more of them (band_order). 0 (or at least the n tiles
    # there are): row-major, a row's n tiles in a row.
    band: int = 0
    # Flat contract kernel only: 2-CTA clusters. The two CTAs take K tiles 2p and 2p + 1 of one (group, N tile),
    # so every step they read the same dout block, which TMA multicasts to both (a third less traffic from L2 per
    # step at 128 x 256 tiles). Needs an even number of K tiles; not in the interpreter (no clusters there).
    cluster_k: bool = False

    def wg_tile(self) -> tuple[int, int]:
        """(rows, columns) of one compute warpgroup's accumulator: the two compute warpgroups take a column half of
        the tile_m x 2 * tile_n tile each. (Row halves, one m64 x 2 * tile_n wgmma each, lost on an H100 in session
        45 and were removed in session 53; experiments/HISTORY.md.)"""
        return self.tile_m, self.tile_n


def _wg_col(tiles: Tiles, wg):
    """First column of compute warpgroup wg's accumulator within a tile (it takes all the tile's rows)."""
    return wg * tiles.tile_n


def _part(ref, dim: int, start, size: int):
    """ref's [start, start + size) along dim: the ref itself where that is all of it (no view in the kernel)."""
    if size == ref.shape[dim]:
        return ref
    return ref.at[(slice(None),) * dim + (pl.ds(start, size),)]


def _num_sms(interpret: bool) -> int:
    if interpret:
        return 2  # the interpreter simulates every SM as threads: keep it small
    return jax.devices()[0].core_count


def _persistent_call(kernel, out_type, interpret: bool, name: str, cluster: int = 1):
    """Both kernels' launch: one CTA per SM walking its tile list, 3 warpgroups (1 TMA + 2 wgmma); with
    cluster > 1, "sm" indexes clusters of that many CTAs (axis "cluster"). `name` becomes the CUDA kernel's name
    (`{name}_mosaic_gpu_kernel`), so a profile tells the products apart."""
    kernel.__name__ = name
    return plgpu.kernel(
        kernel,
        out_type=out_type,
        grid=(_num_sms(interpret) // cluster,),
        grid_names=("sm",),
        **(dict(cluster=(cluster,), cluster_names=("cluster",)) if cluster > 1 else {}),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup,
                                             **(PROFILE or {})),
        interpret=interpret_params(interpret),
    )


def _swizzle_transforms(minor_elems: int, dtype) -> tuple:
    """TMA/wgmma-friendly smem layout for a tile whose minor dimension has minor_elems elements."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(minor_elems * itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def smem_bytes(tiles: Tiles, *, n_rhs: int, in_dtype, out_dtype, contract: bool, margin: int = 4096,
               epi_in: int = 0) -> int:
    """Shared memory the kernel allocates (pipeline ring + epilogue staging + epi_in input tiles of a warpgroup's
    accumulator shape per compute warpgroup, swiglu="grad_halves"'s g and u) plus margin; checked before tracing.

    Mosaic's own use (barriers) measured 64 bytes at 4 stages (cross-lowering's smem check), so a small margin
    is exact enough where a stage is at stake (pallas_gmm's chained tiles)."""
    isz, osz = jnp.dtype(in_dtype).itemsize, jnp.dtype(out_dtype).itemsize
    if contract:
        a = tiles.tile_k * tiles.tile_m
    else:
        a = tiles.tile_m * tiles.tile_k
    b = n_rhs * tiles.tile_k * 2 * tiles.tile_n
    ring = tiles.stages * (a + b) * isz
    wr, wc = tiles.wg_tile()
    epi = 2 * wr * (tiles.epi_n * osz + epi_in * wc * isz)
    return ring + epi + margin  # barriers and Mosaic's own scratch


# --------------------------------------------------------------------------------------------------
# Tile schedule for the rows kernel (computed by XLA, read by the kernel with scalar loads).
# --------------------------------------------------------------------------------------------------


def band_order(lin, n_tiles: int, n_mm, band: int):
    """(row tile, n tile) of a flat kernel's linear tile index lin, with n_mm rows of n tiles banded (Tiles.band):
    the rows kernel's matmul tiles (its schedule's tail tiles after them stay row-major), or a group's K tiles in
    the contract kernel. Banded, the CTAs running at once (lin .. lin + SMs) span SMs / band rows and band n tiles:
    at LongCat's down forward (24 n tiles of 256 columns, 132 SMs) row-major spans 5.5 row blocks and all 24 n
    tiles, so each rhs tile is read by ~5.5 CTAs at once and each lhs block by 24; a band of 8 makes that 16.5 and
    8, the balance of the [gate | up] forward (8 n tiles), which reads ~40% fewer bytes per step if each shared
    read comes from HBM once (experiments/gmm_notes.md, session 40)."""
    if not band or band >= n_tiles:
        return lin // n_tiles, lin % n_tiles
    per_band = jnp.maximum(n_mm * band, 1)
    b, rem = lin // per_band, lin % per_band
    in_mm = lin < n_mm * n_tiles
    return (jnp.where(in_mm, rem // band, lin // n_tiles),
            jnp.where(in_mm, b * band + rem % band, lin % n_tiles))


def widest_band(n_tiles: int, most: int) -> int:
    """The widest band of at most `most` n tiles that divides n_tiles (0 for most = 0: row-major)."""
    return max((d for d in range(1, min(most, n_tiles) + 1) if n_tiles % d == 0), default=0)


def _check_band(tiles: Tiles, n_tiles: int):
    if tiles.band < 0 or (0 < tiles.band < n_tiles and (n_tiles % tiles.band or not tiles.chain)):
        raise ValueError(f"Tiles.band = {tiles.band}: must be 0, at least the {n_tiles} n tiles, or a divisor of "
                         f"them with chain=True (the flat pipeline)")


def row_schedule(group_sizes_g: jax.Array, m: int, tile_m: int, align: int | None = None
                 ) -> tuple[jax.Array, jax.Array]:
    """Per row tile: (group, first row of its window / 8, first row within the window, rows, has_matmul); rows
    past sum(sizes) form a tail.

    A tile is a tile_m-row window of lhs intersected with one group; each visit stores only its own rows. A
    group's windows start at its first row rounded down to `align` (default tile_m: the blocks of lhs, so a block
    two groups share is visited once per group) and follow each other tile_m apart; one past row m moves back to
    end there where that keeps it aligned (else TMA zero-fills the reads past m). align = 8, the row tiling of the
    kernels' swizzled TMA copies, leaves each group about half a window fewer: at the skewed load of
    experiments/bench_moe_gemm.py (T = 512) 287 tiles against 304. Per-tile pipelines index lhs by blocks, so they
    take the default only. The tail (rows past sum(group_sizes)) gets tiles with has_matmul = 0: they run zero
    pipeline steps and store zeros. Unused tiles have rows = 0.
    Returns (sched_5t int32 [5, T], num_live_tiles), T = cdiv(m, tile_m) + G (an upper bound).
    """
    align = tile_m if align is None else align
    if align % 8 or tile_m % align or m < tile_m:
        raise ValueError(f"row_schedule: align = {align} must be a multiple of 8 dividing tile_m = {tile_m}, and "
                         f"m = {m} at least tile_m")
    g = group_sizes_g.shape[0]
    sizes = group_sizes_g.astype(jnp.int32)
    ends = jnp.minimum(jnp.cumsum(sizes), m)
    ends_x = jnp.concatenate([ends, jnp.full((1,), m, jnp.int32)])  # tail group G: rows [total, m)
    starts_x = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])
    first_row = starts_x // align * align
    ntiles = jnp.where(ends_x > starts_x, pl.cdiv(ends_x - first_row, tile_m), 0)
    cum = jnp.cumsum(ntiles)
    off = cum - ntiles
    t_max = pl.cdiv(m, tile_m) + g
    t = jnp.arange(t_max, dtype=jnp.int32)
    gi = jnp.searchsorted(cum, t, side="right", method="compare_all").astype(jnp.int32)  # G + 1 means unused
    live = gi <= g
    gi_c = jnp.minimum(gi, g)
    row = first_row[gi_c] + (t - off[gi_c]) * tile_m  # the window's first row, before the move back
    lo = jnp.maximum(starts_x[gi_c], row)
    hi = jnp.minimum(ends_x[gi_c], row + tile_m)
    if (m - tile_m) % align == 0:  # the last windows end at row m (the interpreter raises on reads past it)
        row = jnp.minimum(row, m - tile_m)
    row0 = jnp.where(live, row, 0)
    rows = jnp.where(live, hi - lo, 0)
    start = jnp.where(live, lo - row0, 0)
    has_mm = (gi < g).astype(jnp.int32)
    group = jnp.minimum(gi, max(g - 1, 0))
    return jnp.stack([group, row0 // 8, start, rows, has_mm]).astype(jnp.int32), cum[-1]


# --------------------------------------------------------------------------------------------------
# Epilogue: store rows [start, start + rows) of a warpgroup's (tile_m, tile_n) result.
# --------------------------------------------------------------------------------------------------


def _store_rows(val, out_gmem, stage_smem, *, row0, start, rows, col0, epi_n, ragged_smem=None):
    """Casts val (fp32, WGMMA layout) to out dtype and stores it in epi_n-column chunks via TMA.

    A whole tile goes through stage_smem (swizzled, so the register store has no bank conflicts). A ragged row
    range [start, start + rows) needs row slices at any offset, which a swizzled buffer cannot give, so with
    ragged_smem (unswizzled, aliasing stage_smem's bytes through a RefUnion) it is written as a ladder of
    power-of-two row counts, the scheme of JAX's ragged_dot_mgpu example. Without ragged_smem every tile is whole.
    """
    tile_rows = stage_smem.shape[0]
    whole_tile = (start == 0) & (rows == tile_rows)
    for c in range(val.shape[1] // epi_n):
        with jax.named_scope("store_wait"):  # the staging buffer is free again (its last TMA store has read it)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        chunk = val[:, c * epi_n:(c + 1) * epi_n].astype(stage_smem.dtype)
        cols = pl.ds(col0 + c * epi_n, epi_n)

        def _whole(chunk=chunk, cols=cols):
            stage_smem[...] = chunk
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(stage_smem, out_gmem.at[pl.ds(row0, tile_rows), cols])

        if ragged_smem is None:
            _whole()
            continue
        pl.when(whole_tile)(_whole)

        @pl.when(jnp.logical_not(whole_tile))
        def _ragged(chunk=chunk, cols=cols):
            ragged_smem[...] = chunk
            plgpu.commit_smem()
            s0 = start
            p = 1 << int(math.log2(tile_rows))
            while p >= 1:

                @pl.when((rows & p) != 0)
                def _():
                    plgpu.copy_smem_to_gmem(ragged_smem.at[pl.ds(s0, p)], out_gmem.at[pl.ds(row0 + s0, p), cols])

                s0 = s0 + (rows & p)
                p //= 2
    # No wait here: the stores drain while the next tile's pipeline runs; the next epilogue (or the end of the
    # kernel) waits before the staging buffer is reused.


def _next_tile_info(last, load_next, epilogue, info):
    """The tile info the next step runs: load_next()'s at a tile's last step (after which epilogue stores the
    finished tile), else info unchanged.

    The loads run every step and a select keeps them. Loading only in the last step's branch (a cond with results)
    ran no faster on an H100 (session 48, LongCat's T = 512: d_rhs 1,335-1,471 us against 1,322-1,414); under the
    profiler, "next_tile"'s share of d_rhs's time moved into unscoped time, so the loads were not what it cost."""
    with jax.named_scope("next_tile"):
        nxt = load_next()
    pl.when(last)(epilogue)
    return tuple(jnp.where(last, a, b) for a, b in zip(nxt, info))


def _silu(x):
    return x * (1.0 / (1.0 + jnp.exp(-x)))


def _rows_staging(shape, dtype, interpret: bool):
    """One staging buffer, two views: swizzled for whole tiles, plain for ragged ones (see _store_rows).

    Pallas' GPU interpreter (0.10) cannot read through a RefUnion, so there the two views are separate buffers:
    same results, only the aliasing (covered by the GPU tests) is not simulated."""
    views = (plgpu.SMEM(shape, dtype, transforms=_swizzle_transforms(shape[-1], dtype)), plgpu.SMEM(shape, dtype))
    return views if interpret else plgpu.RefUnion(*views)


# --------------------------------------------------------------------------------------------------
# Rows kernel: forward, d_lhs, fused SwiGLU forward.
# --------------------------------------------------------------------------------------------------


def rows_kernel(
    lhs_mk,
    rhs_list,
    sched_5t,
    *,
    transpose_rhs: bool,
    out_dtype,
    tiles: Tiles,
    swiglu: str | None = None,
    zero_tail: tuple[bool, ...] | None = None,
    gu_mn2=None,
    interpret: bool = False,
):
    """out[rows of g] = lhs[rows of g] @ rhs[g] (or @ rhs[g]^T); rows past the groups are zero.

    rhs_list: one [G, K, N] array (transpose_rhs: [G, N, K]), or two (gate, up) with swiglu "h" or "hgu":
    swiglu="h" returns silu(x@wg) * (x@wu); swiglu="hgu" returns (h, x@wg, x@wu) for the backward pass.
    swiglu="halves": one rhs [G, K, 2N] = [gate | up], read at both halves' columns into two accumulators;
    returns (h [M, N], x @ rhs [M, 2N]): the backward pass's residual in the layout its one d_lhs product takes.
    swiglu="grad_halves": SwiGLU's backward in the epilogue of d_h = lhs @ rhs (the down projection's d_lhs): reads
    gu_mn2 = [g | u] (the "halves" residual) at the tile's rows and columns and returns [d_g | d_u] [M, 2N], the
    input of the [gate | up] backward, so d_h never leaves registers. Each compute warpgroup loads its g and u
    tiles by TMA at its tile's first step (flat pipeline) and waits for them at the last.

    tiles.chain=False: every tile runs its own pipeline (dynamic step count, 0 for tail tiles), so the TMA
    warpgroup quiesces at each tile's end and the next tile's first loads wait behind this tile's epilogue.
    tiles.chain=True: one flat pipeline per CTA over all its matmul tiles' steps (k_steps each; _flat_loop, whose
    TMA warpgroup finds a tile's group, row block and n tile once per tile), the epilogue run inside the pipeline
    body at each tile's last step (the flat contract kernel's scheme): the TMA warpgroup never drains between
    tiles. The tail tiles (rows past the groups) are stored as zeros afterwards by the compute warpgroups, outside
    the pipeline.
    zero_tail: per output, whether rows past the groups are stored as zeros (default: all); False leaves them
    unwritten (undefined), for consumers that never read them: the tail is about half of the MoE row buffers.
    """
    m, k = lhs_mk.shape
    n_rhs = len(rhs_list)
    if transpose_rhs:
        g, n, k2 = rhs_list[0].shape
    else:
        g, k2, n = rhs_list[0].shape
    tm, tn, tk, epi_n = tiles.tile_m, tiles.tile_n, tiles.tile_k, tiles.epi_n
    wr, wc = tiles.wg_tile()  # one compute warpgroup's accumulator
    grad = swiglu == "grad_halves"
    if swiglu == "halves" and (transpose_rhs or n_rhs != 1):
        raise ValueError(f"swiglu={swiglu!r} takes one [G, K, 2N] rhs, not transposed")
    if swiglu == "halves":  # [gate | up] as two rhs operands, the up half's blocks n // (2 * tn) further on
        n, n_rhs = n // 2, 2
    rhs_inputs = rhs_list[:1] if swiglu == "halves" else rhs_list  # the kernel's rhs operands
    if grad != (gu_mn2 is not None) or (gu_mn2 is not None and gu_mn2.shape != (m, 2 * n)):
        raise ValueError(f"swiglu='grad_halves' takes gu_mn2 [M, 2N] = {(m, 2 * n)} and only it takes gu_mn2; got "
                         f"swiglu={swiglu!r}, gu_mn2 {None if gu_mn2 is None else gu_mn2.shape}")
    rhs_block_offsets = (0, n // (2 * tn)) if swiglu == "halves" else (0,) * n_rhs
    if k != k2:
        raise ValueError(f"contraction sizes differ: lhs has {k}, rhs has {k2}")
    if k % tk or n % (2 * tn) or wc % epi_n or wr % 64 or m < tm:
        raise ValueError(f"rows_kernel needs K % {tk} == 0, N % {2 * tn} == 0, M >= {tm}, warpgroup tiles of a "
                         f"multiple of 64 rows and of epi_n = {epi_n} columns; got {m=} {k=} {n=}, {tiles}")
    if tiles.overlap_mma and not tiles.chain:
        raise ValueError("Tiles.overlap_mma needs chain=True (a per-tile pipeline's prologue would refill buffers "
                         "its last wgmma still reads)")
    if grad and not tiles.chain:
        raise ValueError(f"swiglu={swiglu!r} needs chain=True (the flat pipeline starts a tile's g and u loads at "
                         "its first step)")
    k_steps = k // tk
    n_tiles = n // (2 * tn)
    _check_band(tiles, n_tiles)
    t_max = sched_5t.shape[1]
    dtype = lhs_mk.dtype
    tr_a = _swizzle_transforms(tk, dtype)
    tr_b = _swizzle_transforms(tk if transpose_rhs else 2 * tn, dtype)
    n_out = {None: 1, "h": 1, "hgu": 3, "halves": 2, "grad_halves": 1}[swiglu]
    zero_tail = (True,) * n_out if zero_tail is None else tuple(zero_tail)
    if len(zero_tail) != n_out:
        raise ValueError(f"zero_tail has {len(zero_tail)} entries for {n_out} outputs")
    if swiglu in ("h", "hgu") and n_rhs != 2:
        raise ValueError(f"swiglu={swiglu!r} needs exactly two rhs arrays (gate, up)")
    if swiglu in (None, "grad_halves") and n_rhs != 1:
        raise ValueError(f"swiglu={swiglu!r} takes one rhs array")
    n_sms = _num_sms(interpret)  # persistent CTAs walking the tile list
    flat = tiles.chain
    stages = tiles.stages if flat else min(tiles.stages, k_steps)
    b_block = (2 * tn, tk) if transpose_rhs else (tk, 2 * tn)

    def make_pipeline(body, context, nsteps, r8, nt):
        """A per-tile pipeline over the K steps of the row block at row r8 * 8 (a multiple of tm: row_schedule's
        default align) and N tile nt, on a group's [K, N] rhs slice."""
        blk = lax.div(r8, jnp.int32(tm // 8))

        def b_map(kk, off):
            return (nt + off, kk) if transpose_rhs else (kk, nt + off)

        spec = lambda shape, imap, tr: plgpu.BlockSpec(shape, imap, transforms=tr, memory_space=plgpu.SMEM)  # noqa
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(nsteps,),
            memory_registers=_MEMORY_REGISTERS,
            in_specs=[spec((tm, tk), lambda kk: (blk, kk), tr_a)] + [
                spec(b_block, functools.partial(b_map, off=off), tr_b) for off in rhs_block_offsets],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=stages,
            compute_context=context,
        )

    def kernel(sched_ref, *refs):
        counts_ref, (lhs_gmem, *refs) = (refs[0], refs[1:]) if flat else (None, refs)  # counts: flat only
        rhs_gmems = refs[:len(rhs_inputs)] * (n_rhs // len(rhs_inputs))  # one per accumulator
        n_in = len(rhs_inputs) + (gu_mn2 is not None)
        gu_gmem = refs[len(rhs_inputs)] if gu_mn2 is not None else None
        out_gmems = refs[n_in:]
        sm = lax.axis_index("sm")
        ignore = lambda *_, **__: None

        if flat:
            n_mm, n_live = counts_ref[0], counts_ref[1]  # the schedule lists matmul, then tail, then unused tiles
            mm_total = n_mm * n_tiles
            count = (mm_total - sm + n_sms - 1) // n_sms  # this CTA's matmul tiles sm, sm + n_sms, ...

            def lin_of(s):  # linear tile index of step s
                return sm + (s // k_steps) * n_sms

            def order(lin):  # (schedule tile, n tile)
                return band_order(lin, n_tiles, n_mm, tiles.band)

            allocs = _flat_ring([((tm, tk), tr_a)] + [(b_block, tr_b)] * len(rhs_block_offsets), dtype, stages)

            def copy_step(slots, barrier, info, kk):  # the copies of K step kk of tile info
                (a_slot, *b_slots), (grp, r8, nt), ks = slots, info, pl.ds(kk * tk, tk)
                plgpu.copy_gmem_to_smem(lhs_gmem.at[pl.ds(r8 * 8, tm), ks], a_slot, barrier)
                for b_slot, off, rhs in zip(b_slots, rhs_block_offsets, rhs_gmems):
                    cols = pl.ds((nt + off) * 2 * tn, 2 * tn)
                    plgpu.copy_gmem_to_smem(rhs.at[grp, cols, ks] if transpose_rhs else rhs.at[grp, ks, cols],
                                            b_slot, barrier)
        else:
            order = functools.partial(band_order, n_tiles=n_tiles, n_mm=None, band=0)  # row-major (_check_band)
            alloc_pipe = make_pipeline(ignore, ignore, k_steps, 0, 0)
            allocs = alloc_pipe.get_allocations(lhs_gmem, *[r.at[0] for r in rhs_gmems])

        # grad_halves: per compute warpgroup its g and u tiles, each with its own barrier.
        gu_allocs = {} if gu_mn2 is None else dict(
            gu_smem=plgpu.SMEM((2, 2, wr, wc), gu_mn2.dtype, transforms=_swizzle_transforms(wc, gu_mn2.dtype)),
            gu_bar=plgpu.Barrier(num_barriers=4))

        @functools.partial(
            pl.run_scoped,
            allocs=allocs,
            stage_smem=_rows_staging((2, wr, epi_n), out_dtype, interpret),
            collective_axes="wg",
            **gu_allocs,
        )
        def _scope(allocs, stage_smem, gu_smem=None, gu_bar=None):
            stage_whole, stage_ragged = stage_smem
            if not tiles.swizzle_epilogue:
                stage_whole = stage_ragged
            wg = lax.axis_index("wg")
            c_off = _wg_col(tiles, wg)

            def tile_of(lin):
                """(n tile, group, first row of the window / 8, first row in it, rows) of linear tile index lin."""
                mt, nt = order(lin)
                mt = jnp.minimum(mt, t_max - 1)  # flat: the tile after a CTA's last one is never used
                # the window's first row comes in units of 8, which the copies and stores scale back: given the row
                # itself, Mosaic GPU's layout inference fails on them (JAX 0.10.2, lowering for CUDA)
                return nt, sched_ref[0, mt], sched_ref[1, mt], sched_ref[2, mt], sched_ref[3, mt]

            def load_gu(nt, r8):
                """grad_halves: starts this warpgroup's TMA loads of its g and u tiles (the window at row r8 * 8)."""
                rows = pl.ds(r8 * 8, wr)
                for j in range(2):
                    plgpu.copy_gmem_to_smem(gu_gmem.at[rows, pl.ds(j * n + nt * 2 * tn + c_off, wc)],
                                            gu_smem.at[wg, j], gu_bar.at[2 * wg + j])

            def swiglu_grad(dh):
                """[d_g, d_u] of h = silu(g) * u at the loaded tiles, in fp32."""
                g, u = (gu_smem.at[wg, j][...].astype(jnp.float32) for j in range(2))
                sig = 1.0 / (1.0 + jnp.exp(-g))
                return dh * u * sig * (1.0 + g * (1.0 - sig)), dh * g * sig

            @jax.named_scope("epilogue")
            def store(vals, nt, r8, start, rows, tail=False):
                """tail: True (static) or a traced predicate for tiles of rows past the groups, whose outputs with
                zero_tail False are not stored."""
                col0 = nt * 2 * tn + c_off
                if grad and tail is not True:  # the tiles load_gu started at the first step
                    for j in range(2):
                        plgpu.barrier_wait(gu_bar.at[2 * wg + j])
                outs = [(v, i, col0) for i, v in enumerate(vals)]  # (value, output, first column)
                if grad:
                    d_gu = [vals[0]] * 2 if tail is True else swiglu_grad(vals[0])  # the tail stores zeros
                    outs = [(d_gu[0], 0, col0), (d_gu[1], 0, col0 + n)]
                elif swiglu is not None:
                    h = (_silu(vals[0]) * vals[1], 0, col0)
                    outs = {"h": [h], "hgu": [h] + [(v, i + 1, c) for v, i, c in outs],
                            "halves": [h, (vals[0], 1, col0), (vals[1], 1, col0 + n)]}[swiglu]
                for val, i, c0 in outs:
                    if tail is True and not zero_tail[i]:
                        continue

                    def _store(val=val, i=i, c0=c0):
                        _store_rows(val, out_gmems[i], stage_whole.at[wg], row0=r8 * 8, start=start,
                                    rows=rows, col0=c0, epi_n=epi_n, ragged_smem=stage_ragged.at[wg])

                    if zero_tail[i] or tail is True or tail is False:
                        _store()
                    else:
                        pl.when(jnp.logical_not(tail))(_store)

            @jax.named_scope("mma")
            def mma_step(a_smem, b_smems, accs):
                for b_smem, acc in zip(b_smems, accs):  # all the tile's rows, this warpgroup's columns
                    if transpose_rhs:
                        b = _part(b_smem, 0, c_off, wc).transpose((1, 0))
                    else:
                        b = _part(b_smem, 1, c_off, wc)
                    plgpu.wgmma(acc, a_smem, b)
                # Per-tile pipelines wait for this step's wgmma before its buffers are released: releasing one
                # step later (delay_release=1) would let the next tile's prologue refill the last step's buffers
                # while its wgmma still reads them; the other compute warpgroup keeps the tensor cores busy.
                plgpu.wgmma_wait(int(tiles.overlap_mma))

            def acc_context(run, make_carry, after=None):
                def acc_scope(*acc_refs):
                    run(make_carry(tuple(acc_refs)))
                    if after is not None:
                        after(acc_refs)

                pl.run_scoped(acc_scope, *[plgpu.ACC((wr, wc), jnp.float32) for _ in range(n_rhs)])

            if not flat:

                @plgpu.nd_loop((t_max * n_tiles,), collective_axes="sm")
                def _tile(info):
                    lin = info.index[0]
                    nt, grp, r8, start, rows = tile_of(lin)
                    nsteps = sched_ref[4, lin // n_tiles] * k_steps  # 0 for tail tiles: accumulators stay zero

                    def mma(_, a_smem, *args):
                        mma_step(a_smem, args[:n_rhs], args[n_rhs])
                        return args[n_rhs]

                    def context(run):
                        acc_context(run, lambda accs: accs, after=lambda accs: store(
                            [acc[...] for acc in accs], nt, r8, start, rows, tail=nsteps == 0))

                    pipe = make_pipeline(mma, context, nsteps, r8, nt)
                    pl.when(rows > 0)(lambda: pipe(lhs_gmem, *[r.at[grp] for r in rhs_gmems], allocations=allocs))

            else:

                def mma(s, slots, carry):
                    (a_smem, *b_smems), (accs, info) = slots, carry
                    if gu_mn2 is not None:  # this tile's g and u land while its steps run
                        pl.when(s % k_steps == 0)(lambda: load_gu(info[0], info[2]))
                    mma_step(a_smem, b_smems, accs)
                    last = s % k_steps == k_steps - 1

                    def _epilogue():
                        nt, _, r8, start, rows = info
                        plgpu.wgmma_wait(0)
                        store([acc[...] for acc in accs], nt, r8, start, rows)
                        for acc in accs:
                            _zero_acc(acc, interpret)

                    return accs, _next_tile_info(last, lambda: tile_of(lin_of(s) + n_sms), _epilogue, info)

                def context(run):
                    acc_context(run, lambda accs: (accs, tile_of(sm)))

                def tile_at(j):  # TMA warpgroup: ((group, window's first row / 8, n tile), steps) of the j-th tile
                    nt, grp, r8, _, _ = tile_of(sm + j * n_sms)  # the unused loads are dropped
                    return (grp, r8, nt), jnp.int32(k_steps)

                _flat_loop(allocs, context, mma, count * k_steps, tile_at, copy_step, stages,
                           late=int(tiles.overlap_mma))

                if any(zero_tail):  # else no output stores the tail
                    @pl.when(wg < 2)
                    def _tail():  # rows past the groups: zeros, round-robin continuing after the matmul tiles
                        first = (sm - mm_total % n_sms + n_sms) % n_sms
                        tail_count = ((n_live - n_mm) * n_tiles - first + n_sms - 1) // n_sms

                        @pl.loop(0, tail_count)
                        def _tail_tile(j):
                            nt, _, r8, start, rows = tile_of(mm_total + first + j * n_sms)
                            store([jnp.zeros((wr, wc), jnp.float32)] * n_rhs, nt, r8, start, rows, tail=True)

            plgpu.wait_smem_to_gmem(0)  # all output stores have landed before the kernel exits

    out_type = [jax.ShapeDtypeStruct((m, n), out_dtype) for _ in range(n_out)]
    if swiglu in ("halves", "grad_halves"):
        out_type[-1] = jax.ShapeDtypeStruct((m, 2 * n), out_dtype)
    call = _persistent_call(kernel, out_type, interpret,
                            name=f"gmm_rows{'_t' if transpose_rhs else ''}_{swiglu or 'plain'}_k{k}_n{n}")
    counts = [jnp.stack([sched_5t[4].sum(), (sched_5t[3] > 0).sum()]).astype(jnp.int32)] if flat else []
    gu_in = [] if gu_mn2 is None else [gu_mn2]
    outs = call(sched_5t, *counts, lhs_mk, *rhs_inputs, *gu_in)  # counts: matmul and live tiles
    return outs[0] if n_out == 1 else tuple(outs)

# --------------------------------------------------------------------------------------------------
# Contract kernel: d_rhs[g] = lhs[rows of g]^T @ dout[rows of g].
# --------------------------------------------------------------------------------------------------


def _contract_dims(lhs_mk, rhs_mn, gsched_4g, tiles: Tiles, lhs_is_km: bool):
    """(lhs as [M, K], M, K, N, G) after checking the shapes the contract kernels tile."""
    if lhs_is_km:
        lhs_mk = lhs_mk.T
    (m, k), (m2, n), g = lhs_mk.shape, rhs_mn.shape, gsched_4g.shape[1]
    tm, tn, tc = tiles.tile_m, tiles.tile_n, tiles.tile_k
    if m != m2:
        raise ValueError(f"row counts differ: lhs has {m}, rhs has {m2}")
    wr, wc = tiles.wg_tile()
    if k % tm or n % (2 * tn) or wc % tiles.epi_n or wr % 64 or m < tc or g == 0:
        raise ValueError(f"contract_kernel needs K % {tm} == 0, N % {2 * tn} == 0, M >= {tc}, G > 0 and warpgroup "
                         f"tiles of a multiple of 64 rows and of epi_n columns; got {m=} {k=} {n=} {g=}, {tiles}")
    return lhs_mk, m, k, n, g


def _contract_scope(allocs, tiles: Tiles, out_dtype):
    """run_scoped for a contract kernel's body: the pipeline's smem ring and barriers (`allocs`) and a swizzled
    output staging buffer per compute warpgroup (whole tiles only, so the register store has no bank conflicts)."""
    wr, _ = tiles.wg_tile()
    stage_shape = (2, wr, tiles.epi_n)
    return functools.partial(
        pl.run_scoped,
        allocs=allocs,
        stage_smem=plgpu.SMEM(stage_shape, out_dtype, transforms=_swizzle_transforms(stage_shape[-1], out_dtype)),
        collective_axes="wg",
    )


def _contract_step(acc, a_smem, b_smem, row0, start, end, *, wg, tiles: Tiles, lhs_is_km: bool, interpret: bool):
    """One 64-row step of d_rhs: zero the rows of this warpgroup's column half of dout outside [start, end) (another
    group's, in a window two groups share, or an earlier window's, in one moved back at row m), then acc +=
    lhs_block^T @ dout_block for this warpgroup's part of the tile (it reads only the dout half it masked, so the two
    warpgroups need no barrier between)."""
    tc, tn = b_smem.shape[0], tiles.tile_n
    b_own = b_smem.at[:, pl.ds(wg * tn, tn)]  # the half this warpgroup masks and reads
    masked = (row0 < start) | (row0 + tc > end)

    def _mask():
        r = lax.broadcasted_iota(jnp.int32, (tc, tn), 0)
        if not interpret:  # the interpreter has no layouts
            r = plgpu.layout_cast(r, plgpu.Layout.WGMMA)
        keep = (r >= start - row0) & (r < end - row0)
        vals = b_own[...]
        b_own[...] = jnp.where(keep, vals, jnp.zeros_like(vals))
        plgpu.commit_smem()

    if CONTRACT_MASK:
        pl.when(masked)(_mask)
    # all the tile's rows (of K), this warpgroup's columns
    a = a_smem if lhs_is_km else a_smem.transpose((1, 0))
    plgpu.wgmma(acc, a, b_own)
    plgpu.wgmma_wait(int(tiles.overlap_mma))  # see rows_kernel and Tiles.overlap_mma


def contract_schedule(group_sizes_g: jax.Array, m: int, tile_k: int) -> jax.Array:
    """Per group: (start row, end row, first tile_k block, number of blocks) as int32 [4, G]."""
    sizes = group_sizes_g.astype(jnp.int32)
    ends = jnp.minimum(jnp.cumsum(sizes), m)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    blk0 = starts // tile_k
    nblk = jnp.where(ends > starts, pl.cdiv(ends, tile_k) - blk0, 0)
    return jnp.stack([starts, ends, blk0, nblk]).astype(jnp.int32)


# False skips d_rhs's masking of the row blocks two groups share (and of an empty group's one block), so their rows
# add to both groups' gradients: wrong wherever groups do not fill whole tile_k blocks. Only for timing what the
# masking costs (experiments/bench_moe_gemm.py --deal-nomask). Read at trace time.
CONTRACT_MASK = True
# Flat contract pipeline: an empty group's tiles (zeros) stored by the compute warpgroups after the pipeline, dealt
# round robin after the live tiles, instead of each running one fully masked step in it (a block loaded, masked and
# multiplied for nothing). Skewed routing empties experts: 13 of 64 in the benchmark's skewed case at T = 512, a
# fifth of the d_rhs tiles; there d_rhs (fp32 out) ran 5.3% faster for the down projection and 1.7% for [gate | up]
# on an H100, 1.1% at Dirichlet(0.3) shares (6 empty), the same at equal groups (session 44). Bit-identical either
# way. Read at trace time.
CONTRACT_ZERO_EMPTY = True
# How the flat contract pipeline deals its tiles to the CTAs: "round_robin" (CTA c takes c, c + n_sms, ...), or by
# cost (their group's row blocks), so that a skewed routing's large groups do not pile onto a few CTAs: "sorted"
# (round robin over the tiles sorted by cost) or "snake" (every other row of that deal reversed). "auto": snake where
# a group has fewer tiles than there are CTAs, else round robin, which then already spreads every group over all
# CTAs. On an H200 against round robin: configs/small.py's d_rhs (12-24 tiles per group) 13-21% faster for the down
# projection and 5-10% for [gate | up] at expert-size CVs of 0.7-1.3, 2-6% slower at equal groups (session 20), and
# training +1.7% (session 21); LongCat's (384 tiles per group) 4-10% slower at equal groups and at CV 0.67 (session
# 21; experiments/HISTORY.md). Read at trace time.
CONTRACT_DEAL = "auto"
CONTRACT_DEALS = ("auto", "round_robin", "sorted", "snake")
_TILE_STORE_STEPS = 2  # a tile's epilogue (accumulator to gmem), in pipeline steps, for the deals by cost


def deal_tiles(cost_g: jax.Array, tiles_per_group: int, n_sms: int, snake: bool, n_dealt=None) -> jax.Array:
    """[n_sms, cdiv(T, n_sms)] int32, T = G * tiles_per_group: CTA c's tiles (group-major numbers) in the order it
    runs them, T (no tile) past its last. The tiles, sorted by their group's cost (descending; ties in group order),
    are dealt in rows of n_sms, so each CTA gets one tile of every rank band; `snake` reverses every other row, so
    the CTAs that got a band's largest get the next band's smallest. Only the first n_dealt tiles in that order
    (default all) are dealt. The groups are ranked by counting (two fused [G, G] comparison-reductions): with an
    argsort, building the deal cost 17-49 us per call on an H200, 5-20 us this way (experiments/HISTORY.md, session
    20)."""
    g = cost_g.shape[0]
    n_t = g * tiles_per_group
    j_max = pl.cdiv(n_t, n_sms)
    ids = jnp.arange(g, dtype=jnp.int32)
    other, this = cost_g[None, :], cost_g[:, None]
    before = (other > this) | ((other == this) & (ids[None, :] < ids[:, None]))   # [g, h]: h ranks before g
    rank_g = jnp.sum(before, axis=1, dtype=jnp.int32)
    group_r = jnp.sum(jnp.where(rank_g[None, :] == ids[:, None], ids[None, :], 0), axis=1, dtype=jnp.int32)
    q = jnp.arange(j_max * n_sms, dtype=jnp.int32)
    order = jnp.where(q < (n_t if n_dealt is None else n_dealt),
                      group_r[jnp.minimum(q // tiles_per_group, g - 1)] * tiles_per_group + q % tiles_per_group, n_t)
    rows = order.reshape(j_max, n_sms)
    if snake:
        rows = jnp.where((jnp.arange(j_max) % 2 == 1)[:, None], rows[:, ::-1], rows)
    return rows.T


def contract_flat_schedule(gsched_4g: jax.Array, m: int, tile_k: int, tiles_per_group: int, n_sms: int,
                           deal: str | None = None, zero_empty: bool | None = None, align: int | None = None):
    """Per-CTA tile lists for the flat contract pipeline (contract_kernel with tiles.chain).

    Tiles are numbered group-major (group = lin // tiles_per_group). CTA c walks the tiles of row c of `lin_cj`, as
    `deal` (default CONTRACT_DEAL; see there for "auto") deals them: round robin (CTA c takes the c-th, c + n_sms-th,
    ... tile) or by cost (`deal_tiles`). It runs every tile's steps back to back in one pipeline. An empty group's
    tiles either run one step each on a (clamped, in-bounds) block that the kernel masks entirely, so they store
    zeros like any other, or, with `zero_empty` (default CONTRACT_ZERO_EMPTY), stay out of the pipeline: the compute
    warpgroups store them as zeros after it, round robin continuing after the live tiles. Returns
      tile_4g int32 [4, G]: start row, end row, first window row / 8, steps;
      total_c int32 [n_sms]: CTA c's step count;
      lin_cj int32 [n_sms, J + 2]: the tile in CTA c's slot j, G * tiles_per_group (no tile) past its last;
      zero_2z int32 [2 + G]: the number of zero tiles, of pipeline tiles, then the empty groups in order (0 tiles
        without zero_empty).
    A tile's steps are tile_k-row windows from its group's first row rounded down to `align` (default tile_k: lhs's
    blocks) on, tile_k apart, like row_schedule's; the kernel masks the rows of other groups in them.
    """
    deal = CONTRACT_DEAL if deal is None else deal
    zero_empty = CONTRACT_ZERO_EMPTY if zero_empty is None else zero_empty
    if deal not in CONTRACT_DEALS:
        raise ValueError(f"contract deal {deal!r}: must be one of {CONTRACT_DEALS}")
    if deal == "auto":
        deal = "snake" if tiles_per_group < n_sms else "round_robin"
    align = tile_k if align is None else align
    if align % 8 or tile_k % align:
        raise ValueError(f"contract_flat_schedule: align = {align} must be a multiple of 8 dividing tile_k = {tile_k}")
    by_cost = deal != "round_robin"
    g = gsched_4g.shape[1]
    starts, ends = gsched_4g[0], gsched_4g[1]
    first = starts // align * align
    nblk = jnp.where(ends > starts, pl.cdiv(ends - first, tile_k), 0)
    nst = jnp.maximum(nblk, 1)
    # an empty group at row m: keep its one masked load in bounds (a group of one step still covers its rows)
    first = jnp.minimum(first, (pl.cdiv(m, tile_k) - 1) * tile_k)
    tile_4g = jnp.stack([starts, ends, first // 8, nst]).astype(jnp.int32)
    n_lin = g * tiles_per_group
    j_max = pl.cdiv(n_lin, n_sms)
    live = nblk > 0 if zero_empty else jnp.ones((g,), bool)
    n_piped = jnp.sum(live, dtype=jnp.int32) * tiles_per_group
    find = functools.partial(jnp.searchsorted, side="right", method="compare_all")
    ranks = jnp.arange(g, dtype=jnp.int32)
    if by_cost:  # an empty group costs least, so with zero_empty the first n_piped tiles dealt are the live ones
        lin_cj = deal_tiles(jnp.where(live, nst + _TILE_STORE_STEPS, 0), tiles_per_group, n_sms,
                            snake=deal == "snake", n_dealt=n_piped)
    else:  # the q-th live tile, q = c + j * n_sms
        q = jnp.arange(n_sms, dtype=jnp.int32)[:, None] + n_sms * jnp.arange(j_max, dtype=jnp.int32)[None, :]
        live_g = find(jnp.cumsum(live, dtype=jnp.int32), ranks).astype(jnp.int32)  # the r-th live group
        lin_cj = jnp.where(q < n_piped, live_g[jnp.minimum(q // tiles_per_group, g - 1)] * tiles_per_group
                           + q % tiles_per_group, n_lin)
    empty_g = find(jnp.cumsum(~live, dtype=jnp.int32), ranks).astype(jnp.int32)  # the r-th empty group (>= g: none)
    zero_2z = jnp.concatenate([jnp.stack([n_lin - n_piped, n_piped]), jnp.minimum(empty_g, g - 1)])
    grp_cj = jnp.minimum(lin_cj // tiles_per_group, g - 1)
    steps_cj = jnp.where(lin_cj < n_lin, nst[grp_cj], 0)
    total_c = jnp.sum(steps_cj, axis=1)
    lin_cj = jnp.concatenate([lin_cj, jnp.full((n_sms, 2), n_lin, jnp.int32)], axis=1)  # slots j + 1, j + 2 read ahead
    return tile_4g, total_c.astype(jnp.int32), lin_cj.astype(jnp.int32), zero_2z.astype(jnp.int32)


def contract_kernel(lhs_mk, rhs_mn, gsched_4g, *, out_dtype, tiles: Tiles, lhs_is_km: bool = False,
                    interpret: bool = False, align: int | None = None):
    """out[g] = lhs[rows of g]^T @ rhs[rows of g] -> [G, K, N]; empty groups give zeros.

    lhs_is_km: lhs arrives already transposed ([K, M]) and wgmma reads it untransposed. Pallas' GPU interpreter
    (0.10) cannot run wgmma on a transposed smem view, so CPU tests use this variant; the GPU reads [M, K].

    tiles.chain=False: one pipeline per output tile (its group's block count deep), so the TMA warpgroup drains
    at each tile's end and loads the next tile's first blocks only once this tile's last block is consumed.
    tiles.chain=True: one pipeline per CTA over all its tiles' steps (`contract_flat_schedule`): the compute
    warpgroups zero the accumulator and store the tile at a tile's last step, the TMA warpgroup never drains
    between tiles. Same tiles, same accumulation order: results are bit-identical to the per-tile variant, unless
    `align` (chain only) moves the flat pipeline's row windows off lhs's blocks (contract_flat_schedule).
    """
    if tiles.overlap_mma and not tiles.chain:
        raise ValueError("Tiles.overlap_mma needs chain=True (see rows_kernel)")
    if align is not None and not tiles.chain:
        raise ValueError(f"contract_kernel: align = {align} needs chain=True (the per-tile pipelines read lhs's blocks)")
    if tiles.chain:
        return _contract_kernel_flat(lhs_mk, rhs_mn, gsched_4g, out_dtype=out_dtype, tiles=tiles,
                                     lhs_is_km=lhs_is_km, interpret=interpret, align=align)
    lhs_mk, m, k, n, g = _contract_dims(lhs_mk, rhs_mn, gsched_4g, tiles, lhs_is_km)
    tm, tn, tc, epi_n = tiles.tile_m, tiles.tile_n, tiles.tile_k, tiles.epi_n
    dtype = lhs_mk.dtype
    tr_a = _swizzle_transforms(tc if lhs_is_km else tm, dtype)
    tr_b = _swizzle_transforms(2 * tn, dtype)
    k_tiles, n_tiles = k // tm, n // (2 * tn)
    _check_band(tiles, n_tiles)
    stages = tiles.stages

    def make_pipeline(body, context, nsteps, blk0_of, kt_of, nt_of):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(nsteps,),
            memory_registers=_MEMORY_REGISTERS,
            in_specs=[
                plgpu.BlockSpec((tm, tc), lambda s: (kt_of(), blk0_of() + s), transforms=tr_a, delay_release=0,
                                memory_space=plgpu.SMEM)
                if lhs_is_km else
                plgpu.BlockSpec((tc, tm), lambda s: (blk0_of() + s, kt_of()), transforms=tr_a, delay_release=0,
                                memory_space=plgpu.SMEM),
                plgpu.BlockSpec((tc, 2 * tn), lambda s: (blk0_of() + s, nt_of()), transforms=tr_b, delay_release=0,
                                memory_space=plgpu.SMEM),
            ],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=stages,
            compute_context=context,
        )

    def kernel(gsched_ref, lhs_gmem, rhs_gmem, out_gmem):
        zero = lambda: jnp.int32(0)
        ignore = lambda *_, **__: None
        # A dynamic grid keeps all `stages` buffers, so the allocation pipeline must not be shrunk either.
        alloc_pipe = make_pipeline(ignore, ignore, jnp.int32(stages), zero, zero, zero)

        @_contract_scope(alloc_pipe.get_allocations(lhs_gmem, rhs_gmem), tiles, out_dtype)
        def _scope(allocs, stage_smem):
            wg = lax.axis_index("wg")
            (wr, wc), c_off = tiles.wg_tile(), _wg_col(tiles, wg)

            @plgpu.nd_loop((g * k_tiles * n_tiles,), collective_axes="sm")
            def _tile(info):
                lin = info.index[0]
                gi = lin // (k_tiles * n_tiles)
                kt = (lin // n_tiles) % k_tiles
                nt = lin % n_tiles
                start = gsched_ref[0, gi]
                end = gsched_ref[1, gi]
                blk0 = gsched_ref[2, gi]
                nsteps = gsched_ref[3, gi]

                def mma(idx, a_smem, b_smem, acc):
                    _contract_step(acc, a_smem, b_smem, (blk0 + idx[0]) * tc, start, end, wg=wg, tiles=tiles,
                                   lhs_is_km=lhs_is_km, interpret=interpret)
                    return acc

                def context(run):
                    def acc_scope(acc_ref):
                        run(acc_ref)
                        _store_rows(acc_ref[...], out_gmem.at[gi], stage_smem.at[wg], row0=kt * tm, start=0,
                                    rows=wr, col0=nt * 2 * tn + c_off, epi_n=epi_n)

                    pl.run_scoped(acc_scope, plgpu.ACC((wr, wc), jnp.float32))

                pipe = make_pipeline(mma, context, nsteps, lambda: blk0, lambda: kt, lambda: nt)
                pipe(lhs_gmem, rhs_gmem, allocations=allocs)

            plgpu.wait_smem_to_gmem(0)  # all output stores have landed before the kernel exits

    call = _persistent_call(kernel, jax.ShapeDtypeStruct((g, k, n), out_dtype), interpret,
                            name=f"gmm_contract_k{k}_n{n}")
    return call(gsched_4g, lhs_mk.T if lhs_is_km else lhs_mk, rhs_mn)


def _zero_acc(acc_ref, interpret: bool):
    """acc = 0 mid-pipeline. Pallas' GPU interpreter (0.10) has no rule for the accumulator store
    (`wgmma_accumulator_store_p`), so there the accumulator's buffer is written with a plain ref store."""
    zeros = jnp.zeros(acc_ref.shape, acc_ref.dtype)
    if interpret:
        from jax._src.state import primitives as state_primitives

        state_primitives.ref_set(acc_ref, (), zeros)
    else:
        acc_ref[...] = zeros


def _store_zero_tiles(zero_ref, sm, n_sms: int, kn: int, k_n_tile, store):
    """The empty groups' tiles (contract_flat_schedule's zero_2z) that fall to unit `sm` (a CTA, or a cluster of
    Tiles.cluster_k) of n_sms, round robin continuing after the pipelines' tiles; store(group, K tile, N tile)
    writes one as zeros."""
    n_zero, n_piped = zero_ref[0], zero_ref[1]
    first = (sm - n_piped % n_sms + n_sms) % n_sms

    @pl.loop(0, (n_zero - first + n_sms - 1) // n_sms)
    def _zero_tile(i):
        z = first + i * n_sms
        store(zero_ref[2 + z // kn], *k_n_tile(z))


def _flat_ring(blocks, dtype, stages: int, cluster: bool = False) -> dict:
    """_flat_loop's smem ring and barriers, from plgpu's public types (emit_pipeline's get_allocations names its
    parts differently across JAX releases): a `stages`-slot buffer per (block shape, transforms) of `blocks`, one
    barrier per slot for all of a step's copies, and one per slot released by both compute warpgroups, across the
    cluster where a block is multicast."""
    ring = tuple(plgpu.SMEM((stages, *shape), dtype, transforms=tr) for shape, tr in blocks)
    released = plgpu.Barrier
    if cluster:
        released = functools.partial(plgpu.ClusterBarrier, collective_axes=("cluster",))
    return dict(ring=ring, full=plgpu.Barrier(num_arrivals=len(blocks), num_barriers=stages),
                consumed=released(num_arrivals=2, num_barriers=stages))


def _flat_loop(allocs, context, body, nsteps, tile_of_slot, copy_step, stages: int, late: int):
    """A flat pipeline (Tiles.chain) as our own warp-specialised loop over the CTA's steps, on the smem ring and
    barriers of _flat_ring (`allocs`).

    TMA warpgroup: the first `stages` steps' copies, then each step's once its slot is released, then a wait for
    the last releases (a cluster peer must not arrive on an exited CTA's barrier). It walks the CTA's tiles itself:
    tile_of_slot(j) -> (info, steps) of its j-th tile; carry (j, step in tile, this tile's, the next tile's), the
    tile after next loaded as a tile starts, so no load or index arithmetic stands between a release and the
    copies, copy_step(slots, barrier, info, step in tile). (On an H100, session 54, against
    emit_pipeline_warp_specialized, whose index maps ran per step after the release: d_rhs's whole backward 0-7%
    faster, the rows kernels 0-3%; experiments/HISTORY.md.)
    Compute warpgroups: wait for a slot's copies, run body(step, slots, carry) (its carry set up in `context`),
    release the slot, or with late = 1 (Tiles.overlap_mma: a step's wgmma left in flight) the slot before it."""
    ring, full, consumed = allocs["ring"], allocs["full"], allocs["consumed"]
    at = lambda slot: tuple(r.at[slot] for r in ring)  # noqa: E731
    first = jnp.minimum(jnp.int32(stages), nsteps)

    def memory():
        plgpu.set_max_registers(_MEMORY_REGISTERS, action="decrease")

        def issue(s, carry):
            j, s_in, (info, nst), nxt = carry
            slot = lax.rem(s, stages)
            copy_step(at(slot), full.at[slot], info, s_in)
            last = s_in == nst - 1
            cur = jax.tree.map(lambda a, b: jnp.where(last, a, b), nxt, (info, nst))
            nxt = lax.cond(last, lambda: tile_of_slot(j + 2), lambda: nxt)
            return jnp.where(last, j + 1, j), jnp.where(last, 0, s_in + 1), cur, nxt

        def steady(s, carry):
            plgpu.barrier_wait(consumed.at[lax.rem(s, stages)])
            return issue(s, carry)

        carry = (jnp.int32(0), jnp.int32(0), tile_of_slot(jnp.int32(0)), tile_of_slot(jnp.int32(1)))
        lax.fori_loop(first, nsteps, steady, lax.fori_loop(0, first, issue, carry))

        @pl.loop(nsteps - first, nsteps)
        def _drain(s):
            plgpu.barrier_wait(consumed.at[lax.rem(s, stages)])

    def compute():
        # the registers the TMA warpgroup gives up, split between the two compute warpgroups (as JAX's pipeline does)
        plgpu.set_max_registers(int(min(256, (512 - _MEMORY_REGISTERS) / 2) // 8 * 8), action="increase")
        release = lambda s: plgpu.barrier_arrive(consumed.at[lax.rem(s, stages)])  # noqa: E731

        def step(s, carry):
            slot = lax.rem(s, stages)
            plgpu.barrier_wait(full.at[slot])
            carry = body(s, at(slot), carry)
            if late:
                pl.when(s > 0)(lambda: release(s - 1))
            else:
                release(s)
            return carry

        context(lambda init: lax.fori_loop(0, nsteps, step, init))
        if late:  # the last step is a tile's last, whose epilogue waited for its wgmma
            pl.when(nsteps > 0)(lambda: release(nsteps - 1))

    lax.cond(lax.axis_index("wg") == 2, memory, compute)


def _contract_kernel_flat(lhs_mk, rhs_mn, gsched_4g, *, out_dtype, tiles: Tiles, lhs_is_km: bool,
                          interpret: bool, align: int | None):
    """contract_kernel with one flat pipeline per CTA (tiles.chain); see contract_kernel and
    contract_flat_schedule.

    The TMA warpgroup walks the CTA's tile slots in registers (_flat_loop), loading a tile's entries a
    tile ahead. The compute warpgroups carry (tile slot, step in tile) and the tile's group bounds through the
    loop, prefetching the next slot's tile and bounds every step (loads off the wgmma's critical path).
    """
    lhs_mk, m, k, n, g = _contract_dims(lhs_mk, rhs_mn, gsched_4g, tiles, lhs_is_km)
    tm, tn, tc, epi_n = tiles.tile_m, tiles.tile_n, tiles.tile_k, tiles.epi_n
    n_cl = 2 if tiles.cluster_k else 1  # CTAs per cluster: a tile slot is n_cl K tiles of one (group, N tile)
    k_tiles, n_tiles = k // tm, n // (2 * tn)
    if interpret and n_cl > 1:
        raise ValueError("Tiles.cluster_k: Pallas' GPU interpreter has no clusters")
    if k_tiles % n_cl:
        raise ValueError(f"Tiles.cluster_k needs an even number of K tiles; K = {k} has {k_tiles} of {tm} rows")
    _check_band(tiles, n_tiles)
    kn = k_tiles // n_cl * n_tiles  # a group's tile slots
    n_sms = _num_sms(interpret) // n_cl  # persistent units (CTAs or clusters) walking the slot lists

    def k_n_tile(lin):  # (K tile pair or K tile, N tile) of a group's tile slot lin % kn
        return band_order(lin % kn, n_tiles, k_tiles // n_cl, tiles.band)

    zero_empty = CONTRACT_ZERO_EMPTY
    tables = contract_flat_schedule(gsched_4g, m, tc, kn, n_sms, zero_empty=zero_empty, align=align)

    def window(r8, s_in):
        """(a step's window row, the row its copies read from): a window past row m moves back to end there where
        that keeps it on the swizzle's 8 rows (TMA would zero-fill the reads past m; the interpreter raises), its
        rows before the window row masked. The row travels as row / 8, as in rows_kernel."""
        row = (r8 + s_in * (tc // 8)) * 8
        return row, (jnp.minimum(row, m - tc) if (m - tc) % 8 == 0 else row)

    def kernel(tile_ref, total_ref, lin_ref, zero_ref, lhs_gmem, rhs_gmem, out_gmem):
        sm = lax.axis_index("sm")
        cta = lax.axis_index("cluster") if n_cl > 1 else 0

        def cta_tile(lin):  # (K tile, N tile) of this CTA in a group's tile slot
            kp, nt = k_n_tile(lin)
            return kp * n_cl + cta, nt

        def copy_step(slots, barrier, info, s_in):  # the copies of tile lin's window s_in
            (a_slot, b_slot), (lin, r8) = slots, info
            kt, nt = cta_tile(lin)
            rows = pl.ds(window(r8, s_in)[1], tc)
            a_src = lhs_gmem.at[pl.ds(kt * tm, tm), rows] if lhs_is_km else lhs_gmem.at[rows, pl.ds(kt * tm, tm)]
            plgpu.copy_gmem_to_smem(a_src, a_slot, barrier)
            plgpu.copy_gmem_to_smem(rhs_gmem.at[rows, pl.ds(nt * 2 * tn, 2 * tn)], b_slot, barrier,
                                    **(dict(collective_axes="cluster") if n_cl > 1 else {}))

        a_block = (tm, tc) if lhs_is_km else (tc, tm)
        ring = _flat_ring([(a_block, _swizzle_transforms(a_block[1], lhs_mk.dtype)),
                           ((tc, 2 * tn), _swizzle_transforms(2 * tn, lhs_mk.dtype))], lhs_mk.dtype, tiles.stages,
                          cluster=n_cl > 1)

        @_contract_scope(ring, tiles, out_dtype)
        def _scope(allocs, stage_smem):
            wg = lax.axis_index("wg")
            (wr, wc), c_off = tiles.wg_tile(), _wg_col(tiles, wg)

            def tile_info(j):
                """(group, start row, end row, first window row / 8, steps) of this CTA's tile slot j."""
                gi = jnp.minimum(lin_ref[sm, j] // kn, g - 1)  # past the last tile: any valid group
                return (gi, tile_ref[0, gi], tile_ref[1, gi], tile_ref[2, gi], tile_ref[3, gi])

            def mma(_, slots, carry):
                (a_smem, b_smem), (acc, j, s_in, info) = slots, carry
                gi, start, end, r8, nst = info
                row, row0 = window(r8, s_in)
                with jax.named_scope("mma"):
                    _contract_step(acc, a_smem, b_smem, row0, jnp.maximum(start, row), end, wg=wg, tiles=tiles,
                                   lhs_is_km=lhs_is_km, interpret=interpret)
                last = s_in == nst - 1

                @jax.named_scope("epilogue")
                def _epilogue():
                    kt, nt = cta_tile(lin_ref[sm, j])
                    plgpu.wgmma_wait(0)
                    _store_rows(acc[...], out_gmem.at[gi], stage_smem.at[wg], row0=kt * tm, start=0, rows=wr,
                                col0=nt * 2 * tn + c_off, epi_n=epi_n)
                    _zero_acc(acc, interpret)

                info = _next_tile_info(last, lambda: tile_info(j + 1), _epilogue, info)
                return acc, jnp.where(last, j + 1, j), jnp.where(last, 0, s_in + 1), info

            def context(run):
                def acc_scope(acc_ref):
                    run((acc_ref, jnp.int32(0), jnp.int32(0), tile_info(jnp.int32(0))))

                pl.run_scoped(acc_scope, plgpu.ACC((wr, wc), jnp.float32))

            def tile_at(j):  # TMA warpgroup: ((tile, first window row / 8), steps) of this CTA's slot j
                _, _, _, r8, nst = tile_info(j)  # the unused loads are dropped
                return (lin_ref[sm, j], r8), nst

            _flat_loop(allocs, context, mma, total_ref[sm], tile_at, copy_step, tiles.stages,
                       late=int(tiles.overlap_mma))

            if zero_empty:
                @pl.when(wg < 2)
                def _zeros():
                    _store_zero_tiles(zero_ref, sm, n_sms, kn, cta_tile, lambda gi, kt, nt: _store_rows(
                        jnp.zeros((wr, wc), jnp.float32), out_gmem.at[gi], stage_smem.at[wg], row0=kt * tm,
                        start=0, rows=wr, col0=nt * 2 * tn + c_off, epi_n=epi_n))

            plgpu.wait_smem_to_gmem(0)  # all output stores have landed before the kernel exits

    call = _persistent_call(kernel, jax.ShapeDtypeStruct((g, k, n), out_dtype), interpret,
                            name=f"gmm_contract_flat{'_cluster' if n_cl > 1 else ''}_k{k}_n{n}", cluster=n_cl)
    return call(*tables, lhs_mk.T if lhs_is_km else lhs_mk, rhs_mn)
