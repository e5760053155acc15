"""Per-component time of one decode step on one GPU: max(bytes / bandwidth, FLOPs / peak) per component.

Deployment shape (the report's and the BLOG's): attention is data-parallel (each GPU holds its own sequences and
their latent/KV cache, and a full copy of the attention weights), routed experts are spread over `ep` GPUs and
reached by all-to-all dispatch/combine, dense FFNs are replicated or tensor-parallel over `tp` GPUs of a node.
Every component is costed for one micro-batch of `seqs` sequences; the schedule decides what overlaps.

Load balance is assumed perfect (every GPU receives tokens x K_e expert slots per step), and communication is
assumed not to slow concurrent compute (DeepEP's low-latency kernels receive without SMs).
"""

from __future__ import annotations

import dataclasses

from lcflash.perfmodel.hardware import Cluster, Efficiency
from lcflash.perfmodel.models import GQASpec, MLASpec, ModelSpec

DTYPE_BYTES = {"fp8": 1, "bf16": 2, "fp32": 4}
# Dispatch payload: fp8 values plus one fp32 scale per 128 channels (DeepEP low-latency FP8 dispatch).
FP8_SCALE_BLOCK = 128


class WorkloadError(ValueError):
    """A workload value is impossible; the message names the field and what would be valid."""


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one decode step processes per GPU, and in which number formats.

    mtp: one MTP draft token per sequence, so the target verifies 2 tokens per sequence per step and emits
    1 + mtp_acceptance tokens on average (reference §8.4). weight_dtype is the storage of every linear layer but
    the router (fp32) and the LM head (head_dtype); GEMMs run in fp8 for fp8 weights, else in the activation type.
    """

    batch_per_gpu: float
    context: int
    ep: int = 1
    tp: int = 1
    mtp: bool = True
    mtp_acceptance: float = 0.8
    weight_dtype: str = "fp8"
    head_dtype: str = "bf16"
    kv_dtype: str = "bf16"
    act_dtype: str = "bf16"
    dispatch_dtype: str = "fp8"
    mla_absorb: bool = True

    def __post_init__(self):
        def bad(field, allowed):
            raise WorkloadError(f"workload.{field} = {getattr(self, field)!r} is invalid: {allowed}")

        if not (isinstance(self.batch_per_gpu, (int, float)) and self.batch_per_gpu > 0):
            bad("batch_per_gpu", "must be > 0 sequences per GPU")
        if not (isinstance(self.context, int) and self.context >= 0):
            bad("context", "must be an integer >= 0 (cached tokens per sequence)")
        for f in ("ep", "tp"):
            v = getattr(self, f)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                bad(f, "must be a positive integer")
        if not 0.0 <= self.mtp_acceptance <= 1.0:
            bad("mtp_acceptance", "must be in [0, 1]")
        for f in ("weight_dtype", "head_dtype", "kv_dtype"):
            if getattr(self, f) not in DTYPE_BYTES:
                bad(f, f"must be one of {tuple(DTYPE_BYTES)}")
        if self.act_dtype not in ("bf16", "fp32"):
            bad("act_dtype", "must be 'bf16' or 'fp32'")
        if self.dispatch_dtype not in ("fp8", "bf16"):
            bad("dispatch_dtype", "must be 'fp8' or 'bf16'")

    @property
    def tokens_per_seq(self) -> int:
        return 2 if self.mtp else 1

    @property
    def expected_tokens(self) -> float:
        """Output tokens per sequence per step: speculative decoding divides the step time by this."""
        return 1.0 + self.mtp_acceptance if self.mtp else 1.0

    @property
    def act_bytes(self) -> int:
        return DTYPE_BYTES[self.act_dtype]

    @property
    def act_flop_dtype(self) -> str:
        return "bf16" if self.act_dtype == "bf16" else "tf32"

    @property
    def gemm_flop_dtype(self) -> str:
        return "fp8" if self.weight_dtype == "fp8" else self.act_flop_dtype

    @property
    def head_flop_dtype(self) -> str:
        return "bf16" if self.head_dtype in ("bf16", "fp8") else self.act_flop_dtype


@dataclasses.dataclass(frozen=True)
class Component:
    """One costed operation. resource: 'compute' (HBM + tensor cores), 'rdma' or 'nvlink'."""

    name: str
    resource: str
    seconds: float
    bytes: float
    flops: float
    bound: str


def compute_component(name, cluster: Cluster, eff: Efficiency, *, nbytes, flops, dtype, attention=False):
    t_mem = nbytes / (cluster.hbm_bw * eff.hbm)
    t_flop = flops / (cluster.peak(dtype) * (eff.attention if attention else eff.gemm))
    bound = "memory" if t_mem >= t_flop else "compute"
    return Component(name, "compute", max(t_mem, t_flop) + eff.op_overhead, nbytes, flops, bound)


def link_component(name, cluster: Cluster, eff: Efficiency, *, nbytes, link):
    bw, lat = (cluster.rdma_bw, cluster.rdma_latency) if link == "rdma" else (cluster.nvlink_bw,
                                                                                cluster.nvlink_latency)
    seconds = nbytes / (bw * eff.network) + lat if nbytes > 0 else 0.0
    return Component(name, link, seconds, nbytes, 0.0, "network")


def gemm_component(name, cluster, eff, wl: Workload, *, tokens, params, act_values, weight_dtype=None,
                   flop_dtype=None):
    """A group of matmuls over `tokens` rows: weights once, `act_values` activation values in/out per token."""
    wb = DTYPE_BYTES[weight_dtype or wl.weight_dtype]
    return compute_component(name, cluster, eff, nbytes=params * wb + tokens * act_values * wl.act_bytes,
                             flops=2.0 * tokens * params, dtype=flop_dtype or wl.gemm_flop_dtype)


def attention_components(prefix, spec: ModelSpec, cluster, eff, wl: Workload, tokens, seqs):
    """attn_in (projections into the cache/latent space), attn_core (over the cache), attn_out (back to D)."""
    d, a, ab, kvb = spec.hidden, spec.attention, wl.act_bytes, DTYPE_BYTES[wl.kv_dtype]
    ctx = wl.context
    if isinstance(a, MLASpec):
        h, dn, dr, dv, rq, rkv = (a.heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.q_lora_rank,
                                  a.kv_lora_rank)
        q_params = d * rq + rq * h * (dn + dr) if rq else d * h * (dn + dr)
        cache_vals = rkv + dr
        if wl.mla_absorb:
            # Reference §8.2: W_UK moves the query into latent space, W_UV maps the latent output back.
            in_params = q_params + d * cache_vals + h * dn * rkv
            out_params = h * rkv * dv + h * dv * d
            core_bytes = seqs * ctx * cache_vals * kvb + tokens * h * (cache_vals + rkv) * ab
            core_flops = 2.0 * tokens * ctx * h * (cache_vals + rkv)
            in_act, out_act = d + h * cache_vals, h * rkv + d
        else:
            # Plain MLA decode: expand the cached latent to per-head K/V for the whole context every step.
            in_params = q_params + d * cache_vals
            out_params = h * dv * d
            kvb_params = rkv * h * (dn + dv)
            core_bytes = (seqs * ctx * cache_vals * kvb + kvb_params * DTYPE_BYTES[wl.weight_dtype]
                          + 2 * seqs * ctx * h * (dn + dv) * ab + tokens * h * (dn + dr + dv) * ab)
            core_flops = 2.0 * seqs * ctx * rkv * h * (dn + dv) + 2.0 * tokens * ctx * h * (dn + dr + dv)
            in_act, out_act = d + h * (dn + dr) + cache_vals, h * dv + d
        cache_write = tokens * cache_vals * kvb
    elif isinstance(a, GQASpec):
        h, kv, hd = a.heads, a.kv_heads, a.head_dim
        in_params, out_params = d * (h + 2 * kv) * hd, h * hd * d
        core_bytes = seqs * ctx * 2 * kv * hd * kvb + 2 * tokens * h * hd * ab
        core_flops = 2.0 * tokens * ctx * h * hd * 2
        in_act, out_act = d + (h + 2 * kv) * hd, h * hd + d
        cache_write = tokens * 2 * kv * hd * kvb
    else:
        raise TypeError(f"unknown attention spec {type(a).__name__}")
    attn_in = gemm_component(f"{prefix}attn_in", cluster, eff, wl, tokens=tokens, params=in_params,
                             act_values=in_act)
    attn_in = dataclasses.replace(attn_in, seconds=attn_in.seconds + cache_write / (cluster.hbm_bw * eff.hbm),
                                  bytes=attn_in.bytes + cache_write)
    core = compute_component(f"{prefix}attn_core", cluster, eff, nbytes=core_bytes, flops=core_flops,
                             dtype=wl.act_flop_dtype, attention=True)
    attn_out = gemm_component(f"{prefix}attn_out", cluster, eff, wl, tokens=tokens, params=out_params,
                              act_values=out_act)
    return {c.name: c for c in (attn_in, core, attn_out)}


def dense_ffn_components(prefix, spec: ModelSpec, cluster, eff, wl: Workload, tokens, inner):
    """SwiGLU of width `inner`; with tp > 1 it runs on the node group's tokens with 1/tp of the weights."""
    d, tp = spec.hidden, wl.tp
    out = {}
    ffn = gemm_component(f"{prefix}dense_ffn", cluster, eff, wl, tokens=tokens * tp, params=3 * d * inner / tp,
                         act_values=2 * d + 3 * inner / tp)
    out[ffn.name] = ffn
    if tp > 1:
        moved = (tp - 1) * tokens * d * wl.act_bytes
        for name in ("dense_ffn_allgather", "dense_ffn_reducescatter"):
            out[prefix + name] = link_component(prefix + name, cluster, eff, nbytes=moved, link="nvlink")
    return out


def expected_touched_experts(n_routed: int, ffn_per_token: float, tokens_per_gpu: float, ep: int) -> float:
    """Expected distinct experts one GPU must read: its local experts times P(some token of the step picks one).

    With uniform routing a token picks a given expert with probability K_e / N; replicas (ep > N) split an
    expert's tokens evenly.
    """
    local = max(n_routed / ep, 1.0)
    replicas = max(ep / n_routed, 1.0)
    p_token = min(ffn_per_token / (n_routed * replicas), 1.0)
    return local * (1.0 - (1.0 - p_token) ** (tokens_per_gpu * ep))


def moe_components(prefix, spec: ModelSpec, cluster, eff, wl: Workload, tokens):
    """Router, dispatch, routed-expert GEMMs, combine and shared experts for `tokens` tokens on one GPU.

    Zero-computation experts cost nothing here: their identity term is added locally and their slots are masked
    out of dispatch (reference §3.6), so traffic and GEMMs scale with K_e, not with top-k.
    """
    m, d, ab = spec.moe, spec.hidden, wl.act_bytes
    out = {}
    router = gemm_component(f"{prefix}router", cluster, eff, wl, tokens=tokens, params=m.router_width * d,
                            act_values=d + 2 * m.router_width, weight_dtype="fp32", flop_dtype="tf32")
    out[router.name] = router
    pairs = tokens * m.ffn_experts_per_token
    touched = expected_touched_experts(m.n_routed, m.ffn_experts_per_token, tokens, wl.ep)
    p = spec.expert_params()
    experts = compute_component(
        f"{prefix}experts", cluster, eff,
        nbytes=touched * p * DTYPE_BYTES[wl.weight_dtype] + pairs * (2 * d + 3 * m.expert_inner) * ab,
        flops=2.0 * pairs * p, dtype=wl.gemm_flop_dtype)
    out[experts.name] = experts
    if m.n_shared:
        sp = spec.shared_params()
        out[f"{prefix}shared_expert"] = gemm_component(
            f"{prefix}shared_expert", cluster, eff, wl, tokens=tokens, params=sp,
            act_values=2 * d + 3 * m.shared_inner * m.n_shared)
    if wl.ep > 1:
        link = "rdma" if wl.ep > cluster.gpus_per_node else "nvlink"
        per_value = 1 + 4 / FP8_SCALE_BLOCK if wl.dispatch_dtype == "fp8" else 2
        out[f"{prefix}dispatch"] = link_component(f"{prefix}dispatch", cluster, eff,
                                                  nbytes=pairs * d * per_value, link=link)
        out[f"{prefix}combine"] = link_component(f"{prefix}combine", cluster, eff, nbytes=pairs * d * 2,
                                                 link=link)
    return out


def lm_head_component(name, spec: ModelSpec, cluster, eff, wl: Workload, tokens):
    return gemm_component(name, cluster, eff, wl, tokens=tokens, params=spec.vocab * spec.hidden,
                          act_values=spec.hidden + spec.vocab, weight_dtype=wl.head_dtype,
                          flop_dtype=wl.head_flop_dtype)


def step_components(spec: ModelSpec, cluster: Cluster, eff: Efficiency, wl: Workload, seqs: float) -> dict:
    """Every component of one decode step for a micro-batch of `seqs` sequences, keyed by name.

    Main stack: attn_*, dense_ffn*, router, dispatch, experts, combine, shared_expert, lm_head (over all verified
    tokens). MTP draft ("mtp." prefix): eh_proj, its attention and FFN/MoE over the verified tokens (SGLang's
    draft-extend after verification), and a draft LM head over one position per sequence.
    """
    if wl.tp > cluster.gpus_per_node:
        raise WorkloadError(f"workload.tp = {wl.tp} exceeds gpus_per_node = {cluster.gpus_per_node} "
                            f"(dense TP stays inside a node)")
    if wl.mtp and spec.mtp_kind is None:
        raise WorkloadError(f"{spec.name} has no MTP head (num_mtp_layers = 0); run without MTP (--no-mtp)")
    tokens = seqs * wl.tokens_per_seq
    comps = {}
    comps.update(attention_components("", spec, cluster, eff, wl, tokens, seqs))
    if spec.layer_kind == "scmoe" or spec.first_dense_layers:
        comps.update(dense_ffn_components("", spec, cluster, eff, wl, tokens, spec.dense_inner))
    if spec.moe_layers:
        comps.update(moe_components("", spec, cluster, eff, wl, tokens))
    comps["lm_head"] = lm_head_component("lm_head", spec, cluster, eff, wl, tokens)
    if wl.mtp:
        d = spec.hidden
        comps["mtp.eh_proj"] = gemm_component("mtp.eh_proj", cluster, eff, wl, tokens=tokens, params=2 * d * d,
                                              act_values=3 * d)
        comps.update(attention_components("mtp.", spec, cluster, eff, wl, tokens, seqs))
        if spec.mtp_kind == "dense":
            comps.update(dense_ffn_components("mtp.", spec, cluster, eff, wl, tokens, spec.dense_inner))
        else:
            comps.update(moe_components("mtp.", spec, cluster, eff, wl, tokens))
        comps["mtp.lm_head"] = lm_head_component("mtp.lm_head", spec, cluster, eff, wl, seqs)
    return comps


def memory_per_gpu(spec: ModelSpec, wl: Workload) -> dict:
    """Bytes resident on one GPU: replicated weights, its share of the experts, and its sequences' caches."""
    wb, d = DTYPE_BYTES[wl.weight_dtype], spec.hidden
    mtp = 1 if wl.mtp else 0
    attn_blocks = spec.attention_sublayers + mtp
    attn = attn_blocks * spec.attention.params(d) * wb
    dense_blocks = (2 * spec.num_layers if spec.layer_kind == "scmoe" else spec.first_dense_layers)
    dense_blocks += mtp if spec.mtp_kind == "dense" else 0
    dense = dense_blocks * spec.dense_ffn_params() / wl.tp * wb
    moe_blocks = spec.moe_layers + (mtp if spec.mtp_kind == "moe" else 0)
    local = max(spec.moe.n_routed / wl.ep, 1.0)
    experts = moe_blocks * (local * spec.expert_params() + spec.shared_params()) * wb
    routers = moe_blocks * spec.router_params() * 4
    n_tables = (1 if spec.tied_embeddings else 2) + (mtp if spec.mtp_own_embedding else 0)
    tables = n_tables * spec.vocab * d * DTYPE_BYTES[wl.head_dtype] + mtp * 2 * d * d * wb
    kv = wl.batch_per_gpu * wl.context * spec.attention.cache_values_per_token * DTYPE_BYTES[wl.kv_dtype]
    kv *= attn_blocks
    weights = attn + dense + experts + routers + tables
    return dict(weights=weights, kv_cache=kv, total=weights + kv)

