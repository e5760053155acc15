"""The one-kernel decode FFN: the folded-norm arithmetic == the model's FFN (CPU), the Mosaic GPU kernel lowers for
cuda (CPU) and equals the reference and the XLA decode path (GPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcflash.config import load_config, model_config
from lcflash.infer import decode
from lcflash.kernels.decode_mlp import decode_mlp, decode_mlp_reference, fold_norm
from lcflash.model import LongcatFlash
from lcflash.model.mlp import swiglu
from lcflash.model.norm import rms_norm
from numerics import rel

ON_GPU = jax.default_backend() == "gpu"


def operands(M, D, F, dtype, seed):
    ks = jax.random.split(jax.random.key(seed), 5)
    h = jax.random.normal(ks[0], (M, D), jnp.float32) * (1 + 3 * jax.random.uniform(ks[4], (M, 1)))
    w_gu = jax.random.normal(ks[1], (2 * F, D), jnp.float32) * D ** -0.5
    w_d = jax.random.normal(ks[2], (D, F), jnp.float32) * F ** -0.5
    norm_w = 1.0 + 0.2 * jax.random.normal(ks[3], (D,), jnp.float32)
    return tuple(x.astype(dtype) for x in (h, w_gu, w_d, norm_w))


def model_ffn(h, w_gu, w_d, norm_w, eps):
    """lcflash/model/mlp.py's swiglu on rms_norm(h), the weights in the model's [D, F] layout."""
    F = w_d.shape[1]
    return swiglu(rms_norm(h, norm_w, eps), w_gu[:F].T, w_gu[F:].T, w_d.T)


def test_folded_reference_is_the_models_ffn():
    """Folding the norm weight into the gate|up rows and scaling by 1/rms after the product is the same map."""
    for seed, (M, D, F) in enumerate([(1, 64, 128), (5, 256, 512)]):
        h, w_gu, w_d, norm_w = operands(M, D, F, jnp.float32, seed)
        got = jax.jit(decode_mlp, static_argnames=("eps", "impl"))(h, fold_norm(w_gu, norm_w), w_d, eps=1e-6)
        assert rel(got, model_ffn(h, w_gu, w_d, norm_w, 1e-6)) < 1e-5


def test_ffn_sublayer_falls_back_without_the_kernel():
    """Off a Hopper GPU, folded rows change nothing: the XLA path runs on the unfolded rows."""
    M, D, F = 3, 64, 128
    h, w_gu, w_d, norm_w = operands(M, D, F, jnp.float32, 7)
    cfg = model_config(load_config("configs/tiny.py"))
    p = decode.MLPWeights(w_gu, w_d)
    pk = p._replace(w_gate_up_normed=fold_norm(w_gu, norm_w))
    run = jax.jit(lambda p, h: decode.ffn_sublayer(cfg, p, h[None], norm_w)[0])
    if not decode.ffn_kernel_runs(cfg, jnp.bfloat16, M):
        np.testing.assert_array_equal(run(pk, h), run(p, h))
    assert rel(run(p, h), h + model_ffn(h, w_gu, w_d, norm_w, cfg.rms_norm_eps)) < 1e-5


@pytest.mark.parametrize("M", [1, 8, 64])
def test_kernel_lowers_for_cuda(M):
    """Pallas -> Mosaic GPU lowering (TMA transforms, wgmma shapes, the semaphore, shared memory) runs on CPU."""
    from lcflash.kernels.decode_mlp.pallas_mgpu import decode_mlp_pallas

    sd = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)  # noqa: E731
    f = jax.jit(lambda *a: decode_mlp_pallas(*a, eps=1e-6))
    lowered = f.trace(sd(M, 1024), sd(4096, 1024), sd(1024, 2048)).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


def test_kernel_rejects_unsupported_inputs():
    from lcflash.kernels.decode_mlp.pallas_mgpu import decode_mlp_pallas, supported

    h, w_gu, w_d, _ = operands(2, 256, 512, jnp.float32, 0)
    with pytest.raises(NotImplementedError, match="bfloat16"):
        decode_mlp_pallas(h, w_gu, w_d, eps=1e-6)
    h, w_gu, w_d, _ = operands(65, 256, 512, jnp.bfloat16, 0)
    with pytest.raises(NotImplementedError, match="65 token rows"):
        decode_mlp_pallas(h, w_gu, w_d, eps=1e-6)
    with pytest.raises(ValueError, match="must be"):
        decode_mlp_pallas(h[:8], w_gu[:256], w_d, eps=1e-6)
    assert "shared memory" in supported(1, 6144, 12288, jnp.bfloat16)   # LongCat-Flash: the XLA path
    assert supported(1, 1024, 2048, jnp.bfloat16) is None               # configs/small.py


def test_decode_model_ffn_impl():
    cfg = model_config(load_config("configs/tiny.py"))
    model = LongcatFlash(cfg, nnx.Rngs(0))
    dm = decode.DecodeModel(model, ffn_impl="pallas")
    p = dm.weights.layers[0]
    np.testing.assert_array_equal(p.mlp_1.w_gate_up_normed, fold_norm(p.mlp_1.w_gate_up, p.post_attn_norm_1))
    assert decode.read_by_decode(p.mlp_1).w_gate_up is None
    assert decode.DecodeModel(model, weights=dm.weights).weights.layers[0].mlp_0.w_gate_up_normed is None
    with pytest.raises(ValueError, match="ffn_impl"):
        decode.DecodeModel(model, ffn_impl="cuda")


@pytest.mark.skipif(not ON_GPU, reason="the Mosaic GPU kernel runs on Hopper GPUs only")
@pytest.mark.parametrize("M,D,F", [(1, 1024, 2048), (3, 1024, 2048), (8, 1024, 2048), (64, 1024, 2048),
                                   (2, 256, 512)])
def test_kernel_on_gpu_matches_reference(M, D, F):
    for seed in range(3):
        h, w_gu, w_d, norm_w = operands(M, D, F, jnp.bfloat16, seed + 10 * M)
        w_n = fold_norm(w_gu, norm_w)
        got = decode_mlp(h, w_n, w_d, eps=1e-6, impl="pallas")
        ref = decode_mlp_reference(h, w_n, w_d, 1e-6)
        f32 = model_ffn(*(x.astype(jnp.float32) for x in (h, w_gu, w_d, norm_w)), 1e-6)
        assert rel(got, ref) < 1e-2
        assert rel(got, f32) < 2 * rel(ref, f32) + 1e-3


@pytest.mark.skipif(not ON_GPU, reason="the Mosaic GPU kernel runs on Hopper GPUs only")
def test_model_decode_with_ffn_kernel_on_gpu():
    """A bf16 model decoding with ffn_impl='pallas' gives the logits of the XLA path."""
    from lcflash.infer.cache import DecodeCache

    cfg = model_config(load_config("configs/tiny.py")).replace(
        hidden_size=256, ffn_hidden_size=512, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=128,
        qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32, dtype="bfloat16", param_dtype="bfloat16")
    model = LongcatFlash(cfg, nnx.Rngs(5))
    assert decode.ffn_kernel_runs(cfg, jnp.bfloat16, 3)
    tokens = jax.random.randint(jax.random.key(6), (3, 40), 0, cfg.vocab_size)
    outs = []
    for ffn_impl in ("xla", "pallas"):
        dm = decode.DecodeModel(model, "pallas", ffn_impl=ffn_impl)

        @jax.jit
        def run(w, tokens):
            cache = DecodeCache.zeros(cfg, 3, 128)
            h0, cache, _ = decode.forward(dm.graphs, w, tokens[:, :37], cache, jnp.zeros(3, jnp.int32),
                                          prefill=True, moe_impl="model")
            h1, cache, _ = decode.forward(dm.graphs, w, tokens[:, 37:39], cache, jnp.full((3,), 37, jnp.int32),
                                          prefill=False, moe_impl="auto")
            h2, cache, _ = decode.forward(dm.graphs, w, tokens[:, 39:], cache, jnp.full((3,), 39, jnp.int32),
                                          prefill=False, moe_impl="auto")
            return decode.logits(w, jnp.concatenate([h1, h2], axis=1))

        outs.append(run(dm.weights, tokens))
    assert rel(outs[1], outs[0]) < 2e-2
