"""The dispatch gather kernel (lcflash/kernels/row_gather.py): rows below the FFN-slot count (rounded up to a tile)
equal XLA's gather; the rest stay unwritten. CPU: Pallas' GPU interpreter (which NaN-fills outputs, so an
unwritten row shows) and the lowering for CUDA; GPU: the compiled kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcflash.kernels import row_gather

ON_GPU = jax.default_backend() == "gpu"


def _check(t, d, m, n, dtype, align, interpret, scaled=False, seed=0):
    kx, ki, ks = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (t, d), jnp.float32).astype(dtype)
    idx = jax.random.randint(ki, (m,), 0, t)
    scale = jax.random.uniform(ks, (m,), jnp.float32, -2.0, 2.0) if scaled else None
    out = np.asarray(row_gather.take_rows(x, idx, jnp.int32(n), scale, align=align, interpret=interpret), np.float32)
    written = min(m, -(-n // align) * align)
    want = x[idx] if scale is None else (scale[:, None] * x[idx].astype(jnp.float32)).astype(dtype)
    np.testing.assert_array_equal(out[:written], np.asarray(want[:written], np.float32))
    return out, written


@pytest.mark.skipif(ON_GPU, reason="interpreter test; the GPU runs the compiled kernel instead")
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("n", [0, 1, 50, 96])
def test_take_rows_writes_the_rows_up_to_the_aligned_count_in_the_interpreter(n, scaled):
    out, written = _check(t=40, d=512, m=96, n=n, dtype=jnp.bfloat16, align=32, interpret=True, scaled=scaled,
                          seed=n)
    assert np.isnan(out[written:]).all()  # left unwritten (the interpreter's NaN fill)


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU (Mosaic GPU kernel)")
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_gpu_take_rows_matches_xla(dtype, scaled):
    _check(t=4096, d=1024, m=4096 * 12, n=23_000, dtype=dtype, align=128, interpret=False,  # small config's rows
           scaled=scaled, seed=int(scaled))
    _check(t=64, d=6144, m=64 * 12, n=500, dtype=dtype, align=128, interpret=False,  # LongCat-Flash's, decode
           scaled=scaled, seed=2 + int(scaled))


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("t,d,dtype", [(32768, 1024, jnp.bfloat16), (8, 6144, jnp.bfloat16), (64, 6144, jnp.float32)])
def test_take_rows_lowers_for_cuda(scaled, t, d, dtype):
    """configs/small.py's dispatch (and combine backward) at 32 x 1024 tokens, and LongCat-Flash's 6144-wide rows
    at 8 and 64 decode tokens (fewer rows per CTA: SMEM_BUDGET), through Pallas -> Mosaic GPU lowering for CUDA on
    the CPU, which checks the shared memory."""
    sd = jax.ShapeDtypeStruct
    f = jax.jit(lambda x, i, n, s: row_gather.take_rows(x, i, n, s if scaled else None))
    lowered = f.trace(sd((t, d), dtype), sd((12 * t,), jnp.int32), sd((), jnp.int32),
                      sd((12 * t,), jnp.float32)).lower(lowering_platforms=("cuda",))
    assert "row_gather_mosaic_gpu" in lowered.as_text()   # named, so a profile finds it


def test_bad_shapes_fail_before_compiling():
    with pytest.raises(ValueError, match="multiple of 256"):
        row_gather.take_rows(jnp.zeros((8, 100), jnp.bfloat16), jnp.zeros((16,), jnp.int32), 3)
    with pytest.raises(ValueError, match="multiple of 8"):
        row_gather.take_rows(jnp.zeros((8, 256), jnp.bfloat16), jnp.zeros((12,), jnp.int32), 3)
    with pytest.raises(ValueError, match="do not fit the 131072-byte shared-memory stage"):
        row_gather.take_rows(jnp.zeros((8, 65536 + 256), jnp.bfloat16), jnp.zeros((16,), jnp.int32), 3)
    with pytest.raises(ValueError, match="one value per row"):
        row_gather.take_rows(jnp.zeros((8, 256), jnp.bfloat16), jnp.zeros((16,), jnp.int32), 3, jnp.ones((8,)))


def test_dispatch_rows_uses_the_kernel_on_hopper_with_the_same_rows_and_gradient(monkeypatch):
    """lcflash.model.slots.dispatch_rows with the kernel switched on (on the CPU in the interpreter, as if on a Hopper
    GPU; on a GPU compiled): the FFN slots' rows and the gradient equal XLA's gather."""
    from lcflash.model import slots as slots_mod

    t, k, n_ffn, d = 16, 4, 3, 256
    x = jax.random.normal(jax.random.key(2), (t, d), jnp.float32).astype(jnp.bfloat16)
    experts = jax.random.randint(jax.random.key(3), (t, k), 0, n_ffn + 2)   # ids >= n_ffn: zero experts
    s = slots_mod.sort_slots(experts, n_ffn)
    n = int(s.group_sizes_g.sum())
    g = jax.random.normal(jax.random.key(4), (t * k, d), jnp.float32).astype(jnp.bfloat16)

    def run():
        y, vjp = jax.vjp(lambda x: slots_mod.dispatch_rows(x, s, tail_unread=True), x)
        return y, vjp(g)[0]

    monkeypatch.setattr(slots_mod, "on_hopper", lambda: False)   # XLA's gather, on a GPU too
    want = run()
    monkeypatch.setattr(slots_mod, "on_hopper", lambda: True)
    monkeypatch.setattr(slots_mod, "GATHER_KERNEL", True)
    jaxpr = str(jax.make_jaxpr(lambda x: slots_mod.dispatch_rows(x, s, tail_unread=True))(x))
    assert "custom_vmap_call[" in jaxpr  # the kernel's launch
    got = run()
    np.testing.assert_array_equal(np.asarray(got[0][:n]), np.asarray(want[0][:n]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


def test_combine_rows_backward_uses_the_kernel_on_hopper_with_the_same_gradients(monkeypatch):
    """lcflash.model.slots.combine_rows with the kernel switched on (on the CPU in the interpreter, as if on a Hopper
    GPU; on a GPU compiled) against XLA's path: the same output, d_w, and d_y on the FFN slots' rows (zero up to the
    next whole tile, unwritten after), from a gradient that holds bf16 values as MoE.combine's cast makes it."""
    from lcflash.model import slots as slots_mod

    t, k, n_ffn, d = 64, 4, 3, 256
    ks = jax.random.split(jax.random.key(7), 4)
    experts = jax.random.randint(ks[0], (t, k), 0, n_ffn + 12)   # ids >= n_ffn: zero experts (most slots)
    s = slots_mod.sort_slots(experts, n_ffn)
    n = int(s.group_sizes_g.sum())
    y = jax.random.normal(ks[1], (t * k, d), jnp.float32).astype(jnp.bfloat16)
    w = jnp.where(s.ffn_tk, jax.random.uniform(ks[2], (t, k), jnp.float32), 0.0)
    g = jax.random.normal(ks[3], (t, d), jnp.float32).astype(jnp.bfloat16).astype(jnp.float32)

    def run():
        out, vjp = jax.vjp(lambda y, w: slots_mod.combine_rows(y, w, s, jnp.bfloat16, tail_unread=True), y, w)
        return (out, *vjp(g))

    monkeypatch.setattr(slots_mod, "on_hopper", lambda: False)   # XLA's scatter, on a GPU too
    want = run()
    assert n < t * k and not np.asarray(want[1][n:], np.float32).any()
    monkeypatch.setattr(slots_mod, "on_hopper", lambda: True)
    monkeypatch.setattr(slots_mod, "GATHER_KERNEL", True)
    got = run()
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(want[2]))
    written = -(-n // 128) * 128  # the kernel's alignment
    assert written < t * k
    np.testing.assert_array_equal(np.asarray(got[1][:written], np.float32), np.asarray(want[1][:written], np.float32))
    if not ON_GPU:   # the interpreter's NaN fill shows the rows left unwritten; a GPU leaves whatever was there
        assert np.isnan(np.asarray(got[1][written:], np.float32)).all()
