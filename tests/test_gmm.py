"""Grouped matmul implementations against the per-group reference loop.

CPU: the XLA implementations in fp32 and bf16, and our Pallas Mosaic GPU kernels in Pallas' GPU interpreter
(bf16; the interpreter cannot run wgmma on transposed smem views, so there the backward kernels read operands
transposed by XLA, see pallas_gmm). GPU: the compiled kernels, ours and JAX's example (`jax_mgpu`).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcflash.kernels.gmm import api, reference
from numerics import HAS_TOKAMAX, needs_tokamax

ON_GPU = jax.default_backend() == "gpu"
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a GPU (Mosaic GPU kernels)")
cpu_only = pytest.mark.skipif(ON_GPU, reason="interpreter test; the GPU runs the compiled kernels instead")

BF16_TOL = 6e-3  # relative Frobenius error of bf16-rounded outputs against an fp32 reference on the same inputs
FP32_TOL = 1e-5


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.isfinite(a).all(), "non-finite values (unwritten output?)"
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _inputs(seed, m, k, n, sizes, dtype):
    keys = jax.random.split(jax.random.key(seed), 3)
    lhs = jax.random.normal(keys[0], (m, k), jnp.float32).astype(dtype)
    rhs = (jax.random.normal(keys[1], (len(sizes), k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
    dout = jax.random.normal(keys[2], (m, n), jnp.float32).astype(dtype)
    return lhs, rhs, dout, jnp.asarray(sizes, jnp.int32)


def _ref_fwd_grads(lhs, rhs, dout, sizes):
    """fp32 reference on the (possibly bf16-rounded) inputs: output, d_lhs, d_rhs."""
    f32 = lambda x: x.astype(jnp.float32)
    out, vjp = jax.vjp(lambda a, b: reference.gmm_loop(a, b, sizes), f32(lhs), f32(rhs))
    return (out, *vjp(f32(dout)))


def _fwd_grads(impl, lhs, rhs, dout, sizes):
    out, vjp = jax.vjp(lambda a, b: api.gmm(a, b, sizes, impl=impl), lhs, rhs)
    return (out, *vjp(dout))


# Group sizes with an empty first group, empty middle groups, single-row groups, sizes that are not multiples of
# any tile, and rows past sum(sizes).
SIZES_RAGGED = [0, 37, 0, 130, 1, 52, 0]  # sum 220
M_RAGGED = 300


def test_reference_loop_matches_numpy_float64():
    lhs, rhs, _, sizes = _inputs(0, 50, 16, 8, [5, 0, 20, 1], jnp.float32)
    out = np.asarray(reference.gmm_loop(lhs, rhs, sizes), np.float64)
    l64, r64 = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    want, start = np.zeros((50, 8)), 0
    for g, s in enumerate([5, 0, 20, 1]):
        want[start:start + s] = l64[start:start + s] @ r64[g]
        start += s
    assert _rel(out, want) < FP32_TOL
    assert not out[26:].any()


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, FP32_TOL), (jnp.bfloat16, BF16_TOL)])
def test_ragged_dot_matches_reference(dtype, tol):
    lhs, rhs, dout, sizes = _inputs(1, 90, 32, 24, [0, 11, 0, 40, 1, 7], dtype)  # 31 rows past the groups
    got = _fwd_grads("ragged_dot", lhs, rhs, dout, sizes)
    want = _ref_fwd_grads(lhs, rhs, dout, sizes)
    for name, g, w in zip(("out", "d_lhs", "d_rhs"), got, want):
        assert _rel(g, w) < tol, name
    assert not np.asarray(got[0][59:], np.float32).any()
    assert not np.asarray(got[1][59:], np.float32).any()
    assert not np.asarray(got[2], np.float32)[[0, 2]].any()  # empty groups get zero d_rhs


def test_swiglu_composition_and_its_gradient_formula():
    from lcflash.kernels.gmm import pallas_gmm

    lhs, wg, dh, sizes = _inputs(2, 40, 16, 8, [10, 0, 25], jnp.float32)
    wu = jax.random.normal(jax.random.key(9), wg.shape, jnp.float32)
    h = api.gmm_swiglu(lhs, wg, wu, sizes, impl="reference")
    gate, up = reference.gmm_loop(lhs, wg, sizes), reference.gmm_loop(lhs, wu, sizes)
    assert _rel(h, jax.nn.silu(gate) * up) < FP32_TOL
    _, vjp = jax.vjp(lambda g, u: jax.nn.silu(g) * u, gate, up)
    want = vjp(dh)
    got = pallas_gmm.swiglu_grads(dh, gate, up)
    assert _rel(got[0], want[0]) < FP32_TOL and _rel(got[1], want[1]) < FP32_TOL


def test_unavailable_impls_fail_clearly():
    x, w, _, s = _inputs(3, 8, 128, 128, [8], jnp.float32)
    if not HAS_TOKAMAX:   # the optional peer names what to install, before tracing
        with pytest.raises(ValueError, match="tokamax>="):
            api.gmm(x, w, s, impl="tokamax")
    with pytest.raises(ValueError, match="available"):
        api.gmm(x, w, s, impl="nope")
    with pytest.raises(TypeError, match="bfloat16"):
        api.gmm(x, w, s, impl="pallas")


def test_overlap_mma_needs_the_flat_pipeline():
    from lcflash.kernels.gmm import mgpu_kernels as mk

    x, w, dy, s = _inputs(3, 128, 128, 256, [128], jnp.bfloat16)
    tiles = mk.Tiles(overlap_mma=True)
    with pytest.raises(ValueError, match="overlap_mma needs chain=True"):
        mk.rows_kernel(x, [w], mk.row_schedule(s, 128, 128)[0], transpose_rhs=False, out_dtype=x.dtype, tiles=tiles)
    with pytest.raises(ValueError, match="overlap_mma needs chain=True"):
        mk.contract_kernel(x, dy, mk.contract_schedule(s, 128, 64), out_dtype=x.dtype, tiles=tiles)
    with pytest.raises(ValueError, match="align = 8 needs chain=True"):
        mk.contract_kernel(x, dy, mk.contract_schedule(s, 128, 64), out_dtype=x.dtype, tiles=mk.Tiles(), align=8)


# ------------------------------------------------------------------------------------------------
# Our kernels in Pallas' GPU interpreter (CPU).
# ------------------------------------------------------------------------------------------------


@cpu_only
def test_pallas_interpret_forward_and_gradients():
    """The forward (the same rows kernel as a plain api.gmm call: the custom VJP's forward rule runs it) and both
    gradients; the interpreter NaN-fills outputs, so unwritten rows fail _rel."""
    lhs, rhs, dout, sizes = _inputs(5, M_RAGGED, 128, 256, SIZES_RAGGED, jnp.bfloat16)
    got = _fwd_grads("pallas", lhs, rhs, dout, sizes)
    want = _ref_fwd_grads(lhs, rhs, dout, sizes)
    assert got[0].shape == (M_RAGGED, 256) and got[0].dtype == jnp.bfloat16
    for name, g, w in zip(("out", "d_lhs", "d_rhs"), got, want):
        assert _rel(g, w) < BF16_TOL, name
    assert not np.asarray(got[0][220:], np.float32).any()  # rows past the groups get zero output
    assert not np.asarray(got[1][220:], np.float32).any()  # and zero d_lhs
    assert not np.asarray(got[2], np.float32)[[0, 2, 6]].any()  # empty groups get zero d_rhs


@cpu_only
@pytest.mark.parametrize("impl", ["pallas", "pallas_chain"])
def test_pallas_interpret_zero_tail_false_skips_only_the_tail(impl):
    """gmm(zero_tail=False): the output's and d_lhs's rows of the groups are those of the default call, bit for bit,
    and the rows past the groups are not written (the interpreter's NaN fill shows through); d_rhs is unchanged."""
    lhs, rhs, dout, sizes = _inputs(18, M_RAGGED, 128, 256, SIZES_RAGGED, jnp.bfloat16)
    n_rows = sum(SIZES_RAGGED)
    base = _fwd_grads(impl, lhs, rhs, dout, sizes)
    out, vjp = jax.vjp(lambda a, b: api.gmm(a, b, sizes, impl=impl, zero_tail=False), lhs, rhs)
    got = (out, *vjp(dout))
    for a, b in zip(got[:2], base[:2]):
        np.testing.assert_array_equal(np.asarray(a[:n_rows], np.float32), np.asarray(b[:n_rows], np.float32))
        assert np.isnan(np.asarray(a[n_rows:], np.float32)).all()
    np.testing.assert_array_equal(np.asarray(got[2], np.float32), np.asarray(base[2], np.float32))


def _nt_ref(x, wg_gnk, wu_gnk, wd_gnk, sizes):
    """fp32 reference of the decode MoE's two nt products: h = silu(x wg^T) * (x wu^T), y = h wd^T."""
    f32, t = (lambda a: a.astype(jnp.float32)), (lambda w: w.astype(jnp.float32).swapaxes(1, 2))
    h = api.gmm_swiglu(f32(x), t(wg_gnk), t(wu_gnk), sizes, impl="reference")
    return h, reference.gmm_loop(h.astype(x.dtype).astype(jnp.float32), t(wd_gnk), sizes)


def _nt_inputs(seed, m, d, i, sizes_l):
    keys = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(keys[0], (m, d), jnp.float32).astype(jnp.bfloat16)
    g = len(sizes_l)
    wg, wu = ((jax.random.normal(k, (g, i, d), jnp.float32) / np.sqrt(d)).astype(jnp.bfloat16) for k in keys[1:3])
    wd = (jax.random.normal(keys[3], (g, d, i), jnp.float32) / np.sqrt(i)).astype(jnp.bfloat16)
    return x, wg, wu, wd, jnp.asarray(sizes_l, jnp.int32)


def _check_nt(impl, m, d, i, sizes_l, seed):
    """gmm_nt_swiglu then gmm_nt (decode's grouped MoE on [G, N, K] weights) against the fp32 reference; the
    groups' rows only where zero_tail=False leaves the rest undefined, and zero rows past the groups otherwise."""
    x, wg, wu, wd, sizes = _nt_inputs(seed, m, d, i, sizes_l)
    n_rows = sum(sizes_l)

    @jax.jit
    def run(x, wg, wu, wd):
        h = api.gmm_nt_swiglu(x, wg, wu, sizes, impl=impl)
        return h, api.gmm_nt(h, wd, sizes, impl=impl), api.gmm_nt(h, wd, sizes, impl=impl, zero_tail=False)

    h, y, y_groups = run(x, wg, wu, wd)
    want_h, want_y = _nt_ref(x, wg, wu, wd, sizes)
    assert h.dtype == y.dtype == jnp.bfloat16
    assert _rel(h, want_h) < BF16_TOL
    assert _rel(y, want_y) < BF16_TOL
    assert not np.asarray(h[n_rows:], np.float32).any() and not np.asarray(y[n_rows:], np.float32).any()
    np.testing.assert_array_equal(np.asarray(y_groups[:n_rows], np.float32), np.asarray(y[:n_rows], np.float32))


@pytest.mark.parametrize("impl", ["ragged_dot", "reference"])
def test_nt_products_match_reference(impl):
    _check_nt(impl, 48, 128, 128, [5, 0, 17, 9, 1], seed=70)


@cpu_only
def test_pallas_interpret_nt_products():
    """gmm_nt / gmm_nt_swiglu on the flat rows kernel with 64-row decode tiles, empty and one-row groups, in the
    interpreter (which multiplies by XLA-transposed weights: the transposed smem reads run on the GPU only)."""
    _check_nt("pallas_chain", 48, 128, 256, [5, 0, 17, 9, 1], seed=71)


@pytest.mark.parametrize("d,i,g,m", [(6144, 2048, 32, 96), (1024, 384, 128, 768)])  # LongCat, small config
def test_nt_products_lower_for_cuda(mosaic_gpu_trace, d, i, g, m):
    """Decode's grouped MoE kernels (two transposed rhs into two accumulators with SwiGLU before the store; one
    transposed rhs) through Pallas -> Mosaic GPU lowering for CUDA on the CPU, within the shared-memory budget."""
    sd = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)  # noqa: E731

    def ffn(x, wg, wu, wd, sizes):
        h = api.gmm_nt_swiglu(x, wg, wu, sizes, impl="pallas_chain", zero_tail=False)
        return api.gmm_nt(h, wd, sizes, impl="pallas_chain", zero_tail=False)

    lowered = jax.jit(ffn).trace(sd(m, d), sd(g, i, d), sd(g, i, d), sd(g, d, i), sd(g, dt=jnp.int32)).lower(
        lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert text.count("mosaic_gpu") >= 2
    assert "stablehlo.transpose" not in text  # the weights are read as stored, not copied transposed first


def test_nt_products_refuse_mismatched_weights():
    x, wg, wu, _, sizes = _nt_inputs(72, 48, 128, 128, [5, 0, 17, 9, 1])
    with pytest.raises(ValueError, match=r"want rhs arrays \[G, N, K\] of one shape"):
        from lcflash.kernels.gmm import pallas_gmm
        pallas_gmm.gmm_nt_swiglu(x, wg, wu[:, :64], sizes)


@cpu_only
def test_pallas_interpret_fused_swiglu_and_decode_tiles():
    from lcflash.kernels.gmm import pallas_gmm

    # 40 rows over 4 groups: the 64-row decode tiling, and fewer rows than a tile.
    x, wg, _, sizes = _inputs(6, 40, 128, 128, [3, 0, 17, 9], jnp.bfloat16)
    wu = (jax.random.normal(jax.random.key(7), wg.shape, jnp.float32) / np.sqrt(128)).astype(jnp.bfloat16)
    h = pallas_gmm.gmm_swiglu_fused(x, wg, wu, sizes)
    want = api.gmm_swiglu(x.astype(jnp.float32), wg.astype(jnp.float32), wu.astype(jnp.float32), sizes,
                          impl="reference")
    assert _rel(h, want) < BF16_TOL
    assert not np.asarray(h[29:], np.float32).any()


@cpu_only
@pytest.mark.parametrize("m,k,n,sizes_l", [
    # 15 matmul tiles (3 column tiles of 2 x 64) over 2 simulated SMs: flat pipelines of 8 and 7 tiles x 6 K steps
    # through a 4-deep ring (tile boundaries fall mid-ring), partial tiles at group edges; 80 tail rows in 2 tiles.
    (300, 384, 384, SIZES_RAGGED),
    # one matmul tile: a one-tile pipeline on one SM, an empty one (0 steps) on the other; tail rows in 2 tiles.
    (200, 128, 128, [0, 100]),
])
def test_pallas_interpret_chained_rows_kernel(m, k, n, sizes_l):
    """Forward rows kernel with one flat pipeline per CTA (pallas_chain) against the fp32 reference and bit for
    bit against the per-tile kernel; every output element is written (the interpreter NaN-fills outputs)."""
    from lcflash.kernels.gmm import pallas_gmm

    lhs, rhs, _, sizes = _inputs(8, m, k, n, sizes_l, jnp.bfloat16)
    got = np.asarray(pallas_gmm.rows_matmul(lhs, [rhs], sizes, chain=True), np.float32)
    want = reference.gmm_loop(lhs.astype(jnp.float32), rhs.astype(jnp.float32), sizes)
    assert _rel(got, want) < BF16_TOL
    assert not got[sum(sizes_l):].any()
    np.testing.assert_array_equal(got, np.asarray(pallas_gmm.rows_matmul(lhs, [rhs], sizes), np.float32))


@cpu_only
@pytest.mark.parametrize("chain", [False, True])
def test_pallas_interpret_swiglu_epilogue(chain):
    """gmm_swiglu_halves: the [gate | up] kernel that applies SwiGLU before its store (3 column tiles per half,
    ragged groups, tail rows) and its backward against the fp32 reference; the interpreter NaN-fills outputs, so
    an unwritten element of h or of its residual [g | u] fails _rel."""
    from lcflash.kernels.gmm import pallas_gmm

    x, wg, dh, sizes = _inputs(15, M_RAGGED, 128, 384, SIZES_RAGGED, jnp.bfloat16)
    wu = (jax.random.normal(jax.random.key(16), wg.shape, jnp.float32) / np.sqrt(128)).astype(jnp.bfloat16)

    def run(f, *args):
        h, vjp = jax.vjp(f, *args)
        return (h, *vjp(dh.astype(h.dtype)))

    got = run(lambda x, wg, wu: pallas_gmm.gmm_swiglu_halves(x, jnp.concatenate([wg, wu], -1), sizes, chain=chain),
              x, wg, wu)
    want = run(lambda *a: api.gmm_swiglu(*a, sizes, impl="reference"), *(t.astype(jnp.float32) for t in (x, wg, wu)))
    assert got[0].shape == (M_RAGGED, 384) and got[0].dtype == jnp.bfloat16
    for name, g, w in zip(("h", "dx", "dwg", "dwu"), got, want):
        assert _rel(g, w) < 2 * BF16_TOL, name  # gate/up are rounded to bf16 before the backward
    assert not np.asarray(got[0][sum(SIZES_RAGGED):], np.float32).any()
    w_gu = jnp.concatenate([wg, wu], -1)
    _, gu = pallas_gmm.rows_matmul(x, [w_gu], sizes, swiglu="halves", chain=chain)
    want_gu = reference.gmm_loop(x.astype(jnp.float32), w_gu.astype(jnp.float32), sizes)
    assert _rel(gu, want_gu) < BF16_TOL


def _check_ffn_swiglu_grad_epilogue(m, d, f, sizes_l, seed, zero_tails=(True, False)):
    """gmm_swiglu_ffn's output and all gradients, with and without zero_tail, against the fp32 reference and against
    composing the two kernels (d_h rounded to bf16 there, kept in fp32 here). Without zero_tail, only the rows past
    the groups of y and dx may differ (undefined); they must not leak into the weight gradients."""
    from lcflash.kernels.gmm import pallas_gmm

    x, wg, _, sizes = _inputs(seed, m, d, f, sizes_l, jnp.bfloat16)
    wu, wd = ((jax.random.normal(jax.random.key(seed + s), shape, jnp.float32) / np.sqrt(shape[1])).astype(
        jnp.bfloat16) for s, shape in ((1, wg.shape), (2, (len(sizes_l), f, d))))
    dy = jax.random.normal(jax.random.key(seed + 3), (m, d), jnp.float32).astype(jnp.bfloat16)

    def run(f, *args):
        y, vjp = jax.vjp(f, *args)
        return (y, *vjp(dy.astype(y.dtype)))

    want = run(lambda x, wg, wu, wd: reference.gmm_loop(api.gmm_swiglu(x, wg, wu, sizes, impl="reference"), wd,
                                                        sizes), *(t.astype(jnp.float32) for t in (x, wg, wu, wd)))
    composed = jax.jit(lambda *a: run(lambda x, wg, wu, wd: pallas_gmm.gmm(pallas_gmm.gmm_swiglu_halves(
        x, jnp.concatenate([wg, wu], -1), sizes, chain=True), wd, sizes, chain=True), *a))(x, wg, wu, wd)

    def fused(zero_tail):
        ffn = lambda x, wg, wu, wd: pallas_gmm.gmm_swiglu_ffn(x, jnp.concatenate([wg, wu], -1), wd, sizes,  # noqa
                                                              zero_tail=zero_tail)
        return jax.jit(lambda *a: run(ffn, *a))(x, wg, wu, wd)

    for zero_tail in zero_tails:
        got = fused(zero_tail)
        valid = m if zero_tail else sum(sizes_l)
        assert got[0].shape == (m, d) and got[0].dtype == jnp.bfloat16
        for name, g, w, c in zip(("y", "dx", "dwg", "dwu", "dwd"), got, want, composed):
            rows = valid if name in ("y", "dx") else None
            assert _rel(g[:rows], w[:rows]) < 2 * BF16_TOL, (zero_tail, name)  # h, [g | u] rounded to bf16 between
            assert _rel(g[:rows], c[:rows]) < BF16_TOL, (zero_tail, name)
        if zero_tail:
            assert not np.asarray(got[0][sum(sizes_l):], np.float32).any()


def _rows_variants(x, w, dy, sizes, chain, wd=None):
    """The rows kernel's variants on one input, as fp32 arrays: the forward, d_lhs (rhs transposed), the [gate | up]
    product with SwiGLU in its epilogue (h, [g | u]) and, given the down projection's [G, F, D] weight wd, its d_lhs
    with SwiGLU's backward in the epilogue (x as its output gradient; flat pipelines only)."""
    from lcflash.kernels.gmm import pallas_gmm

    h, gu = pallas_gmm.rows_matmul(x, [w], sizes, swiglu="halves", chain=chain)
    outs = [pallas_gmm.rows_matmul(x, [w], sizes, chain=chain),
            pallas_gmm.rows_matmul(dy, [w], sizes, transpose_rhs=True, chain=chain), h, gu]
    if wd is not None:
        outs.append(pallas_gmm.rows_matmul(x, [wd], sizes, transpose_rhs=True, swiglu="grad_halves", gu_mn2=gu,
                                           chain=chain))
    return [np.asarray(a, np.float32) for a in outs]


def _check_flat_rows_bitwise(monkeypatch, m, k, n, sizes_l, seed, again: bool):
    """The flat rows kernels (our own loop, _flat_loop) against the per-tile ones (emit_pipeline), bit for bit (same
    tiles, same accumulation order), and with `again` the same on a second call (a race would move it; the
    interpreter has none): the forward, d_lhs (rhs transposed), the [gate | up] product with SwiGLU in its
    epilogue, and a forward in bands of 2 of 4 n tiles with each slot released a step late (Tiles.overlap_mma)."""
    from lcflash.kernels.gmm import mgpu_kernels as mk
    from lcflash.kernels.gmm import pallas_gmm

    x, w, dy, sizes = _inputs(seed, m, k, n, sizes_l, jnp.bfloat16)
    run = functools.partial(_rows_variants, x, w, dy, sizes)
    want, got = run(chain=False), run(chain=True)
    second = run(chain=True) if again else got
    monkeypatch.setattr(pallas_gmm, "ROWS_TILES", mk.Tiles(tile_n=64, epi_n=64, band=2, chain=True, overlap_mma=True))
    w4 = (jax.random.normal(jax.random.key(seed + 1), (len(sizes_l), k, 512), jnp.float32) / np.sqrt(k)).astype(
        jnp.bfloat16)  # 4 n tiles of 2 x 64 columns
    want.append(np.asarray(reference.gmm_loop(x.astype(jnp.float32), w4.astype(jnp.float32), sizes), np.float32))
    banded = [np.asarray(pallas_gmm.rows_matmul(x, [w4], sizes, chain=True), np.float32) for _ in range(1 + again)]
    assert _rel(banded[0], want[-1]) < BF16_TOL
    monkeypatch.setattr(pallas_gmm, "ROWS_TILES", mk.Tiles(tile_n=64, epi_n=64))
    want[-1] = np.asarray(pallas_gmm.rows_matmul(x, [w4], sizes), np.float32)
    for name, a, b, c in zip(("forward", "d_lhs", "h", "[g | u]", "banded late"), got + banded[:1],
                             second + banded[-1:], want):
        np.testing.assert_array_equal(a, c, err_msg=name)
        np.testing.assert_array_equal(a, b, err_msg=name)


@cpu_only
def test_pallas_interpret_flat_rows_kernels_bitwise_per_tile(monkeypatch):
    _check_flat_rows_bitwise(monkeypatch, M_RAGGED, 128, 256, SIZES_RAGGED, seed=41, again=False)


def _schedule_rows(sched, m, tm):
    """{group: sorted rows its live tiles cover}, checking each tile's window lies in [0, m) and holds its rows."""
    group, row8, start, rows, has_mm = (np.asarray(f) for f in sched)
    row0 = row8 * 8
    covered = {}
    for gi, r0, st, n, mm in zip(group, row0, start, rows, has_mm):
        if n == 0:
            continue
        assert 0 <= r0 <= m - tm and 0 <= st and st + n <= tm, (r0, st, n)
        covered.setdefault(int(gi) if mm else -1, []).extend(range(r0 + st, r0 + st + n))
    return {gi: sorted(r) for gi, r in covered.items()}


@pytest.mark.parametrize("align", [8, 64])
def test_row_schedule_windows_cover_each_group_once(align):
    """mk.row_schedule's windows: each group's rows exactly once (the tail's as group -1), windows inside [0, m)
    starting at multiples of align (the swizzled TMA copies tile rows by 8), no more tiles than with blocks (align =
    tile_m), which are the rows kernel's schedule as before."""
    from lcflash.kernels.gmm import mgpu_kernels as mk

    rng = np.random.default_rng(align)
    for _ in range(8):
        m, g = 128 * int(rng.integers(2, 5)), int(rng.integers(1, 12))
        sizes_l = rng.multinomial(int(rng.integers(0, m + 1)), rng.dirichlet(np.full(g, 0.5)))
        sched, n_live = mk.row_schedule(jnp.asarray(sizes_l, jnp.int32), m, 128, align=align)
        blocks, n_blocks = mk.row_schedule(jnp.asarray(sizes_l, jnp.int32), m, 128)
        ends = np.cumsum(sizes_l)
        want = {gi: list(range(e - sz, e)) for gi, (sz, e) in enumerate(zip(sizes_l, ends)) if sz}
        want.update({-1: list(range(ends[-1], m))} if ends[-1] < m else {})
        assert _schedule_rows(sched, m, 128) == want == _schedule_rows(blocks, m, 128)
        assert not (np.asarray(sched[1]) * 8 % align).any() and not (np.asarray(blocks[1]) * 8 % 128).any()
        assert int(n_live) <= int(n_blocks) and int(n_live) == int((np.asarray(sched[3]) > 0).sum())
    with pytest.raises(ValueError, match="align = 12 must be a multiple of 8 dividing tile_m = 128"):
        mk.row_schedule(jnp.asarray([3], jnp.int32), 128, 128, align=12)


def _check_rows_align(monkeypatch, m, k, n, sizes_l, seed):
    """pallas_gmm.ROWS_ALIGN = 8 against the default (windows on lhs's blocks): the same results bit for bit in
    every variant of the flat rows kernel, the forward, [gate | up] with SwiGLU in its epilogue (swiglu="halves"),
    d_lhs (rhs transposed), and the down projection's d_lhs with SwiGLU's backward in its epilogue
    (swiglu="grad_halves"), whose g and u loads follow the windows too."""
    from lcflash.kernels.gmm import pallas_gmm

    x, w, dy, sizes = _inputs(seed, m, k, n, sizes_l, jnp.bfloat16)
    wd = (jax.random.normal(jax.random.key(seed + 1), (len(sizes_l), n // 2, k), jnp.float32) / np.sqrt(k)).astype(
        jnp.bfloat16)  # the down projection's [G, F, D], read transposed: d_h = dy @ w_down^T

    def run(align):
        monkeypatch.setattr(pallas_gmm, "ROWS_ALIGN", align)
        return _rows_variants(x, w, dy, sizes, chain=True, wd=wd)

    got, want = run(8), run(0)
    assert _rel(got[0], reference.gmm_loop(x.astype(jnp.float32), w.astype(jnp.float32), sizes)) < BF16_TOL
    for name, a, b in zip(("forward", "d_lhs", "h", "[g | u]", "[d_g | d_u]"), got, want):
        np.testing.assert_array_equal(a, b, err_msg=name)


# Groups starting off the blocks and off multiples of 8 (rows 0, 37, 37, 167, 168, 220, 300), an empty one, a group
# of one row, and the last group ending at row m = 384 from row 300, whose window (296) moves back to 256.
SIZES_ALIGN = [37, 0, 130, 1, 52, 80, 84]


@cpu_only
def test_pallas_interpret_rows_align(monkeypatch):
    _check_rows_align(monkeypatch, 384, 128, 256, SIZES_ALIGN, seed=61)


@cpu_only
def test_pallas_interpret_ffn_swiglu_grad_epilogue():
    """The expert FFN whose down-projection d_lhs kernel writes [d_g | d_u] (3 column tiles per half, ragged
    groups, tail rows); the interpreter NaN-fills outputs, so with zero_tail an unwritten element fails _rel. Without
    zero_tail (the model's way) the same kernels run in tests/test_moe.py's tail tests, which check in the interpreter
    that nothing reads the unwritten tail."""
    _check_ffn_swiglu_grad_epilogue(M_RAGGED, 128, 384, SIZES_RAGGED, seed=17, zero_tails=(True,))


def test_band_order_permutes_the_matmul_tiles():
    """Tiles.band: every matmul tile once, each band's tiles of every row block before the next band, the tail
    row-major after them; what 132 CTAs run at once spans one band's n tiles."""
    from lcflash.kernels.gmm import mgpu_kernels as mk

    n_tiles, n_mm, n_live = 24, 37, 41
    lin = jnp.arange(n_live * n_tiles)
    row_major = [(i // n_tiles, i % n_tiles) for i in range(n_live * n_tiles)]
    for band in (0, 24, 32):
        assert list(zip(*map(np.asarray, mk.band_order(lin, n_tiles, jnp.int32(n_mm), band)))) == row_major, band
    mt, nt = mk.band_order(lin, n_tiles, jnp.int32(n_mm), 8)
    pairs = list(zip(np.asarray(mt).tolist(), np.asarray(nt).tolist()))
    mm = n_mm * n_tiles
    assert sorted(pairs[:mm]) == row_major[:mm] and pairs[mm:] == row_major[mm:]
    assert [c // 8 for _, c in pairs[:mm]] == sorted(c // 8 for _, c in pairs[:mm])   # band by band
    assert {c for _, c in pairs[:132]} == set(range(8)) and {r for r, _ in pairs[:132]} == set(range(17))
    x, w, _, s = _inputs(3, 256, 128, 512, [256], jnp.bfloat16)
    sched = mk.row_schedule(s, 256, 128)[0]
    for tiles in (mk.Tiles(tile_n=64, band=3, chain=True), mk.Tiles(tile_n=64, band=2)):   # 4 n tiles
        with pytest.raises(ValueError, match="Tiles.band = "):
            mk.rows_kernel(x, [w], sched, transpose_rhs=False, out_dtype=x.dtype, tiles=tiles)


def test_band_takes_the_largest_divisor_of_the_n_tiles(monkeypatch):
    """pallas_gmm.ROWS_BAND and CONTRACT_BAND bound each kernel's band; each flat product takes the largest
    divisor of its n tiles; per-tile pipelines and pinned tiles keep theirs; the rows kernel bands only groups of
    more than one row tile on average."""
    from lcflash.kernels.gmm import mgpu_kernels as mk
    from lcflash.kernels.gmm import pallas_gmm

    seen = []
    monkeypatch.setattr(mk, "rows_kernel", lambda lhs, rhs, sched, *, tiles, **kw: seen.append(tiles) or lhs)
    monkeypatch.setattr(mk, "contract_kernel", lambda lhs, rhs, sched, *, tiles, **kw: seen.append(tiles) or lhs)
    monkeypatch.setattr(pallas_gmm, "ROWS_BAND", 8)
    monkeypatch.setattr(pallas_gmm, "CONTRACT_BAND", 4)
    x, sizes = jnp.zeros((256, 128), jnp.bfloat16), jnp.array([256], jnp.int32)
    for n in (6144, 3072, 2048, 1280, 1024):   # 24, 12, 8, 5 and 4 n tiles of 256 columns
        pallas_gmm.rows_matmul(x, [jnp.zeros((1, 128, n), jnp.bfloat16)], sizes, chain=True)
    pallas_gmm.contract_matmul(x, jnp.zeros((256, 6144), jnp.bfloat16), sizes, out_dtype=jnp.float32, chain=True)
    pallas_gmm.rows_matmul(x, [jnp.zeros((1, 128, 6144), jnp.bfloat16)], sizes)   # per-tile pipelines: no bands
    pallas_gmm.contract_matmul(x, jnp.zeros((256, 6144), jnp.bfloat16), sizes, out_dtype=jnp.float32)
    monkeypatch.setattr(pallas_gmm, "ROWS_TILES", mk.Tiles(band=3))
    pallas_gmm.rows_matmul(x, [jnp.zeros((1, 128, 6144), jnp.bfloat16)], sizes, chain=True)
    assert [(2 * t.tile_n, t.band) for t in seen] == [(256, 8), (256, 6), (256, 8), (256, 5), (256, 4), (256, 4),
                                                      (256, 0), (256, 0), (256, 3)]
    # A row tile or less per group on average: no weight tile is read twice, so no bands (LongCat T = 64, 128).
    monkeypatch.setattr(pallas_gmm, "ROWS_TILES", None)
    seen.clear()
    for rows_per_group in (64, 128, 129):
        x = jnp.zeros((4 * rows_per_group, 128), jnp.bfloat16)
        pallas_gmm.rows_matmul(x, [jnp.zeros((4, 128, 6144), jnp.bfloat16)], jnp.full((4,), rows_per_group,
                                                                                     jnp.int32), chain=True)
    assert [(t.tile_m, t.band) for t in seen] == [(64, 0), (128, 0), (128, 8)]


def test_stages_bound_the_flat_rings(monkeypatch):
    """pallas_gmm.ROWS_STAGES and CONTRACT_STAGES: the deepest ring each flat pipeline takes (fewer where shared
    memory is short); d_rhs over groups of CONTRACT_DEEP_ROWS or more on average takes CONTRACT_DEEP_STAGES and
    CONTRACT_DEEP_BAND instead (0: never). d_rhs always stores 64 columns at a time (128-column stores fit at 3
    stages but lost there); the rows kernel stores a warpgroup's whole tile where it fits. Pinned tiles keep
    theirs."""
    from lcflash.kernels.gmm import mgpu_kernels as mk
    from lcflash.kernels.gmm import pallas_gmm

    seen = []
    monkeypatch.setattr(mk, "rows_kernel", lambda lhs, rhs, sched, *, tiles, **kw: seen.append(tiles) or lhs)
    x, sizes = jnp.zeros((256, 128), jnp.bfloat16), jnp.array([256], jnp.int32)

    def ring(n, dtype, rows_per_group=512):
        t = pallas_gmm.flat_contract_tiles(n, dtype, rows_per_group, k=2048)
        return t.stages, t.epi_n, t.chain

    def rows_ring():
        pallas_gmm.rows_matmul(x, [jnp.zeros((1, 128, 6144), jnp.bfloat16)], sizes, chain=True)
        return seen[-1].stages, seen[-1].epi_n

    for most, want_bf16, want_f32, want_rows in ((4, 4, 3, (4, 64)), (3, 3, 3, (3, 128)), (2, 2, 2, (2, 128))):
        monkeypatch.setattr(pallas_gmm, "CONTRACT_STAGES", most)
        monkeypatch.setattr(pallas_gmm, "ROWS_STAGES", most)
        assert ring(6144, jnp.bfloat16) == ring(4096, jnp.bfloat16) == (want_bf16, 64, True), most
        assert ring(6144, jnp.float32) == (want_f32, 64, True), most
        assert rows_ring() == want_rows, most
    monkeypatch.setattr(pallas_gmm, "CONTRACT_STAGES", 4)
    monkeypatch.setattr(pallas_gmm, "CONTRACT_BAND", 8)
    monkeypatch.setattr(pallas_gmm, "CONTRACT_DEEP_STAGES", 3)
    monkeypatch.setattr(pallas_gmm, "CONTRACT_DEEP_BAND", 2)
    for deep_rows, rows, deep in ((4096, 4095, False), (4096, 4096, True), (0, 1e9, False)):
        monkeypatch.setattr(pallas_gmm, "CONTRACT_DEEP_ROWS", deep_rows)
        t = pallas_gmm.flat_contract_tiles(6144, jnp.bfloat16, rows, k=2048)   # 24 n tiles: bands of 2 or 8
        assert (t.stages, t.band) == ((3, 2) if deep else (4, 8)), (deep_rows, rows)
    monkeypatch.setattr(pallas_gmm, "CONTRACT_TILES", mk.Tiles(stages=4, epi_n=128))
    monkeypatch.setattr(pallas_gmm, "ROWS_TILES", mk.Tiles(stages=4, epi_n=64))
    assert ring(6144, jnp.bfloat16) == (4, 128, True) and rows_ring() == (4, 64)
    assert ring(6144, jnp.bfloat16, 8192) == (4, 128, True)


def test_set_bands_refuses_a_bad_band_by_name(monkeypatch):
    from lcflash.kernels.gmm import pallas_gmm

    monkeypatch.setattr(pallas_gmm, "ROWS_BAND", 0)
    monkeypatch.setattr(pallas_gmm, "CONTRACT_BAND", 0)
    pallas_gmm.set_bands(rows=12)
    assert (pallas_gmm.ROWS_BAND, pallas_gmm.CONTRACT_BAND) == (12, 0)
    pallas_gmm.set_bands(contract=4)
    assert (pallas_gmm.ROWS_BAND, pallas_gmm.CONTRACT_BAND) == (12, 4)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="pallas_gmm.CONTRACT_BAND = .*must be 0"):
            pallas_gmm.set_bands(rows=0, contract=bad)
    assert (pallas_gmm.ROWS_BAND, pallas_gmm.CONTRACT_BAND) == (12, 4)   # nothing set when one value is bad


@cpu_only
def test_pallas_interpret_banded_rows_kernel(monkeypatch):
    """The flat rows kernel with its tiles in bands of 2 of 4 n tiles gives the row-major order's output bit for
    bit (the same tiles, visited in another order), forward and d_lhs, over ragged groups and a tail."""
    from lcflash.kernels.gmm import mgpu_kernels as mk
    from lcflash.kernels.gmm import pallas_gmm

    m, k, n = M_RAGGED, 128, 512
    x, w, _, sizes = _inputs(31, m, k, n, SIZES_RAGGED, jnp.bfloat16)
    dy = jax.random.normal(jax.random.key(32), (m, n), jnp.bfloat16)
    got = {}
    for band in (0, 2):
        monkeypatch.setattr(pallas_gmm, "ROWS_TILES", mk.Tiles(tile_n=64, epi_n=64, band=band, chain=True))
        got[band] = (pallas_gmm.rows_matmul(x, [w], sizes, chain=True),
                     pallas_gmm.rows_matmul(dy, [w], sizes, transpose_rhs=True, chain=True))
    want = reference.gmm_loop(x.astype(jnp.float32), w.astype(jnp.float32), sizes)
    assert _rel(got[0][0], want) < BF16_TOL
    for a, b in zip(got[0], got[2]):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@cpu_only
def test_pallas_interpret_banded_contract_kernel(monkeypatch):
    """The flat contract kernel (d_rhs) with each group's 2 x 4 (K, N) tiles in bands of 2 N tiles: the row-major
    order's output bit for bit, and the float64 reference."""
    from lcflash.kernels.gmm import mgpu_kernels as mk
    from lcflash.kernels.gmm import pallas_gmm

    lhs, _, _, sizes = _inputs(33, M_RAGGED, 256, 128, SIZES_RAGGED, jnp.bfloat16)
    dout = jax.random.normal(jax.random.key(34), (M_RAGGED, 512), jnp.bfloat16)
    got = {}
    for band in (0, 2):
        monkeypatch.setattr(pallas_gmm, "CONTRACT_TILES", mk.Tiles(tile_n=64, epi_n=64, band=band, chain=True))
        got[band] = np.asarray(pallas_gmm.contract_matmul(lhs, dout, sizes, out_dtype=jnp.float32, chain=True))
    assert _rel(got[0], _contract_ref_f64(lhs, dout, SIZES_RAGGED)) < FP32_TOL
    np.testing.assert_array_equal(got[0], got[2])


@cpu_only
def test_pallas_interpret_contract_mask_switch_is_live(monkeypatch):
    """mgpu_kernels.CONTRACT_MASK (off only to time what the masking costs, bench_moe_gemm --deal-nomask): off, the
    rows of blocks two groups share reach both groups' d_rhs, so the result is wrong; on (the default), exact."""
    from lcflash.kernels.gmm import mgpu_kernels as mk
    from lcflash.kernels.gmm import pallas_gmm

    sizes_l = [40, 100, 0, 124]  # group bounds inside 64-row blocks
    lhs, _, dout, sizes = _inputs(35, 264, 128, 128, sizes_l, jnp.bfloat16)
    want = _contract_ref_f64(lhs, dout, sizes_l)
    assert mk.CONTRACT_MASK is True
    got = np.asarray(pallas_gmm.contract_matmul(lhs, dout, sizes, out_dtype=jnp.float32, chain=True))
    assert _rel(got, want) < FP32_TOL
    monkeypatch.setattr(mk, "CONTRACT_MASK", False)
    unmasked = np.asarray(pallas_gmm.contract_matmul(lhs, dout, sizes, out_dtype=jnp.float32, chain=True))
    assert _rel(unmasked, want) > 0.1


def test_grad_halves_needs_its_residual_and_the_flat_pipeline():
    from lcflash.kernels.gmm import mgpu_kernels as mk

    x, w, _, s = _inputs(3, 256, 128, 256, [256], jnp.bfloat16)
    sched = mk.row_schedule(s, 256, 128)[0]
    with pytest.raises(ValueError, match="grad_halves' takes gu_mn2"):
        mk.rows_kernel(x, [w], sched, transpose_rhs=False, out_dtype=x.dtype, tiles=mk.Tiles(chain=True),
                       swiglu="grad_halves")
    with pytest.raises(ValueError, match="needs chain=True"):
        mk.rows_kernel(x, [w], sched, transpose_rhs=False, out_dtype=x.dtype, tiles=mk.Tiles(tile_n=64),
                       swiglu="grad_halves", gu_mn2=jnp.zeros((256, 512), x.dtype))


def _contract_ref_f64(lhs, dout, sizes_l):
    l64, d64, start, out = np.asarray(lhs, np.float64), np.asarray(dout, np.float64), 0, []
    for s in sizes_l:
        out.append(l64[start:start + s].T @ d64[start:start + s])
        start += s
    return np.stack(out)


@cpu_only
@pytest.mark.parametrize("m,k,n,sizes_l,out_dtype,tol", [
    # 3 K tiles x 7 groups = 21 tiles on 2 simulated SMs (11 and 10 in one pipeline each), 1..4 steps per tile
    # through a 3-deep ring, masked blocks shared by groups, empty first/middle/last groups, a 1-row group,
    # 80 tail rows; fp32 output, so the check is tight.
    (300, 384, 256, SIZES_RAGGED, jnp.float32, FP32_TOL),
    # one step per tile (every step a tile's first and last), an empty group starting at row M (its masked load
    # is clamped into bounds), bf16 output through the 128-column epilogue.
    (128, 128, 256, [64, 64, 0], jnp.bfloat16, BF16_TOL),
])
def test_pallas_interpret_flat_contract_kernel(monkeypatch, m, k, n, sizes_l, out_dtype, tol):
    """d_rhs through one flat pipeline per CTA (pallas_chain) against a float64 reference; the interpreter
    NaN-fills outputs, so an unwritten tile fails; empty groups must be exactly zero, whether their tiles run a
    masked step in the pipeline or are stored as zeros after it (CONTRACT_ZERO_EMPTY), bit for bit the same, and the
    same again with each slot released a step late (Tiles.overlap_mma)."""
    from lcflash.kernels.gmm import mgpu_kernels as mk
    from lcflash.kernels.gmm import pallas_gmm

    lhs, _, dout, sizes = _inputs(14, m, k, n, sizes_l, jnp.bfloat16)
    got = {}
    for zero_empty in (False, True):
        monkeypatch.setattr(mk, "CONTRACT_ZERO_EMPTY", zero_empty)
        out = got[zero_empty] = np.asarray(
            pallas_gmm.contract_matmul(lhs, dout, sizes, out_dtype=out_dtype, chain=True), np.float32)
        assert out.shape == (len(sizes_l), k, n)
        assert _rel(out, _contract_ref_f64(lhs, dout, sizes_l)) < tol
        assert not out[[i for i, s in enumerate(sizes_l) if s == 0]].any()
    np.testing.assert_array_equal(got[True], got[False])
    tiles = pallas_gmm.flat_contract_tiles(n, out_dtype, m / len(sizes_l), k=k)
    monkeypatch.setattr(pallas_gmm, "CONTRACT_TILES", dataclasses.replace(tiles, overlap_mma=True))
    late = pallas_gmm.contract_matmul(lhs, dout, sizes, out_dtype=out_dtype, chain=True)
    np.testing.assert_array_equal(np.asarray(late, np.float32), got[False])


def _check_contract_align(monkeypatch, m, k, n, sizes_l, seed, tile_k=64):
    """pallas_gmm.CONTRACT_ALIGN = 8: d_rhs's 64-row windows from each group's first row rounded down to 8 (fewer
    steps than lhs's blocks where groups start off them) against a float64 reference, fp32 out, empty groups exactly
    zero whether they run a masked step or are stored after the pipeline, and the same on a second call."""
    from lcflash.kernels.gmm import mgpu_kernels as mk
    from lcflash.kernels.gmm import pallas_gmm

    lhs, _, dout, sizes = _inputs(seed, m, k, n, sizes_l, jnp.bfloat16)
    gs = mk.contract_schedule(sizes, m, tile_k)
    steps = {a: int(mk.contract_flat_schedule(gs, m, tile_k, 1, 1, zero_empty=True, align=a)[1][0]) for a in (None, 8)}
    assert steps[8] < steps[None], steps
    want = _contract_ref_f64(lhs, dout, sizes_l)
    flat = jax.jit(lambda a, d: pallas_gmm.contract_matmul(a, d, sizes, out_dtype=jnp.float32, chain=True))
    monkeypatch.setattr(pallas_gmm, "CONTRACT_ALIGN", 0)
    blocks = _rel(flat(lhs, dout), want)  # the error on lhs's blocks, for the failure message
    monkeypatch.setattr(pallas_gmm, "CONTRACT_ALIGN", 8)
    got = {}
    for zero_empty in (False, True):
        monkeypatch.setattr(mk, "CONTRACT_ZERO_EMPTY", zero_empty)
        flat.clear_cache()
        out = got[zero_empty] = np.asarray(flat(lhs, dout))
        assert _rel(out, want) < FP32_TOL, (_rel(out, want), blocks)
        assert not out[[i for i, s in enumerate(sizes_l) if s == 0]].any()
    np.testing.assert_array_equal(got[True], got[False])
    np.testing.assert_array_equal(got[True], np.asarray(flat(lhs, dout)))


@cpu_only
@pytest.mark.parametrize("m,sizes_l", [
    (384, SIZES_ALIGN),  # the last group's second window (row 360) moves back to row 320, its first 40 rows masked
    (M_RAGGED, SIZES_RAGGED),  # empty first, middle and last groups, 80 tail rows
])
def test_pallas_interpret_contract_align(monkeypatch, m, sizes_l):
    _check_contract_align(monkeypatch, m, 128, 256, sizes_l, seed=63)


@pytest.mark.parametrize("zero_empty,align", [(False, None), (True, None), (False, 8)])
@pytest.mark.parametrize("deal", ["round_robin", "sorted", "snake"])
@pytest.mark.parametrize("sizes_l", [[512] * 64, [0] * 63 + [32768], list(range(0, 1024, 16)),
                                     [0, 900, 0, 0, 31000, 0, 300, 568, 0]])
def test_flat_contract_schedule_walks_every_tile(sizes_l, deal, zero_empty, align):
    """The per-CTA tile lists at LongCat gate/up shapes on 132 SMs (48 x 8 tiles per group): every tile is dealt
    to one CTA once (round robin: CTA c's tiles are c, c + 132, ...), each tile's steps are its group's row blocks
    (one for an empty group), or with `align` its 64-row windows from its first row rounded down to 8, and every
    CTA's step count is its tiles' steps. With zero_empty an empty group's tiles are in the zero list instead, and
    the pipeline deals the others as if the empty groups were not there."""
    from lcflash.kernels.gmm import mgpu_kernels as mk

    m, tk, kn, n_sms = 32768, 64, 48 * 8, 132
    sizes = jnp.asarray(sizes_l, jnp.int32)
    tile_4g, total_c, lin_cj, zero_2z = (np.asarray(a) for a in mk.contract_flat_schedule(
        mk.contract_schedule(sizes, m, tk), m, tk, kn, n_sms, deal=deal, zero_empty=zero_empty, align=align))
    n_lin = len(sizes_l) * kn
    empty = [i for i, s in enumerate(sizes_l) if s == 0] if zero_empty else []
    live_tiles = [t for t in range(n_lin) if t // kn not in empty]
    assert zero_2z[:2].tolist() == [len(empty) * kn, len(live_tiles)]
    assert zero_2z[2:2 + len(empty)].tolist() == empty
    dealt = lin_cj[lin_cj < n_lin]
    np.testing.assert_array_equal(np.sort(dealt), live_tiles)
    assert (lin_cj[:, -2:] == n_lin).all()  # the slots read ahead past every CTA's last tile
    ends = np.minimum(np.cumsum(sizes_l), m)
    starts = np.concatenate([[0], ends[:-1]])
    for c in range(n_sms):
        tiles_c = [t for t in lin_cj[c] if t < n_lin]
        assert (lin_cj[c, len(tiles_c):] == n_lin).all()  # no gaps: the CTA's tiles come first
        if deal == "round_robin" or (deal == "sorted" and len(set(sizes_l)) == 1):  # equal costs: the same deal
            assert tiles_c == live_tiles[c::n_sms]
        steps = 0
        for lin in tiles_c:
            g = lin // kn
            first = min(starts[g] // (align or tk) * (align or tk), m - tk)
            nblk = -(-(ends[g] - first) // tk) if ends[g] > starts[g] else 1
            assert (tile_4g[2, g] * 8, tile_4g[3, g]) == (first, nblk)
            steps += nblk
        assert total_c[c] == steps


def test_deal_tiles_ranks_as_a_stable_sort_of_the_tiles():
    """deal_tiles ranks groups by counting comparisons: the same order as a stable descending sort of every tile's
    cost (ties in tile order), padded with the no-tile number; the snake deal reverses the odd rows."""
    from lcflash.kernels.gmm import mgpu_kernels as mk

    rng = np.random.default_rng(1)
    for g, kn, n_sms in [(128, 24, 132), (7, 5, 4), (64, 384, 132), (1, 3, 8)]:
        cost = rng.integers(1, 6, g)
        plain = np.asarray(mk.deal_tiles(jnp.asarray(cost, jnp.int32), kn, n_sms, snake=False))
        want = np.argsort(-np.repeat(cost, kn), kind="stable")
        flat = plain.T.ravel()
        np.testing.assert_array_equal(flat[:g * kn], want)
        assert (flat[g * kn:] == g * kn).all()
        snake = np.asarray(mk.deal_tiles(jnp.asarray(cost, jnp.int32), kn, n_sms, snake=True))
        np.testing.assert_array_equal(snake[:, 1::2], plain[::-1, 1::2])
        np.testing.assert_array_equal(snake[:, 0::2], plain[:, 0::2])


def test_contract_deals_by_cost_even_out_skewed_groups():
    """configs/small.py's [gate | up] d_rhs (8 x 3 tiles per group, 128 groups, 132 SMs) under a skewed load: the
    busiest CTA's steps over the mean, 1.21 dealt round robin (several large groups' tiles on one CTA), 1.14 sorted
    by cost, 1.07 in the snake deal."""
    from lcflash.kernels.gmm import mgpu_kernels as mk

    rng = np.random.default_rng(0)
    sizes_l = rng.multinomial(196608, rng.dirichlet(np.full(128, 0.5)))
    m, tk, kn, n_sms = 393216, 64, 24, 132
    gs = mk.contract_schedule(jnp.asarray(sizes_l, jnp.int32), m, tk)
    mean = kn * int(np.maximum(np.asarray(gs[3]), 1).sum()) / n_sms
    busiest = {d: int(np.asarray(mk.contract_flat_schedule(gs, m, tk, kn, n_sms, deal=d)[1]).max()) / mean
               for d in mk.CONTRACT_DEALS}
    assert busiest["snake"] < 1.1 < busiest["sorted"] < 1.2 < busiest["round_robin"], busiest
    with pytest.raises(ValueError, match="contract deal 'lpt'"):
        mk.contract_flat_schedule(gs, m, tk, kn, n_sms, deal="lpt")


def test_auto_deal_is_snake_below_one_tile_per_cta_and_round_robin_above():
    """CONTRACT_DEAL "auto": a group with fewer tiles than CTAs (configs/small.py) is dealt by cost; with more
    (LongCat), round robin already spreads every group over all CTAs."""
    from lcflash.kernels.gmm import mgpu_kernels as mk

    rng = np.random.default_rng(1)
    sizes = jnp.asarray(rng.multinomial(8192, rng.dirichlet(np.full(16, 1.0))), jnp.int32)
    m, tk, n_sms = 16384, 64, 8
    gs = mk.contract_schedule(sizes, m, tk)
    for kn, expect in ((5, "snake"), (8, "round_robin"), (24, "round_robin")):
        auto = mk.contract_flat_schedule(gs, m, tk, kn, n_sms, deal="auto")
        want = mk.contract_flat_schedule(gs, m, tk, kn, n_sms, deal=expect)
        other = mk.contract_flat_schedule(gs, m, tk, kn, n_sms, deal={"snake": "round_robin"}.get(expect, "snake"))
        assert all(np.array_equal(a, b) for a, b in zip(auto, want)), (kn, expect)
        assert not all(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(auto, other)), kn


# LongCat's down projection (the largest tiles against the shared-memory budget) in each setting; configs/small.py's
# [gate | up] in the one with the most switches off their defaults.
@pytest.mark.parametrize("k,n,g,m,band,zero_empty,align", [
    (2048, 6144, 64, 32768, 0, False, 0), (2048, 6144, 64, 32768, 0, True, 8), (2048, 6144, 64, 32768, 8, False, 8),
    (1024, 768, 128, 65536, 8, False, 8)])
def test_pallas_chain_backward_lowers_for_cuda(mosaic_gpu_trace, monkeypatch, k, n, g, m, band, zero_empty, align):
    """pallas_chain's forward + backward (flat rows and contract pipelines) and the flat contract kernel through
    Pallas -> Mosaic GPU lowering (layouts, smem budget) for CUDA on the CPU, at LongCat and small-config shapes,
    with both flat kernels' tiles in column bands (pallas_gmm.ROWS_BAND and CONTRACT_BAND: 8 of LongCat's 24 n tiles)
    with both kernels' rings at 3 stages (ROWS_STAGES, whole-tile stores; d_rhs as over deep groups,
    CONTRACT_DEEP_*), d_rhs's empty groups in the pipeline or stored after it (mgpu_kernels.CONTRACT_ZERO_EMPTY),
    and both flat kernels' row windows on lhs's blocks or on multiples of 8 (ROWS_ALIGN, CONTRACT_ALIGN)."""
    from lcflash.kernels.gmm import mgpu_kernels as mk, pallas_gmm

    monkeypatch.setattr(mk, "CONTRACT_ZERO_EMPTY", zero_empty)
    monkeypatch.setattr(pallas_gmm, "ROWS_ALIGN", align)
    monkeypatch.setattr(pallas_gmm, "CONTRACT_ALIGN", align)
    monkeypatch.setattr(pallas_gmm, "ROWS_BAND", band)
    monkeypatch.setattr(pallas_gmm, "CONTRACT_BAND", band)
    monkeypatch.setattr(pallas_gmm, "ROWS_STAGES", 3 if band else 4)
    monkeypatch.setattr(pallas_gmm, "CONTRACT_DEEP_ROWS", 1 if band else 0)
    monkeypatch.setattr(pallas_gmm, "CONTRACT_DEEP_STAGES", 3)
    monkeypatch.setattr(pallas_gmm, "CONTRACT_DEEP_BAND", band)

    sd = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)  # noqa: E731

    def fwd_bwd(lhs, rhs, dout, sizes):
        out, vjp = jax.vjp(lambda a, b: api.gmm(a, b, sizes, impl="pallas_chain"), lhs, rhs)
        flat = pallas_gmm.contract_matmul(lhs, dout, sizes, out_dtype=jnp.bfloat16, chain=True)
        h, gu = pallas_gmm.rows_matmul(lhs, [rhs], sizes, swiglu="halves", chain=True,  # SwiGLU epilogue
                                       zero_tail=(True, False))
        no_tail = pallas_gmm.rows_matmul(lhs, [rhs], sizes, zero_tail=(False,))  # per-tile pipelines
        return (out, *vjp(dout), flat, h, gu, no_tail)

    lowered = jax.jit(fwd_bwd).trace(sd(m, k), sd(g, k, n), sd(m, n), sd(g, dt=jnp.int32)).lower(
        lowering_platforms=("cuda",))
    assert lowered.as_text().count("mosaic_gpu") >= 6  # forward, d_lhs, d_rhs, flat d_rhs, SwiGLU, per-tile kernels


@pytest.mark.parametrize("zero_empty", [False, True])
def test_clustered_d_rhs_lowers_for_cuda_where_its_k_tiles_pair(mosaic_gpu_trace, monkeypatch, zero_empty):
    """pallas_gmm.CONTRACT_CLUSTER: the flat d_rhs on 2-CTA clusters (dout multicast) lowers for CUDA at LongCat's
    and configs/small.py's shapes, as one kernel per product launched as 66 clusters of 2; configs/small.py's down
    d_rhs (K = 384: 3 K tiles) and groups of CONTRACT_DEEP_ROWS or more keep the one-CTA kernel. Without the empty
    groups' zeroing (an A/B switch), one shape of each kernel."""
    from lcflash.kernels.gmm import mgpu_kernels as mk, pallas_gmm

    monkeypatch.setattr(pallas_gmm, "CONTRACT_CLUSTER", True)
    monkeypatch.setattr(pallas_gmm, "CONTRACT_DEEP_ROWS", 4096)
    monkeypatch.setattr(mk, "CONTRACT_ZERO_EMPTY", zero_empty)
    sd = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)  # noqa: E731
    shapes = [(2048, 6144, 64, 32768, True), (6144, 4096, 64, 32768, True), (1024, 768, 128, 65536, True),
              (384, 1024, 128, 65536, False), (2048, 6144, 16, 16 * 4096, False)]
    for k, n, g, m, clustered in shapes if zero_empty else shapes[::3]:
        text = jax.jit(lambda a, d, s: pallas_gmm.contract_matmul(a, d, s, out_dtype=jnp.bfloat16, chain=True)).trace(
            sd(m, k), sd(m, n), sd(g, dt=jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
        assert ("gmm_contract_flat_cluster" in text) == clustered, (k, n)
        assert ("gmm_contract_flat_k" in text) != clustered, (k, n)
        assert pallas_gmm.flat_contract_tiles(n, jnp.bfloat16, m / g, k=k).cluster_k == clustered, (k, n)


def test_flat_loops_lower_for_cuda_with_and_without_clusters_and_late_release(mosaic_gpu_trace, monkeypatch):
    """The flat d_rhs loop lowers for CUDA with all 512 experts on one GPU (512 x 192 clustered tiles) and without
    clusters (T = 4096; LongCat's T = 512 on 2-CTA clusters is test_clustered_d_rhs_lowers_for_cuda_...'s first
    case); d_rhs and the rows kernel lower with each slot released a step late (Tiles.overlap_mma, whose races the
    interpreter cannot show)."""
    from lcflash.kernels.gmm import mgpu_kernels as mk, pallas_gmm

    sd = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)  # noqa: E731

    def lowered(m, g):
        return jax.jit(lambda a, d, s: pallas_gmm.contract_matmul(a, d, s, out_dtype=jnp.bfloat16, chain=True)).trace(
            sd(m, 2048), sd(m, 6144), sd(g, dt=jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()

    for m, g, name in ((262144, 64, "gmm_contract_flat_k2048_n6144"),
                       (32768, 512, "gmm_contract_flat_cluster_k2048_n6144")):
        assert name in lowered(m, g), (m, g)
    tiles = pallas_gmm.flat_contract_tiles(6144, jnp.bfloat16, 512, k=2048)
    monkeypatch.setattr(pallas_gmm, "CONTRACT_TILES", dataclasses.replace(tiles, overlap_mma=True))
    assert "gmm_contract_flat_cluster_k2048_n6144" in lowered(32768, 64)
    monkeypatch.setattr(pallas_gmm, "ROWS_TILES", mk.Tiles(epi_n=64, band=4, chain=True, overlap_mma=True))
    text = jax.jit(lambda x, w, s: pallas_gmm.rows_matmul(x, [w], s, chain=True)).trace(
        sd(32768, 6144), sd(64, 6144, 2048), sd(64, dt=jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
    assert "gmm_rows_plain_k6144_n2048" in text


def test_clustered_d_rhs_refuses_odd_k_tiles_and_the_interpreter():
    from lcflash.kernels.gmm import mgpu_kernels as mk

    tiles = mk.Tiles(tile_m=128, tile_n=64, chain=True, cluster_k=True)
    lhs, dout = jnp.zeros((256, 384), jnp.bfloat16), jnp.zeros((256, 128), jnp.bfloat16)
    gs = mk.contract_schedule(jnp.array([100, 156], jnp.int32), 256, 64)
    with pytest.raises(ValueError, match="interpreter has no clusters"):
        mk.contract_kernel(lhs.T, dout, gs, out_dtype=jnp.bfloat16, tiles=tiles, lhs_is_km=True, interpret=True)
    with pytest.raises(ValueError, match="even number of K tiles; K = 384 has 3"):
        mk.contract_kernel(lhs, dout, gs, out_dtype=jnp.bfloat16, tiles=tiles, interpret=False)


@pytest.mark.parametrize("d,f,g,m", [(6144, 2048, 64, 32768), (1024, 384, 128, 65536)])  # LongCat, small config
def test_ffn_swiglu_grad_epilogue_lowers_for_cuda(mosaic_gpu_trace, d, f, g, m):
    """gmm_swiglu_ffn's forward and backward (the grad_halves epilogue: TMA loads of g and u started by the compute
    warpgroups, their swizzled tiles read in the accumulator's layout) through Pallas -> Mosaic GPU lowering for
    CUDA on the CPU, within the shared-memory budget."""
    from lcflash.kernels.gmm import pallas_gmm

    sd = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)  # noqa: E731

    def fwd_bwd(x, w_gu, w_down, dy, sizes):
        y, vjp = jax.vjp(lambda *a: pallas_gmm.gmm_swiglu_ffn(*a, sizes, zero_tail=False), x, w_gu, w_down)
        return (y, *vjp(dy))

    lowered = jax.jit(fwd_bwd).trace(sd(m, d), sd(g, d, 2 * f), sd(g, f, d), sd(m, d), sd(g, dt=jnp.int32)).lower(
        lowering_platforms=("cuda",))
    assert lowered.as_text().count("mosaic_gpu") >= 6  # forward: [gate | up], down; backward: four kernels


# ------------------------------------------------------------------------------------------------
# GPU: compiled kernels.
# ------------------------------------------------------------------------------------------------

GPU_CASES = {
    # m, k, n, group sizes
    "ragged": (4096, 512, 1024, [0, 700, 1, 0, 1500, 333, 129, 0, 1000, 64]),  # 372 rows past the groups
    "small_cfg": (2000, 1024, 384, [130] * 7 + [0] * 3 + [97] * 9),  # N = 384: 64-column warpgroup tiles
    "decode": (96, 256, 512, [5, 0, 17, 9, 1, 30, 0, 8]),  # 64-row tiles, M < 128
}
# N of a [gate | up] weight for the rows kernels' variant tests: halves of whole column tiles (2 x 512, 2 x 384)
GPU_GATE_UP_N = {"ragged": 1024, "small_cfg": 768}


@gpu_only
@pytest.mark.parametrize("impl", ["pallas", "pallas_chain"])
@pytest.mark.parametrize("case", sorted(GPU_CASES))
def test_gpu_pallas_forward_and_gradients(case, impl):
    m, k, n, sizes_l = GPU_CASES[case]
    lhs, rhs, dout, sizes = _inputs(10, m, k, n, sizes_l, jnp.bfloat16)
    f = jax.jit(lambda a, b, d: _fwd_grads(impl, a, b, d, sizes))
    got = f(lhs, rhs, dout)
    want = _ref_fwd_grads(lhs, rhs, dout, sizes)
    for name, g, w in zip(("out", "d_lhs", "d_rhs"), got, want):
        assert _rel(g, w) < BF16_TOL, name
    total = sum(sizes_l)
    assert not np.asarray(got[0][total:], np.float32).any()
    assert not np.asarray(got[1][total:], np.float32).any()
    empty = [i for i, s in enumerate(sizes_l) if s == 0]
    assert not np.asarray(got[2], np.float32)[empty].any()
    again = f(lhs, rhs, dout)  # same inputs, bit-identical results: a moving result would be a race
    for g, a in zip(got, again):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(a, np.float32))


@gpu_only
@pytest.mark.parametrize("zero_empty,cluster,late", [(False, False, False), (True, False, False), (False, True, False),
                                                     (True, True, False), (True, True, True), (False, False, True)])
@pytest.mark.parametrize("case", sorted(GPU_CASES))
def test_gpu_flat_contract_kernel(monkeypatch, case, zero_empty, cluster, late):
    """d_rhs through one flat pipeline per CTA (or per 2-CTA cluster sharing dout's blocks: CONTRACT_CLUSTER; every
    case has an even number of K tiles; with each slot released a step late: Tiles.overlap_mma): bit-identical to the
    per-tile contract kernel (same tiles, same accumulation order), empty groups zero (a masked step each in the
    pipeline, or stored after it: CONTRACT_ZERO_EMPTY), and the same on a second call. On lhs's blocks
    (CONTRACT_ALIGN = 0), as the per-tile kernel reads them; the windows have their own test."""
    from lcflash.kernels.gmm import mgpu_kernels as mk
    from lcflash.kernels.gmm import pallas_gmm

    monkeypatch.setattr(pallas_gmm, "CONTRACT_ALIGN", 0)
    monkeypatch.setattr(mk, "CONTRACT_ZERO_EMPTY", zero_empty)
    monkeypatch.setattr(pallas_gmm, "CONTRACT_CLUSTER", cluster)
    m, k, n, sizes_l = GPU_CASES[case]
    lhs, _, dout, sizes = _inputs(13, m, k, n, sizes_l, jnp.bfloat16)
    per_tile = jax.jit(lambda a, d: pallas_gmm.contract_matmul(a, d, sizes, out_dtype=jnp.bfloat16))
    want = np.asarray(per_tile(lhs, dout), np.float32)
    if late:  # pinned after the per-tile run, which would take pinned tiles too
        tiles = pallas_gmm.flat_contract_tiles(n, jnp.bfloat16, m / len(sizes_l), k=k)
        monkeypatch.setattr(pallas_gmm, "CONTRACT_TILES", dataclasses.replace(tiles, overlap_mma=True))
    flat = jax.jit(lambda a, d: pallas_gmm.contract_matmul(a, d, sizes, out_dtype=jnp.bfloat16, chain=True))
    assert ("gmm_contract_flat_cluster" in flat.lower(lhs, dout).as_text()) == cluster
    got = np.asarray(flat(lhs, dout), np.float32)
    assert _rel(got, _contract_ref_f64(lhs, dout, sizes_l)) < BF16_TOL
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, np.asarray(flat(lhs, dout), np.float32))
    assert not got[[i for i, s in enumerate(sizes_l) if s == 0]].any()


@gpu_only
@pytest.mark.parametrize("case", sorted(GPU_CASES))
def test_gpu_contract_align(monkeypatch, case):
    m, k, n, sizes_l = GPU_CASES[case]
    _check_contract_align(monkeypatch, m, k, n, sizes_l, seed=64)


@gpu_only
@pytest.mark.parametrize("fused", [True, False, "halves"])
def test_gpu_pallas_swiglu_forward_and_gradients(fused):
    """The two-array SwiGLU kernel (fused), two gmm kernels with XLA's SwiGLU (False) and the [gate | up] kernel with
    SwiGLU in its epilogue (halves) against the fp32 reference."""
    from lcflash.kernels.gmm import pallas_gmm

    m, k, n, sizes_l = GPU_CASES["ragged"]
    x, wg, dh, sizes = _inputs(11, m, k, n, sizes_l, jnp.bfloat16)
    wu = (jax.random.normal(jax.random.key(12), wg.shape, jnp.float32) / np.sqrt(k)).astype(jnp.bfloat16)

    def run(f, *args):
        h, vjp = jax.vjp(lambda a, b, c: f(a, b, c, sizes), *args)
        return (h, *vjp(dh.astype(args[0].dtype)))

    ours = {True: pallas_gmm.gmm_swiglu_fused, False: lambda *a: api.gmm_swiglu(*a, impl="pallas"),
            "halves": lambda x, wg, wu, s: api.gmm_swiglu_halves(x, jnp.concatenate([wg, wu], -1), s,
                                                                 impl="pallas_chain")}[fused]
    got = jax.jit(lambda *a: run(ours, *a))(x, wg, wu)
    want = run(lambda *a: api.gmm_swiglu(*a, impl="reference"), *(t.astype(jnp.float32) for t in (x, wg, wu)))
    for name, g, w in zip(("h", "dx", "dwg", "dwu"), got, want):
        assert _rel(g, w) < 2 * BF16_TOL, name  # gate/up are rounded to bf16 between the kernels
    assert not np.asarray(got[0][sum(sizes_l):], np.float32).any()


@gpu_only
@pytest.mark.parametrize("case", ["decode", "small_cfg", "longcat_decode"])
def test_gpu_nt_products(case):
    """Decode's grouped MoE kernels, compiled (wgmma on the transposed weight tiles), against the fp32 reference."""
    m, d, i, sizes_l = {"decode": (96, 256, 512, [5, 0, 17, 9, 1, 30, 0, 8]),
                        "small_cfg": (768, 1024, 384, [6] * 64 + [0] * 64),
                        "longcat_decode": (12, 6144, 2048, [1] * 8 + [0] * 24)}[case]
    _check_nt("pallas_chain", m, d, i, sizes_l, seed=73)


@gpu_only
def test_gpu_ffn_swiglu_grad_epilogue():
    """Both zero_tail settings (the helper runs each), whole and ragged tiles."""
    m, k, n, sizes_l = GPU_CASES["small_cfg"]  # d = 1024, f = 384: the small config's experts
    _check_ffn_swiglu_grad_epilogue(m, k, n, sizes_l, seed=21)


@gpu_only
@pytest.mark.parametrize("case", ["ragged", "small_cfg"])
def test_gpu_flat_rows_kernels_bitwise_per_tile(monkeypatch, case):
    m, k, _, sizes_l = GPU_CASES[case]
    _check_flat_rows_bitwise(monkeypatch, m, k, GPU_GATE_UP_N[case], sizes_l, seed=44, again=True)


@gpu_only
@pytest.mark.parametrize("case", ["ragged", "small_cfg"])
def test_gpu_rows_align(monkeypatch, case):
    m, k, _, sizes_l = GPU_CASES[case]
    _check_rows_align(monkeypatch, m, k, GPU_GATE_UP_N[case], sizes_l, seed=62)


@gpu_only
@pytest.mark.parametrize("impl", ["jax_mgpu", pytest.param("tokamax", marks=needs_tokamax)])
def test_gpu_peer_forward_and_gradients(impl):
    """The peers' kernels (JAX's example, tokamax's) behind `gmm`: values, gradients and zeroed tails."""
    m, k, n, sizes_l = GPU_CASES["ragged"]
    lhs, rhs, dout, sizes = _inputs(13, m, k, n, sizes_l, jnp.bfloat16)
    got = jax.jit(lambda a, b, d: _fwd_grads(impl, a, b, d, sizes))(lhs, rhs, dout)
    want = _ref_fwd_grads(lhs, rhs, dout, sizes)
    for name, g, w in zip(("out", "d_lhs", "d_rhs"), got, want):
        assert _rel(g, w) < BF16_TOL, name
    assert not np.asarray(got[0][sum(sizes_l):], np.float32).any()
    assert not np.asarray(got[1][sum(sizes_l):], np.float32).any()


@needs_tokamax
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, FP32_TOL), (jnp.bfloat16, BF16_TOL)])
def test_tokamax_wrapper_matches_reference(monkeypatch, dtype, tol):
    """The wrapper around tokamax (its XLA path here; its Mosaic GPU kernels in the GPU test): values, gradients and
    zeroed tails of the output and d_lhs."""
    from lcflash.kernels.gmm import tokamax_gmm

    monkeypatch.setattr(tokamax_gmm, "IMPLEMENTATION", "xla")
    lhs, rhs, dout, sizes = _inputs(15, 90, 32, 24, [0, 11, 0, 40, 1, 7], dtype)  # 31 rows past the groups
    got = jax.jit(lambda a, b, d: _fwd_grads("tokamax", a, b, d, sizes))(lhs, rhs, dout)
    want = _ref_fwd_grads(lhs, rhs, dout, sizes)
    for name, g, w in zip(("out", "d_lhs", "d_rhs"), got, want):
        assert _rel(g, w) < tol, name
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == dtype
    assert not np.asarray(got[0][59:], np.float32).any() and not np.asarray(got[1][59:], np.float32).any()


def test_tokamax_wrapper_gives_no_cotangent_to_rows_past_the_groups(monkeypatch):
    """tokamax's Mosaic GPU d_rhs product reads the rows past the groups. A stand-in that does the same (its last
    group runs on to the last row) must still give the reference's d_rhs: the wrapper zeroes those rows' cotangent
    (the forward zeroed their output)."""
    import types

    from lcflash.kernels.gmm import tokamax_gmm

    def ragged_dot(a, b, gs, preferred_element_type=None, implementation=None):
        gs = gs.at[-1].add(a.shape[0] - jnp.sum(gs))   # rows past the groups join the last one
        return jax.lax.ragged_dot(a, b, gs, preferred_element_type=preferred_element_type)

    monkeypatch.setattr(tokamax_gmm, "load", lambda: types.SimpleNamespace(ragged_dot=ragged_dot))
    monkeypatch.setattr(tokamax_gmm, "IMPLEMENTATION", "xla")
    lhs, rhs, dout, sizes = _inputs(16, 90, 32, 24, [0, 11, 0, 40, 1, 7], jnp.float32)  # 31 rows past the groups
    got = jax.jit(lambda a, b, d: _fwd_grads("tokamax", a, b, d, sizes))(lhs, rhs, dout)
    want = _ref_fwd_grads(lhs, rhs, dout, sizes)
    for name, g, w in zip(("out", "d_lhs", "d_rhs"), got, want):
        assert _rel(g, w) < FP32_TOL, name


@needs_tokamax
def test_tokamax_forward_runs_once_under_a_kernel_outputs_policy(monkeypatch):
    """Its output and residuals are named KERNEL_OUTPUT: under a policy that keeps only those names, the gradient
    does not run its forward product again (counted as ragged dots in the jaxpr)."""
    from lcflash.kernels import KERNEL_OUTPUT
    from lcflash.kernels.gmm import tokamax_gmm

    monkeypatch.setattr(tokamax_gmm, "IMPLEMENTATION", "xla")
    lhs, rhs, _, sizes = _inputs(17, 40, 32, 24, [10, 0, 25], jnp.float32)

    def loss(a, b):
        return jnp.sum(jnp.sin(api.gmm(a, b, sizes, impl="tokamax")))

    def ragged_dots(f):
        return str(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(lhs, rhs)).count("ragged_dot_general")

    keep = jax.checkpoint_policies.save_only_these_names(KERNEL_OUTPUT)
    assert ragged_dots(jax.checkpoint(loss, policy=keep)) == ragged_dots(loss) > 0
    assert ragged_dots(jax.checkpoint(loss, policy=jax.checkpoint_policies.nothing_saveable)) > ragged_dots(loss)


def test_pallas_gradients_inside_shard_map():
    """Expert-parallel training differentiates the kernel inside shard_map with expert-sharded weights: its
    cotangents must carry the weights' varying manual axes (this raised a custom_vjp type error on the GPU)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    # Auto axes and no ambient mesh: the interpreter's worker threads trace outside this thread's mesh context.
    mesh = jax.make_mesh((1,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
    lhs, rhs, _, sizes = _inputs(9, 96, 128, 128, [40, 0, 30], jnp.bfloat16)

    def loss(impl):
        def local(l, r):
            return jax.lax.psum(api.gmm(l, r, sizes, impl=impl).astype(jnp.float32).sum(), "expert")
        return jax.shard_map(local, mesh=mesh, in_specs=(P("expert"), P("expert")), out_specs=P())

    args = [jax.device_put(a, NamedSharding(mesh, P("expert"))) for a in (lhs, rhs)]
    got = jax.jit(jax.grad(loss("pallas"), argnums=(0, 1)))(*args)
    want = jax.jit(jax.grad(loss("reference"), argnums=(0, 1)))(*args)
    for g, w in zip(got, want):
        assert _rel(g, w) < BF16_TOL


def test_fused_expert_ffn_gradients_inside_shard_map():
    """The same for the whole expert FFN with SwiGLU's backward in the down d_lhs kernel (api.gmm_swiglu_ffn):
    its [d_g | d_u] goes from one kernel to the next inside the custom gradient."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((1,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
    x, w_gu, _, sizes = _inputs(10, 96, 128, 256, [40, 0, 30], jnp.bfloat16)
    w_down = (jax.random.normal(jax.random.key(11), (3, 128, 128), jnp.float32) / np.sqrt(128)).astype(jnp.bfloat16)

    def loss(impl):
        def local(x, a, b):
            y = api.gmm_swiglu_ffn(x, a, b, sizes, impl=impl)
            return jax.lax.psum(y.astype(jnp.float32).sum(), "expert")
        return jax.shard_map(local, mesh=mesh, in_specs=(P("expert"),) * 3, out_specs=P())

    args = [jax.device_put(a, NamedSharding(mesh, P("expert"))) for a in (x, w_gu, w_down)]
    got = jax.jit(jax.grad(loss("pallas_chain"), argnums=(0, 1, 2)))(*args)
    want = jax.jit(jax.grad(loss("reference"), argnums=(0, 1, 2)))(*args)
    for g, w in zip(got, want):
        assert _rel(g, w) < 2 * BF16_TOL


def test_gmm_profile_summary_attributes_time_to_the_innermost_scope():
    """experiments/gmm_profile.py's reading of a Mosaic GPU profiler trace, on a synthetic two-CTA trace."""
    from experiment_scripts import load

    gp = load("gmm_profile")
    ev = lambda name, ph, ts, tid: dict(name=name, ph=ph, ts=ts, pid=1, tid=tid)  # noqa: E731
    events = []
    for cta, scale in ((0, 1.0), (1, 3.0)):
        tid = 1 + cta * gp.N_WARPGROUPS  # compute warpgroup 0 of this CTA
        events += [ev("mma", "B", 0.0, tid), ev("mma", "E", 2.0 * scale, tid),  # mma: 2 + 1.5 (x3) us
                   ev("mma", "B", 3.0 * scale, tid), ev("next_tile", "B", 3.5 * scale, tid),  # nested: 0.5 (1.5) us
                   ev("next_tile", "E", 4.0 * scale, tid), ev("mma", "E", 5.0 * scale, tid),
                   ev("epilogue", "B", 6.0 * scale, tid), ev("epilogue", "E", 7.0 * scale, tid)]
    got = gp.summarize({"traceEvents": events})["wg0"]
    assert got["mma"]["mean_us"] == pytest.approx((3.5 + 10.5) / 2) and got["mma"]["count"] == 2
    assert got["next_tile"]["mean_us"] == pytest.approx(1.0) and got["next_tile"]["max_us"] == pytest.approx(1.5)
    assert got["epilogue"]["mean_us"] == pytest.approx(2.0)
    assert got["other"]["mean_us"] == pytest.approx(4.0)  # gaps 1 + 1 (x3 for the second CTA)
    assert got["span"]["mean_us"] == pytest.approx(14.0)


def test_auto_picks_our_kernel_only_where_it_runs():
    """gmm_impl="auto": pallas_chain for half-precision operands with K, N multiples of 128 on a Hopper GPU,
    ragged_dot otherwise (here, on the CPU, the same numbers as ragged_dot)."""
    bf16, f32 = jnp.bfloat16, jnp.float32

    def auto(dtype, k, n, *where):
        sd = jax.ShapeDtypeStruct
        return api.auto_impl(sd((256, k), dtype), sd((8, k, n), dtype), *where)

    assert auto(bf16, 1024, 384, "gpu", "9.0") == "pallas_chain"
    assert auto(jnp.float16, 6144, 2048, "gpu", "9.0") == "pallas_chain"
    assert auto(f32, 1024, 384, "gpu", "9.0") == "ragged_dot"
    assert auto(bf16, 64, 32, "gpu", "9.0") == "ragged_dot"   # configs/tiny.py's experts
    assert auto(bf16, 1024, 384, "gpu", "8.0") == "ragged_dot"
    assert auto(bf16, 1024, 384, "cpu") == "ragged_dot"
    keys = jax.random.split(jax.random.key(7), 2)
    x = jax.random.normal(keys[0], (24, 128), f32)
    w = jax.random.normal(keys[1], (3, 128, 256), f32)
    sizes = jnp.array([10, 0, 9], jnp.int32)
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(api.gmm(x, w, sizes, impl="auto"), api.gmm(x, w, sizes, impl="ragged_dot"))


def test_gmm_profile_refuses_an_unknown_impl_before_any_work(monkeypatch, capsys):
    from experiment_scripts import load

    gp = load("gmm_profile")
    monkeypatch.setattr(gp.sys, "argv", ["gmm_profile.py", "--impls", "d_rhs,d_lhs"])
    monkeypatch.setattr(gp.jax, "devices", lambda: pytest.fail("reached the device before refusing the flags"))
    with pytest.raises(SystemExit):
        gp.main()
    assert "--impls ['d_lhs']: not among" in capsys.readouterr().err
    monkeypatch.setattr(gp.sys, "argv", ["gmm_profile.py", "--kernels", "halves,swiglu"])
    with pytest.raises(SystemExit):
        gp.main()
    assert "--kernels ['swiglu']: not among ['plain', 'halves', 'grad_halves']" in capsys.readouterr().err


@cpu_only
def test_gmm_profile_d_rhs_checks_the_kernel_and_unpins_its_tiles(monkeypatch):
    """gmm_profile.profile_contract at a toy shape in the interpreter (the profiler itself needs a GPU: a fake
    trace stands in): the flat d_rhs kernel's error against the einsum is reported, the trace summarised, and
    pallas_gmm.CONTRACT_TILES is unpinned afterwards."""
    from experiment_scripts import load

    gp = load("gmm_profile")
    monkeypatch.setitem(gp.SHAPES, ("longcat", "gate_up"), (256, 256, 4))
    monkeypatch.setattr(gp, "CONTRACT_TILES", gp.mgpu_kernels.Tiles(128, 64, 64, 3, 64, chain=True, band=2))
    monkeypatch.setattr(gp, "time_ms", lambda f, args, **_: (2.0, 2.0, 2.0))
    pinned = []

    def trace(fn, args, space, path):
        pinned.append(gp.pallas_gmm.CONTRACT_TILES)
        return {"traceEvents": [dict(name="epilogue", ph=ph, ts=ts, pid=1, tid=1) for ph, ts in (("B", 0.0),
                                                                                              ("E", 3.0))]}

    monkeypatch.setattr(gp, "profiled_trace", trace)
    rec = gp.profile_contract("gate_up", 2, 64, 512, "/tmp")
    assert pinned == [gp.CONTRACT_TILES] and gp.pallas_gmm.CONTRACT_TILES is None
    assert rec["max_abs_err_vs_einsum"] > 0 and rec["max_rel_err_vs_einsum"] < BF16_TOL
    assert rec["warpgroups"]["wg0"]["epilogue"]["mean_us"] == 3.0
    assert rec["unprofiled_tflops"] == pytest.approx(2 * 128 * 256 * 256 / 2.0 / 1e9)
