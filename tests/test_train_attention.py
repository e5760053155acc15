"""`model.train_attn_impl`: the fused `jax.nn.dot_product_attention` path (cuDNN flash attention on a GPU) gives
the expanded attention's logits and gradients, with packed-document masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcflash.config import ConfigError, load_config, model_config
from lcflash.model.mla import LatentKV, expanded_attention
from lcflash.model.transformer import causal_mask
from numerics import random_model, rel

ON_GPU = jax.default_backend() == "gpu"


def _model_fns(impl: str, dtype: str):
    """(loss_and_grad, params) of a one-layer tiny model with MTP; the same random values for every impl."""
    mc = model_config(load_config("configs/tiny.py", {"model.train_attn_impl": impl, "model.num_layers": 1,
                                                       "model.dtype": dtype}))
    gd, params, rest = random_model(mc)
    B, T = 2, 32
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, mc.vocab_size, (B, T)), jnp.int32)
    seg = jnp.asarray([[0] * 11 + [1] * 21, [0] * T], jnp.int32)    # two packed documents in row 0
    pos = jnp.where(seg == 0, jnp.arange(T), jnp.arange(T) - 11).astype(jnp.int32)
    w = jax.random.normal(jax.random.key(2), (B, T, mc.vocab_size))

    def loss(p):
        m = nnx.merge(gd, p, rest)
        out = m.forward(tokens, positions_bt=pos, segment_ids_bt=seg)
        mtp = m.mtp_logits(out.hidden, tokens, pos, seg)
        y = out.logits.astype(jnp.float32)
        return jnp.sum(w * y) + jnp.sum(w * mtp.astype(jnp.float32)), y

    return jax.jit(jax.value_and_grad(loss, has_aux=True)), params


def test_train_attn_impl_is_validated():
    with pytest.raises(ConfigError, match="train_attn_impl.*must be one of"):
        model_config(load_config("configs/tiny.py", {"model.train_attn_impl": "flash"}))


def test_fused_path_equals_expanded_attention_fp32():
    """The dot_product_attention plumbing (concatenated rope heads, padded values, segment mask) on XLA: same
    logits and gradients as the einsum path, to fp32 rounding."""
    fn, params = _model_fns("xla", "float32")
    (_, y_ref), g_ref = fn(params)
    fn, params = _model_fns("dpa_xla", "float32")
    (_, y), g = fn(params)
    assert rel(y, y_ref) < 1e-5
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        assert rel(a, b) < 1e-4


def _attention_case(dtype, seed=0):
    """Random MLA attention inputs with two packed documents in row 0 (B=2, T=256, 8 heads, LongCat head sizes)."""
    B, T, H, dn, dr, dv, R = 2, 256, 8, 128, 64, 128, 64
    ks = jax.random.split(jax.random.key(seed), 5)
    q_nope = jax.random.normal(ks[0], (B, T, H, dn), jnp.float32)
    q_pe = jax.random.normal(ks[1], (B, T, H, dr), jnp.float32)
    kv = LatentKV(jax.random.normal(ks[2], (B, T, R), jnp.float32), jax.random.normal(ks[3], (B, T, dr), jnp.float32))
    w_kv_b = jax.random.normal(ks[4], (R, H, dn + dv), jnp.float32) * R ** -0.5
    seg = jnp.concatenate([jnp.zeros((1, T), jnp.int32).at[:, 100:].set(1), jnp.zeros((1, T), jnp.int32)])
    mask = causal_mask(B, T, T, None, seg)
    cast = lambda x: x.astype(dtype)  # noqa: E731
    return (cast(q_nope), cast(q_pe), jax.tree.map(cast, kv), cast(w_kv_b)), mask, dn


def _attention_and_grads(impl, dtype, causal=False):
    args, mask, dn = _attention_case(dtype)
    w = jax.random.normal(jax.random.key(9), args[0].shape[:3] + (128,), jnp.float32)

    def f(*a):
        o = expanded_attention(*a, mask, 0.07, dn, impl, causal)
        return jnp.sum(w * o.astype(jnp.float32)), o

    (_, o), g = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))(*args)
    return o, jax.tree.leaves(g)


@pytest.mark.skipif(not ON_GPU, reason="cuDNN attention needs a GPU")
def test_cudnn_attention_matches_fp32_as_closely_as_xla_bf16():
    """In bf16, cuDNN's output and input gradients err against the fp32 attention (matmul precision 'highest') by
    no more than twice the XLA bf16 path's own error. (At the attention itself: a whole bf16 MoE model flips
    routing choices, which swamps the comparison.)"""
    with jax.default_matmul_precision("highest"):
        o32, g32 = _attention_and_grads("xla", jnp.float32)
    errs = {}
    for impl, causal in (("xla", False), ("cudnn", False), ("cudnn", True)):   # causal: blocks skipped
        o, g = _attention_and_grads(impl, jnp.bfloat16, causal)
        errs[impl, causal] = [rel(o, o32)] + [rel(a, b) for a, b in zip(g, g32)]
    ref = errs["xla", False]
    assert max(ref) < 2e-2, errs    # the bf16 reference itself is sane
    for key in (("cudnn", False), ("cudnn", True)):
        for k in range(len(ref)):
            assert errs[key][k] <= 2 * ref[k], (key, k, errs)
