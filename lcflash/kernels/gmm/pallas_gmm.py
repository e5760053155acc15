"""`gmm` and `gmm_swiglu` on the Mosaic GPU kernels, with explicit VJPs (forward, d_lhs, d_rhs).

On a GPU the kernels compile for Hopper; anywhere else they run in Pallas' GPU interpreter, which simulates the
same kernel on the CPU (slow: for tests on small shapes only).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from lcflash.kernels import KERNEL_OUTPUT
from lcflash.kernels.gmm import mgpu_kernels as mk
from lcflash.kernels.gmm.swiglu import swiglu_halves_grad
from lcflash.parallel.vma import varying, vma

_KERNEL_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

# Benchmarks may pin tile sizes here (mk.Tiles); None picks them from the shapes below.
ROWS_TILES: mk.Tiles | None = None
CONTRACT_TILES: mk.Tiles | None = None
# The flat kernels' column bands (mk.Tiles.band): at most this many n tiles per band, the largest divisor of a
# product's n tiles (0: row-major); ROWS_BAND for the rows kernel (forward, d_lhs), CONTRACT_BAND for d_rhs. Read
# at trace time. On an H100 in rotated rounds with an A/A control (session 42, experiments/gmm_notes.md), rows
# bands of 4 lifted LongCat's down forward from 0.78 to 0.98 of the einsum at T = 512 and from 0.68 to 0.90 at
# T = 4096, and the gate/up d_lhs from 0.71 to 0.87 (T = 512). d_rhs with an fp32 output (a 3-deep ring) gained at
# down and lost at gate/up (session 42), but with the bf16 output the model's backward writes (a 4-deep ring),
# row-major collapsed at large T: LongCat's down d_rhs at T = 4096 ran at 0.50 of the einsum, 0.885 in bands of 4,
# and its whole backward at 0.77 against 0.95-1.01; elsewhere bands of 4 were level or ahead (session 44). So both
# are 4. configs/small.py's products have at most 4 n tiles (3 for its gate and up d_rhs), so its forward and
# d_lhs are unchanged by any band of 4 or more (its lowered expert FFN is the same text). Pinned tiles (ROWS_TILES,
# CONTRACT_TILES) keep their own, and groups of a row tile or less on average are not banded (rows_matmul).
ROWS_BAND = 4
CONTRACT_BAND = 4
# The flat pipelines' deepest rings (fewer stages where shared memory is short): the rows kernel's (4 fill shared
# memory at LongCat's shapes; 3 is untimed there) and d_rhs's.
ROWS_STAGES = 4
CONTRACT_STAGES = 4
# d_rhs over groups of at least CONTRACT_DEEP_ROWS rows on average (the buffer's rows over the groups; 0: never):
# a ring of at most CONTRACT_DEEP_STAGES in bands of CONTRACT_DEEP_BAND instead. On an H100 by the device's busy
# time (session 50, experiments/HISTORY.md), 3 stages in bands of 2 against 4 in bands of 4, LongCat's d_rhs
# kernel: T = 4096 down 9.93-9.97 ms against 11.49-12.14, [gate | up] 10.22-10.28 against 10.55-11.14; T = 2048
# -3% (down) and +3% ([gate | up]); T = 512 +8% and +4%; T = 64 +0.5-5%. Read at trace time.
CONTRACT_DEEP_ROWS = 4096
CONTRACT_DEEP_STAGES = 3
CONTRACT_DEEP_BAND = 2
# The flat d_rhs on 2-CTA clusters sharing each dout block (mk.Tiles.cluster_k) where its K tiles pair up, on a GPU
# (the interpreter has no clusters), over groups shallower than CONTRACT_DEEP_ROWS. On an H100 by the device's busy
# time (session 51, experiments/HISTORY.md), LongCat's d_rhs kernel: down T = 2048 4.94-5.08 ms against 5.39-5.93 in
# three calls; T = 512 and 1024 level (on the means of 7 rounds at T = 512, down +2.5%, [gate | up] -2.5%); the
# skewed T = 512 2-4% faster; over deep groups (T = 4096, 3 stages in bands of 2) 1% slower, so not there. Read at
# trace time.
CONTRACT_CLUSTER = True
# The flat rows kernels' row windows start at each group's first row rounded down to ROWS_ALIGN rows (0: the row
# tile, i.e. lhs's blocks; mk.row_schedule). 8, the row tiling of the swizzled TMA copies, visits no block twice for
# two groups: at experiments/bench_moe_gemm.py's skewed T = 512, 287 row tiles against 304 (rows used 0.892 against
# 0.842), and 3% fewer at configs/small.py's training loads. On an H100 by the device's busy time (session 56,
# experiments/HISTORY.md), the forward and d_lhs kernels 1-6% faster at the skewed T = 512; balanced loads get the
# same tiles. Read at trace time.
ROWS_ALIGN = 8
# The same for the flat d_rhs kernel's 64-row steps (mk.contract_flat_schedule; 0: lhs's tile_k blocks): at the
# skewed T = 512, 540 steps per tile column against 559. On an H100 by the device's busy time (session 56, two calls,
# 5 rounds), the skewed T = 512 d_rhs kernel 1-5% faster on the means ([gate | up] 1,531 and 1,515 µs against 1,543
# and 1,552, down 1,556 and 1,544 against 1,637 and 1,618), configs/small.py's at Dirichlet(1) loads level to 1.4%
# faster. Read at trace time.
CONTRACT_ALIGN = 8


def tiling_settings() -> dict:
    """The kernels' trace-time switches as they stand (for benchmarks' JSON metadata)."""
    return dict(rows_band=ROWS_BAND, contract_band=CONTRACT_BAND, rows_stages=ROWS_STAGES,
                contract_stages=CONTRACT_STAGES,
                contract_deep=[CONTRACT_DEEP_ROWS, CONTRACT_DEEP_STAGES, CONTRACT_DEEP_BAND],
                contract_cluster=CONTRACT_CLUSTER, contract_deal=mk.CONTRACT_DEAL,
                contract_zero_empty=mk.CONTRACT_ZERO_EMPTY, rows_align=ROWS_ALIGN,
                contract_align=CONTRACT_ALIGN)


def set_bands(rows: int | None = None, contract: int | None = None):
    """Sets ROWS_BAND and CONTRACT_BAND (None keeps one), for the benchmarks' flags: a bad value is refused by name
    before anything is traced."""
    for value, name in ((rows, "ROWS_BAND"), (contract, "CONTRACT_BAND")):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"pallas_gmm.{name} = {value!r}: must be 0 (row-major) or a band of n tiles (an int > 0)")
    global ROWS_BAND, CONTRACT_BAND
    ROWS_BAND = ROWS_BAND if rows is None else rows
    CONTRACT_BAND = CONTRACT_BAND if contract is None else contract


def _interpret() -> bool:
    return jax.default_backend() != "gpu"


def _col_tile(n: int, what: str, prefer: int = 128) -> int:
    """Per-warpgroup output columns: the CTA covers twice this."""
    for tn in (prefer, 64):
        if n % (2 * tn) == 0:
            return tn
    raise ValueError(f"pallas gmm: {what} = {n} must be a multiple of 128 (two warpgroups x 64 columns)")


def _rows_tiles(m: int, g: int, n: int, out_dtype, n_rhs: int, what: str, epi_in: int = 0) -> mk.Tiles:
    if ROWS_TILES is not None:
        return ROWS_TILES
    # Decode-sized groups waste less of a 64-row tile; training-sized groups amortise better over 128 rows.
    tm = 64 if m <= 64 * max(g, 1) else 128
    tn = _col_tile(n, what, prefer=128 if n_rhs == 1 and not epi_in else 64)
    # One epilogue store per warpgroup and tile (epi_n = tn) where it fits; fp32 outputs store in 64-col chunks.
    epi_n = tn if jnp.dtype(out_dtype).itemsize <= 2 else 64
    tiles = mk.Tiles(tile_m=tm, tile_n=tn, tile_k=64, stages=4, epi_n=epi_n)
    while tiles.stages > 2 and mk.smem_bytes(tiles, n_rhs=n_rhs, in_dtype=jnp.bfloat16, out_dtype=out_dtype,
                                             contract=False, epi_in=epi_in) > mk._SMEM_BYTES:
        tiles = dataclasses.replace(tiles, stages=tiles.stages - 1)
    return tiles


def _chain_tiles(tiles: mk.Tiles, pinned: bool, out_dtype, n_rhs: int, contract: bool = False,
                 epi_in: int = 0, *, n: int, band: int, most_stages: int) -> mk.Tiles:
    """Flat pipelines (Tiles.chain): pinned tiles (ROWS_TILES / CONTRACT_TILES) keep their ring and band; otherwise the
    deepest ring (up to most_stages) that fits, halving the epilogue chunk (epi_n 64) before dropping a stage (LongCat's
    rows products: 4 stages and 64-column stores; d_rhs at T=512 measured 0.87-0.90 of the einsum with them against
    0.83-0.85 with 3 stages and 128-column stores, H200), and the output's n columns in bands of the widest
    divisor of its n tiles up to band (ROWS_BAND / CONTRACT_BAND)."""
    if pinned:
        return dataclasses.replace(tiles, chain=True)
    band = mk.widest_band(n // (2 * tiles.tile_n), band)
    for stages in range(most_stages, 0, -1):
        for epi_n in sorted({tiles.epi_n, min(64, tiles.epi_n)}, reverse=True):
            t = dataclasses.replace(tiles, stages=stages, epi_n=epi_n, chain=True, band=band)
            if mk.smem_bytes(t, n_rhs=n_rhs, in_dtype=jnp.bfloat16, out_dtype=out_dtype, contract=contract,
                             margin=512, epi_in=epi_in) <= mk._SMEM_BYTES:
                return t
    raise ValueError(f"pallas gmm: no tiling with a flat pipeline fits shared memory for {tiles}")


def flat_contract_tiles(n: int, out_dtype, rows_per_group: float, *, k: int) -> mk.Tiles:
    """The flat d_rhs pipeline's tiles at N = n, K = k: pinned CONTRACT_TILES as they are, else the shape's tiles
    with the deepest ring of at most CONTRACT_STAGES that fits (_chain_tiles), in bands of CONTRACT_BAND;
    CONTRACT_DEEP_* where the groups average at least CONTRACT_DEEP_ROWS rows, else on 2-CTA clusters
    (CONTRACT_CLUSTER) on a GPU where the K tiles pair."""
    pinned, tiles = CONTRACT_TILES is not None, _contract_tiles(n, out_dtype)
    if not pinned:  # 64-column stores at any ring depth: at 3 stages 128-column ones lost (session 46, HISTORY.md)
        tiles = dataclasses.replace(tiles, epi_n=64)
    deep = 0 < CONTRACT_DEEP_ROWS <= rows_per_group
    tiles = _chain_tiles(tiles, pinned, out_dtype, 1, contract=True, n=n,
                         band=CONTRACT_DEEP_BAND if deep else CONTRACT_BAND,
                         most_stages=CONTRACT_DEEP_STAGES if deep else CONTRACT_STAGES)
    if pinned:
        return tiles
    pairs = (k // tiles.tile_m) % 2 == 0
    return dataclasses.replace(tiles, cluster_k=CONTRACT_CLUSTER and not deep and pairs and not _interpret())


def _contract_tiles(n: int, out_dtype) -> mk.Tiles:
    if CONTRACT_TILES is not None:
        return CONTRACT_TILES
    tn = _col_tile(n, "d_rhs columns (N)")
    epi_n = tn if jnp.dtype(out_dtype).itemsize <= 2 else 64
    tiles = mk.Tiles(tile_m=128, tile_n=tn, tile_k=64, stages=4, epi_n=epi_n)
    while tiles.stages > 2 and mk.smem_bytes(tiles, n_rhs=1, in_dtype=jnp.bfloat16, out_dtype=out_dtype,
                                             contract=True) > mk._SMEM_BYTES:
        tiles = dataclasses.replace(tiles, stages=tiles.stages - 1)
    return tiles


def _check(lhs_mk, rhs_gkn, group_sizes_g):
    if lhs_mk.ndim != 2 or rhs_gkn.ndim != 3:
        raise ValueError(f"pallas gmm: want lhs [M, K] and rhs [G, K, N]; got {lhs_mk.shape} and {rhs_gkn.shape}")
    if lhs_mk.dtype not in _KERNEL_DTYPES or rhs_gkn.dtype != lhs_mk.dtype:
        raise TypeError(
            f"pallas gmm: lhs and rhs must both be bfloat16 or float16 (wgmma operands), got {lhs_mk.dtype} and "
            f"{rhs_gkn.dtype}; use impl='ragged_dot' for float32")
    if lhs_mk.shape[1] != rhs_gkn.shape[1]:
        raise ValueError(f"pallas gmm: lhs K = {lhs_mk.shape[1]} but rhs K = {rhs_gkn.shape[1]}")
    if group_sizes_g.shape != (rhs_gkn.shape[0],):
        raise ValueError(f"pallas gmm: group_sizes shape {group_sizes_g.shape}, want ({rhs_gkn.shape[0]},)")
    k = lhs_mk.shape[1]
    if k % 128:
        raise ValueError(f"pallas gmm: K = {k} must be a multiple of 128 (it is the output width of d_lhs)")


def supports(lhs_mk, rhs_gkn) -> bool:
    """Whether gmm takes these operands (arrays or ShapeDtypeStructs): the checks gmm itself runs."""
    try:
        _check(lhs_mk, rhs_gkn, jax.ShapeDtypeStruct(rhs_gkn.shape[:1], jnp.int32))
        _col_tile(rhs_gkn.shape[2], "N")
    except (ValueError, TypeError):
        return False
    return True


def _padded_rows(m: int, tile: int) -> int:
    """Tiles may not be taller than the array, so tiny inputs (M < tile) are padded. TMA zero-fills reads past the
    last row; the interpreter raises on them instead, so there M is padded to a whole number of tiles."""
    return -(-m // tile) * tile if _interpret() else max(m, tile)


def _pad_rows(x, rows):
    return x if x.shape[0] >= rows else jnp.pad(x, ((0, rows - x.shape[0]), (0, 0)))


def rows_matmul(lhs_mk, rhs_list, group_sizes_g, *, transpose_rhs=False, out_dtype=None, swiglu=None, chain=False,
                zero_tail=None, gu_mn2=None):
    """Grouped rows product through the rows kernel; rows past sum(group_sizes) are zero (or, per output where
    zero_tail says False, undefined: mk.rows_kernel). gu_mn2: the [g | u] residual swiglu="grad_halves" reads.

    chain: one flat pipeline per CTA (mk.Tiles.chain), the variant timed against the default in
    experiments/bench_moe_gemm.py."""
    m = lhs_mk.shape[0]
    out_dtype = jnp.dtype(out_dtype or lhs_mk.dtype)
    n = rhs_list[0].shape[1] if transpose_rhs else rhs_list[0].shape[2]
    if swiglu == "halves":  # [gate | up] read into two accumulators, each half as wide
        n, n_acc = n // 2, 2
    else:
        n_acc = len(rhs_list)
    epi_in = 2 if swiglu == "grad_halves" else 0  # g and u tiles per warpgroup
    tiles = _rows_tiles(m, group_sizes_g.shape[0], n, out_dtype, n_acc, "N", epi_in=epi_in)
    if chain:
        # Bands trade the lhs rows' reuse for the weights'; with a row tile or less per group each weight tile
        # is read by one tile whatever the order (LongCat T = 64: 5-8% slower in bands, H100, session 42).
        band = ROWS_BAND if m > group_sizes_g.shape[0] * tiles.tile_m else 0
        tiles = _chain_tiles(tiles, ROWS_TILES is not None, out_dtype, n_acc, epi_in=epi_in, n=n, band=band,
                             most_stages=ROWS_STAGES)
    mp = _padded_rows(m, tiles.tile_m)
    sched, _ = mk.row_schedule(group_sizes_g, mp, tiles.tile_m, align=(ROWS_ALIGN or None) if tiles.chain else None)
    if transpose_rhs and _interpret():  # the interpreter cannot run wgmma on transposed smem: transpose in XLA
        rhs_list, transpose_rhs = [r.swapaxes(1, 2) for r in rhs_list], False
    out = mk.rows_kernel(_pad_rows(lhs_mk, mp), list(rhs_list), sched, transpose_rhs=transpose_rhs,
                         out_dtype=out_dtype, tiles=tiles, swiglu=swiglu, zero_tail=zero_tail,
                         gu_mn2=None if gu_mn2 is None else _pad_rows(gu_mn2, mp), interpret=_interpret())
    if mp != m:
        out = jax.tree.map(lambda o: o[:m], out)
    return out


def contract_matmul(lhs_mk, dout_mn, group_sizes_g, *, out_dtype, chain=False):
    """d_rhs[g] = lhs[rows of g]^T @ dout[rows of g]; empty groups are zero.

    chain: one flat pipeline per CTA over all its tiles' steps (mk.Tiles.chain in contract_kernel) with the
    deepest ring that fits (_chain_tiles); pinned CONTRACT_TILES are kept as they are."""
    m, k = lhs_mk.shape
    n = dout_mn.shape[1]
    g = group_sizes_g.shape[0]
    tiles = flat_contract_tiles(n, out_dtype, m / max(g, 1), k=k) if chain else _contract_tiles(n, out_dtype)
    if k % tiles.tile_m:
        raise ValueError(f"pallas gmm: K = {k} must be a multiple of {tiles.tile_m} for d_rhs")
    mp = _padded_rows(m, tiles.tile_k)
    gsched = mk.contract_schedule(group_sizes_g, m, tiles.tile_k)
    lhs_is_km = _interpret()  # the interpreter cannot run wgmma on transposed smem: transpose in XLA
    lhs = _pad_rows(lhs_mk, mp)
    return mk.contract_kernel(lhs.T if lhs_is_km else lhs, _pad_rows(dout_mn, mp), gsched, out_dtype=out_dtype,
                              tiles=tiles, lhs_is_km=lhs_is_km, interpret=_interpret(),
                              align=(CONTRACT_ALIGN or None) if tiles.chain else None)


def _int_zeros(x):
    return np.zeros(x.shape, dtype=jax.dtypes.float0)


# ------------------------------------------------------------------------------------------------
# gmm
# ------------------------------------------------------------------------------------------------


def _gmm_forward(lhs_mk, rhs_gkn, group_sizes_g, out_dtype, vmas, chain, zero_tail):
    out = rows_matmul(lhs_mk, [rhs_gkn], group_sizes_g, out_dtype=out_dtype, chain=chain, zero_tail=(zero_tail,))
    return varying(out, vmas[0] | vmas[1])


_gmm = functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))(_gmm_forward)


def _gmm_fwd(lhs_mk, rhs_gkn, group_sizes_g, out_dtype, vmas, chain, zero_tail):
    # Named in the forward rule's own equations, where a remat policy sees it (not inside a nested custom_vjp).
    out = checkpoint_name(_gmm_forward(lhs_mk, rhs_gkn, group_sizes_g, out_dtype, vmas, chain, zero_tail),
                          KERNEL_OUTPUT)
    return out, (lhs_mk, rhs_gkn, group_sizes_g)


def _gmm_bwd(out_dtype, vmas, chain, zero_tail, res, dout_mn):
    lhs_mk, rhs_gkn, group_sizes_g = res
    dout_mn = dout_mn.astype(lhs_mk.dtype)  # wgmma operands; fp32 cotangents are rounded like the forward inputs
    d_lhs = rows_matmul(dout_mn, [rhs_gkn], group_sizes_g, transpose_rhs=True, out_dtype=lhs_mk.dtype,
                        chain=chain, zero_tail=(zero_tail,))
    d_rhs = contract_matmul(lhs_mk, dout_mn, group_sizes_g, out_dtype=rhs_gkn.dtype, chain=chain)
    return varying(d_lhs, vmas[0]), varying(d_rhs, vmas[1]), _int_zeros(group_sizes_g)


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(lhs_mk, rhs_gkn, group_sizes_g, preferred_element_type=None, chain=False, zero_tail=True):
    """chain=True: every product (forward, d_lhs, d_rhs) through one flat pipeline per CTA (mk.Tiles.chain).
    zero_tail=False: the output's and d_lhs's rows past sum(group_sizes) are left undefined (not stored)."""
    _check(lhs_mk, rhs_gkn, group_sizes_g)
    _col_tile(rhs_gkn.shape[2], "N")
    out_dtype = jnp.dtype(preferred_element_type or lhs_mk.dtype)
    return _gmm(lhs_mk, rhs_gkn, group_sizes_g.astype(jnp.int32), out_dtype, (vma(lhs_mk), vma(rhs_gkn)),
                bool(chain), bool(zero_tail))


# ------------------------------------------------------------------------------------------------
# Forward only, against rhs[g]^T: weights stored [G, N, K] (decode's layout) read in place
# ------------------------------------------------------------------------------------------------


def _check_nt(lhs_mk, rhs_list):
    for rhs in rhs_list:
        if rhs.shape != rhs_list[0].shape or rhs.ndim != 3:
            raise ValueError(f"pallas gmm_nt: want rhs arrays [G, N, K] of one shape; got "
                             f"{[r.shape for r in rhs_list]}")
        g, n, k = rhs.shape
        _check(lhs_mk, jax.ShapeDtypeStruct((g, k, n), rhs.dtype), jax.ShapeDtypeStruct((g,), jnp.int32))
    _col_tile(rhs_list[0].shape[1], "N")


def gmm_nt(lhs_mk, rhs_gnk, group_sizes_g, chain=False, zero_tail=True, out_dtype=None):
    """lhs[rows of g] @ rhs[g]^T through the rows kernel's transposed-rhs path (the d_lhs product's): a weight
    stored contraction-last is read as it is. No VJP (inference)."""
    _check_nt(lhs_mk, [rhs_gnk])
    return rows_matmul(lhs_mk, [rhs_gnk], group_sizes_g.astype(jnp.int32), transpose_rhs=True, chain=chain,
                       zero_tail=(bool(zero_tail),), out_dtype=out_dtype)


def gmm_nt_swiglu(x_mk, w_gate_gnk, w_up_gnk, group_sizes_g, chain=False, zero_tail=True):
    """silu(x @ w_gate[g]^T) * (x @ w_up[g]^T) in one kernel (both accumulators in registers, SwiGLU before the
    store), the weights read as stored. No VJP (inference)."""
    _check_nt(x_mk, [w_gate_gnk, w_up_gnk])
    return rows_matmul(x_mk, [w_gate_gnk, w_up_gnk], group_sizes_g.astype(jnp.int32), transpose_rhs=True,
                       swiglu="h", chain=chain, zero_tail=(bool(zero_tail),))


# ------------------------------------------------------------------------------------------------
# gmm_swiglu_halves: SwiGLU in the epilogue of one gmm against [gate | up]
# ------------------------------------------------------------------------------------------------


def _gmm_swiglu_halves_forward(x_mk, w_gkn, group_sizes_g, vmas, chain, zero_tail):
    # h's tail stays zero: the down projection's weight gradient reads it (as lhs, which the contract kernel does
    # not mask).
    outs = rows_matmul(x_mk, [w_gkn], group_sizes_g, swiglu="halves", chain=chain, zero_tail=(True, zero_tail))
    return tuple(varying(o, vmas[0] | vmas[1]) for o in outs)  # (h, x @ w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gmm_swiglu_halves(x_mk, w_gkn, group_sizes_g, vmas, chain, zero_tail):
    return _gmm_swiglu_halves_forward(x_mk, w_gkn, group_sizes_g, vmas, chain, zero_tail)[0]


def _gmm_swiglu_halves_fwd(x_mk, w_gkn, group_sizes_g, vmas, chain, zero_tail):
    # Both kernel outputs named: a policy that keeps them saves the SwiGLU pass a remat would otherwise rerun.
    h, gu = (checkpoint_name(o, KERNEL_OUTPUT)
             for o in _gmm_swiglu_halves_forward(x_mk, w_gkn, group_sizes_g, vmas, chain, zero_tail))
    return h, (x_mk, w_gkn, group_sizes_g, gu)


def _gmm_swiglu_halves_bwd(vmas, chain, zero_tail, res, dh_mn):
    x_mk, w_gkn, group_sizes_g, gu = res
    d_gu = swiglu_halves_grad(gu, dh_mn.astype(gu.dtype))
    return _gmm_bwd(x_mk.dtype, vmas, chain, zero_tail, (x_mk, w_gkn, group_sizes_g), d_gu)


_gmm_swiglu_halves.defvjp(_gmm_swiglu_halves_fwd, _gmm_swiglu_halves_bwd)


def gmm_swiglu_halves(x_mk, w_gkn, group_sizes_g, chain=False, zero_tail=True):
    """silu(g) * u of [g | u] = x @ w, w = [w_gate | w_up]: one kernel reads both halves' columns into two
    accumulators, applies SwiGLU before its store and also stores x @ w, the backward pass's residual.
    zero_tail=False: that residual's and d_x's rows past sum(group_sizes) are left undefined (h's stay zero)."""
    _check(x_mk, w_gkn, group_sizes_g)
    _col_tile(w_gkn.shape[2] // 2, "half of N", prefer=64)
    return _gmm_swiglu_halves(x_mk, w_gkn, group_sizes_g.astype(jnp.int32), (vma(x_mk), vma(w_gkn)), bool(chain),
                              bool(zero_tail))


# ------------------------------------------------------------------------------------------------
# gmm_swiglu_ffn: the whole expert FFN, SwiGLU's backward in the epilogue of the down projection's d_lhs
# ------------------------------------------------------------------------------------------------


def _ffn_forward(x_mk, w_gkn, w_down_gnk, group_sizes_g, vmas, zero_tail):
    v = vmas[0] | vmas[1] | vmas[2]
    h, gu = _gmm_swiglu_halves_forward(x_mk, w_gkn, group_sizes_g, vmas[:2], True, zero_tail)
    y = rows_matmul(h, [w_down_gnk], group_sizes_g, chain=True, zero_tail=(zero_tail,))
    return varying(y, v), h, gu


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _gmm_swiglu_ffn(x_mk, w_gkn, w_down_gnk, group_sizes_g, vmas, zero_tail, h_names):
    return _ffn_forward(x_mk, w_gkn, w_down_gnk, group_sizes_g, vmas, zero_tail)[0]


def _gmm_swiglu_ffn_fwd(x_mk, w_gkn, w_down_gnk, group_sizes_g, vmas, zero_tail, h_names):
    y, h, gu = (checkpoint_name(o, KERNEL_OUTPUT)
                for o in _ffn_forward(x_mk, w_gkn, w_down_gnk, group_sizes_g, vmas, zero_tail))
    for name in h_names:
        h = checkpoint_name(h, name)
    return y, (x_mk, w_gkn, w_down_gnk, group_sizes_g, h, gu)


def _gmm_swiglu_ffn_bwd(vmas, zero_tail, h_names, res, dy_mk):
    x_mk, w_gkn, w_down_gnk, group_sizes_g, h, gu = res
    dy_mk = dy_mk.astype(x_mk.dtype)
    # [d_g | d_u] straight from the d_h accumulator: no d_h array, no XLA pass over [g | u].
    d_gu = rows_matmul(dy_mk, [w_down_gnk], group_sizes_g, transpose_rhs=True, out_dtype=x_mk.dtype,
                       swiglu="grad_halves", gu_mn2=gu, chain=True, zero_tail=(zero_tail,))
    d_w_down = contract_matmul(h, dy_mk, group_sizes_g, out_dtype=w_down_gnk.dtype, chain=True)
    dx, d_w, _ = _gmm_bwd(x_mk.dtype, vmas[:2], True, zero_tail, (x_mk, w_gkn, group_sizes_g), d_gu)
    return dx, d_w, varying(d_w_down, vmas[2]), _int_zeros(group_sizes_g)


_gmm_swiglu_ffn.defvjp(_gmm_swiglu_ffn_fwd, _gmm_swiglu_ffn_bwd)


def gmm_swiglu_ffn(x_mk, w_gkn, w_down_gnk, group_sizes_g, zero_tail=True, h_names=()):
    """gmm(gmm_swiglu_halves(x, w), w_down) through the flat (pallas_chain) kernels, with SwiGLU's backward in the
    epilogue of the down projection's d_lhs kernel (mk.rows_kernel swiglu="grad_halves"): it writes [d_g | d_u]
    for the [gate | up] backward directly. h_names: extra checkpoint names for h (a remat policy's keep list).
    zero_tail=False: the output's, the residual's and the gradients' rows past sum(group_sizes) are undefined."""
    _check(x_mk, w_gkn, group_sizes_g)
    f = w_gkn.shape[2] // 2
    if w_down_gnk.ndim != 3 or w_down_gnk.shape[:2] != (w_gkn.shape[0], f) or w_down_gnk.dtype != x_mk.dtype:
        raise ValueError(f"pallas gmm_swiglu_ffn: w_down must be {x_mk.dtype} [G, F, D] = "
                         f"[{w_gkn.shape[0]}, {f}, D] for w [G, K, 2F] {w_gkn.shape}; got {w_down_gnk.dtype} "
                         f"{w_down_gnk.shape}")
    _col_tile(f, "half of N", prefer=64)
    _col_tile(w_down_gnk.shape[2], "D")
    return _gmm_swiglu_ffn(x_mk, w_gkn, w_down_gnk, group_sizes_g.astype(jnp.int32),
                           (vma(x_mk), vma(w_gkn), vma(w_down_gnk)), bool(zero_tail), tuple(h_names))


# ------------------------------------------------------------------------------------------------
# gmm_swiglu: silu(x @ w_gate) * (x @ w_up) in one kernel
# ------------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _gmm_swiglu(x_mk, wg_gkn, wu_gkn, group_sizes_g, vmas):
    return varying(rows_matmul(x_mk, [wg_gkn, wu_gkn], group_sizes_g, swiglu="h"), vmas[0] | vmas[1] | vmas[2])


def _gmm_swiglu_fwd(x_mk, wg_gkn, wu_gkn, group_sizes_g, vmas):
    h, gate, up = rows_matmul(x_mk, [wg_gkn, wu_gkn], group_sizes_g, swiglu="hgu")
    return varying(h, vmas[0] | vmas[1] | vmas[2]), (x_mk, wg_gkn, wu_gkn, group_sizes_g, gate, up)


def swiglu_grads(dh, gate, up):
    """(d gate, d up) of h = silu(gate) * up, in fp32."""
    dh, gate, up = (a.astype(jnp.float32) for a in (dh, gate, up))
    sig = jax.nn.sigmoid(gate)
    silu = gate * sig
    return dh * up * sig * (1.0 + gate * (1.0 - sig)), dh * silu


def _gmm_swiglu_bwd(vmas, res, dh_mn):
    x_mk, wg_gkn, wu_gkn, group_sizes_g, gate, up = res
    dg, du = (d.astype(x_mk.dtype) for d in swiglu_grads(dh_mn, gate, up))
    dx = (rows_matmul(dg, [wg_gkn], group_sizes_g, transpose_rhs=True, out_dtype=jnp.float32)
          + rows_matmul(du, [wu_gkn], group_sizes_g, transpose_rhs=True, out_dtype=jnp.float32))
    dwg = contract_matmul(x_mk, dg, group_sizes_g, out_dtype=wg_gkn.dtype)
    dwu = contract_matmul(x_mk, du, group_sizes_g, out_dtype=wu_gkn.dtype)
    return (varying(dx.astype(x_mk.dtype), vmas[0]), varying(dwg, vmas[1]), varying(dwu, vmas[2]),
            _int_zeros(group_sizes_g))


_gmm_swiglu.defvjp(_gmm_swiglu_fwd, _gmm_swiglu_bwd)


def gmm_swiglu(x_mk, w_gate_gkn, w_up_gkn, group_sizes_g, chain=False):
    """silu(x @ wg) * (x @ wu): two gmm kernels (bf16 outputs) and the activation in fp32 by XLA.

    Faster than the fused kernel below on an H100 (LongCat gate/up, T=512: 2.62 ms against 3.27 ms): the fused
    kernel's two accumulators leave 64-column wgmma per warpgroup instead of 128 (experiments/gmm_notes.md).
    """
    gate = gmm(x_mk, w_gate_gkn, group_sizes_g, chain=chain)
    up = gmm(x_mk, w_up_gkn, group_sizes_g, chain=chain)
    return (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(x_mk.dtype)


def gmm_swiglu_fused(x_mk, w_gate_gkn, w_up_gkn, group_sizes_g):
    """gmm_swiglu in one kernel per pass: both accumulators in registers, silu(g) * u applied before the store."""
    _check(x_mk, w_gate_gkn, group_sizes_g)
    _check(x_mk, w_up_gkn, group_sizes_g)
    if w_gate_gkn.shape != w_up_gkn.shape:
        raise ValueError(f"pallas gmm_swiglu: gate {w_gate_gkn.shape} and up {w_up_gkn.shape} shapes differ")
    _col_tile(w_gate_gkn.shape[2], "N", prefer=64)
    return _gmm_swiglu(x_mk, w_gate_gkn, w_up_gkn, group_sizes_g.astype(jnp.int32),
                       (vma(x_mk), vma(w_gate_gkn), vma(w_up_gkn)))
