"""The dense SwiGLU FFN on our kernels (model.dense_ffn_impl "pallas": SwiGLU and its backward in the grouped-matmul
kernels' epilogues, one group) against XLA's: Pallas' GPU interpreter on CPU, the CUDA lowering at the small
config's shapes, the compiled kernels on a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcflash.config import ConfigError, validate
from lcflash.kernels.gmm import pallas_gmm
from lcflash.model import mlp

ON_GPU = jax.default_backend() == "gpu"


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.isfinite(a).all(), "non-finite values (unwritten output?)"
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _inputs(seed, m, d, f):
    """bf16 activations and fp32 weights (the model's param dtype), scaled so h and y are O(1)."""
    ks = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(ks[0], (m, d), jnp.float32).astype(jnp.bfloat16)
    wg, wu = (jax.random.normal(k, (d, f), jnp.float32) / np.sqrt(d) for k in ks[1:3])
    wd = jax.random.normal(ks[3], (f, d), jnp.float32) / np.sqrt(f)
    dy = jax.random.normal(ks[4], (m, d), jnp.float32).astype(jnp.bfloat16)
    return (x, wg, wu, wd), dy


def _value_and_grads(impl, args, dy, dtype=jnp.bfloat16):
    cast = lambda a: a.astype(dtype) if a.dtype == jnp.bfloat16 else a  # noqa: E731
    y, vjp = jax.vjp(lambda *a: mlp.swiglu(*a, impl=impl), *map(cast, args))
    return (y, *vjp(dy.astype(y.dtype)))


def _check_against_xla(m, d, f, seed):
    """Output and the four gradients: within bf16 rounding of the fp32 XLA computation on the same inputs, and no
    further from it than twice XLA's own bf16 path (which rounds g and u before SwiGLU, as ours does not)."""
    args, dy = _inputs(seed, m, d, f)
    got = jax.jit(lambda *a: _value_and_grads("pallas", a, dy))(*args)
    xla = jax.jit(lambda *a: _value_and_grads("xla", a, dy))(*args)
    want = _value_and_grads("xla", args, dy, jnp.float32)
    assert got[0].shape == (m, d) and got[0].dtype == jnp.bfloat16
    for name, g, x, w in zip(("y", "dx", "dw_gate", "dw_up", "dw_down"), got, xla, want):
        assert g.dtype == x.dtype, name
        err, xla_err = _rel(g, w), _rel(x, w)
        assert err < 1.2e-2 and err <= 2 * xla_err, (name, err, xla_err)


@pytest.mark.skipif(ON_GPU, reason="interpreter test; the GPU runs the compiled kernels instead")
def test_pallas_interpret_matches_xla():
    """300 rows (not a whole tile: the padding rows must not reach the weight gradients), 2 column tiles per half."""
    _check_against_xla(300, 128, 256, seed=0)


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU (Mosaic GPU kernels)")
def test_gpu_matches_xla():
    _check_against_xla(4000, 1024, 2048, seed=1)   # the small config's dense FFN, a ragged last tile


def test_lowers_for_cuda_at_the_small_config(mosaic_gpu_trace):
    """32 x 1024 tokens, D 1024, F 2048: forward and backward through Pallas -> Mosaic GPU lowering for CUDA on
    the CPU, within the shared-memory budget."""
    sd = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)  # noqa: E731

    def fwd_bwd(x, w_gu, w_down, dy):
        y, vjp = jax.vjp(pallas_gmm.dense_swiglu_ffn, x, w_gu, w_down)
        return (y, *vjp(dy))

    text = jax.jit(fwd_bwd).trace(sd(32768, 1024), sd(1024, 4096), sd(2048, 1024), sd(32768, 1024)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 2   # [gate | up] with SwiGLU; d_h with SwiGLU's backward


def test_auto_picks_the_kernels_on_one_hopper_gpu_for_training_sized_calls(monkeypatch):
    x = jax.ShapeDtypeStruct((2, 1024, 1024), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((1024, 2048), jnp.float32)
    assert mlp.resolve_impl("auto", x, w, "gpu", "9.0") == "pallas"
    assert mlp.resolve_impl("auto", x, w, "gpu", "8.0") == "xla"                    # no wgmma before Hopper
    assert mlp.resolve_impl("auto", x, w, "cpu") == "xla"
    assert mlp.resolve_impl("auto", jax.ShapeDtypeStruct((8, 1, 1024), jnp.bfloat16), w, "gpu", "9.0") == "xla"
    assert mlp.resolve_impl("auto", jax.ShapeDtypeStruct((2048, 1024), jnp.float32), w, "gpu", "9.0") == "xla"
    assert mlp.resolve_impl("auto", x, jax.ShapeDtypeStruct((1024, 1000), jnp.float32), "gpu", "9.0") == "xla"
    assert mlp.resolve_impl("xla", x, w) == "xla"
    monkeypatch.setattr(mlp, "multi_device", lambda: True)                          # no sharding rule
    assert mlp.resolve_impl("auto", x, w, "gpu", "9.0") == "xla"
    with pytest.raises(ValueError, match="one device"):
        mlp.resolve_impl("pallas", x, w)


def test_bad_impls_and_operands_are_named():
    x = jnp.zeros((64, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="dense_ffn_impl 'cublas'"):
        mlp.swiglu(x, jnp.zeros((128, 128)), jnp.zeros((128, 128)), jnp.zeros((128, 128)), impl="cublas")
    with pytest.raises(ConfigError, match="dense_ffn_impl"):
        from lcflash.config import ModelConfig

        validate(ModelConfig(dense_ffn_impl="fast"))
    w = jnp.zeros((128, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="multiples of 128"):
        pallas_gmm.dense_swiglu_ffn(x, jnp.zeros((128, 192), jnp.bfloat16), jnp.zeros((96, 128), jnp.bfloat16))
    with pytest.raises(ValueError, match="bfloat16"):
        pallas_gmm.dense_swiglu_ffn(x.astype(jnp.float32), w.astype(jnp.float32), jnp.zeros((128, 128)))
    with pytest.raises(ValueError, match=r"want \[M, D\], \[D, 2F\], \[F, D\]"):
        pallas_gmm.dense_swiglu_ffn(x, w, jnp.zeros((128, 256), jnp.bfloat16))
