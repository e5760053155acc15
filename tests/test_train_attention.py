"""`model.train_attn_impl`: the fused `jax.nn.dot_product_attention` path (cuDNN flash attention on a GPU) gives
the expanded attention's logits and gradients, with packed-document masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcflash.config import ConfigError, load_config, model_config
from lcflash.model import LongcatFlash
from numerics import rel

ON_GPU = jax.default_backend() == "gpu"


def _model_fns(impl: str, dtype: str):
    """(loss_and_grad, params) of a one-layer tiny model with MTP; the same random values for every impl."""
    mc = model_config(load_config("configs/tiny.py", {"model.train_attn_impl": impl, "model.num_layers": 1,
                                                       "model.dtype": dtype}))
    gd, params, rest = nnx.split(nnx.eval_shape(lambda: LongcatFlash(mc, nnx.Rngs(0))), nnx.Param, ...)
    rng = np.random.RandomState(0)
    fill = lambda x: jnp.asarray(  # noqa: E731
        rng.normal(1.0, 0.1, x.shape) if x.ndim == 1 else rng.normal(0, x.shape[-2] ** -0.5, x.shape), x.dtype)
    params, rest = jax.tree.map(fill, params), jax.tree.map(fill, rest)
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


@pytest.mark.skipif(not ON_GPU, reason="cuDNN attention needs a GPU")
def test_cudnn_matches_fp32_as_closely_as_xla_bf16():
    """bf16 compute: cuDNN's error against the fp32 model is no worse than twice the XLA bf16 path's own."""
    fn, params = _model_fns("xla", "float32")
    (_, y32), g32 = fn(params)
    errs = {}
    for impl in ("xla", "cudnn"):
        fn, params = _model_fns(impl, "bfloat16")
        (_, y), g = fn(params)
        errs[impl] = (rel(y, y32), max(rel(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g32))))
    assert errs["cudnn"][0] <= 2 * errs["xla"][0] + 1e-4, errs
    assert errs["cudnn"][1] <= 2 * errs["xla"][1] + 1e-4, errs
