"""L2 prefetch in the decode step (lcflash/kernels/l2_prefetch.py, decode.L2_PREFETCH): each sublayer starts pulling
the next one's matrices into L2. Values must not change, and each prefetch must hang off the right input. The
Mosaic kernel (TMA L2 prefetches) cannot run in Pallas' interpreter, so on the CPU it is lowered for CUDA only."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcflash.config import load_config, model_config
from lcflash.infer import decode
from lcflash.infer.cache import DecodeCache
from lcflash.kernels import l2_prefetch, on_hopper
from lcflash.model import LongcatFlash


@pytest.fixture(scope="module")
def tiny():
    cfg = model_config(load_config("configs/tiny.py")).replace(dtype="float32", max_position_embeddings=64)
    return decode.DecodeModel(LongcatFlash(cfg, nnx.Rngs(7)), "absorbed")


def _steps(dm, tokens):
    """Four tokens, then one, through the decode path: (logits of the last step, distinct experts of both). The
    prefetches ride on the expert counts (decode_layer), so a caller that drops those drops them too; generation
    sums them over its steps."""
    cache = DecodeCache.zeros(dm.cfg, tokens.shape[0], 64)
    start = jnp.zeros(tokens.shape[0], jnp.int32)
    _, cache, n_0 = decode.forward(dm.graphs, dm.weights, tokens[:, :4], cache, start, prefill=False,
                                   moe_impl="gather")
    h, _, n_1 = decode.forward(dm.graphs, dm.weights, tokens[:, 4:], cache, start + 4, prefill=False,
                               moe_impl="gather")
    return decode.logits(dm.weights, h), n_0 + n_1


@pytest.mark.parametrize("impl", ["xla", pytest.param("mosaic", marks=pytest.mark.skipif(
    not on_hopper(), reason="needs a Hopper GPU (TMA L2 prefetches)"))])
def test_prefetch_changes_no_value(tiny, monkeypatch, impl):
    """The decode steps' values are bitwise those without prefetches, and each prefetch returns its zero."""
    tokens = jax.random.randint(jax.random.key(11), (2, 5), 0, tiny.cfg.vocab_size)
    want = jax.jit(lambda t: _steps(tiny, t))(tokens)
    monkeypatch.setattr(decode, "L2_PREFETCH", impl)
    got = jax.jit(lambda t: _steps(tiny, t))(tokens)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    w = jax.random.normal(jax.random.key(12), (4096, 1024), jnp.bfloat16)
    sets = [decode.sublayer_matrices(p) for p in tiny.weights.layers[0]
            if isinstance(p, (decode.AttnWeights, decode.MLPWeights))] + [[w, w[:512]]]
    zeros = [l2_prefetch.prefetch(arrays, tokens, impl) for arrays in sets]
    assert [int(z[0]) for z in zeros] == [0] * 5


def test_each_sublayer_prefetches_the_next_ones_matrices(tiny, monkeypatch):
    """Eagerly, the prefetch of sublayer k + 1's matrices is handed sublayer k's input (the value its norm reads),
    in the order attn_0, mlp_0, attn_1, mlp_1, then the next layer's attn_0."""
    calls, norm_inputs = [], []
    monkeypatch.setattr(decode, "L2_PREFETCH", "xla")
    monkeypatch.setattr(l2_prefetch, "prefetch",
                        lambda arrays, after, impl: calls.append((arrays, after, impl)) or jnp.zeros(1, jnp.int32))
    norm = decode.deferred_norm
    monkeypatch.setattr(decode, "deferred_norm", lambda x, w, eps: norm_inputs.append(x) or norm(x, w, eps))
    tokens = jax.random.randint(jax.random.key(12), (1, 5), 0, tiny.cfg.vocab_size)
    cache = DecodeCache.zeros(tiny.cfg, 1, 64)
    decode.forward(tiny.graphs, tiny.weights, tokens, cache, jnp.zeros(1, jnp.int32), prefill=False,
                   moe_impl="gather")
    layers = tiny.weights.layers
    order = [m for i, p in enumerate(layers)
             for m in (p.mlp_0, p.attn_1, p.mlp_1, layers[i + 1].attn_0 if i + 1 < len(layers) else None)]
    order = [m for m in order if m is not None]
    assert len(calls) == len(order) == 4 * len(layers) - 1
    assert len(norm_inputs) == 4 * len(layers)
    for (arrays, after, impl), m, x in zip(calls, order, norm_inputs):
        assert impl == "xla"
        assert after is x
        want = decode.sublayer_matrices(m)
        assert len(arrays) == len(want) and all(a is b for a, b in zip(arrays, want))
    # An absorbed attention reads its merged products, not their factors.
    attn = decode.sublayer_matrices(layers[0].attn_1)
    assert any(a is layers[0].attn_1.w_q_lat for a in attn) and not any(a is layers[0].attn_1.w_q_b for a in attn)


def test_mosaic_prefetch_lowers_for_cuda_in_the_decode_step(tiny, monkeypatch):
    monkeypatch.setattr(decode, "L2_PREFETCH", "mosaic")
    tokens = jax.ShapeDtypeStruct((1, 5), jnp.int32)
    text = jax.jit(lambda t: _steps(tiny, t)).trace(tokens).lower(lowering_platforms=("cuda",)).as_text()
    L = tiny.cfg.num_layers
    assert "cp.async.bulk.prefetch.tensor.2d.L2" in text
    assert len(re.findall(r"call @_mosaic\w*\(", text)) == 2 * (4 * L - 1)   # every prefetch of both steps kept


@pytest.mark.parametrize("shape,dtype,boxes", [((4096, 1024), jnp.bfloat16, (256, 256)),
                                               ((8, 576, 1536), jnp.bfloat16, (256, 256)),
                                               ((12, 100, 384), jnp.bfloat16, (240, 192)),
                                               ((96, 40), jnp.float32, (96, 40))])
def test_boxes_tile_each_matrix_exactly(shape, dtype, boxes):
    m = l2_prefetch.as_matrix(jnp.zeros(shape, dtype))
    got = (l2_prefetch.box(m.shape[0]), l2_prefetch.box(m.shape[1]))
    assert got == boxes
    assert all(d % b == 0 and b <= l2_prefetch.BOX for d, b in zip(m.shape, got))
    assert l2_prefetch.supported([m]) is None


@pytest.mark.parametrize("shape,ctas", [((4096, 1024), 16), ((1024, 2048), 16), ((448, 1024), 16), ((96, 40), 3),
                                        ((4608, 256), 7)])
def test_the_ctas_boxes_cover_each_matrix_once(shape, ctas):
    rb, cb = l2_prefetch.box(shape[0]), l2_prefetch.box(shape[1])
    seen = [(r, c) for cta in range(ctas) for valid, r, c in l2_prefetch.box_origins(cta, shape, ctas) if valid]
    want = [(r, c) for r in range(0, shape[0], rb) for c in range(0, shape[1], cb)]
    assert sorted(seen) == want


def test_bad_input_is_named(tiny, monkeypatch):
    monkeypatch.setattr(decode, "L2_PREFETCH", "tma")
    with pytest.raises(ValueError, match=r"decode.L2_PREFETCH = 'tma'; valid: \('off', 'xla', 'mosaic'\)"):
        jax.eval_shape(lambda t: _steps(tiny, t), jax.ShapeDtypeStruct((1, 5), jnp.int32))
    x = jnp.zeros((4,))
    with pytest.raises(ValueError, match="impl 'tma' is not one of"):
        l2_prefetch.prefetch([jnp.zeros((8, 8))], x, "tma")
    with pytest.raises(ValueError, match="array 0 .*multiple of 16 bytes"):
        l2_prefetch.prefetch([jnp.zeros((8, 7), jnp.bfloat16)], x, "mosaic")
    assert l2_prefetch.prefetch([None], x, "mosaic") is None
    assert l2_prefetch.prefetch([jnp.zeros((8, 8))], x, "off") is None
    assert l2_prefetch.keep(x, [None]) is x
    np.testing.assert_array_equal(l2_prefetch.keep(jnp.arange(3), [jnp.zeros(1, jnp.int32)] * 2), jnp.arange(3))
