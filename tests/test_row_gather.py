"""The dispatch gather kernel (lcflash/kernels/row_gather.py): rows below the FFN-slot count (rounded up to a tile)
equal XLA's gather; the rest stay unwritten. CPU: Pallas' GPU interpreter (which NaN-fills outputs, so an
unwritten row shows) and the lowering for CUDA; GPU: the compiled kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcflash.kernels import row_gather

ON_GPU = jax.default_backend() == "gpu"


def _check(t, d, m, n, dtype, align, interpret):
    x = jax.random.normal(jax.random.key(0), (t, d), jnp.float32).astype(dtype)
    idx = jax.random.randint(jax.random.key(1), (m,), 0, t)
    out = np.asarray(row_gather.take_rows(x, idx, jnp.int32(n), align=align, interpret=interpret), np.float32)
    written = min(m, -(-n // align) * align)
    np.testing.assert_array_equal(out[:written], np.asarray(x[idx][:written], np.float32))
    return out, written


@pytest.mark.skipif(ON_GPU, reason="interpreter test; the GPU runs the compiled kernel instead")
@pytest.mark.parametrize("n", [0, 1, 50, 96])
def test_take_rows_writes_the_rows_up_to_the_aligned_count_in_the_interpreter(hang_guard, n):
    out, written = _check(t=40, d=512, m=96, n=n, dtype=jnp.bfloat16, align=32, interpret=True)
    assert np.isnan(out[written:]).all()  # left unwritten (the interpreter's NaN fill)


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU (Mosaic GPU kernel)")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_gpu_take_rows_matches_xla(dtype):
    _check(t=4096, d=1024, m=4096 * 12, n=23_000, dtype=dtype, align=128, interpret=False)  # small config's rows


def test_take_rows_lowers_for_cuda():
    """configs/small.py's dispatch at 32 x 1024 tokens through Pallas -> Mosaic GPU lowering for CUDA on the CPU."""
    sd = jax.ShapeDtypeStruct
    f = jax.jit(lambda x, i, n: row_gather.take_rows(x, i, n))
    lowered = f.trace(sd((32768, 1024), jnp.bfloat16), sd((393216,), jnp.int32), sd((), jnp.int32)).lower(
        lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


def test_bad_shapes_fail_before_compiling():
    with pytest.raises(ValueError, match="multiple of 256"):
        row_gather.take_rows(jnp.zeros((8, 100), jnp.bfloat16), jnp.zeros((16,), jnp.int32), 3)
    with pytest.raises(ValueError, match="multiple of 8"):
        row_gather.take_rows(jnp.zeros((8, 256), jnp.bfloat16), jnp.zeros((12,), jnp.int32), 3)


def test_dispatch_rows_uses_the_kernel_on_hopper_with_the_same_rows_and_gradient(hang_guard, monkeypatch):
    """lcflash.model.slots.dispatch_rows with the kernel switched on (here in the interpreter, as if on a Hopper
    GPU): the FFN slots' rows and the gradient equal XLA's gather."""
    from lcflash.model import slots as slots_mod

    t, k, n_ffn, d = 16, 4, 3, 256
    x = jax.random.normal(jax.random.key(2), (t, d), jnp.float32).astype(jnp.bfloat16)
    experts = jax.random.randint(jax.random.key(3), (t, k), 0, n_ffn + 2)   # ids >= n_ffn: zero experts
    s = slots_mod.sort_slots(experts, n_ffn)
    n = int(s.group_sizes_g.sum())
    g = jax.random.normal(jax.random.key(4), (t * k, d), jnp.float32).astype(jnp.bfloat16)

    def run():
        y, vjp = jax.vjp(lambda x: slots_mod.dispatch_rows(x, s), x)
        return y, vjp(g)[0]

    want = run()
    monkeypatch.setattr(slots_mod, "on_hopper", lambda: True)
    monkeypatch.setattr(slots_mod, "GATHER_KERNEL", True)
    jaxpr = str(jax.make_jaxpr(lambda x: slots_mod.dispatch_rows(x, s))(x))
    assert "custom_vmap_call[" in jaxpr  # the kernel's launch
    got = run()
    np.testing.assert_array_equal(np.asarray(got[0][:n]), np.asarray(want[0][:n]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
