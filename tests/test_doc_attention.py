"""Causal attention over packed documents (`train_attn_impl="pallas"`, lcflash/kernels/doc_attention): the block
ranges the kernels visit, and the Mosaic GPU kernels (forward, dq, dk/dv) in Pallas' GPU interpreter and lowered
for CUDA on any backend, against the plain-JAX attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcflash.kernels.doc_attention import pallas_mgpu
from lcflash.kernels.doc_attention.reference import (attention_reference, doc_mask, first_visible,
                                                     kv_block_ranges, q_block_ranges, unmasked_runs)
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
    # The unmasked runs: every pair in them visible, inside the visited ranges, and for contiguous documents every
    # whole block off the diagonal.
    whole = np.asarray(mask).reshape(B, n, bq, n, bq).all(axis=(2, 4)) & (blocks[None, None, :] < blocks[None, :, None])
    kv_from, q_to = (np.asarray(a) for a in unmasked_runs(first, bq))
    run_q = (blocks[None, None, :] >= kv_from[..., None]) & (blocks[None, None, :] < blocks[None, :, None])
    run_kv = (blocks[None, None, :] > blocks[None, :, None]) & (blocks[None, None, :] < q_to[..., None])
    assert not (run_q & ~whole).any() and not (run_kv.transpose(0, 2, 1) & ~whole).any()
    assert (kv_lo <= kv_from).all() and (q_to <= q_hi).all()
    if contiguous:
        np.testing.assert_array_equal(run_q, whole)
        np.testing.assert_array_equal(run_kv.transpose(0, 2, 1), whole)
    assert whole.any()


def _inputs(B, T, H, seed, dtype=jnp.bfloat16):
    ks = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(ks[0], (B, T, H, 192), dtype), jax.random.normal(ks[1], (B, T, H, 192), dtype),
            jax.random.normal(ks[2], (B, T, H, 128), dtype), jax.random.normal(ks[3], (B, T, H, 128), dtype))


def _three_documents_and_a_return():
    """`first` of two rows of 128: row 0 holds three documents, row 1 a segment that comes back after another."""
    seg = jnp.asarray([[0] * 40 + [1] * 60 + [2] * 28, [0] * 30 + [1] * 50 + [0] * 48], jnp.int32)
    return first_visible(causal_mask(2, 128, 128, None, seg))


def _whole_blocks():
    """`first` of two rows of 256 with blocks whose every pair is visible (the kernels skip their masks): row 0 one
    document, then two; row 1 a segment that comes back, whole blocks on both sides of another segment's block."""
    seg = jnp.asarray([[0] * 200 + [1] * 56, [0] * 64 + [1] * 64 + [0] * 128], jnp.int32)
    return first_visible(causal_mask(2, 256, 256, None, seg))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="Pallas' GPU interpreter, for CPU runs (on a GPU: "
                    "tests/test_train_attention.py runs the kernels)")
@pytest.mark.parametrize("dq_from_ds", [True, False])
@pytest.mark.parametrize("make_first", [_three_documents_and_a_return, _whole_blocks])
def test_kernels_in_the_interpreter_match_the_reference(make_first, dq_from_ds, monkeypatch):
    """Forward and the three gradients in GPU interpret mode (TMA ring, barriers, block ranges, masks, online
    softmax; plain dots for the products): documents and a segment that comes back after another, so some visited
    blocks are partly, some wholly masked for some rows, and (`_whole_blocks`) some need no mask, which the kernels
    then walk unmasked (UNMASKED_RUNS on; the MLA-form test below runs with it off). dq from the dk/dv kernel's dS
    or recomputed: the interpreter fills unwritten memory with NaN, so a dS block the dq kernel reads but the dk/dv
    kernel did not write would show."""
    monkeypatch.setattr(pallas_mgpu, "UNMASKED_RUNS", True)
    monkeypatch.setattr(pallas_mgpu, "DQ_FROM_DS", dq_from_ds)
    first = make_first()
    (B, T), H = first.shape, 1
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


def _mla_inputs(B, T, H, seed, nope=128, rope=64, dv=128):
    ks = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(ks[0], (B, T, H, nope + rope), jnp.bfloat16),
            jax.random.normal(ks[1], (B, T, H, nope + dv), jnp.bfloat16),
            jax.random.normal(ks[2], (B, T, rope), jnp.bfloat16), jax.random.normal(ks[3], (B, T, H, dv), jnp.bfloat16))


def _assembled(q, kv, kpe, nope=128):
    """MLA's operands as the plain kernels take them: per-head keys [k_nope | rope key] and values."""
    H = q.shape[2]
    k = jnp.concatenate([kv[..., :nope], jnp.broadcast_to(kpe[:, :, None], kpe.shape[:2] + (H, kpe.shape[-1]))], -1)
    return q, k, kv[..., nope:]


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="Pallas' GPU interpreter, for CPU runs")
def test_mla_form_in_the_interpreter_matches_the_plain_kernels_and_the_reference(monkeypatch):
    """The MLA form (q, kv = [k_nope | v], one rope key for all heads) gives the plain kernels' output and
    gradients on the assembled operands, and the fp32 reference's within bf16 error; the rope key's gradient is
    the sum over the heads. Every visited block masked (UNMASKED_RUNS off), which the test above does not run."""
    monkeypatch.setattr(pallas_mgpu, "UNMASKED_RUNS", False)
    B, T, H = 2, 128, 2
    first = _three_documents_and_a_return()
    q, kv, kpe, do = _mla_inputs(B, T, H, seed=11)
    scale = 192 ** -0.5

    def mla(q, kv, kpe):
        return pallas_mgpu.mla_doc_attention(q, kv, kpe, first, scale=scale, nope_dim=128, interpret=True)

    def plain(q, kv, kpe):
        return pallas_mgpu.doc_attention(*_assembled(q, kv, kpe), first, scale=scale, interpret=True)

    def f32(q, kv, kpe):
        with jax.default_matmul_precision("highest"):
            return attention_reference(*_assembled(*(x.astype(jnp.float32) for x in (q, kv, kpe))), first, scale)

    outs = {}
    for name, fn in (("mla", mla), ("plain", plain), ("f32", f32)):
        o, vjp = jax.vjp(fn, q, kv, kpe)
        outs[name] = [o, *vjp(do.astype(o.dtype))]
    for i, name in enumerate(("o", "dq", "dkv", "dkpe")):
        a, b, ref = outs["mla"][i], outs["plain"][i], outs["f32"][i]
        assert a.shape == b.shape and a.dtype == jnp.bfloat16, name
        # Same kernels' arithmetic up to the order the two key parts' products are summed, and the bf16 rounding
        # of the per-head rope key gradients before (plain: after) their sum over heads.
        assert rel(a, b) < 2e-4, (name, rel(a, b))
        assert rel(a, ref) < 1e-2, (name, rel(a, ref))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="Pallas' GPU interpreter, for CPU runs")
def test_dq_from_the_dkv_kernels_ds_equals_dq_recomputed(monkeypatch):
    """In MLA's form, dq from the dS the dk/dv kernel wrote equals the dq kernel's own recomputation up to the
    order of fp32 sums (the same bf16 dS feeds the same product); the other gradients are the same kernel's."""
    first = _three_documents_and_a_return()
    q, kv, kpe, do = _mla_inputs(2, 128, 2, seed=23)
    grads = {}
    for dq_from_ds in (True, False):
        monkeypatch.setattr(pallas_mgpu, "DQ_FROM_DS", dq_from_ds)
        _, vjp = jax.vjp(lambda q, kv, kpe: pallas_mgpu.mla_doc_attention(
            q, kv, kpe, first, scale=192 ** -0.5, nope_dim=128, interpret=True), q, kv, kpe)
        grads[dq_from_ds] = vjp(do)
    for name, a, b in zip(("dq", "dkv", "dkpe"), grads[True], grads[False], strict=True):
        assert not np.isnan(np.asarray(a, np.float32)).any(), name
        assert rel(a, b) < 2e-3, (name, rel(a, b))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="Pallas' GPU interpreter, for CPU runs")
def test_queries_as_two_arrays_give_the_joined_queries_results_bitwise(monkeypatch):
    """q given as (q_nope, q_rope) loads the same tiles into the same products as q = [q_nope | q_rope]: the output
    and kv's gradients are bitwise the same, and dq comes back as the two column blocks of the joined dq. With dq
    recomputed (DQ_FROM_DS off); tests/test_train_attention.py's q_parts test checks the default kernels so."""
    monkeypatch.setattr(pallas_mgpu, "DQ_FROM_DS", False)
    first = _three_documents_and_a_return()
    q, kv, kpe, do = _mla_inputs(2, 128, 2, seed=31)

    def attend(q, kv, kpe):
        return pallas_mgpu.mla_doc_attention(q, kv, kpe, first, scale=192 ** -0.5, nope_dim=128, interpret=True)

    o, vjp = jax.vjp(attend, q, kv, kpe)
    dq, dkv, dkpe = vjp(do)
    parts = (q[..., :128], q[..., 128:])
    o_p, vjp_p = jax.vjp(attend, parts, kv, kpe)
    dq_p, dkv_p, dkpe_p = vjp_p(do)
    assert isinstance(dq_p, tuple) and [x.shape for x in dq_p] == [x.shape for x in parts]
    assert not np.isnan(np.asarray(dq, np.float32)).any()
    for name, a, b in (("o", o_p, o), ("dq", jnp.concatenate(dq_p, axis=-1), dq), ("dkv", dkv_p, dkv),
                       ("dkpe", dkpe_p, dkpe)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=name)


# (2, 1, 1): the dk/dv kernel small enough for 2 CTAs/SM; runs: the whole blocks walked unmasked; dq recomputed;
# q_parts: the queries as (q_nope, q_rope). The model's defaults first, then each switch off them, with every pair
# of runs, dq_from_ds and q_parts (the switches the dq kernel shares) in some row.
@pytest.mark.parametrize("depths,runs,dq_from_ds,q_parts", [
    (None, True, True, True), ((2, 1, 1), True, True, False), (None, False, False, True), (None, False, True, False),
    (None, True, False, False)])
def test_mla_form_lowers_for_cuda(depths, runs, dq_from_ds, q_parts, monkeypatch):
    monkeypatch.setattr(pallas_mgpu, "UNMASKED_RUNS", runs)
    monkeypatch.setattr(pallas_mgpu, "DQ_FROM_DS", dq_from_ds)
    sd = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)  # noqa: E731

    def f(q, kv, kpe, first, do):
        o, vjp = jax.vjp(lambda q, kv, kpe: pallas_mgpu.mla_doc_attention(q, kv, kpe, first, scale=0.07,
                                                                          nope_dim=128, depths=depths), q, kv, kpe)
        return o, vjp(do)

    q = (sd(2, 256, 4, 128), sd(2, 256, 4, 64)) if q_parts else sd(2, 256, 4, 192)
    lowered = jax.jit(f).trace(q, sd(2, 256, 4, 256), sd(2, 256, 64), sd(2, 256, dt=jnp.int32),
                               sd(2, 256, 4, 128)).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert text.count("mosaic_gpu") >= 3
    # Each kernel under its own name, so a profile tells them apart.
    for name in ["attn_fwd", "attn_dkv", "attn_dq_ds" if dq_from_ds else "attn_dq"]:
        assert f"{name}_mosaic_gpu" in text, name


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


def test_calls_without_depths_read_the_module_default_at_call_time(monkeypatch):
    """bench_train.py --attn_depths sets DEPTHS after import: a call that passes none must see it."""
    q, k, v, _ = _inputs(1, 64, 1, seed=0)
    monkeypatch.setattr(pallas_mgpu, "DEPTHS", (2, 0, 2))
    with pytest.raises(ValueError, match=r"depths \(2, 0, 2\)"):
        pallas_mgpu.doc_attention(q, k, v, jnp.zeros((1, 64), jnp.int32), scale=1.0)


@pytest.mark.parametrize("depth", [0, 1.5, None])
def test_a_bad_dq_ds_depth_is_named_at_call_time(depth, monkeypatch):
    """bench_attention.py sets DQ_DS_DEPTH after import; a value that is no block count fails before any kernel."""
    q, k, v, _ = _inputs(1, 64, 1, seed=0)
    monkeypatch.setattr(pallas_mgpu, "DQ_DS_DEPTH", depth)
    with pytest.raises(ValueError, match="DQ_DS_DEPTH"):
        pallas_mgpu.doc_attention(q, k, v, jnp.zeros((1, 64), jnp.int32), scale=1.0)
    monkeypatch.setattr(pallas_mgpu, "DQ_FROM_DS", False)   # unread when dq recomputes dS
    assert pallas_mgpu._dq_from_ds() == 0


def test_auto_picks_the_kernels_for_packed_documents_on_one_hopper_gpu_only(monkeypatch):
    from lcflash.model import mla

    q, kv, kpe, _ = _mla_inputs(1, 128, 1, seed=0)
    assert mla.auto_fused_impl(q, kv, kpe, "causal_docs", "gpu", "9.0") == "pallas"
    assert mla.auto_fused_impl((q[..., :128], q[..., 128:]), kv, kpe, "causal_docs", "gpu", "9.0") == "pallas"
    assert mla.auto_fused_impl(q, kv, kpe, "causal", "gpu", "9.0") == "cudnn"       # cuDNN's plain causal is faster
    assert mla.auto_fused_impl(q, kv, kpe, "causal_docs", "gpu", "8.0") == "cudnn"  # no wgmma before Hopper
    assert mla.auto_fused_impl(q[:, :96], kv[:, :96], kpe[:, :96], "causal_docs", "gpu", "9.0") == "cudnn"  # T % 64
    monkeypatch.setattr(mla, "multi_device", lambda: True)                          # no sharding rule yet
    assert mla.auto_fused_impl(q, kv, kpe, "causal_docs", "gpu", "9.0") == "cudnn"
    with pytest.raises(ValueError, match="one device"):
        mla._pallas_attention(q, (kv, kpe), None, 1.0, "causal", mla_form=True)


def test_unsupported_mla_operands_are_named():
    q, kv, kpe, _ = _mla_inputs(1, 64, 2, seed=0)
    first = jnp.zeros((1, 64), jnp.int32)
    with pytest.raises(NotImplementedError, match="nope"):
        pallas_mgpu.mla_doc_attention(q, kv, kpe[..., :32], first, scale=1.0, nope_dim=128)
    with pytest.raises(NotImplementedError, match="multiples of 64"):
        q, kv, kpe, _ = _mla_inputs(1, 64, 2, seed=0, nope=96, rope=96, dv=128)
        pallas_mgpu.mla_doc_attention(q, kv, kpe, first, scale=1.0, nope_dim=96)
    with pytest.raises(NotImplementedError, match="q parts of 64 and 128 columns"):
        pallas_mgpu.mla_doc_attention((q[..., 128:], q[..., :128]), kv, kpe, first, scale=1.0, nope_dim=128)
