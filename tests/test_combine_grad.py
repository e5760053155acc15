"""The combine's backward kernel (lcflash/kernels/combine_grad.py): rows below the FFN-slot count (rounded up to a
tile) equal XLA's gradients, the rest stay unwritten, and rows of y past the count may hold NaN. CPU: Pallas' GPU
interpreter (which NaN-fills outputs, so an unwritten row shows) and the lowering for CUDA; GPU: the compiled
kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcflash.kernels import combine_grad

ON_GPU = jax.default_backend() == "gpu"


def _check(t, d, m, n, align, interpret):
    ks = jax.random.split(jax.random.key(t + n), 4)
    g = jax.random.normal(ks[0], (t, d), jnp.float32)
    y = jax.random.normal(ks[1], (m, d), jnp.float32).astype(jnp.bfloat16)
    y = jnp.where(jnp.arange(m)[:, None] < n, y, jnp.nan)          # past the FFN rows: anything, NaN included
    tok = jax.random.randint(ks[2], (m,), 0, t)
    w = jnp.where(jnp.arange(m) < n, jax.random.uniform(ks[3], (m,)), 0.0)
    dy, dw = combine_grad.combine_grads(g, y, tok, w, jnp.int32(n), align=align, interpret=interpret)
    dy, dw = np.asarray(dy, np.float32), np.asarray(dw)
    written = min(m, -(-n // align) * align)
    want_dy = np.asarray((w[:, None] * g[tok]).astype(jnp.bfloat16), np.float32)
    want_dw = np.sum(np.asarray(g[tok], np.float64) * np.asarray(y, np.float64), axis=1)
    np.testing.assert_array_equal(dy[:written], want_dy[:written])   # zeros on [n, written): w is 0 there
    np.testing.assert_allclose(dw[:n], want_dw[:n], rtol=1e-5, atol=1e-4)
    return dy, dw, written


@pytest.mark.skipif(ON_GPU, reason="interpreter test; the GPU runs the compiled kernel instead")
@pytest.mark.parametrize("n", [0, 50, 130])
def test_combine_grads_write_the_rows_up_to_the_aligned_count_in_the_interpreter(hang_guard, n):
    dy, dw, written = _check(t=40, d=512, m=192, n=n, align=64, interpret=True)
    assert np.isnan(dy[written:]).all() and np.isnan(dw[written:]).all()   # left unwritten (the NaN fill)


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU (Mosaic GPU kernel)")
def test_gpu_combine_grads_match_xla():
    _check(t=4096, d=1024, m=4096 * 12, n=23_000, align=128, interpret=False)   # small config's rows


def test_combine_grads_lower_for_cuda():
    """configs/small.py's combine at 32 x 1024 tokens through Pallas -> Mosaic GPU lowering for CUDA on the CPU."""
    sd = jax.ShapeDtypeStruct
    f = jax.jit(lambda *a: combine_grad.combine_grads(*a))
    lowered = f.trace(sd((32768, 1024), jnp.float32), sd((393216, 1024), jnp.bfloat16), sd((393216,), jnp.int32),
                      sd((393216,), jnp.float32), sd((), jnp.int32)).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


def test_bad_operands_fail_before_compiling():
    g, y, i, w = (jnp.zeros((8, 256), jnp.float32), jnp.zeros((64, 256), jnp.bfloat16), jnp.zeros((64,), jnp.int32),
                  jnp.zeros((64,), jnp.float32))
    with pytest.raises(ValueError, match="multiple of 256"):
        combine_grad.combine_grads(g[:, :100], y[:, :100], i, w, 3)
    with pytest.raises(ValueError, match="float32 and y bfloat16"):
        combine_grad.combine_grads(g, y.astype(jnp.float32), i, w, 3)
    with pytest.raises(ValueError, match="must be \\[64\\]"):
        combine_grad.combine_grads(g, y, i[:8], w, 3)


def test_combine_rows_uses_the_kernel_on_hopper_with_the_same_gradients(hang_guard, monkeypatch):
    """lcflash.model.slots.combine_rows with the kernel switched on (here in the interpreter, as if on a Hopper
    GPU): d_y equals XLA's on the FFN slots' rows, d_w within fp32 summation order."""
    from lcflash.model import slots as slots_mod

    t, k, n_ffn, d = 16, 4, 3, 256
    experts = jax.random.randint(jax.random.key(3), (t, k), 0, n_ffn + 2)   # ids >= n_ffn: zero experts
    s = slots_mod.sort_slots(experts, n_ffn)
    n = int(s.group_sizes_g.sum())
    y = jax.random.normal(jax.random.key(4), (t * k, d), jnp.float32).astype(jnp.bfloat16)
    w = jnp.where(s.ffn_tk, jax.random.uniform(jax.random.key(5), (t, k)), 0.0)
    g = jax.random.normal(jax.random.key(6), (t, d), jnp.float32)

    def grads():
        return jax.vjp(lambda y, w: slots_mod.combine_rows(y, w, s), y, w)[1](g)

    want = grads()
    monkeypatch.setattr(slots_mod, "on_hopper", lambda: True)
    monkeypatch.setattr(slots_mod, "COMBINE_GRAD_KERNEL", True)
    jaxpr = str(jax.make_jaxpr(grads)())
    assert "custom_vmap_call[" in jaxpr  # the kernel's launch
    got = grads()
    np.testing.assert_array_equal(np.asarray(got[0][:n], np.float32), np.asarray(want[0][:n], np.float32))
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-5, atol=1e-5)
