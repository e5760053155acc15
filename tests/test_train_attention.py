"""`model.train_attn_impl`: the fused attention paths (cuDNN flash attention on a GPU, `jax.nn.dot_product_attention`
on XLA) give the expanded attention's logits and gradients, with and without packed-document masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcflash.config import ConfigError, load_config, model_config
from lcflash.model.mla import LatentKV, expanded_attention
from lcflash.model.transformer import causal_mask
from numerics import needs_tokamax, random_model, rel

ON_GPU = jax.default_backend() == "gpu"


def _model_fns(impl: str, dtype: str, packed: bool = True):
    """(loss_and_grad, params) of a one-layer tiny model with MTP; the same random values for every impl.
    packed: two documents in row 0 (the forward's mask kind "causal_docs"), else none ("causal", mask dropped)."""
    mc = model_config(load_config("configs/tiny.py", {"model.train_attn_impl": impl, "model.num_layers": 1,
                                                       "model.dtype": dtype}))
    gd, params, rest = random_model(mc)
    B, T = 2, 32
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, mc.vocab_size, (B, T)), jnp.int32)
    seg = jnp.asarray([[0] * 11 + [1] * 21, [0] * T], jnp.int32)    # two packed documents in row 0
    pos = jnp.where(seg == 0, jnp.arange(T), jnp.arange(T) - 11).astype(jnp.int32)
    if not packed:
        seg, pos = None, None
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


@pytest.mark.parametrize("packed", [True, False])
def test_fused_path_equals_expanded_attention_fp32(packed):
    """The dot_product_attention plumbing (concatenated rope heads, padded values, the segment mask, or no mask
    at all when the forward's mask is plainly causal) on XLA: same logits and gradients as the einsum path, to
    fp32 rounding."""
    fn, params = _model_fns("xla", "float32", packed)
    (_, y_ref), g_ref = fn(params)
    fn, params = _model_fns("dpa_xla", "float32", packed)
    (_, y), g = fn(params)
    assert rel(y, y_ref) < 1e-5
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        assert rel(a, b) < 1e-4


def _attention_case(dtype, docs=True, seed=0, B=2, T=256, H=8):
    """Random MLA attention inputs (B=2, T=256, 8 heads, LongCat head sizes); docs: two packed documents in row 0,
    else a plain causal mask."""
    dn, dr, dv, R = 128, 64, 128, 64
    ks = jax.random.split(jax.random.key(seed), 5)
    q_nope = jax.random.normal(ks[0], (B, T, H, dn), jnp.float32)
    q_pe = jax.random.normal(ks[1], (B, T, H, dr), jnp.float32)
    kv = LatentKV(jax.random.normal(ks[2], (B, T, R), jnp.float32), jax.random.normal(ks[3], (B, T, dr), jnp.float32))
    w_kv_b = jax.random.normal(ks[4], (R, H, dn + dv), jnp.float32) * R ** -0.5
    seg = jnp.concatenate([jnp.zeros((1, T), jnp.int32).at[:, 100:].set(1), jnp.zeros((B - 1, T), jnp.int32)])
    mask = causal_mask(B, T, T, None, seg if docs else None)
    cast = lambda x: x.astype(dtype)  # noqa: E731
    return (cast(q_nope), cast(q_pe), jax.tree.map(cast, kv), cast(w_kv_b)), mask, dn


def _attention_and_grads(impl, dtype, mask_kind="given", **case):
    args, mask, dn = _attention_case(dtype, docs=mask_kind != "causal", **case)
    w = jax.random.normal(jax.random.key(9), args[0].shape[:3] + (128,), jnp.float32)

    def f(*a):
        o = expanded_attention(*a, mask, 0.07, dn, impl, mask_kind)
        return jnp.sum(w * o.astype(jnp.float32)), o

    (_, o), g = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))(*args)
    return o, jax.tree.leaves(g)


@pytest.mark.skipif(not ON_GPU, reason="cuDNN attention and the Mosaic GPU kernels need a GPU")
@pytest.mark.parametrize("impl", ["cudnn", "pallas", "pallas_masked", "pallas_dq_recompute",
                                  pytest.param("tokamax", marks=needs_tokamax)])
def test_fused_attention_matches_fp32_as_closely_as_xla_bf16(impl, monkeypatch):
    """In bf16, cuDNN's (or our kernels') output and input gradients err against the fp32 attention (matmul
    precision 'highest') by no more than twice the XLA bf16 path's own error, for every mask kind (packed
    documents given as a mask, or promised causal so blocks are skipped; a plain causal mask dropped; the kernels
    take only the causal kinds). (At the attention itself: a whole bf16 MoE model flips routing choices, which
    swamps the comparison.) pallas_masked: the kernels mask also the whole blocks next to the diagonal;
    pallas_dq_recompute: the dq kernel recomputes dS instead of reading the dk/dv kernel's; tokamax: the peer's
    kernels."""
    if impl.startswith("pallas"):
        from lcflash.kernels.doc_attention import pallas_mgpu
        monkeypatch.setattr(pallas_mgpu, "UNMASKED_RUNS", impl != "pallas_masked")
        monkeypatch.setattr(pallas_mgpu, "DQ_FROM_DS", impl != "pallas_dq_recompute")
        impl = "pallas"
    for kinds in (("given", "causal_docs"), ("causal",)):
        with jax.default_matmul_precision("highest"):
            o32, g32 = _attention_and_grads("xla", jnp.float32, kinds[0])
        o, g = _attention_and_grads("xla", jnp.bfloat16, kinds[0])
        ref = [rel(o, o32)] + [rel(a, b) for a, b in zip(g, g32)]
        assert max(ref) < 2e-2, ref    # the bf16 reference itself is sane
        for kind in kinds:
            if impl in ("pallas", "tokamax") and kind == "given":
                continue
            o, g = _attention_and_grads(impl, jnp.bfloat16, kind)
            errs = [rel(o, o32)] + [rel(a, b) for a, b in zip(g, g32)]
            for k in range(len(ref)):
                assert errs[k] <= 2 * ref[k], (kind, k, errs, ref)


@needs_tokamax
@pytest.mark.parametrize("mask_kind", ["causal_docs", "causal"])
def test_tokamax_path_equals_expanded_attention_fp32(monkeypatch, mask_kind):
    """The peer's plumbing (per-head keys, the documents as each row's first visible key, its custom VJP) on its XLA
    path: the expanded attention's output and gradients to fp32 rounding."""
    from lcflash.kernels.doc_attention import tokamax_attention

    monkeypatch.setattr(tokamax_attention, "IMPLEMENTATION", "xla")
    o, g = _attention_and_grads("tokamax", jnp.float32, mask_kind)
    o_ref, g_ref = _attention_and_grads("xla", jnp.float32, "given" if mask_kind == "causal_docs" else mask_kind)
    assert rel(o, o_ref) < 1e-5
    for a, b in zip(g, g_ref):
        assert rel(a, b) < 1e-5


@needs_tokamax
def test_tokamax_forward_runs_once_under_the_kernels_remat_policy(monkeypatch):
    """Its residuals are named for the "kernels" policy: a rematerialised layer's backward does not run its forward
    again (counted as the softmax's exponentials in the gradient's jaxpr)."""
    from lcflash.kernels.doc_attention import tokamax_attention
    from lcflash.model.common import keep_kernel_outputs

    monkeypatch.setattr(tokamax_attention, "IMPLEMENTATION", "xla")
    args, mask, dn = _attention_case(jnp.float32, B=1, T=64, H=2)

    def loss(*a):
        return jnp.sum(expanded_attention(*a, mask, 0.07, dn, "tokamax", "causal_docs") ** 2)

    def exps(f):
        return str(jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2, 3)))(*args)).count(" exp ")

    assert exps(jax.checkpoint(loss, policy=keep_kernel_outputs)) == exps(loss) > 0
    assert exps(jax.checkpoint(loss, policy=jax.checkpoint_policies.nothing_saveable)) > exps(loss)


@pytest.mark.skipif(ON_GPU, reason="Pallas' GPU interpreter, for CPU runs (on a GPU: the test above)")
def test_kernels_read_mla_operands_as_the_model_computes_them(monkeypatch):
    """train_attn_impl "pallas" hands our kernels q, kv = [k_nope | v] and the shared rope key as they are
    (`mla_doc_attention`): the same output and gradients (latent, up projection, rope key included) as the same
    kernels on assembled per-head keys, and within bf16 error of the fp32 attention."""
    from lcflash.model import mla

    case = dict(B=2, T=128, H=2)
    with jax.default_matmul_precision("highest"):
        o32, g32 = _attention_and_grads("xla", jnp.float32, "causal_docs", **case)
    args, mask, dn = _attention_case(jnp.bfloat16, **case)
    concats, results = {}, {}
    for form in (True, False):
        monkeypatch.setattr(mla, "PALLAS_MLA_FORM", form)
        fwd = lambda *a: expanded_attention(*a, mask, 0.07, dn, "pallas", "causal_docs")  # noqa: E731 (traced anew)
        concats[form] = str(jax.make_jaxpr(fwd)(*args)).count("concatenate[")
        results[form] = _attention_and_grads("pallas", jnp.bfloat16, "causal_docs", **case)
    assert concats[True] < concats[False], concats   # no per-head keys assembled
    (o, g), (o_heads, g_heads) = results[True], results[False]
    assert len(g) == 5, len(g)   # q_nope, q_pe, latent, rope key, up projection
    for a, b, c in zip([o, *g], [o_heads, *g_heads], [o32, *g32], strict=True):
        assert rel(a, b) < 2e-4, rel(a, b)
        assert rel(a, c) < 1e-2, rel(a, c)


def test_q_parts_hands_the_kernels_two_query_arrays_with_the_same_results(monkeypatch):
    """mla.Q_PARTS: q_nope and the roped q_pe reach our kernels as two arrays, with no [nope | rope] concatenation
    in the traced forward or backward, and the same output and gradients, bitwise (in Pallas' GPU interpreter off
    a GPU)."""
    from lcflash.model import mla

    case = dict(B=2, T=128, H=2)
    args, mask, dn = _attention_case(jnp.bfloat16, **case)
    concats, results = {}, {}
    for parts in (False, True):
        monkeypatch.setattr(mla, "Q_PARTS", parts)
        fwd = lambda *a: expanded_attention(*a, mask, 0.07, dn, "pallas", "causal_docs")  # noqa: E731 (traced anew)
        jaxpr = jax.make_jaxpr(lambda *a: jax.vjp(fwd, *a)[1](fwd(*a)))(*args)
        concats[parts] = str(jaxpr).count("concatenate[")
        results[parts] = _attention_and_grads("pallas", jnp.bfloat16, "causal_docs", **case)
    assert concats[True] < concats[False], concats
    (o, g), (o_joined, g_joined) = results[True], results[False]
    for a, b in zip([o, *g], [o_joined, *g_joined], strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def _mla_module(**overrides):
    from lcflash.model.mla import MLA

    mc = model_config(load_config("configs/tiny.py", {"model.num_layers": 1})).replace(**overrides)
    return mc, MLA(mc, nnx.Rngs(params=jax.random.key(4)))


def test_q_parts_projection_gives_the_joined_projection_s_values_and_gradients():
    """MLA.latents(q_parts=True) computes q_nope and q_rope as two products of the one w_q_b, alpha_q folded into
    the weight: the same queries and gradients (w_q_b, w_q_a, the input) as one product sliced, to fp32 rounding.
    The tiny config's alpha_q (sqrt 2) is not a power of two, so the fold rounds differently there."""
    mc, attn = _mla_module()
    ks = jax.random.split(jax.random.key(5), 4)
    B, T = 2, 16
    x = jax.random.normal(ks[0], (B, T, mc.hidden_size), jnp.float32)
    ang = jax.random.uniform(ks[1], (B, T, mc.qk_rope_head_dim // 2)) * 6.0
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    gd, params = nnx.split(attn)
    w_nope = jax.random.normal(ks[2], (B, T, mc.num_attention_heads, mc.qk_nope_head_dim))
    w_rope = jax.random.normal(ks[3], (B, T, mc.num_attention_heads, mc.qk_rope_head_dim))

    def f(p, x, parts):
        q_nope, q_pe, _ = nnx.merge(gd, p).latents(x, cos, sin, q_parts=parts)
        return jnp.sum(w_nope * q_nope) + jnp.sum(w_rope * q_pe), (q_nope, q_pe)

    out = {parts: jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True), static_argnums=2)(params, x, parts)
           for parts in (False, True)}
    ((_, q), g), ((_, q_ref), g_ref) = out[True], out[False]
    for a, b in zip(jax.tree.leaves((q, g)), jax.tree.leaves((q_ref, g_ref)), strict=True):
        assert rel(a, b) < 1e-5, rel(a, b)


@pytest.mark.parametrize("impl,q_parts_on,want", [("pallas", True, True), ("pallas", False, False),
                                                  ("xla", True, False), ("dpa_xla", True, False), ("auto", True, True)])
def test_q_is_split_only_for_a_kernel_that_takes_the_parts(monkeypatch, impl, q_parts_on, want):
    """The cache-free forward computes q in two parts (mla.Q_PARTS) only where the attention reads them as two
    arrays, our kernels in MLA's form; XLA's and cuDNN's paths join q again, so they keep the one product. "auto"
    is resolved from the operands' shapes before the q projection, here as on one Hopper GPU (our kernels)."""
    from lcflash.model import mla

    monkeypatch.setattr(mla, "Q_PARTS", q_parts_on)
    monkeypatch.setattr(mla, "on_hopper", lambda *a: True)
    monkeypatch.setattr(mla, "train_attn_kernel", lambda impl: impl)   # "auto" stays "auto" off a GPU too
    seen = []
    latents = mla.MLA.latents
    monkeypatch.setattr(mla.MLA, "latents", lambda self, x, cos, sin, q_parts=False: seen.append(q_parts)
                        or latents(self, x, cos, sin, q_parts))
    # Our kernels themselves are checked above; here a stand-in of the output's shape, recording q's form.
    monkeypatch.setattr(mla, "_pallas_attention", lambda q, ops, *a, **k: (
        seen.append(isinstance(q, tuple)) or jnp.zeros(ops[0].shape[:3] + (ops[0].shape[-1] - mc.qk_nope_head_dim,),
                                                        ops[0].dtype)))
    # Head sizes our kernels take (multiples of 64), a whole block of tokens, bf16.
    mc, attn = _mla_module(train_attn_impl=impl, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64,
                           dtype="bfloat16")
    B, T = 1, 64
    x = jnp.ones((B, T, mc.hidden_size), jnp.bfloat16)
    cs = jnp.ones((B, T, mc.qk_rope_head_dim // 2), jnp.bfloat16)
    jax.eval_shape(lambda x: attn(x, cs, cs, causal_mask(B, T, T, None, None), mask_kind="causal_docs")[0], x)
    assert seen[0] is want, seen
    if impl in ("pallas", "auto"):
        assert seen[1] is want, seen   # the kernel got the pair exactly when latents split q


def test_document_mask_off_attends_across_documents():
    """`data.document_mask=False`: the training loss is the one of a window holding a single document (plain
    causal attention, the window's positions), and differs from the loss with the documents kept apart."""
    from lcflash.data.loader import pack_windows
    from lcflash.train.step import forward_losses

    cfg = load_config("configs/tiny.py", {"model.num_layers": 1})
    mc = model_config(cfg)
    gd, params, rest = random_model(mc)
    w = np.random.RandomState(3).randint(1, mc.vocab_size, (2, 33))
    w[0, [0, 9, 20]] = w[1, 0] = 0    # bos 0: three documents in row 0, one in row 1
    batch = {k: jnp.asarray(v) for k, v in pack_windows(w, bos_id=0).items()}
    one_doc = dict(batch, segment_ids=jnp.zeros_like(batch["segment_ids"]),
                   positions=jnp.broadcast_to(jnp.arange(32, dtype=jnp.int32), (2, 32)))
    loss = lambda c, b: np.asarray(jax.jit(lambda p: forward_losses(c, mc, gd, p, rest, b)[0])(params))  # noqa: E731
    kept, single = loss(cfg, batch), loss(cfg, one_doc)
    cfg.data.document_mask = False
    crossed = loss(cfg, batch)
    np.testing.assert_allclose(crossed, single, rtol=1e-6)
    assert not np.allclose(crossed[0], kept[0])


def test_cudnn_backward_writes_no_mask_bias_gradient(monkeypatch):
    """Traced only (any backend, either JAX): cuDNN's backward gets no bias-gradient output for the boolean mask
    (variadic_args (has_bias, has_dbias) = (True, False)); on a JAX with the `should_export_dbias` switch, the
    switch is restored after the trace."""
    import re

    from jax._src.cudnn import fused_attention_stablehlo as fa

    from lcflash.model import mla

    if not ON_GPU:  # no cuDNN to ask for its version and head-size limits here
        monkeypatch.setattr(fa, "check_cudnn_version", lambda: 91000)
        monkeypatch.setattr(fa, "check_is_flash_attention", lambda *a, **k: None)
    export = getattr(fa, "should_export_dbias", None)
    B, T, H = 2, 128, 4
    q = jax.random.normal(jax.random.key(0), (B, T, H, 192), jnp.bfloat16)
    v = jax.random.normal(jax.random.key(1), (B, T, H, 128), jnp.bfloat16)
    mask = causal_mask(B, T, T, None, jnp.zeros((B, T), jnp.int32).at[:, 50:].set(1))[:, None]

    def f(q, k, v):
        return jnp.sum(mla._cudnn_attention(q, k, v, mask, 0.1, "causal_docs").astype(jnp.float32))

    jaxpr = str(jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(q, q, v))
    assert set(re.findall(r"variadic_args=\(([^)]*)\)", jaxpr)) == {"True, False"}
    assert getattr(fa, "should_export_dbias", None) is export
    with pytest.raises(ValueError, match="must be boolean"):
        mla._cudnn_attention(q, q, v, mask.astype(jnp.bfloat16), 0.1, "causal_docs")
