"""The dense SwiGLU FFN on our kernels (model.dense_ffn_impl="pallas"): SwiGLU and its backward in the epilogues of
the [gate | up] product and of the down projection's d_lhs, against XLA's einsums (lcflash/model/mlp.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcflash.config import ConfigError, load_config, model_config
from lcflash.model.mlp import swiglu

ON_GPU = jax.default_backend() == "gpu"


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.isfinite(a).all(), "non-finite values (unwritten output?)"
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _check(t, d, f, seed):
    ks = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(ks[0], (2, t // 2, d), jnp.float32).astype(jnp.bfloat16)
    ws = [jax.random.normal(k, s, jnp.float32) / np.sqrt(s[0]) for k, s in zip(ks[1:4], ((d, f), (d, f), (f, d)))]
    dy = jax.random.normal(ks[4], x.shape, jnp.float32).astype(jnp.bfloat16)

    def run(impl, x, *ws):
        y, vjp = jax.vjp(lambda *a: swiglu(*a, impl=impl), x, *ws)
        return (y, *vjp(dy.astype(y.dtype)))

    launches = str(jax.make_jaxpr(lambda *a: run("pallas", *a))(x, *ws)).count("custom_vmap_call[")
    assert launches == 2, launches  # [gate | up] with SwiGLU, down d_lhs with its backward; the rest is XLA's
    got = jax.jit(lambda *a: run("pallas", *a))(x, *ws)
    want = run("xla", x.astype(jnp.float32), *ws)  # fp32 reference on the same inputs
    xla_bf16 = jax.jit(lambda *a: run("xla", *a))(x, *ws)
    assert got[0].shape == x.shape and got[0].dtype == jnp.bfloat16
    for name, g, w, b in zip(("y", "dx", "dw_gate", "dw_up", "dw_down"), got, want, xla_bf16):
        # bf16 operands between the products either way: ours within twice XLA's own bf16 error.
        assert _rel(g, w) <= max(2 * _rel(b, w), 2e-3), (name, _rel(g, w), _rel(b, w))


@pytest.mark.skipif(ON_GPU, reason="interpreter test; the GPU runs the compiled kernels instead")
def test_dense_ffn_kernels_match_xla_in_the_interpreter(hang_guard):
    _check(t=256, d=128, f=256, seed=0)


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU (Mosaic GPU kernels)")
def test_gpu_dense_ffn_kernels_match_xla():
    _check(t=4096, d=1024, f=2048, seed=1)  # configs/small.py's dense FFN


def test_dense_ffn_falls_back_to_xla_where_the_kernels_do_not_apply():
    """Decode-sized token counts (< one 128-row tile) and fp32 take XLA's path, so "pallas" changes nothing there."""
    ks = jax.random.split(jax.random.key(2), 4)
    ws = [jax.random.normal(k, s) for k, s in zip(ks[1:], ((128, 256), (128, 256), (256, 128)))]
    for x in (jax.random.normal(ks[0], (1, 8, 128), jnp.bfloat16), jax.random.normal(ks[0], (2, 128, 128))):
        jaxpr = str(jax.make_jaxpr(lambda x, *w: swiglu(x, *w, impl="pallas"))(x, *ws))
        assert "custom_vmap_call" not in jaxpr and "pallas_call" not in jaxpr
        np.testing.assert_array_equal(swiglu(x, *ws, impl="pallas"), swiglu(x, *ws, impl="xla"))


def test_bad_dense_ffn_impl_is_a_config_error():
    with pytest.raises(ConfigError, match="dense_ffn_impl.*must be one of"):
        model_config(load_config("configs/tiny.py", {"model.dense_ffn_impl": "cublas"}))


def test_dense_ffn_lowers_for_cuda(mosaic_gpu_trace):
    """configs/small.py's dense FFN at 32 x 1024 tokens through Pallas -> Mosaic GPU lowering for CUDA on the CPU."""
    sd = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)  # noqa: E731

    def fwd_bwd(x, wg, wu, wd):
        y, vjp = jax.vjp(lambda *a: swiglu(*a, impl="pallas"), x, wg, wu, wd)
        return (y, *vjp(x))

    lowered = jax.jit(fwd_bwd).trace(sd(32, 1024, 1024), *(sd(*s, dt=jnp.float32) for s in (
        (1024, 2048), (1024, 2048), (2048, 1024)))).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("mosaic_gpu") >= 2
