"""Causal attention over packed documents (`train_attn_impl="pallas"`, lcflash/kernels/doc_attention): the block
ranges the kernels visit, and the Mosaic GPU kernels (forward, dq, dk/dv) in Pallas' GPU interpreter and lowered
for CUDA on any backend, against the plain-JAX attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcflash.kernels.doc_attention import pallas_mgpu
from lcflash.kernels.doc_attention.reference import (attention_reference, doc_mask, first_visible,
                                                     kv_block_ranges, q_block_ranges)
from lcflash.model.transformer import causal_mask
from numerics import rel


def _segments(rng, B, T, mean_doc, contiguous=True):
    seg = np.cumsum(rng.random((B, T)) < 1.0 / mean_doc, axis=1)
    if not contiguous:   # a segment id that comes back later in the row
        seg[0, T // 2:] = seg[0, 0]
    return jnp.asarray(seg, jnp.int32)


@pytest.mark.parametrize("contiguous", [True, False])
def test_first_visible_names_the_segments_and_the_ranges_cover_every_visible_block(contiguous):
    """The mask rebuilt from each row's first visible key is the model's causal-and-same-segment mask; the key
    blocks visited per query block (and query blocks per key block) hold every visible pair, and for contiguous
    documents nothing else: each visited block holds one."""
    B, T, bq = 3, 512, 64
    seg = _segments(np.random.default_rng(5 + contiguous), B, T, 90, contiguous)
    mask = causal_mask(B, T, T, None, seg)
    first = first_visible(mask)
    np.testing.assert_array_equal(doc_mask(first), mask)
    n = T // bq
    visible = np.asarray(mask).reshape(B, n, bq, n, bq).any(axis=(2, 4))      # [B, q block, kv block]
    kv_lo, kv_hi = (np.asarray(a) for a in kv_block_ranges(first, bq, bq))
    q_lo, q_hi = (np.asarray(a) for a in q_block_ranges(first, bq, bq))
    blocks = np.arange(n)
    by_q = (blocks[None, None, :] >= kv_lo[..., None]) & (blocks[None, None, :] < kv_hi[..., None])
    by_kv = (blocks[None, None, :] >= q_lo[..., None]) & (blocks[None, None, :] < q_hi[..., None])
    assert not (visible & ~by_q).any() and not (visible & ~by_kv.transpose(0, 2, 1)).any()
    if contiguous:
        np.testing.assert_array_equal(by_q, visible)
        np.testing.assert_array_equal(by_kv.transpose(0, 2, 1), visible)
    assert visible.sum() < np.tril(np.ones((n, n), bool)).sum() * B   # the documents do skip blocks


def _inputs(B, T, H, seed, dtype=jnp.bfloat16):
    ks = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(ks[0], (B, T, H, 192), dtype), jax.random.normal(ks[1], (B, T, H, 192), dtype),
            jax.random.normal(ks[2], (B, T, H, 128), dtype), jax.random.normal(ks[3], (B, T, H, 128), dtype))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="Pallas' GPU interpreter, for CPU runs (on a GPU: "
                    "tests/test_train_attention.py runs the kernels)")
def test_kernels_in_the_interpreter_match_the_reference():
    """Forward and the three gradients in GPU interpret mode (TMA ring, barriers, block ranges, masks, online
    softmax; plain dots for the products): row 0 holds three documents, row 1 a segment that comes back after
    another, so some visited blocks are partly and some wholly masked for some rows."""
    B, T, H = 2, 128, 1
    seg = jnp.asarray([[0] * 40 + [1] * 60 + [2] * 28, [0] * 30 + [1] * 50 + [0] * 48], jnp.int32)
    first = first_visible(causal_mask(B, T, T, None, seg))
    q, k, v, do = _inputs(B, T, H, seed=3)
    scale = 192 ** -0.5

    def kernel(q, k, v):
        return pallas_mgpu.doc_attention(q, k, v, first, scale=scale, depths=(2, 1, 2), interpret=True)

    def f32(q, k, v):
        with jax.default_matmul_precision("highest"):
            return attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), first, scale)

    o, vjp = jax.vjp(kernel, q, k, v)
    o_ref, vjp_ref = jax.vjp(f32, q, k, v)
    got, want = [o, *vjp(do)], [o_ref, *vjp_ref(do.astype(jnp.float32))]
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want, strict=True):
        assert a.dtype == jnp.bfloat16 and not np.isnan(np.asarray(a, np.float32)).any(), name
        assert rel(a, b) < 1e-2, (name, rel(a, b))     # bf16 operands and probabilities


def test_kernels_lower_for_cuda():
    """Pallas -> Mosaic GPU lowering of all three kernels (layouts, wgmma operand shapes, TMA transforms) on CPU."""
    sd = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)  # noqa: E731

    def f(q, k, v, first, do):
        o, vjp = jax.vjp(lambda q, k, v: pallas_mgpu.doc_attention(q, k, v, first, scale=0.07), q, k, v)
        return o, vjp(do)

    lowered = jax.jit(f).trace(sd(2, 256, 4, 192), sd(2, 256, 4, 192), sd(2, 256, 4, 128), sd(2, 256, dt=jnp.int32),
                               sd(2, 256, 4, 128)).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("mosaic_gpu") >= 3


def test_unsupported_operands_are_named():
    q, k, v, _ = _inputs(1, 64, 1, seed=0, dtype=jnp.float32)
    first = jnp.zeros((1, 64), jnp.int32)
    with pytest.raises(NotImplementedError, match="bfloat16"):
        pallas_mgpu.doc_attention(q, k, v, first, scale=1.0)
    q, k, v, _ = _inputs(1, 96, 1, seed=0)
    with pytest.raises(NotImplementedError, match="multiple of 64"):
        pallas_mgpu.doc_attention(q, k, v, jnp.zeros((1, 96), jnp.int32), scale=1.0)
    q, k, v, _ = _inputs(1, 64, 1, seed=0)
    with pytest.raises(ValueError, match="depths"):
        pallas_mgpu.doc_attention(q, k, v, jnp.zeros((1, 64), jnp.int32), scale=1.0, depths=(2, 0, 2))


def test_auto_picks_the_kernels_for_packed_documents_on_one_hopper_gpu_only(monkeypatch):
    from lcflash.model import mla

    q, k, v, _ = _inputs(1, 128, 1, seed=0)
    assert mla.auto_fused_impl(q, k, v, "causal_docs", "gpu", "9.0") == "pallas"
    assert mla.auto_fused_impl(q, k, v, "causal", "gpu", "9.0") == "cudnn"       # cuDNN's plain causal is faster
    assert mla.auto_fused_impl(q, k, v, "causal_docs", "gpu", "8.0") == "cudnn"  # no wgmma before Hopper
    assert mla.auto_fused_impl(q[:, :96], k[:, :96], v[:, :96], "causal_docs", "gpu", "9.0") == "cudnn"  # T % 64
    monkeypatch.setattr(mla, "_multi_device", lambda: True)                      # no sharding rule yet
    assert mla.auto_fused_impl(q, k, v, "causal_docs", "gpu", "9.0") == "cudnn"
    with pytest.raises(ValueError, match="one device"):
        mla._pallas_attention(q, k, v, None, 1.0, "causal")
