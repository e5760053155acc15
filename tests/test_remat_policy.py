"""model.remat_policy changes what the backward pass recomputes, never what it computes."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcflash.config import REMAT_KEEP_NAMES, REMAT_POLICIES, ConfigError, load_config, model_config
from lcflash.kernels.gmm import api
from lcflash.model import LongcatFlash
from lcflash.model.common import (ATTENTION_QUERIES, DISPATCH_ROWS, KERNEL_PRIMITIVES, NORM_OUTPUT, POLICY_FNS,
                                  ROUTING_CHOICES, SWIGLU_OUTPUT)
from numerics import rel
from xla_flags import default_codegen


def _loss(mc, tokens):
    graphdef, state = nnx.split(LongcatFlash(mc, nnx.Rngs(2)))

    def loss(st):
        logits = nnx.merge(graphdef, st).forward(tokens).logits
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])

    return loss, state


def _loss_and_grad(mc, tokens):
    loss, state = _loss(mc, tokens)
    return jax.value_and_grad(loss), state


def test_policies_keep_the_expert_matmuls_and_change_no_value():
    """With XLA's grouped matmul (a kernel primitive), the "kernels" and "dots" policies save its three forward
    products per layer instead of recomputing them in the backward pass, "dots" the dense matmuls too; loss and
    gradients are unchanged."""
    cfg = model_config(load_config("configs/tiny.py", {"moe.gmm_impl": "ragged_dot"})).replace(
        num_layers=1, remat=True)
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.vocab_size)
    out, ragged, dots = {}, {}, {}
    for policy in REMAT_POLICIES:
        fn, state = _loss_and_grad(cfg.replace(remat_policy=policy), tokens)
        jaxpr = str(jax.make_jaxpr(fn)(state))
        ragged[policy] = jaxpr.count("ragged_dot_general[")
        dots[policy] = jaxpr.count("dot_general[") - ragged[policy]
        out[policy] = jax.jit(fn, compiler_options=default_codegen())(state)
        if policy == "nothing":
            fn0, state0 = fn, state
    # One scan body in the jaxpr: forward 3 products, backward 6 (d_lhs, d_rhs) plus the 3 recomputed under "nothing".
    assert (ragged["nothing"], ragged["kernels"], ragged["dots"]) == (12, 9, 9), ragged
    # "dots" recomputes no dense projection either; "kernels" recomputes them as "nothing" does.
    assert dots["dots"] < dots["kernels"] == dots["nothing"], dots
    l0, g0 = out["nothing"]
    if jax.default_backend() != "cpu":
        # Separately compiled GPU programs fuse the recomputed forward differently and so sum some fp32 values in
        # another order (H200: rel 1.3e-6 on one gradient). The bound for each gradient is how far another valid
        # summation order moves it: the same program compiled for XLA:CPU.
        g_cpu = jax.jit(fn0)(jax.device_put(state0, jax.devices("cpu")[0]))[1]
    for policy in ("kernels", "dots"):
        l1, g1 = out[policy]
        np.testing.assert_array_equal(l1, l0)
        for i, (a, b) in enumerate(zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True)):
            if jax.default_backend() == "cpu":
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
            else:
                assert rel(a, b) <= max(2 * rel(b, jax.tree.leaves(g_cpu)[i]), 1e-6), (policy, i, rel(a, b))


# plgpu.kernel wraps each Mosaic GPU launch in custom_vmap: one custom_vmap_call per kernel call in a jaxpr.
MGPU_CALL = "custom_vmap_call["


@pytest.mark.parametrize("fn", ["gmm", "gmm_swiglu_halves"])
def test_kernels_policy_keeps_the_mosaic_gpu_gmm_output(mosaic_gpu_trace, fn):
    """Traced for a GPU (never run, so on any backend): the Mosaic GPU grouped matmul's forward outputs (with the
    SwiGLU epilogue: h and its residual [g | u]) are kept under "kernels" and "dots" (forward, d_lhs, d_rhs: 3
    launches) and recomputed under "nothing" (4)."""
    x = jax.random.normal(jax.random.key(0), (256, 128), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (2, 128, 256), jnp.bfloat16)
    sizes = jnp.array([100, 80], jnp.int32)

    def layer(x, w):
        y = getattr(api, fn)(jnp.cos(x), w, sizes, impl="pallas_chain")
        return jnp.sum(jnp.sin(y).astype(jnp.float32))

    launches = {p: str(jax.make_jaxpr(jax.grad(jax.checkpoint(layer, policy=POLICY_FNS[p]), argnums=(0, 1)))(x, w))
                .count(MGPU_CALL) for p in REMAT_POLICIES}
    assert launches == {"nothing": 4, "kernels": 3, "dots": 3}, launches


def test_kernels_policy_keeps_the_fused_expert_ffn_outputs(mosaic_gpu_trace):
    """Traced for a GPU: the expert FFN with SwiGLU's backward in the down projection's epilogue
    (api.gmm_swiglu_ffn) keeps its two forward kernels' outputs under "kernels" and "dots" (2 forward + 4 backward
    launches) and reruns both under "nothing" (8)."""
    x = jax.random.normal(jax.random.key(0), (256, 128), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (2, 128, 256), jnp.bfloat16)
    w_down = jax.random.normal(jax.random.key(2), (2, 128, 128), jnp.bfloat16)
    sizes = jnp.array([100, 80], jnp.int32)

    def layer(x, w, w_down):
        y = api.gmm_swiglu_ffn(jnp.cos(x), w, w_down, sizes, impl="pallas_chain")
        return jnp.sum(jnp.sin(y).astype(jnp.float32))

    launches = {p: str(jax.make_jaxpr(jax.grad(jax.checkpoint(layer, policy=POLICY_FNS[p]), argnums=(0, 1, 2)))(
        x, w, w_down)).count(MGPU_CALL) for p in REMAT_POLICIES}
    assert launches == {"nothing": 8, "kernels": 6, "dots": 6}, launches


@pytest.mark.parametrize("fuse_gate_up", [False, True])
def test_dots_policy_keeps_the_expert_weights_cast_to_the_compute_dtype(mosaic_gpu_trace, fuse_gate_up):
    """Traced for a GPU: under "dots" the backward pass reuses the bf16 expert weights of the forward pass (named
    lcflash.kernels.COMPUTE_WEIGHTS) instead of casting the fp32 stacks again; the other policies recast them."""
    import re

    from lcflash.model.moe import expert_ffn

    x = jax.random.normal(jax.random.key(0), (256, 128), jnp.bfloat16)
    ws = [jax.random.normal(jax.random.key(i), (2, 128, 128)) for i in (1, 2, 3)]
    sizes = jnp.array([100, 80], jnp.int32)

    def layer(x, *ws):
        y = expert_ffn(jnp.cos(x), sizes, *ws, "pallas_chain", fuse_gate_up)
        return jnp.sum(jnp.sin(y).astype(jnp.float32))

    casts = {p: len(re.findall(r"bf16\[2,128,(?:128|256)\] = convert_element_type", str(jax.make_jaxpr(
        jax.grad(jax.checkpoint(layer, policy=POLICY_FNS[p]), argnums=(1, 2, 3)))(x, *ws)))) for p in REMAT_POLICIES}
    forward = 2 if fuse_gate_up else 3   # [gate | up] is cast as one array
    assert casts == {"nothing": 2 * forward, "kernels": 2 * forward, "dots": forward}, casts


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the Mosaic GPU and cuDNN kernels (Pallas' CPU interpreter "
                    "runs callbacks, which jax.checkpoint cannot partially evaluate)")
def test_kernels_policy_keeps_the_pallas_and_cudnn_kernels_on_gpu():
    """On a GPU: the policy sees the kernels inside their custom_vjps. Per scan body, 3 forward expert matmuls and 6
    backward ones, the forward ones again only under "nothing"; the 2 flash attention forwards likewise; loss and
    gradients unchanged."""
    cfg = model_config(load_config("configs/tiny.py", {
        "moe.gmm_impl": "pallas_chain", "model.dtype": "bfloat16", "model.train_attn_impl": "cudnn",
        "model.hidden_size": 128, "model.expert_ffn_hidden_size": 128, "model.qk_nope_head_dim": 128,
        "model.qk_rope_head_dim": 64, "model.v_head_dim": 128})).replace(num_layers=1, remat=True)
    tokens = jax.random.randint(jax.random.key(1), (2, 64), 0, cfg.vocab_size)
    counts, out = {}, {}
    for policy in ("nothing", "kernels"):
        fn, state = _loss_and_grad(cfg.replace(remat_policy=policy), tokens)
        jaxpr = str(jax.make_jaxpr(fn)(state))
        counts[policy] = (jaxpr.count(MGPU_CALL), jaxpr.count("dot_product_attention_fwd"))
        out[policy] = jax.jit(fn)(state)
    assert counts["nothing"][0] - counts["kernels"][0] == 3, counts
    assert counts["nothing"][1] > counts["kernels"][1], counts
    (l0, g0), (l1, g1) = out["nothing"], out["kernels"]
    np.testing.assert_array_equal(l1, l0)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):   # cuDNN's backward may sum in
        assert rel(a, b) < 1e-3                                               # another order from run to run


def test_remat_keep_saves_the_named_activations_and_changes_no_value(monkeypatch):
    """model.remat_keep adds residuals to the policy's: the two dense FFNs' and the experts' SwiGLU outputs
    ("swiglu"), the dispatched expert rows ("dispatch") and the two attentions' queries on the fused path
    ("queries"), every RMSNorm's output ("norms"), the MoE's routing choices ("routing"), per layer; loss and gradients
    unchanged (all of them kept against none)."""
    from jax._src.ad_checkpoint import saved_residuals

    from lcflash.model import router
    monkeypatch.setattr(router, "RANK_TOP_K_MAX_ELEMENTS", 0)   # the top-k of training sizes
    monkeypatch.setattr(router, "LARGE_TOP_K", "sort")          # lax.top_k (the argmax passes: below)
    cfg = model_config(load_config("configs/tiny.py", {"moe.gmm_impl": "ragged_dot"})).replace(
        num_layers=1, remat=True, remat_policy="dots", train_attn_impl="dpa_xla")
    tokens = jax.random.randint(jax.random.key(3), (2, 8), 0, cfg.vocab_size)
    shapes, out, reruns = {}, {}, {}
    keeps = ("", "swiglu", "swiglu,dispatch", "swiglu,dispatch,queries", "swiglu,dispatch,queries,norms",
             "swiglu,dispatch,queries,norms,routing")
    for keep in keeps:
        loss, state = _loss(cfg.replace(remat_keep=keep), tokens)
        shapes[keep] = sorted(str(aval.shape) for aval, _ in saved_residuals(loss, state))
        if keep in (keeps[0], keeps[-1]):   # every residual kept at once against none: the values (one compile each)
            out[keep] = jax.jit(jax.value_and_grad(loss), compiler_options=default_codegen())(state)
        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(state))
        reruns[keep] = (jaxpr.count(" sort["), jaxpr.count(" top_k["))
    M, F_dense, F_exp, D = 2 * 8 * cfg.moe_topk, cfg.ffn_hidden_size, cfg.expert_ffn_hidden_size, cfg.hidden_size

    def added(a, b):
        return sorted((collections.Counter(shapes[b]) - collections.Counter(shapes[a])).elements())

    assert added("", "swiglu") == sorted([str((1, 2, 8, F_dense))] * 2 + [str((1, M, F_exp))]), added("", "swiglu")
    assert added("swiglu", "swiglu,dispatch") == [str((1, M, D))], added("swiglu", "swiglu,dispatch")
    # The queries replace the saved q projection they are computed from (same shape): no residual added.
    assert added(*keeps[2:4]) == [], added(*keeps[2:4])
    norms = added(*keeps[3:5])  # the layer's four on the residual stream and each attention's two latent norms
    assert sorted(norms) == sorted([str((1, 2, 8, D))] * 4 + [str((1, 2, 8, cfg.q_lora_rank)),
                                                              str((1, 2, 8, cfg.kv_lora_rank))] * 2), norms
    # The chosen experts [T, K]; the sorted slots: order, token and FFN flag per sorted row, row and FFN flag per
    # [token, k], group sizes.
    K, N = cfg.moe_topk, cfg.n_routed_experts
    routing = added(*keeps[4:])
    assert routing == sorted([str((1, M))] * 3 + [str((1, 16, K))] * 3 + [str((1, N))]), routing
    # (sorts, top-ks) in the gradient's jaxpr: forward and backward unless kept, then the forward's only.
    assert reruns == {keep: (1, 1) if "routing" in keep else (2, 2) for keep in keeps}, reruns
    monkeypatch.setattr(router, "LARGE_TOP_K", "argmax")        # k argmax passes, kept the same way
    argmaxes = [str(jax.make_jaxpr(jax.grad(_loss(cfg.replace(remat_keep=keep), tokens)[0]))(state)).count(
        " argmax[") for keep in (keeps[0], keeps[-1])]
    assert argmaxes == [2 * K, K], argmaxes
    (l0, g0), (l1, g1) = out[keeps[0]], out[keeps[-1]]
    np.testing.assert_array_equal(l1, l0)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def test_remat_keep_queries_saves_the_assembled_queries_instead_of_recomputing_them():
    """On the fused attention path the [nope | rope] queries are rebuilt from the saved q projection in the
    backward pass; "queries" saves them instead."""
    from jax._src.ad_checkpoint import saved_residuals

    from lcflash.model.common import remat_policy_fn
    from lcflash.model.mla import LatentKV, expanded_attention

    B, T, H, R = 1, 8, 2, 16
    ks = jax.random.split(jax.random.key(0), 5)
    q_nope, q_pe = jax.random.normal(ks[0], (B, T, H, 32)), jax.random.normal(ks[1], (B, T, H, 16))
    kv = LatentKV(jax.random.normal(ks[2], (B, T, R)), jax.random.normal(ks[3], (B, T, 16)))
    w_kv_b = jax.random.normal(ks[4], (R, H, 64))
    mask = jnp.tril(jnp.ones((T, T), bool))[None]

    def attention(q_nope, q_pe, kv, w_kv_b):
        return jnp.sum(expanded_attention(q_nope, q_pe, kv, w_kv_b, mask, 0.1, 32, "dpa_xla", "causal"))

    sources = {keep: [s for _, s in saved_residuals(jax.checkpoint(attention, policy=remat_policy_fn("dots", keep)),
                                                    q_nope, q_pe, kv, w_kv_b)] for keep in ((), ("queries",))}
    assert not any("named 'queries'" in s for s in sources[()]), sources[()]
    assert sum("named 'queries'" in s for s in sources[("queries",)]) == 1, sources[("queries",)]


def test_bad_remat_keep_is_a_config_error():
    with pytest.raises(ConfigError, match="remat_keep.*comma-separated subset"):
        model_config(load_config("configs/tiny.py", {"model.remat_keep": "swiglu,everything"}))


def test_kernel_primitive_names_exist():
    """The names the policy matches are the primitives cuDNN's attention and XLA's grouped matmul bind (a renamed
    primitive would silently turn the policy into "nothing")."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

    x = jnp.ones((16, 32), jnp.bfloat16)
    w = jnp.ones((2, 32, 64), jnp.bfloat16)
    sizes = jnp.array([9, 7], jnp.int32)
    names = {str(e.primitive) for e in jax.make_jaxpr(
        lambda x, w: api.gmm(x, w, sizes, impl="ragged_dot"))(x, w).jaxpr.eqns}
    names |= {cudnn_attention._dot_product_attention_fwd_p.name,
              cudnn_attention._dot_product_attention_fwd_p_wrapper.name}
    assert KERNEL_PRIMITIVES <= names, KERNEL_PRIMITIVES - names
    assert set(POLICY_FNS) == set(REMAT_POLICIES)
    assert {SWIGLU_OUTPUT, DISPATCH_ROWS, ATTENTION_QUERIES, NORM_OUTPUT, ROUTING_CHOICES} == set(REMAT_KEEP_NAMES)


def test_bad_policy_is_a_config_error():
    with pytest.raises(ConfigError, match="remat_policy.*must be one of"):
        model_config(load_config("configs/tiny.py", {"model.remat_policy": "everything"}))


def test_kernels_policy_keeps_the_attention_kernels_output(mosaic_gpu_trace):
    """The same for our flash attention (train_attn_impl "pallas"): its output and softmax statistics are kept
    under "kernels" and "dots" (forward, dq, dk/dv: 3 launches), the forward recomputed under "nothing" (4)."""
    from lcflash.kernels.doc_attention.pallas_mgpu import doc_attention

    q = jax.random.normal(jax.random.key(0), (2, 128, 2, 192), jnp.bfloat16)
    v = jax.random.normal(jax.random.key(1), (2, 128, 2, 128), jnp.bfloat16)
    first = jnp.zeros((2, 128), jnp.int32)

    def layer(q, k, v):
        return jnp.sum(jnp.sin(doc_attention(jnp.cos(q), k, v, first, scale=0.1)).astype(jnp.float32))

    launches = {p: str(jax.make_jaxpr(jax.grad(jax.checkpoint(layer, policy=POLICY_FNS[p]), argnums=(0, 1, 2)))(
        q, q, v)).count(MGPU_CALL) for p in REMAT_POLICIES}
    assert launches == {"nothing": 4, "kernels": 3, "dots": 3}, launches


def test_kernel_policies_keep_the_attention_kernels_first_visible_keys(mosaic_gpu_trace, monkeypatch):
    """Our attention's per-row first visible key (an argmax over the [B, T, T] packed-documents mask) is kept under
    "kernels" and "dots", so a rematerialised layer's backward does not argmax the mask again; "nothing" does."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the kernels traced, not interpreted (not run)
    from lcflash.model.mla import LatentKV, expanded_attention
    from lcflash.model.transformer import causal_mask

    B, T, H, R = 1, 128, 2, 64
    ks = jax.random.split(jax.random.key(0), 5)
    q_nope, q_pe = jax.random.normal(ks[0], (B, T, H, 128)), jax.random.normal(ks[1], (B, T, H, 64))
    kv = LatentKV(jax.random.normal(ks[2], (B, T, R)), jax.random.normal(ks[3], (B, T, 64)))
    w_kv_b = jax.random.normal(ks[4], (R, H, 256))
    segments = jnp.cumsum(jax.random.bernoulli(jax.random.key(1), 0.05, (B, T)), axis=1)
    mask = causal_mask(B, T, T, segment_ids_bt=segments)

    def attention(q_nope, q_pe, kv, w_kv_b):
        o = expanded_attention(q_nope.astype(jnp.bfloat16), q_pe.astype(jnp.bfloat16), kv, w_kv_b, mask, 0.1,
                               128, "pallas", "causal_docs")
        return jnp.sum(o.astype(jnp.float32))

    argmaxes = {p: str(jax.make_jaxpr(jax.grad(jax.checkpoint(attention, policy=POLICY_FNS[p]), argnums=(0, 1)))(
        q_nope, q_pe, kv, w_kv_b)).count("argmax[") for p in REMAT_POLICIES}
    assert argmaxes == {"nothing": 2, "kernels": 1, "dots": 1}, argmaxes
