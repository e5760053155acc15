"""The decode matvec kernel (lcflash/kernels/matvec) against the XLA decode path's arithmetic: in Pallas' GPU
interpreter and through the cuda lowering on CPU, in the decode blocks of a bf16 model, and on a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcflash.config import load_config, model_config
from lcflash.infer import decode
from lcflash.infer.cache import DecodeCache
from lcflash.kernels.matvec.pallas_mgpu import matvec, matvec_reference
from lcflash.model import LongcatFlash

ON_GPU = jax.default_backend() == "gpu"
BF16_ULP = 2.0 ** -7    # bf16's rounding step at 1.0


def case(M, K, N, epilogue, seed):
    ks = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(ks[0], (M, K)).astype(jnp.bfloat16)
    w = (jax.random.normal(ks[1], (N, K)) / K ** 0.5).astype(jnp.bfloat16)
    n_out = N // 2 if epilogue == "swiglu" else N
    r = jax.random.normal(ks[2], (M, n_out)).astype(jnp.bfloat16) if epilogue == "residual" else None
    return x, w, r


def assert_bf16_close(got, want, ulps=4):
    """Equal up to a few bf16 rounding steps of an O(1) value: the kernel sums K in stages and XLA in one dot, so
    the fp32 sums differ in their last bits and a rounding to bf16 can flip; SwiGLU rounds four more times after
    that and the residual add once. A wrong row, column or epilogue is off by O(1)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    np.testing.assert_array_less(np.abs(got - want), ulps * BF16_ULP * np.maximum(np.abs(want), 1.0))


@pytest.mark.skipif(ON_GPU, reason="CPU stand-in for the GPU run")
@pytest.mark.parametrize("M,K,N,epilogue", [(1, 256, 64, None), (3, 512, 128, "swiglu"), (8, 256, 64, "residual")])
def test_kernel_interpret_matches_xla_path(hang_guard, M, K, N, epilogue):
    """Pipeline, tiles, masking of the rows past M and the epilogues' roundings, in GPU interpret mode."""
    x, w, r = case(M, K, N, epilogue, seed=M + K)
    got = matvec(x, w, r, epilogue=epilogue, kc=128, depth=2, interpret=True)
    assert_bf16_close(got, matvec_reference(x, w, r, epilogue=epilogue))


@pytest.mark.parametrize("M,K,N,epilogue", [(1, 1024, 4096, "swiglu"), (1, 2048, 1024, "residual"),
                                            (8, 1024, 448, None)])
def test_kernel_lowers_for_cuda(M, K, N, epilogue):
    """Pallas -> Mosaic GPU lowering (layouts, wgmma operand shapes, TMA transforms) at configs/small.py shapes."""
    sd = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)  # noqa: E731
    n_out = N // 2 if epilogue == "swiglu" else N
    args = (sd(M, K), sd(N, K)) + ((sd(M, n_out),) if epilogue == "residual" else ())
    lowered = jax.jit(lambda *a: matvec(*a, epilogue=epilogue)).trace(*args).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.skipif(not ON_GPU, reason="the Mosaic GPU kernel runs on Hopper GPUs only")
@pytest.mark.parametrize("M,K,N,epilogue", [(1, 1024, 4096, "swiglu"), (1, 2048, 1024, "residual"),
                                            (3, 1024, 448, None), (8, 1024, 1024, "residual"),
                                            (64, 512, 256, "swiglu")])
def test_kernel_on_gpu_matches_xla_path(M, K, N, epilogue):
    """The real kernel, rows past M included (TMA zero-fills the loads and clips the stores)."""
    for seed in range(2):
        x, w, r = case(M, K, N, epilogue, seed=seed + M)
        assert_bf16_close(matvec(x, w, r, epilogue=epilogue), matvec_reference(x, w, r, epilogue=epilogue))


def test_kernel_rejects_bad_input():
    x, w, r = case(1, 256, 64, None, 0)
    with pytest.raises(NotImplementedError, match="bfloat16"):
        matvec(x.astype(jnp.float32), w)
    with pytest.raises(NotImplementedError, match="rows"):
        matvec(jnp.zeros((65, 256), jnp.bfloat16), w)
    with pytest.raises(ValueError, match="contraction last"):
        matvec(x, w.T)
    with pytest.raises(ValueError, match="residual"):
        matvec(x, w, epilogue="residual")


@pytest.fixture(scope="module")
def bf16_model():
    cfg = model_config(load_config("configs/tiny.py", {"model.num_layers": 1})).replace(dtype="bfloat16",
                                                                                        param_dtype="bfloat16")
    return LongcatFlash(cfg, nnx.Rngs(3))


@pytest.mark.skipif(ON_GPU, reason="CPU stand-in for the GPU run")
def test_residual_blocks_in_the_interpreter_equal_xla(hang_guard, bf16_model):
    """decode.mlp_residual (two kernels) and decode.attn_residual (one) on the decode layout of a bf16 model."""
    cfg = bf16_model.cfg
    p = decode.split_weights(bf16_model).layers[0]
    ks = jax.random.split(jax.random.key(0), 3)
    x, h = (jax.random.normal(k, (2, 1, cfg.hidden_size)).astype(jnp.bfloat16) for k in ks[:2])
    o = jax.random.normal(ks[2], (2, 1, cfg.num_attention_heads, cfg.v_head_dim)).astype(jnp.bfloat16)
    for fn, args in ((decode.mlp_residual, (p.mlp_0, x, h)), (decode.attn_residual, (p.attn_0, o, h))):
        assert_bf16_close(fn(*args, "interpret"), fn(*args, "xla"))


def test_decode_step_routes_dense_ffns_and_outputs_through_the_kernel(monkeypatch, bf16_model):
    """matvec_impl="pallas" reaches every dense FFN and attention output of a decode step (traced, not run)."""
    from lcflash.kernels.matvec import pallas_mgpu

    calls = []

    def fake(x, w, residual=None, *, epilogue=None, **_):
        calls.append(epilogue)
        return jnp.zeros((x.shape[0], w.shape[0] // (2 if epilogue == "swiglu" else 1)), x.dtype)

    monkeypatch.setattr(pallas_mgpu, "matvec", fake)
    cfg = bf16_model.cfg
    dm = decode.DecodeModel(bf16_model, "absorbed", matvec_impl="pallas")
    cache = DecodeCache.zeros(cfg, 2, 64)
    jax.eval_shape(lambda w, c: decode.forward(dm.graphs, w, jnp.zeros((2, 1), jnp.int32), c,
                                               jnp.full((2,), 5, jnp.int32), prefill=False, moe_impl="auto"),
                   dm.weights, cache)
    assert sorted(calls) == ["residual"] * 4 + ["swiglu"] * 2   # one layer: 2 attention outputs, 2 dense FFNs
    with pytest.raises(ValueError, match="matvec_impl"):
        decode.DecodeModel(bf16_model, "absorbed", matvec_impl="cuda")
