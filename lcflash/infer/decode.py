"""One forward over new tokens with the decode cache: the model's layers, unrolled, with decode-shaped MoE.

`DecodeModel` holds the model's weights split per layer once (so no step slices a stacked [L, ...] weight
inside the compiled loop) and the module graphs for prefill (expanded attention) and decode (absorbed or Pallas
attention, selected through `ModelConfig.attn_impl`). `forward` runs the ScMoE layer in the order of
lcflash/model/layer.py; only the MoE call differs, chosen by `moe_impl`:

* "model": the model's own MoE (sort by expert + grouped matmul, or expert-parallel); used for prefill.
* "gather": each (token, slot) reads only its expert's weights (multiply-reduce, which XLA fuses with the
  gather); a decode step with few tokens then reads the experts it touches, not all of them.
* "dense": every expert over every token, weighted by the routing; reads each expert once (large batches).
* "auto": "gather" while tokens * top_k < n_routed_experts, else "dense".
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lcflash.config import ModelConfig
from lcflash.infer.cache import DecodeCache
from lcflash.model.mla import LatentKV
from lcflash.model.norm import rms_norm
from lcflash.model.rope import rope_cos_sin
from lcflash.model.router import Routing, zero_expert_output

MOE_IMPLS = ("model", "gather", "dense", "auto")


class DecodeWeights(NamedTuple):
    embed: jax.Array          # [V, D]
    norm: jax.Array           # [D] final norm weight
    lm_head: jax.Array        # [D, V]
    layers: tuple             # L per-layer nnx.State of the DecoderLayer
    mtp: object               # nnx.State of the MTP head, or None


@dataclasses.dataclass(frozen=True, eq=False)
class DecodeGraphs:
    cfg: ModelConfig
    prefill_layer: object     # DecoderLayer graphdef, attn_impl="expanded"
    decode_layer: object      # DecoderLayer graphdef, attn_impl as asked
    prefill_mtp: object
    decode_mtp: object


def _graphs(cfg: ModelConfig, attn_impl: str):
    def build(impl):
        from lcflash.model import LongcatFlash

        abstract = nnx.eval_shape(lambda: LongcatFlash(cfg.replace(attn_impl=impl), nnx.Rngs(0)))
        return nnx.graphdef(abstract.layers), (nnx.graphdef(abstract.mtp) if abstract.mtp is not None else None)

    pl, pm = build("expanded")
    dl, dm = build(attn_impl)
    return DecodeGraphs(cfg.replace(attn_impl=attn_impl), pl, dl, pm, dm)


def split_weights(model) -> DecodeWeights:
    """The model's variables with the layer stack split into L per-layer states (one copy of the layers)."""
    stacked = nnx.state(model.layers)
    layers = tuple(jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(model.cfg.num_layers))
    return DecodeWeights(model.embed[...], model.norm.weight[...], model.lm_head[...], layers,
                         nnx.state(model.mtp) if model.mtp is not None else None)


class DecodeModel:
    """Weights and graphs for cached forwards; build once per model (splitting the layers copies them)."""

    def __init__(self, model, attn_impl: str = "absorbed", weights: DecodeWeights | None = None):
        self.cfg = model.cfg
        self.graphs = _graphs(model.cfg, attn_impl)
        self.weights = split_weights(model) if weights is None else weights
        self.has_mtp = model.mtp is not None


# ----------------------------------------------------------------------------------------------- MoE
def _distinct_experts(experts_tk, n_ffn: int):
    """FFN experts chosen by any slot (one compare-reduce fusion; no scatter in the decode step)."""
    hit_n = jnp.any(experts_tk.reshape(-1, 1) == jnp.arange(n_ffn, dtype=experts_tk.dtype)[None, :], axis=0)
    return jnp.sum(hit_n.astype(jnp.int32))


def experts_gather(x_td, routing: Routing, w_gate, w_up, w_down):
    """FFN-expert output [T, D] fp32 reading only the chosen experts' weights (as products reduced in fp32)."""
    n_ffn = w_gate.shape[0]
    e_tk = routing.experts_tk
    is_ffn = e_tk < n_ffn
    # Zero-expert slots are discarded; point them at the token's first FFN expert so their reads hit the cache.
    first_t1 = jnp.take_along_axis(e_tk, jnp.argmax(is_ffn, axis=1)[:, None], axis=1)
    idx_tk = jnp.where(is_ffn, e_tk, jnp.where(first_t1 < n_ffn, first_t1, 0))
    xf_td = x_td.astype(jnp.float32)
    g_tki = jnp.sum(xf_td[:, None, :, None] * w_gate[idx_tk].astype(jnp.float32), axis=2)
    u_tki = jnp.sum(xf_td[:, None, :, None] * w_up[idx_tk].astype(jnp.float32), axis=2)
    h_tki = (jax.nn.silu(g_tki) * u_tki).astype(x_td.dtype).astype(jnp.float32)
    y_tkd = jnp.sum(h_tki[..., None] * w_down[idx_tk].astype(jnp.float32), axis=2)
    w_tk = jnp.where(is_ffn, routing.weights_tk, 0.0)
    return jnp.sum(y_tkd * w_tk[..., None], axis=1)


def experts_dense(x_td, routing: Routing, w_gate, w_up, w_down):
    """FFN-expert output [T, D] fp32 running every expert on every token (each expert's weights read once)."""
    n_ffn = w_gate.shape[0]
    T, K = routing.experts_tk.shape
    dtype = x_td.dtype
    is_ffn = routing.experts_tk < n_ffn
    w_te = jnp.zeros((T, n_ffn), jnp.float32).at[
        jnp.repeat(jnp.arange(T), K), jnp.where(is_ffn, routing.experts_tk, 0).reshape(-1)
    ].add(jnp.where(is_ffn, routing.weights_tk, 0.0).reshape(-1))
    g = jnp.einsum("td,edi->tei", x_td, w_gate.astype(dtype), preferred_element_type=jnp.float32)
    u = jnp.einsum("td,edi->tei", x_td, w_up.astype(dtype), preferred_element_type=jnp.float32)
    h_tei = (jax.nn.silu(g) * u).astype(dtype)
    y_ted = jnp.einsum("tei,eid->ted", h_tei, w_down.astype(dtype), preferred_element_type=jnp.float32)
    return jnp.einsum("ted,te->td", y_ted.astype(dtype).astype(jnp.float32), w_te)


def moe_apply(moe, x_btd, impl: str):
    """(MoE output [B, T, D], distinct FFN experts touched) for the layer's MoE module."""
    if impl not in MOE_IMPLS:
        raise ValueError(f"moe_impl {impl!r} is not one of {MOE_IMPLS}")
    cfg = moe.cfg
    B, T, D = x_btd.shape
    if impl == "model":
        y, stats = moe(x_btd)
        return y, _distinct_experts(stats["experts_btk"].reshape(B * T, -1), cfg.n_routed_experts)
    if impl == "auto":
        impl = "gather" if B * T * cfg.moe_topk < cfg.n_routed_experts else "dense"
    x_td = x_btd.reshape(B * T, D)
    routing = moe.router(x_td)
    fn = experts_gather if impl == "gather" else experts_dense
    y_td = zero_expert_output(x_td, routing, cfg.n_routed_experts) + fn(
        x_td, routing, moe.w_gate[...], moe.w_up[...], moe.w_down[...])
    return y_td.astype(x_btd.dtype).reshape(B, T, D), _distinct_experts(routing.experts_tk, cfg.n_routed_experts)


# ----------------------------------------------------------------------------------------------- forward
def positions_and_mask(start_b, q_len: int, cache_len: int):
    pos_bt = start_b[:, None] + jnp.arange(q_len, dtype=jnp.int32)[None, :]
    return pos_bt, jnp.arange(cache_len, dtype=jnp.int32)[None, None, :] <= pos_bt[:, :, None]


def layer_forward(layer, h_btd, cos, sin, mask_bts, kv0: LatentKV, kv1: LatentKV, start_b, moe_impl: str):
    """lcflash/model/layer.py's DecoderLayer, with the MoE call swapped for `moe_apply`."""
    a0, kv0 = layer.attn_0(layer.input_norm_0(h_btd), cos, sin, mask_bts, kv0, start_b)
    h_btd = h_btd + a0
    n0 = layer.post_attn_norm_0(h_btd)
    moe_btd, n_experts = moe_apply(layer.moe, n0, moe_impl)
    h_btd = h_btd + layer.mlp_0(n0)
    a1, kv1 = layer.attn_1(layer.input_norm_1(h_btd), cos, sin, mask_bts, kv1, start_b)
    h_btd = h_btd + a1
    h_btd = h_btd + layer.mlp_1(layer.post_attn_norm_1(h_btd))
    return h_btd + moe_btd, kv0, kv1, n_experts


def forward(graphs: DecodeGraphs, w: DecodeWeights, tokens_bt, cache: DecodeCache, start_b, *, prefill: bool,
            moe_impl: str):
    """New tokens at cache indices start_b[b] + t. Returns (hidden [B,T,D] after the final norm, cache with the
    new latents written, distinct FFN experts per layer [L])."""
    cfg = graphs.cfg
    B, T = tokens_bt.shape
    pos_bt, mask_bts = positions_and_mask(start_b, T, cache.length)
    cos, sin = rope_cos_sin(cfg, pos_bt, cfg.jnp_dtype)
    h_btd = jnp.take(w.embed, tokens_bt, axis=0).astype(cfg.jnp_dtype)
    gd = graphs.prefill_layer if prefill else graphs.decode_layer
    new, n_experts = [], []
    for i, st in enumerate(w.layers):
        layer = nnx.merge(gd, st)
        h_btd, kv0, kv1, n_e = layer_forward(layer, h_btd, cos, sin, mask_bts, cache.layers[2 * i],
                                             cache.layers[2 * i + 1], start_b, moe_impl)
        new += [kv0, kv1]
        n_experts.append(n_e)
    hidden = rms_norm(h_btd, w.norm, cfg.rms_norm_eps)
    return hidden, DecodeCache(tuple(new), cache.mtp), jnp.stack(n_experts)


def logits(w: DecodeWeights, hidden_btd):
    return jnp.einsum("btd,dv->btv", hidden_btd, w.lm_head.astype(hidden_btd.dtype),
                      preferred_element_type=jnp.float32)


def mtp_forward(graphs: DecodeGraphs, w: DecodeWeights, hidden_btd, next_tokens_bt, cache: DecodeCache, start_b,
                *, prefill: bool):
    """MTP pairs (hidden at index start+t, token start+t+1) -> logits for token start+t+2; writes the MTP slot."""
    cfg = graphs.cfg
    B, T, _ = hidden_btd.shape
    pos_bt, mask_bts = positions_and_mask(start_b, T, cache.length)
    cos, sin = rope_cos_sin(cfg, pos_bt, hidden_btd.dtype)
    mtp = nnx.merge(graphs.prefill_mtp if prefill else graphs.decode_mtp, w.mtp)
    z_btd, kv = mtp(hidden_btd, next_tokens_bt, cos, sin, mask_bts, cache.mtp, start_b)
    return logits(w, z_btd), DecodeCache(cache.layers, kv)
