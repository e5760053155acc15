"""model.dense_ffn_gmm: the dense SwiGLU FFNs as one group through the grouped-matmul expert FFN, the same values
and gradients as the einsum FFN."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcflash.config import ConfigError, load_config, model_config
from lcflash.model import LongcatFlash
from lcflash.model import mlp as mlp_mod
from numerics import rel


def _ffn_value_and_grads(x, w, ct, impl):
    f = lambda x, w: mlp_mod.swiglu(x, *w, gmm_impl=impl)  # noqa: E731
    y, vjp = jax.vjp(f, x, w)
    return [y, *jax.tree.leaves(vjp(ct))]


@pytest.mark.parametrize("impl", ["ragged_dot", "reference"])
def test_one_group_equals_the_einsum_ffn(impl):
    """In float64, so that the two summation orders agree to ~1e-15; rows of two sequences, not a tile multiple."""
    B, T, D, F = 2, 13, 16, 24
    k = jax.random.split(jax.random.key(3), 5)
    with jax.enable_x64(True):
        f64 = lambda a: jnp.asarray(a, jnp.float64)  # noqa: E731
        x, ct = f64(jax.random.normal(k[0], (B, T, D))), f64(jax.random.normal(k[1], (B, T, D)))
        w = [f64(jax.random.normal(kk, s) / np.sqrt(s[0])) for kk, s in zip(k[2:], [(D, F), (D, F), (F, D)])]
        want, got = _ffn_value_and_grads(x, w, ct, None), _ffn_value_and_grads(x, w, ct, impl)
        for a, b in zip(got, want, strict=True):
            assert a.dtype == jnp.float64 and a.shape == b.shape
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)


def test_one_group_on_our_kernels_is_as_close_to_fp32_as_the_einsum_ffn():
    """pallas_chain (Pallas' GPU interpreter on the CPU, the kernels on a GPU) in bf16, against the fp32 einsum
    FFN: no further from it than the bf16 einsum FFN, which rounds g and u to bf16 before SwiGLU where the kernel's
    epilogue does not."""
    B, T, D, F = 2, 40, 128, 128
    k = jax.random.split(jax.random.key(5), 5)
    x, ct = jax.random.normal(k[0], (B, T, D)), jax.random.normal(k[1], (B, T, D))
    w = [jax.random.normal(kk, s) / np.sqrt(s[0]) for kk, s in zip(k[2:], [(D, F), (D, F), (F, D)])]
    want = _ffn_value_and_grads(x, w, ct, None)
    bf = lambda a: a.astype(jnp.bfloat16)  # noqa: E731
    errs = {impl: [rel(a, b) for a, b in zip(_ffn_value_and_grads(bf(x), w, bf(ct), impl), want, strict=True)]
            for impl in (None, "pallas_chain")}
    assert max(errs[None]) < 2e-2, errs
    for got, base in zip(errs["pallas_chain"], errs[None], strict=True):
        assert got <= 1.1 * base, errs


def test_the_model_with_one_group_ffns_gives_the_same_logits_and_gradients():
    """configs/tiny.py with every dense FFN (the layers' and the MTP block's) through ragged_dot as one group."""
    base = model_config(load_config("configs/tiny.py", {"moe.gmm_impl": "ragged_dot"})).replace(num_layers=2)
    tokens = jax.random.randint(jax.random.key(7), (2, 12), 0, base.vocab_size)
    out = {}
    for on in (False, True):
        model = LongcatFlash(base.replace(dense_ffn_gmm=on), nnx.Rngs(4))
        assert {m.gmm_impl for _, m in nnx.iter_graph(model) if isinstance(m, mlp_mod.MLP)} == {
            "ragged_dot" if on else None}
        graphdef, state = nnx.split(model)

        def loss(st, graphdef=graphdef):
            out = nnx.merge(graphdef, st).forward(tokens)
            return jnp.mean(jax.nn.logsumexp(out.logits, -1)), out.logits

        (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(state)
        out[on] = [logits, *jax.tree.leaves(grads)]
    for a, b in zip(out[True], out[False], strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)


def test_one_group_refuses_a_multi_device_mesh_and_a_non_bool(monkeypatch):
    monkeypatch.setattr(mlp_mod, "multi_device", lambda: True)
    x = jnp.zeros((1, 4, 8))
    with pytest.raises(ValueError, match=r"model.dense_ffn_gmm = True runs on one device"):
        mlp_mod.swiglu(x, jnp.zeros((8, 4)), jnp.zeros((8, 4)), jnp.zeros((4, 8)), gmm_impl="ragged_dot")
    mlp_mod.swiglu(x, jnp.zeros((8, 4)), jnp.zeros((8, 4)), jnp.zeros((4, 8)))   # the einsum FFN runs anywhere
    with pytest.raises(ConfigError, match=r"model.dense_ffn_gmm = 1 is invalid: must be a bool"):
        model_config(load_config("configs/tiny.py")).replace(dense_ffn_gmm=1)


def test_one_group_lowers_to_our_kernels_for_a_gpu_at_configs_small_shapes(mosaic_gpu_trace):
    """configs/small.py's dense FFN (1024 -> 2048 -> 1024), 2 x 256 rows, forward and backward lowered for CUDA on
    any backend: every product is a Mosaic GPU kernel (forward [gate | up] with SwiGLU and down; backward the down
    d_lhs with SwiGLU's backward, [gate | up] d_lhs and the two weight gradients), and XLA runs no dot."""
    sd = jax.ShapeDtypeStruct
    x, ct = sd((2, 256, 1024), jnp.bfloat16), sd((2, 256, 1024), jnp.bfloat16)
    w = [sd((1024, 2048), jnp.float32), sd((1024, 2048), jnp.float32), sd((2048, 1024), jnp.float32)]

    def fwd_bwd(x, w, ct):
        y, vjp = jax.vjp(lambda x, w: mlp_mod.swiglu(x, *w, gmm_impl="pallas_chain"), x, w)
        return y, vjp(ct)

    text = jax.jit(fwd_bwd).trace(x, w, ct).lower(lowering_platforms=("cuda",)).as_text()
    assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 6 and "dot_general" not in text
