"""The decode weight layout (lcflash/infer/decode.py): one transposed copy of the weights that converts back to
the model's exactly, and a decode forward on it that gives the model's logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcflash.config import load_config, model_config
from lcflash.infer import decode
from lcflash.infer.cache import DecodeCache
from lcflash.model import LongcatFlash
from numerics import rel


@pytest.fixture(scope="module")
def tiny():
    cfg = model_config(load_config("configs/tiny.py")).replace(dtype="float32", max_position_embeddings=64)
    return LongcatFlash(cfg, nnx.Rngs(3))


def test_layout_is_one_copy_that_converts_back_exactly(tiny):
    cfg = tiny.cfg
    dm = decode.DecodeModel(tiny)
    w = dm.weights
    stacked = nnx.state(tiny.layers)
    for i, p in enumerate(w.layers):
        # Contraction axis last: q_a and kv_a share one [q_lora + kv_lora + rope, D] matvec, gate and up one [2F, D].
        assert p.attn_0.w_qkv_a.shape == (cfg.q_lora_rank + cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.hidden_size)
        assert p.mlp_1.w_gate_up.shape == (2 * cfg.ffn_hidden_size, cfg.hidden_size)
        assert p.moe.w_down.shape == (cfg.n_routed_experts, cfg.hidden_size, cfg.expert_ffn_hidden_size)
        back = dm.graphs.layer_state.build(decode.layer_to_model(cfg, p))
        want = jax.tree.map(lambda x, i=i: x[i], stacked)
        assert jax.tree.structure(back) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    back = dm.graphs.mtp_state.build(decode.mtp_to_model(cfg, w.mtp))
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(nnx.state(tiny.mtp)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(w.lm_head), np.asarray(tiny.lm_head[...]).T)
    # No second copy: the decode layers hold exactly the model's layer bytes, plus the absorbed products (tiny:
    # both pay, each the size of the matrix it merges into).
    assert decode.absorbed_products_pay(cfg) == (True, True)
    merged = [x for p in w.layers for a in (p.attn_0, p.attn_1) for x in (a.w_q_lat, a.w_o_lat)]
    layer_bytes = sum(x.nbytes for x in jax.tree.leaves(w.layers))
    assert layer_bytes == sum(x.nbytes for x in jax.tree.leaves(stacked)) + sum(x.nbytes for x in merged)


def test_dense_ffn_stacked_for_a_split_ffn_width_converts_back_and_gives_the_same_output(tiny):
    """Where a mesh splits F, the dense FFN's gate and up are stacked [2, F, D] (decode.splits_ffn_width): the same
    weights back, the same SwiGLU output as the one-device [2F, D] layout."""
    m = jax.tree.map(lambda x: x[0], nnx.to_pure_dict(nnx.state(tiny.layers)))["mlp_0"]
    x = jax.random.normal(jax.random.key(5), (2, 3, tiny.cfg.hidden_size))
    flat, stacked = decode.mlp_to_decode(m), decode.mlp_to_decode(m, split_ffn=True)
    assert stacked.w_gate_up.shape == (2, tiny.cfg.ffn_hidden_size, tiny.cfg.hidden_size)
    for p in (flat, stacked):
        for k, v in decode.mlp_to_model(p).items():
            np.testing.assert_array_equal(np.asarray(v), np.asarray(m[k]))
    np.testing.assert_allclose(np.asarray(decode.swiglu_t(stacked, x)), np.asarray(decode.swiglu_t(flat, x)),
                               rtol=1e-6, atol=1e-6)
    assert not decode.splits_ffn_width(m["w_gate"])   # one device


@pytest.fixture(scope="module")
def reference(tiny):
    """Tokens [2, 5], the model's logits over them and its MTP logits for pairs (hidden t, token t+1)."""
    tokens = jax.random.randint(jax.random.key(4), (2, 5), 0, tiny.cfg.vocab_size)
    graphdef, state = nnx.split(tiny)

    @jax.jit
    def full(st, tokens):
        m = nnx.merge(graphdef, st)
        out = m.forward(tokens)
        return out.logits, m.mtp_logits(out.hidden[:, :4], tokens[:, 1:])

    return (tokens,) + full(state, tokens)


@pytest.mark.parametrize("attn_impl,moe_impl,merged,deferred", [
    ("absorbed", "gather", True, True), ("absorbed", "dense", True, True), ("absorbed", "model", True, True),
    ("absorbed", "grouped", True, True), ("absorbed", "gather", False, False), ("expanded", "auto", True, True)])
def test_decode_only_forward_equals_model_forward(tiny, reference, attn_impl, moe_impl, merged, deferred,
                                                  monkeypatch):
    """Every token through the decode path (no prefill): 4 tokens, then 1, from an empty cache; the logits equal
    the plain forward over the whole sequence, and the MTP slot (decode path too) gives model.mtp_logits.
    merged=False: absorbed attention through W_UK and W_UV in turn instead of their merged products;
    deferred=False: every norm applied before its matvec (the decode path before session 22)."""
    cfg = tiny.cfg
    tokens, want, want_mtp = reference
    monkeypatch.setattr(decode, "DEFER_NORMS", deferred)
    dm = decode.DecodeModel(tiny, attn_impl)
    if not merged:
        dm.weights = decode.without_absorbed_products(dm.weights)

    @jax.jit
    def run(w, tokens):
        cache = DecodeCache.zeros(cfg, 2, 64, mtp=True)
        h0, cache, _ = decode.forward(dm.graphs, w, tokens[:, :4], cache, jnp.zeros(2, jnp.int32), prefill=False,
                                      moe_impl=moe_impl)
        h1, cache, n_e = decode.forward(dm.graphs, w, tokens[:, 4:], cache, jnp.full((2,), 4, jnp.int32),
                                        prefill=False, moe_impl=moe_impl)
        hidden = jnp.concatenate([h0, h1], axis=1)
        mtp, _ = decode.mtp_forward(dm.graphs, w, hidden[:, :4], tokens[:, 1:], cache, jnp.zeros(2, jnp.int32),
                                    prefill=False)
        return decode.logits(w, hidden), mtp, n_e

    got, got_mtp, n_experts = run(dm.weights, tokens)
    assert rel(got, want) < 1e-5
    assert rel(got_mtp, want_mtp) < 1e-5
    assert np.all((np.asarray(n_experts) >= 1) & (np.asarray(n_experts) <= cfg.n_routed_experts))


@pytest.mark.parametrize("form", decode.GATHER_FORMS)
def test_gather_and_dense_moe_equal_model_moe(tiny, form, monkeypatch):
    """The decode-layout MoE forms against the model's MoE module on the same (fp32) input, with many tokens so
    that zero-expert and FFN-expert slots both occur; the gather's matvecs in each of its forms."""
    monkeypatch.setattr(decode, "GATHER_FORM", form)
    cfg = tiny.cfg
    w = decode.split_weights(tiny)
    graphs = decode._graphs(cfg, "absorbed")
    x = jax.random.normal(jax.random.key(5), (3, 7, cfg.hidden_size), jnp.float32)

    @jax.jit
    def run(p, x):
        want, _ = graphs.layer_module(p).moe(x)
        return want, [decode.moe_apply(cfg, p.moe, x, impl)[0] for impl in ("gather", "dense", "grouped")]

    want, got = run(w.layers[1], x)
    for g in got:
        assert rel(g, want) < 1e-5


def test_grouped_moe_on_our_kernels_in_bf16():
    """"grouped" on our kernels (compiled on a GPU, Pallas' interpreter elsewhere) reading the decode layout's
    bf16 experts as stored, against the fp32 gather on the same bf16-valued weights and input: 8 FFN + 4 zero
    experts, 4 of them per token, 20 tokens (empty groups, zero-expert slots)."""
    cfg = model_config(load_config("configs/tiny.py")).replace(
        hidden_size=128, expert_ffn_hidden_size=128, gmm_impl="pallas_chain", dtype="bfloat16",
        param_dtype="bfloat16")
    p = decode.split_weights(LongcatFlash(cfg, nnx.Rngs(7))).layers[0].moe
    x = jax.random.normal(jax.random.key(8), (4, 5, cfg.hidden_size), jnp.float32).astype(jnp.bfloat16)
    got, experts = jax.jit(lambda p, x: decode.moe_apply(cfg, p, x, "grouped"))(p, x)
    f32 = cfg.replace(dtype="float32", gmm_impl="ragged_dot")
    want, want_experts = decode.moe_apply(f32, jax.tree.map(lambda a: a.astype(jnp.float32), p),
                                          x.astype(jnp.float32), "gather")
    np.testing.assert_array_equal(np.asarray(experts), np.asarray(want_experts))
    assert got.dtype == jnp.bfloat16
    assert rel(got.astype(jnp.float32), want) < 1e-2   # h and the output rounded to bf16 (~4e-3 each)


def test_auto_moe_runs_our_grouped_kernels_for_wide_experts_or_many_tokens(monkeypatch):
    """decode "auto": "grouped" where moe.gmm_impl resolves to our kernels (on Hopper, bf16, K and N multiples of
    128) and the experts are wide (LongCat-Flash: any batch) or the tokens many (configs/small.py: batch 64, not 1 or
    8); elsewhere the gather / dense rule (the tiny config's 64 x 32 experts, fp32, or ragged_dot). Wide experts
    stored in another dtype than the compute's take "grouped" only with many tokens."""
    from lcflash.kernels.gmm import api

    small = model_config(load_config("configs/small.py"))
    longcat = model_config(load_config("configs/longcat_flash.py"))   # moe.gmm_impl's default, "auto"
    tiny = model_config(load_config("configs/tiny.py"))
    hopper = api.auto_impl
    monkeypatch.setattr(api, "auto_impl", lambda lhs, rhs: hopper(lhs, rhs, "gpu", "9.0"))
    bf16 = jnp.bfloat16
    assert [decode.auto_moe_impl(small, t, bf16) for t in (1, 8, 64)] == ["gather", "gather", "grouped"]
    assert [decode.auto_moe_impl(longcat, t, bf16) for t in (1, 8, 64)] == ["grouped"] * 3
    # 37.7 MB experts at D = 1024: level with the gather at batch 1 on an H100 (session 63), below the threshold
    assert decode.auto_moe_impl(small.replace(expert_ffn_hidden_size=6144), 1, bf16) == "gather"
    # fp32-stored experts (a trainer's weights) decoded in bf16: "grouped" would cast every expert, the gather only
    # its slots; with many tokens the dense MoE casts them all too.
    f32 = jnp.float32
    assert [decode.auto_moe_impl(longcat, t, bf16, f32) for t in (1, 8, 64)] == ["gather", "gather", "grouped"]
    assert [decode.auto_moe_impl(longcat, t, bf16, bf16) for t in (1, 64)] == ["grouped"] * 2
    assert [decode.auto_moe_impl(small, t, jnp.float32) for t in (1, 64)] == ["gather", "dense"]
    assert [decode.auto_moe_impl(longcat.replace(gmm_impl="ragged_dot"), t, bf16) for t in (1, 64)] == [
        "gather", "dense"]
    assert [decode.auto_moe_impl(tiny, t, bf16) for t in (1, 2)] == ["gather", "dense"]


def test_moe_apply_auto_reads_the_stored_expert_dtype(monkeypatch):
    """moe_apply's "auto" passes the experts' stored dtype: fp32 experts decoded in bf16 take the gather at one token
    even where the experts count as wide; bf16 experts take the grouped MoE."""
    cfg = model_config(load_config("configs/tiny.py"))
    moe = decode.split_weights(LongcatFlash(cfg, nnx.Rngs(0))).layers[0].moe
    monkeypatch.setattr(decode, "runs_our_kernels", lambda *a: True)
    monkeypatch.setattr(decode, "GROUPED_MIN_EXPERT_BYTES", 0)
    ran = []
    for name in ("gather", "grouped"):
        monkeypatch.setattr(decode, f"experts_{name}",
                            lambda x, *a, name=name, **k: ran.append(name) or jnp.zeros(x.shape, jnp.float32))
    x = jnp.ones((1, 1, cfg.hidden_size), jnp.bfloat16)
    for dtype in (jnp.float32, jnp.bfloat16):
        p = moe._replace(**{k: getattr(moe, k).astype(dtype) for k in ("w_gate", "w_up", "w_down")})
        decode.moe_apply(cfg, p, x, "auto")
    assert ran == ["gather", "grouped"]


def test_absorbed_products_only_where_they_are_no_larger():
    """configs/small.py (kv_lora_rank = nope = v = 128) merges both sides; LongCat-Flash (kv_lora_rank 512) and a
    tiny model with a wide latent merge neither, and store neither."""
    for path, want in (("configs/small.py", (True, True)), ("configs/longcat_flash.py", (False, False))):
        assert decode.absorbed_products_pay(model_config(load_config(path))) == want, path
    cfg = model_config(load_config("configs/tiny.py")).replace(kv_lora_rank=48)
    assert decode.absorbed_products_pay(cfg) == (False, False)
    p = decode.split_weights(LongcatFlash(cfg, nnx.Rngs(0))).layers[0].attn_1
    assert p.w_q_lat is None and p.w_o_lat is None
    assert decode.read_by_decode(p) == p


def test_unknown_moe_impl_is_named(tiny):
    w = decode.split_weights(tiny)
    with pytest.raises(ValueError, match="moe_impl 'sparse' is not one of"):
        decode.moe_apply(tiny.cfg, w.layers[0].moe, jnp.zeros((1, 1, tiny.cfg.hidden_size)), "sparse")


@pytest.mark.parametrize("sizes", [(32, 16), (1536, 512), (24, 40, 8)])
def test_one_reduction_for_slices_gives_each_slices_norm(sizes):
    """One reduction for the q_a and kv_a norms (decode.mla_latents: rms_scales) gives each slice's own rms_norm,
    applied with its scale or deferred past a matvec (Normed); a trailing part of x (the rope key) is left out."""
    from lcflash.model.norm import apply_rms_scale, rms_norm, rms_scales

    keys = jax.random.split(jax.random.key(sum(sizes)), len(sizes) + 2)
    x = jax.random.normal(keys[0], (2, 3, sum(sizes) + 8), jnp.float32) * 3.0
    ws = [jax.random.normal(k, (n,), jnp.float32) for k, n in zip(keys[2:], sizes)]
    lo = 0
    for r, w, n in zip(rms_scales(x, sizes, 1e-6), ws, sizes, strict=True):
        want = rms_norm(x[..., lo:lo + n], w, 1e-6)
        assert rel(apply_rms_scale(x[..., lo:lo + n], w, r), want) < 1e-6
        m = jax.random.normal(keys[1], (5, n), jnp.float32)
        deferred = decode.matvec("btd,nd->btn", decode.Normed(x[..., lo:lo + n] * w, r), m, 0.5)
        assert rel(deferred, 0.5 * jnp.einsum("btd,nd->btn", want, m)) < 1e-5
        lo += n


def test_distinct_experts_counts_ffn_experts_per_layer():
    """The per-step statistic behind the decode floor: distinct FFN experts (ids < N; zero experts are not
    counted) per layer, for all layers in one op."""
    ids = np.random.default_rng(0).integers(0, 12, size=(3, 5, 4)).astype(np.int32)   # L=3, 5 tokens, top-4
    got = decode.distinct_experts(jnp.asarray(ids), 8)
    assert got.tolist() == [len({int(e) for e in layer.ravel() if e < 8}) for layer in ids]
