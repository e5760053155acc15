"""One forward over new tokens with the decode cache: the model's layers, unrolled, in a decode weight layout.

A decode step runs one token per row, so every projection is a matrix-vector product. XLA's GPU simplifier
rewrites a dot whose activation is a vector into multiply + reduce over the contracting axis; with the model's
[K, N] weights that is a strided column reduction (often with the [K, N] product materialised). `split_weights`
therefore stores each layer's weights once, transposed so that the contraction axis is the last (contiguous)
one ([N, K]: a row reduction, measured faster at batch 1 and equal at batch 8, experiments/bench_decode_ops.json),
and concatenates the projections that read the same input into one matvec:

* attention: q_a and kv_a (both read the normed hidden state) -> `w_qkv_a` [q_lora + kv_lora + rope, D];
  W_UK and W_UV (absorbed attention) as [H, R, nope] and [H, v, R]; w_q_b as [H, qk_head, q_lora]; w_o [D, H, v].
  Where they are no larger (`absorbed_products_pay`: configs/small.py, not LongCat-Flash), also the products
  W_UK . w_q_b and w_o . W_UV, which absorbed decode reads instead: two matvecs fewer per sublayer on a step's
  critical path. They are derived arrays beside the one copy of the model's weights (prefill uses the originals).
* dense FFN: gate and up -> `w_gate_up` [2F, D]; down [D, F]. Where a mesh splits F, [2, F, D] instead: each shard
  then holds the gate and up rows of its slice (a split of [2F, D]'s rows puts all of gate on one half of the
  shards), so neither SwiGLU nor the prefill's slices back exchange anything. One device keeps [2F, D]: the same
  bytes, and 0.91-0.96 against 0.98-1.00 ms per token at batch 1 on an H100 (experiments/HISTORY.md, session 67).
* MoE: router [N + Z, D] (fp32); experts gate/up [E, I, D], down [E, D, I] (each slot's matvecs reduce over the
  contiguous axis of the gathered expert). The experts' gate and up stay two arrays under the model's names
  (experiments/bench_decode.py counts expert bytes by them). LM head [V, D]; the MTP head likewise.

The decode math is written as small pure functions on that layout (`mla_attention`, `swiglu_t`, `moe_apply`,
`decode_layer`, `mtp_decode`), in the model's order, dtypes and casts (lcflash/model/*), except that a norm
feeding a matvec is applied after it (`Normed`), which moves one rounding. Prefill (many tokens: a
GEMM, where [K, N] is fine) runs the model's own modules: `DecodeGraphs.layer_module` transposes the weights back
inside the prefill's jit and merges them into the DecoderLayer graph (expanded attention), so only one copy of the
layers is kept. The MoE impl is chosen by `moe_impl`:

* "model": the model's own MoE (sort by expert + grouped matmul, or expert-parallel); used for prefill.
* "gather": each (token, slot) reads only its expert's weights; a decode step with few tokens then reads the
  experts it touches, not all of them.
* "dense": every expert over every token, weighted by the routing; reads each expert once (large batches).
* "grouped": the model's dropless path on the decode layout: slots sorted by expert, then grouped matmuls
  (`moe.gmm_impl`) that read each chosen expert once and nothing for zero-expert slots; our kernels read the
  [E, I, D] experts as stored (`gmm_nt`), so the model's [E, D, I] copy is never made.
* "auto": "gather" while tokens * top_k < n_routed_experts, else "dense"; "grouped" instead of either where
  `moe.gmm_impl` resolves to our kernels (a Hopper GPU, bf16) and the experts are wide (GROUPED_MIN_EXPERT_BYTES,
  stored in the compute dtype: "grouped" casts whole expert arrays) or the tokens many (tokens * top_k >=
  n_routed_experts). On an H100 (experiments/HISTORY.md, session 62) it was 8% faster than the gather at
  LongCat-Flash's width at batch 1 and 2.1x faster at configs/small.py's batch 64 (level with the dense MoE), but
  19-26% slower at configs/small.py's batch 1, whose MoE branch, off the step's critical path with the gather,
  gains kernels for the sort and the dispatch.

Attention (decode) follows `ModelConfig.attn_impl`: "absorbed" (XLA), "pallas" (the Mosaic GPU kernel, which
swaps only the attention core, lcflash.kernels.mla_decode) or "expanded".
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lcflash.config import ModelConfig
from lcflash.infer.cache import DecodeCache
from lcflash.infer.split import NO_SPLIT, MeshSplit
from lcflash.kernels.gmm import api as gmm_api
from lcflash.kernels.mla_decode import mla_decode
from lcflash.model.mla import LatentKV, expanded_attention
from lcflash.model.norm import apply_rms_scale, rms_norm, rms_scales
from lcflash.model.rope import apply_rope, rope_cos_sin, softmax_scale
from lcflash.model.router import Routing, select_experts, zero_expert_output
from lcflash.model.slots import combine_rows, dispatch_rows, sort_slots

MOE_IMPLS = ("model", "gather", "dense", "grouped", "auto")
F32 = jnp.float32


# ----------------------------------------------------------------------------------------------- layout
class AttnWeights(NamedTuple):
    """One MLA sublayer, contraction axis last. The last two are the absorbed products (`absorb_products`),
    present only where they are no larger than the two matrices they replace in a decode step."""

    w_qkv_a: jax.Array      # [q_lora + kv_lora + rope, D]: w_q_a and w_kv_a, one matvec
    q_a_norm: jax.Array     # [q_lora]
    kv_a_norm: jax.Array    # [kv_lora]
    w_q_b: jax.Array        # [H, qk_head, q_lora]
    w_uk: jax.Array         # [H, kv_lora, qk_nope]: w_kv_b's key half
    w_uv: jax.Array         # [H, v_head, kv_lora]: w_kv_b's value half
    w_o: jax.Array          # [D, H, v_head]
    w_q_lat: jax.Array | None = None   # [H, kv_lora + rope, q_lora]: W_UK . w_q_b's nope half, then its rope half
    w_o_lat: jax.Array | None = None   # [D, H, kv_lora]: w_o . W_UV


class MLPWeights(NamedTuple):
    w_gate_up: jax.Array    # [2F, D], or [2, F, D] where a mesh splits F: gate rows then up rows, one matvec
    w_down: jax.Array       # [D, F]


class MoEWeights(NamedTuple):
    w_router: jax.Array     # [N + Z, D] fp32
    bias: jax.Array         # [N + Z] fp32
    w_gate: jax.Array       # [N, I, D]
    w_up: jax.Array         # [N, I, D]
    w_down: jax.Array       # [N, D, I]


class LayerWeights(NamedTuple):
    input_norm_0: jax.Array
    attn_0: AttnWeights
    post_attn_norm_0: jax.Array
    mlp_0: MLPWeights
    input_norm_1: jax.Array
    attn_1: AttnWeights
    post_attn_norm_1: jax.Array
    mlp_1: MLPWeights
    moe: MoEWeights


class MTPWeights(NamedTuple):
    embed: jax.Array        # [V, D]
    enorm: jax.Array
    hnorm: jax.Array
    w_eh: jax.Array         # [D, 2D]
    input_norm: jax.Array
    attn: AttnWeights
    post_attn_norm: jax.Array
    mlp: MLPWeights
    norm: jax.Array


class DecodeWeights(NamedTuple):
    embed: jax.Array          # [V, D]
    norm: jax.Array           # [D] final norm weight
    lm_head: jax.Array        # [V, D] (the model's [D, V], transposed)
    layers: tuple             # L LayerWeights
    mtp: MTPWeights | None


def _t(x, *perm):
    return jnp.transpose(x, perm)


def absorbed_products_pay(cfg: ModelConfig) -> tuple[bool, bool]:
    """(merge the query side, merge the output side): whether W_UK . w_q_b_nope [H, R, Q] and w_o . W_UV [D, H, R]
    are no larger than the pair each replaces, so a decode step reads fewer bytes in one matvec fewer.
    configs/small.py (R = nope = v = 128): both. LongCat-Flash (R = 512 > 128): neither (4x the bytes)."""
    H, R, Q, D = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.q_lora_rank, cfg.hidden_size
    nope, v = cfg.qk_nope_head_dim, cfg.v_head_dim
    return H * R * Q <= H * nope * Q + H * R * nope, D * H * R <= H * v * R + D * H * v


def absorb_products(cfg: ModelConfig, p: AttnWeights) -> AttnWeights:
    """Adds the absorbed products that pay (`absorbed_products_pay`), computed in fp32 and stored in the weights'
    dtype: the same linear maps as the two matvecs in turn, with one rounding of the product instead of one of
    the intermediate vector."""
    merge_q, merge_o = absorbed_products_pay(cfg)
    nope, hi = cfg.qk_nope_head_dim, jax.lax.Precision.HIGHEST
    dtype = p.w_q_b.dtype
    w_q_lat = w_o_lat = None
    if merge_q:
        w_q_b = p.w_q_b.astype(F32)
        lat = jnp.einsum("hrk,hkq->hrq", p.w_uk.astype(F32), w_q_b[:, :nope], precision=hi)
        w_q_lat = jnp.concatenate([lat, w_q_b[:, nope:]], axis=1).astype(dtype)
    if merge_o:
        w_o_lat = jnp.einsum("dhv,hvr->dhr", p.w_o.astype(F32), p.w_uv.astype(F32), precision=hi).astype(dtype)
    return p._replace(w_q_lat=w_q_lat, w_o_lat=w_o_lat)


def read_by_decode(p: AttnWeights) -> AttnWeights:
    """`p` without the arrays an absorbed decode step does not read (those its merged products replace); for
    counting the bytes a step reads."""
    if p.w_q_lat is not None:
        p = p._replace(w_q_b=None, w_uk=None)
    if p.w_o_lat is not None:
        p = p._replace(w_uv=None, w_o=None)
    return p


def without_absorbed_products(w: DecodeWeights) -> DecodeWeights:
    """`w` with absorbed attention through W_UK and W_UV in turn everywhere (for A/B runs and tests)."""
    strip = lambda a: a._replace(w_q_lat=None, w_o_lat=None)   # noqa: E731
    layers = tuple(p._replace(attn_0=strip(p.attn_0), attn_1=strip(p.attn_1)) for p in w.layers)
    return w._replace(layers=layers, mtp=None if w.mtp is None else w.mtp._replace(attn=strip(w.mtp.attn)))


def attn_to_decode(cfg: ModelConfig, a: dict) -> AttnWeights:
    """MLA's pure-dict state (model layout) -> AttnWeights."""
    nope = cfg.qk_nope_head_dim
    w_kv_b = a["w_kv_b"]                                                # [R, H, nope + v]
    p = AttnWeights(jnp.concatenate([a["w_q_a"].T, a["w_kv_a"].T], axis=0), a["q_a_norm"]["weight"],
                    a["kv_a_norm"]["weight"], _t(a["w_q_b"], 1, 2, 0), _t(w_kv_b[..., :nope], 1, 0, 2),
                    _t(w_kv_b[..., nope:], 1, 2, 0), _t(a["w_o"], 2, 0, 1))
    return absorb_products(cfg, p)


def kv_b_model(p: AttnWeights):
    """w_kv_b [R, H, nope + v] (model layout) from the two decode halves."""
    return jnp.concatenate([_t(p.w_uk, 1, 0, 2), _t(p.w_uv, 2, 0, 1)], axis=-1)


def attn_to_model(cfg: ModelConfig, p: AttnWeights) -> dict:
    Q = cfg.q_lora_rank
    return {"w_q_a": p.w_qkv_a[:Q].T, "w_kv_a": p.w_qkv_a[Q:].T, "q_a_norm": {"weight": p.q_a_norm},
            "kv_a_norm": {"weight": p.kv_a_norm}, "w_q_b": _t(p.w_q_b, 2, 0, 1), "w_kv_b": kv_b_model(p),
            "w_o": _t(p.w_o, 1, 2, 0)}


def splits_ffn_width(w_df) -> bool:
    """Whether a mesh splits this dense FFN weight's F axis (its last): the decode layout then stacks gate and up."""
    sharding = getattr(w_df, "sharding", None)
    return sharding is not None and sharding.shard_shape(w_df.shape)[-1] < w_df.shape[-1]


def mlp_to_decode(m: dict, split_ffn: bool = False) -> MLPWeights:
    gate_up = (jnp.stack if split_ffn else jnp.concatenate)([m["w_gate"].T, m["w_up"].T])
    return MLPWeights(gate_up, m["w_down"].T)


def mlp_to_model(p: MLPWeights) -> dict:
    F = p.w_down.shape[1]
    gate, up = p.w_gate_up if p.w_gate_up.ndim == 3 else (p.w_gate_up[:F], p.w_gate_up[F:])
    return {"w_gate": gate.T, "w_up": up.T, "w_down": p.w_down.T}


def layer_to_decode(cfg: ModelConfig, s: dict, split_ffn: bool = False) -> LayerWeights:
    """One DecoderLayer's pure-dict state (nnx.to_pure_dict) -> LayerWeights."""
    m = s["moe"]
    return LayerWeights(
        s["input_norm_0"]["weight"], attn_to_decode(cfg, s["attn_0"]), s["post_attn_norm_0"]["weight"],
        mlp_to_decode(s["mlp_0"], split_ffn), s["input_norm_1"]["weight"], attn_to_decode(cfg, s["attn_1"]),
        s["post_attn_norm_1"]["weight"], mlp_to_decode(s["mlp_1"], split_ffn),
        MoEWeights(m["w_router"].T, m["bias"], _t(m["w_gate"], 0, 2, 1), _t(m["w_up"], 0, 2, 1),
                   _t(m["w_down"], 0, 2, 1)))


def layer_to_model(cfg: ModelConfig, p: LayerWeights) -> dict:
    m = p.moe
    return {"input_norm_0": {"weight": p.input_norm_0}, "attn_0": attn_to_model(cfg, p.attn_0),
            "post_attn_norm_0": {"weight": p.post_attn_norm_0}, "mlp_0": mlp_to_model(p.mlp_0),
            "input_norm_1": {"weight": p.input_norm_1}, "attn_1": attn_to_model(cfg, p.attn_1),
            "post_attn_norm_1": {"weight": p.post_attn_norm_1}, "mlp_1": mlp_to_model(p.mlp_1),
            "moe": {"w_router": m.w_router.T, "bias": m.bias, "w_gate": _t(m.w_gate, 0, 2, 1),
                    "w_up": _t(m.w_up, 0, 2, 1), "w_down": _t(m.w_down, 0, 2, 1)}}


def mtp_to_decode(cfg: ModelConfig, s: dict, split_ffn: bool = False) -> MTPWeights:
    return MTPWeights(s["embed"], s["enorm"]["weight"], s["hnorm"]["weight"], s["w_eh"].T,
                      s["input_norm"]["weight"], attn_to_decode(cfg, s["attn"]), s["post_attn_norm"]["weight"],
                      mlp_to_decode(s["mlp"], split_ffn), s["norm"]["weight"])


def mtp_to_model(cfg: ModelConfig, p: MTPWeights) -> dict:
    return {"embed": p.embed, "enorm": {"weight": p.enorm}, "hnorm": {"weight": p.hnorm}, "w_eh": p.w_eh.T,
            "input_norm": {"weight": p.input_norm}, "attn": attn_to_model(cfg, p.attn),
            "post_attn_norm": {"weight": p.post_attn_norm}, "mlp": mlp_to_model(p.mlp),
            "norm": {"weight": p.norm}}


@functools.partial(jax.jit, static_argnums=(0, 3))
def _take_layer(cfg: ModelConfig, stacked: dict, i, split_ffn: bool) -> LayerWeights:
    return layer_to_decode(cfg, jax.tree.map(lambda x: x[i], stacked), split_ffn)


_take_mtp = jax.jit(mtp_to_decode, static_argnums=(0, 2))


def split_weights(model) -> DecodeWeights:
    """The model's variables in the decode layout, the layer stack split into L LayerWeights (one copy of the
    layers; the embedding and final norm are the model's own arrays)."""
    cfg = model.cfg
    stacked = nnx.to_pure_dict(nnx.state(model.layers))
    split_ffn = splits_ffn_width(stacked["mlp_0"]["w_gate"])
    layers = tuple(_take_layer(cfg, stacked, jnp.int32(i), split_ffn) for i in range(cfg.num_layers))
    mtp = None
    if model.mtp is not None:
        pure = nnx.to_pure_dict(nnx.state(model.mtp))   # its embedding table stays the model's array
        mtp = _take_mtp(cfg, {**pure, "embed": None}, split_ffn)._replace(embed=pure["embed"])
    return DecodeWeights(model.embed[...], model.norm.weight[...], jnp.transpose(model.lm_head[...]), layers, mtp)


# ----------------------------------------------------------------------------------------------- graphs
def _value_path(path) -> tuple:
    """A state leaf's key path as names, without the Variable's trailing `value` attribute."""
    names = tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)
    return names[:-1] if names and names[-1] == "value" else names


@dataclasses.dataclass(frozen=True, eq=False)
class StateLayout:
    """Rebuilds an nnx.State (Variable types and metadata included) from a pure dict of arrays."""

    treedef: object
    paths: tuple

    @classmethod
    def of(cls, state) -> StateLayout:
        flat, treedef = jax.tree_util.tree_flatten_with_path(state)
        return cls(treedef, tuple(_value_path(p) for p, _ in flat))

    def build(self, pure: dict):
        def lookup(path):
            node = pure
            for k in path:
                node = node[k]
            return node

        return jax.tree.unflatten(self.treedef, [lookup(p) for p in self.paths])


@dataclasses.dataclass(frozen=True, eq=False)
class DecodeGraphs:
    cfg: ModelConfig          # attn_impl: the decode attention
    prefill_layer: object     # DecoderLayer graphdef, attn_impl="expanded"
    prefill_mtp: object       # MTPHead graphdef or None
    layer_state: StateLayout
    mtp_state: StateLayout | None

    def layer_module(self, p: LayerWeights):
        """The model's DecoderLayer (expanded attention) over `p`, transposed back inside the caller's jit: XLA
        folds the transposes of the dense weights into their GEMMs; the experts' become one transient copy per
        layer where the model's grouped matmul reads them (moe_impl "model")."""
        return nnx.merge(self.prefill_layer, self.layer_state.build(layer_to_model(self.cfg, p)))

    def mtp_module(self, p: MTPWeights):
        return nnx.merge(self.prefill_mtp, self.mtp_state.build(mtp_to_model(self.cfg, p)))


def _graphs(cfg: ModelConfig, attn_impl: str):
    from lcflash.model import LongcatFlash

    abstract = nnx.eval_shape(lambda: LongcatFlash(cfg.replace(attn_impl="expanded"), nnx.Rngs(0)))
    has_mtp = abstract.mtp is not None
    return DecodeGraphs(cfg.replace(attn_impl=attn_impl), nnx.graphdef(abstract.layers),
                        nnx.graphdef(abstract.mtp) if has_mtp else None, StateLayout.of(nnx.state(abstract.layers)),
                        StateLayout.of(nnx.state(abstract.mtp)) if has_mtp else None)


class DecodeModel:
    """Weights and graphs for cached forwards; build once per model (splitting the layers copies them)."""

    def __init__(self, model, attn_impl: str = "absorbed", weights: DecodeWeights | None = None):
        self.cfg = model.cfg
        self.graphs = _graphs(model.cfg, attn_impl)
        self.weights = split_weights(model) if weights is None else weights
        self.has_mtp = model.mtp is not None


# ----------------------------------------------------------------------------------------------- norms
class Normed(NamedTuple):
    """rms_norm(x, w) kept as x * w and the row scale 1 / rms(x) (fp32, [..., 1]): a linear map of it (`matvec`)
    runs on x * w and is scaled after, so the norm's reduction runs beside the matvec instead of ahead of it on a
    decode step's critical path. The same map, with x * w rounded once instead of the normed x and then its
    product with w."""

    xw: jax.Array
    r: jax.Array

    @property
    def dtype(self):
        return self.xw.dtype


# False: every norm applied before its matvec, as the model does (read while tracing; for A/B runs).
DEFER_NORMS = True


def scaled_norm(x, w, r):
    """rms_norm(x, w) given r = 1 / rms(x) (`rms_scales`): Normed, or applied where DEFER_NORMS is off."""
    return Normed(x * w.astype(x.dtype), r) if DEFER_NORMS else apply_rms_scale(x, w, r)


def deferred_norm(x, w, eps: float):
    if not DEFER_NORMS:
        return rms_norm(x, w, eps)
    return scaled_norm(x, w, rms_scales(x, (x.shape[-1],), eps)[0])


def matvec(spec: str, x, w, scale: float = 1.0):
    """einsum(spec, x, w) in x's dtype with fp32 accumulation; `scale` and a Normed x's row scale are applied to
    the fp32 product. The output's leading axes are x's (all but its last)."""
    if not isinstance(x, Normed):
        y = jnp.einsum(spec, x, w.astype(x.dtype))
        return y if scale == 1.0 else y * scale
    y = jnp.einsum(spec, x.xw, w.astype(x.dtype), preferred_element_type=F32)
    r = x.r.reshape(x.r.shape[:-1] + (1,) * (y.ndim - x.r.ndim + 1))
    return (y * (r * scale)).astype(x.dtype)


# ----------------------------------------------------------------------------------------------- attention
def mla_latents(cfg: ModelConfig, p: AttnWeights, x_btd, cos_btd, sin_btd, absorbed: bool = False):
    """lcflash/model/mla.py's MLA.latents (x_btd normed, or Normed): queries (nope, roped) and this token's latent
    KV. The q_a norm is deferred past the query matvec (`Normed`). absorbed: the nope query mapped into the latent
    space (q_lat [B, T, H, R]) in its place, by the merged product where it is stored (`w_q_lat`: one matvec for
    both query parts)."""
    Q, R, nope = cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_head_dim
    a_btn = matvec("btd,nd->btn", x_btd, p.w_qkv_a)
    r_q, r_c = rms_scales(a_btn, (Q, R), cfg.mla_norm_eps)
    cq = scaled_norm(a_btn[..., :Q], p.q_a_norm, r_q)
    c_btr = apply_rms_scale(a_btn[..., Q:Q + R], p.kv_a_norm, r_c) * cfg.alpha_kv
    kpe_btd = apply_rope(a_btn[..., None, Q + R:], cos_btd, sin_btd)[..., 0, :]
    kv = LatentKV(c_btr, kpe_btd)
    if absorbed and p.w_q_lat is not None:
        q_bthn = matvec("btq,hnq->bthn", cq, p.w_q_lat, cfg.alpha_q)
        return q_bthn[..., :R], apply_rope(q_bthn[..., R:], cos_btd, sin_btd), kv
    q_bthk = matvec("btr,hkr->bthk", cq, p.w_q_b, cfg.alpha_q)
    q_pe = apply_rope(q_bthk[..., nope:], cos_btd, sin_btd)
    if absorbed:
        return matvec("bthk,hrk->bthr", q_bthk[..., :nope], p.w_uk), q_pe, kv
    return q_bthk[..., :nope], q_pe, kv


def mla_attention(cfg: ModelConfig, p: AttnWeights, x_btd, cos, sin, mask_bts, cache: LatentKV, start_b,
                  split: MeshSplit = NO_SPLIT):
    """MLA with the cache (model's MLA.__call__): writes the new latents at start_b, attends with
    `cfg.attn_impl` (the Pallas kernel per shard of `split`'s mesh). Returns (output [B, T, D], cache)."""
    dtype = x_btd.dtype
    absorbed = cfg.attn_impl != "expanded"
    q, q_pe, kv = mla_latents(cfg, p, x_btd, cos, sin, absorbed)
    kv = split.write_latents(cache, kv, start_b)
    scale = softmax_scale(cfg)
    if not absorbed:
        o_bthv = expanded_attention(q, q_pe, kv, kv_b_model(p), mask_bts, scale, cfg.qk_nope_head_dim)
        return jnp.einsum("bthv,dhv->btd", o_bthv, p.w_o.astype(dtype)), kv
    # weight absorption (model's absorbed_attention, with W_UK / W_UV stored per head or merged)
    if cfg.attn_impl == "pallas":
        def kernel(q, q_pe, c, kpe, start):
            return mla_decode(q, q_pe, c, kpe, scale=scale, q_start_b=start, impl="pallas")
        o_lat_bthr = split.attention(kernel, q, q_pe, kv.c_bsr, kv.kpe_bsd, start_b)
    else:
        o_lat_bthr = mla_decode(q, q_pe, kv.c_bsr, kv.kpe_bsd, scale=scale, mask_bts=mask_bts, q_start_b=start_b)
    o_lat_bthr = o_lat_bthr.astype(dtype)
    if p.w_o_lat is not None:
        return jnp.einsum("bthr,dhr->btd", o_lat_bthr, p.w_o_lat.astype(dtype)), kv
    o_bthv = jnp.einsum("bthr,hvr->bthv", o_lat_bthr, p.w_uv.astype(dtype))
    return jnp.einsum("bthv,dhv->btd", o_bthv, p.w_o.astype(dtype)), kv


def swiglu_t(p: MLPWeights, x_btd):
    """lcflash/model/mlp.py's swiglu with gate and up in one matvec (x_btd normed, or Normed)."""
    dtype = x_btd.dtype
    if p.w_gate_up.ndim == 3:   # [2, F, D] (splits_ffn_width)
        gu = matvec("...d,gfd->...gf", x_btd, p.w_gate_up)
        g, u = gu[..., 0, :], gu[..., 1, :]
    else:
        F = p.w_down.shape[1]
        gu = matvec("...d,fd->...f", x_btd, p.w_gate_up)
        g, u = gu[..., :F], gu[..., F:]
    return jnp.einsum("...f,df->...d", jax.nn.silu(g) * u, p.w_down.astype(dtype))


# ----------------------------------------------------------------------------------------------- MoE
def route_t(cfg: ModelConfig, p: MoEWeights, x_td) -> Routing:
    """The model's router (fp32, highest precision) on the [N + Z, D] router weight. Not `route(x, w.T, ...)`:
    XLA (CPU, checked) then copies the transposed weight before the dot, every step."""
    logits_te = jnp.einsum("td,ed->te", x_td.astype(F32), p.w_router.astype(F32),
                           precision=jax.lax.Precision.HIGHEST)
    return select_experts(logits_te, p.bias, cfg.moe_topk, cfg.routed_scaling_factor)


def distinct_experts(experts_ltk, n_ffn: int):
    """FFN experts chosen by any slot, per layer [L]: one compare-reduce fusion for all layers of a step (no
    scatter, and not one small kernel per layer)."""
    L = experts_ltk.shape[0]
    ids_n = jnp.arange(n_ffn, dtype=experts_ltk.dtype)
    hit_ln = jnp.any(experts_ltk.reshape(L, -1, 1) == ids_n[None, None, :], axis=1)
    return jnp.sum(hit_ln.astype(jnp.int32), axis=1)


# How the gather MoE's matvecs are written (read while tracing):
# "reduce": multiply + reduce over the gathered weights, which XLA fuses with the gather, so each slot's expert is
#   read in place. As einsums, XLA wrote the gathered experts out first and then ran a GEMM on them: at
#   LongCat-Flash's width 12 x 75 MB written and read again per layer, 2.5 of a 4.5 ms batch-1 step on an H100
#   (experiments/HISTORY.md, session 60).
# "reduce_slots_inner": the same with the slots as the output's innermost axis, so that a zero-expert slot's read of
#   the expert another slot reads (`experts_gather`) comes right after it and may hit L2.
# "einsum": the einsums (the A/B baseline).
GATHER_FORMS = ("reduce", "reduce_slots_inner", "einsum")
GATHER_FORM = "reduce"


def _slot_matvec(spec: str, a, w_tknc):
    """[T, K, N] fp32: each token's row of `a` ([T, C], or [T, K, C] per slot) against each slot's gathered [N, C]
    expert, contracting the contiguous C; `spec` is the einsum."""
    if GATHER_FORM not in GATHER_FORMS:
        raise ValueError(f"decode.GATHER_FORM = {GATHER_FORM!r}; valid: {GATHER_FORMS}")
    if GATHER_FORM == "einsum":
        return jnp.einsum(spec, a, w_tknc, preferred_element_type=F32)
    a_tk1c = (a[:, None, None, :] if a.ndim == 2 else a[:, :, None, :]).astype(F32)
    if GATHER_FORM == "reduce":
        return jnp.sum(a_tk1c * w_tknc.astype(F32), axis=-1)
    prod_tnkc = jnp.swapaxes(a_tk1c, 1, 2) * jnp.swapaxes(w_tknc, 1, 2).astype(F32)
    return jnp.swapaxes(jnp.sum(prod_tnkc, axis=-1), 1, 2)


def experts_gather(x_td, routing: Routing, w_gate_nid, w_up_nid, w_down_ndi):
    """FFN-expert output [T, D] fp32 reading only the chosen experts' weights: each (token, slot) contracts over
    the contiguous last axis of its gathered expert. Weights in the compute dtype (as the model's MoE casts
    them), products accumulated in fp32."""
    n_ffn = w_gate_nid.shape[0]
    dtype = x_td.dtype
    e_tk = routing.experts_tk
    is_ffn = e_tk < n_ffn
    # Zero-expert slots are discarded; point them at an expert the token reads anyway (its first or second slot's,
    # else expert 0), so their reads hit the cache. Elementwise: no argmax kernel per layer.
    fallback_t1 = jnp.zeros_like(e_tk[:, :1])
    for j in reversed(range(min(2, e_tk.shape[1]))):
        fallback_t1 = jnp.where(is_ffn[:, j:j + 1], e_tk[:, j:j + 1], fallback_t1)
    idx_tk = jnp.where(is_ffn, e_tk, fallback_t1)
    g_tki = _slot_matvec("td,tkid->tki", x_td, w_gate_nid[idx_tk].astype(dtype))
    u_tki = _slot_matvec("td,tkid->tki", x_td, w_up_nid[idx_tk].astype(dtype))
    h_tki = (jax.nn.silu(g_tki) * u_tki).astype(dtype)
    y_tkd = _slot_matvec("tki,tkdi->tkd", h_tki, w_down_ndi[idx_tk].astype(dtype))
    w_tk = jnp.where(is_ffn, routing.weights_tk, 0.0)
    return jnp.sum(y_tkd * w_tk[..., None], axis=1)


def experts_dense(x_td, routing: Routing, w_gate_nid, w_up_nid, w_down_ndi):
    """FFN-expert output [T, D] fp32 running every expert on every token (each expert's weights read once)."""
    n_ffn = w_gate_nid.shape[0]
    T, K = routing.experts_tk.shape
    dtype = x_td.dtype
    is_ffn = routing.experts_tk < n_ffn
    w_te = jnp.zeros((T, n_ffn), F32).at[
        jnp.repeat(jnp.arange(T), K), jnp.where(is_ffn, routing.experts_tk, 0).reshape(-1)
    ].add(jnp.where(is_ffn, routing.weights_tk, 0.0).reshape(-1))
    g = jnp.einsum("td,eid->tei", x_td, w_gate_nid.astype(dtype), preferred_element_type=F32)
    u = jnp.einsum("td,eid->tei", x_td, w_up_nid.astype(dtype), preferred_element_type=F32)
    h_tei = (jax.nn.silu(g) * u).astype(dtype)
    y_ted = jnp.einsum("tei,edi->ted", h_tei, w_down_ndi.astype(dtype), preferred_element_type=F32)
    return jnp.einsum("ted,te->td", y_ted.astype(dtype).astype(F32), w_te)


def runs_our_kernels(gmm_impl: str, n_ffn: int, d: int, i: int, dtype) -> bool:
    """Whether `gmm_impl` resolves to our kernels for [n_ffn, D, I] experts in `dtype` (which read no row past the
    groups, so the row gathers may leave those unwritten)."""
    return gmm_api.reads_groups_only(gmm_impl, jax.ShapeDtypeStruct((1, d), dtype),
                                     jax.ShapeDtypeStruct((n_ffn, d, i), dtype))


# "auto" takes the grouped MoE at any batch for experts of at least this many bytes (gate, up and down). At batch 1
# on an H100 (experiments/HISTORY.md, session 63; D = 1024) it was 0-9% slower than the gather at 2.4, 9.4 and 18.9
# MB and level at 37.7 MB; at LongCat-Flash's 75.5 MB it was 8% faster (session 62).
GROUPED_MIN_EXPERT_BYTES = 64 << 20


def auto_moe_impl(cfg: ModelConfig, tokens: int, dtype, stored_dtype=None) -> str:
    """The MoE form decode's "auto" runs for `tokens` tokens in `dtype` on experts stored in `stored_dtype` (default
    `dtype`; see the module docstring). Wide experts take "grouped" at few tokens only if stored in `dtype`: it casts
    whole expert arrays, which the gather's per-slot cast never does (fp32 trainer weights, bf16 decode)."""
    D, I, N = cfg.hidden_size, cfg.expert_ffn_hidden_size, cfg.n_routed_experts
    many = tokens * cfg.moe_topk >= N
    wide = (3 * D * I * jnp.dtype(dtype).itemsize >= GROUPED_MIN_EXPERT_BYTES
            and jnp.dtype(stored_dtype or dtype) == jnp.dtype(dtype))
    if (wide or many) and runs_our_kernels(cfg.gmm_impl, N, D, I, dtype):
        return "grouped"
    return "dense" if many else "gather"


def experts_grouped(x_td, routing: Routing, w_gate_nid, w_up_nid, w_down_ndi, gmm_impl: str):
    """FFN-expert output [T, D] fp32 as the model's dropless MoE computes it (slots sorted by expert, grouped
    matmuls, weighted sum over each token's slots), on the decode layout's contraction-last experts."""
    (n_ffn, i, d), dtype = w_gate_nid.shape, x_td.dtype
    slots = sort_slots(routing.experts_tk, n_ffn)
    tail_unread = runs_our_kernels(gmm_impl, n_ffn, d, i, dtype)
    x_md = dispatch_rows(x_td, slots, tail_unread)
    h_mi = gmm_api.gmm_nt_swiglu(x_md, w_gate_nid.astype(dtype), w_up_nid.astype(dtype), slots.group_sizes_g,
                                 impl=gmm_impl, zero_tail=not tail_unread)
    y_md = gmm_api.gmm_nt(h_mi, w_down_ndi.astype(dtype), slots.group_sizes_g, impl=gmm_impl, zero_tail=False)
    return combine_rows(y_md, jnp.where(slots.ffn_tk, routing.weights_tk, 0.0), slots, dtype, tail_unread)


def moe_apply(cfg: ModelConfig, p: MoEWeights, x_btd, impl: str, model_moe: Callable | None = None):
    """(MoE output [B, T, D], chosen expert ids [B * T, top_k]). impl "model" calls `model_moe()` for the model's
    MoE module (the weights in its own layout); the others run on the decode layout `p`."""
    if impl not in MOE_IMPLS:
        raise ValueError(f"moe_impl {impl!r} is not one of {MOE_IMPLS}")
    B, T, D = x_btd.shape
    if impl == "model":
        y, stats = model_moe()(x_btd)
        return y, stats["experts_btk"].reshape(B * T, -1)
    if impl == "auto":
        impl = auto_moe_impl(cfg, B * T, x_btd.dtype, p.w_gate.dtype)
    x_td = x_btd.reshape(B * T, D)
    routing = route_t(cfg, p, x_td)
    fn = {"gather": experts_gather, "dense": experts_dense,
          "grouped": functools.partial(experts_grouped, gmm_impl=cfg.gmm_impl)}[impl]
    y_td = zero_expert_output(x_td, routing, cfg.n_routed_experts) + fn(x_td, routing, p.w_gate, p.w_up, p.w_down)
    return y_td.astype(x_btd.dtype).reshape(B, T, D), routing.experts_tk


# ----------------------------------------------------------------------------------------------- forward
def positions_and_mask(start_b, q_len: int, cache_len: int):
    pos_bt = start_b[:, None] + jnp.arange(q_len, dtype=jnp.int32)[None, :]
    return pos_bt, jnp.arange(cache_len, dtype=jnp.int32)[None, None, :] <= pos_bt[:, :, None]


def decode_layer(cfg: ModelConfig, p: LayerWeights, h_btd, cos, sin, mask_bts, kv0: LatentKV, kv1: LatentKV,
                 start_b, moe_impl: str, model_moe: Callable | None = None, split: MeshSplit = NO_SPLIT):
    """lcflash/model/layer.py's DecoderLayer on the decode layout. Named scopes label each sublayer's kernels in
    profiles and critical paths (experiments/decode_profile.py). `split`: the rows' mesh split (the MoE sees
    every row)."""
    eps = cfg.rms_norm_eps
    with jax.named_scope("attn_0"):
        a0, kv0 = mla_attention(cfg, p.attn_0, deferred_norm(h_btd, p.input_norm_0, eps), cos, sin, mask_bts, kv0,
                                start_b, split)
        h_btd = h_btd + a0
    with jax.named_scope("mlp_0"):
        n0 = deferred_norm(h_btd, p.post_attn_norm_0, eps)
    with jax.named_scope("moe"):
        # The MoE branch (off the critical path: its output joins at the end) reads the norm's output as the model
        # has it, from the same reduction.
        x0 = apply_rms_scale(h_btd, p.post_attn_norm_0, n0.r) if isinstance(n0, Normed) else n0
        moe_btd, experts_tk = moe_apply(cfg, p.moe, split.whole(x0), moe_impl, model_moe)
        moe_btd = split.by_rows(moe_btd)
    with jax.named_scope("mlp_0"):
        h_btd = h_btd + swiglu_t(p.mlp_0, n0)
    with jax.named_scope("attn_1"):
        a1, kv1 = mla_attention(cfg, p.attn_1, deferred_norm(h_btd, p.input_norm_1, eps), cos, sin, mask_bts, kv1,
                                start_b, split)
        h_btd = h_btd + a1
    with jax.named_scope("mlp_1"):
        h_btd = h_btd + swiglu_t(p.mlp_1, deferred_norm(h_btd, p.post_attn_norm_1, eps))
    return h_btd + moe_btd, kv0, kv1, experts_tk


def layer_forward(layer, h_btd, cos, sin, mask_bts, kv0: LatentKV, kv1: LatentKV, start_b, moe: Callable,
                  split: MeshSplit = NO_SPLIT):
    """lcflash/model/layer.py's DecoderLayer (the module), with the MoE call swapped for `moe(n0)` and the cache
    writes run per row shard of `split`. Named scopes as decode_layer's."""
    with jax.named_scope("attn_0"):
        a0, kv0 = layer.attn_0(layer.input_norm_0(h_btd), cos, sin, mask_bts, kv0, start_b, write=split.write_latents)
    h_btd = h_btd + a0
    n0 = layer.post_attn_norm_0(h_btd)
    moe_btd, experts_tk = moe(n0)
    h_btd = h_btd + layer.mlp_0(n0)
    with jax.named_scope("attn_1"):
        a1, kv1 = layer.attn_1(layer.input_norm_1(h_btd), cos, sin, mask_bts, kv1, start_b, write=split.write_latents)
    h_btd = h_btd + a1
    h_btd = h_btd + layer.mlp_1(layer.post_attn_norm_1(h_btd))
    return h_btd + moe_btd, kv0, kv1, experts_tk


def forward(graphs: DecodeGraphs, w: DecodeWeights, tokens_bt, cache: DecodeCache, start_b, *, prefill: bool,
            moe_impl: str, split: MeshSplit = NO_SPLIT):
    """New tokens at cache indices start_b[b] + t. prefill: the model's modules (expanded attention); else the
    decode layout. Returns (hidden [B,T,D] after the final norm, cache with the new latents written, distinct FFN
    experts per layer [L]). split: the rows' mesh split (lcflash/infer/split.py)."""
    cfg = graphs.cfg
    B, T = tokens_bt.shape
    cache = split.by_rows(cache)
    pos_bt, mask_bts = positions_and_mask(start_b, T, cache.length)
    cos, sin = rope_cos_sin(cfg, pos_bt, cfg.jnp_dtype)
    with jax.named_scope("embed"):
        h_btd = split.by_rows(jnp.take(w.embed, tokens_bt, axis=0).astype(cfg.jnp_dtype))
    new, experts = [], []
    for i, p in enumerate(w.layers):
        kv0, kv1 = cache.layers[2 * i], cache.layers[2 * i + 1]
        if prefill:
            layer = graphs.layer_module(p)
            def moe(x, p=p, layer=layer):
                y, e_tk = moe_apply(cfg, p.moe, split.whole(x), moe_impl, lambda: layer.moe)
                return split.by_rows(y), e_tk
            h_btd, kv0, kv1, e_tk = layer_forward(layer, h_btd, cos, sin, mask_bts, kv0, kv1, start_b, moe, split)
        else:
            h_btd, kv0, kv1, e_tk = decode_layer(cfg, p, h_btd, cos, sin, mask_bts, kv0, kv1, start_b, moe_impl,
                                                 lambda p=p: graphs.layer_module(p).moe, split)
        new += [kv0, kv1]
        experts.append(e_tk)
    hidden = rms_norm(h_btd, w.norm, cfg.rms_norm_eps)
    return hidden, DecodeCache(tuple(new), cache.mtp), distinct_experts(jnp.stack(experts), cfg.n_routed_experts)


def logits(w: DecodeWeights, hidden_btd):
    with jax.named_scope("lm_head"):
        return jnp.einsum("btd,vd->btv", hidden_btd, w.lm_head.astype(hidden_btd.dtype),
                          preferred_element_type=F32)


def mtp_decode(cfg: ModelConfig, p: MTPWeights, h_btd, next_tokens_bt, cos, sin, mask_bts, cache: LatentKV,
               start_b, split: MeshSplit = NO_SPLIT):
    """lcflash/model/mtp.py's MTPHead on the decode layout: (normed hidden [B, T, D], latent KV)."""
    dtype, eps = h_btd.dtype, cfg.rms_norm_eps
    with jax.named_scope("mtp"):
        e_btd = jnp.take(p.embed, next_tokens_bt, axis=0).astype(dtype)
        z = jnp.concatenate([rms_norm(e_btd, p.enorm, eps), rms_norm(h_btd, p.hnorm, eps)], axis=-1)
        z = jnp.einsum("btc,dc->btd", z, p.w_eh.astype(dtype))
        a, kv = mla_attention(cfg, p.attn, deferred_norm(z, p.input_norm, eps), cos, sin, mask_bts, cache, start_b,
                              split)
        z = z + a
        z = z + swiglu_t(p.mlp, deferred_norm(z, p.post_attn_norm, eps))
        return rms_norm(z, p.norm, eps), kv


def mtp_forward(graphs: DecodeGraphs, w: DecodeWeights, hidden_btd, next_tokens_bt, cache: DecodeCache, start_b,
                *, prefill: bool, split: MeshSplit = NO_SPLIT):
    """MTP pairs (hidden at index start+t, token start+t+1) -> logits for token start+t+2; writes the MTP slot."""
    cfg = graphs.cfg
    B, T, _ = hidden_btd.shape
    pos_bt, mask_bts = positions_and_mask(start_b, T, cache.length)
    cos, sin = rope_cos_sin(cfg, pos_bt, hidden_btd.dtype)
    if prefill:
        z_btd, kv = graphs.mtp_module(w.mtp)(hidden_btd, next_tokens_bt, cos, sin, mask_bts, cache.mtp, start_b,
                                             write=split.write_latents)
    else:
        z_btd, kv = mtp_decode(cfg, w.mtp, hidden_btd, next_tokens_bt, cos, sin, mask_bts, cache.mtp, start_b,
                               split)
    return logits(w, z_btd), DecodeCache(cache.layers, kv)
