"""Architecture descriptions for the performance model: LongCat-Flash from any lcflash config, plus two baselines.

A `ModelSpec` holds only what decode cost depends on: widths, layer structure, attention type, MoE shape, MTP
head. Parameter counts are derived here from the fields (reference §6 formulas), not from lcflash.params.
"""

from __future__ import annotations

import dataclasses

from lcflash.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class MLASpec:
    """Multi-head latent attention. q_lora_rank = 0 means an uncompressed query projection."""

    heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def cache_values_per_token(self) -> int:
        """Latent c plus the shared rotary key: what one sublayer caches per token (reference §8.1)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def params(self, hidden: int) -> int:
        """Projection weights plus the two latent norms (reference §6: 90,572,800 for LongCat-Flash)."""
        h, dn, dr, dv, rq, rkv = (self.heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim,
                                  self.q_lora_rank, self.kv_lora_rank)
        q = hidden * rq + rq + rq * h * (dn + dr) if rq else hidden * h * (dn + dr)
        return q + hidden * (rkv + dr) + rkv + rkv * h * (dn + dv) + h * dv * hidden


@dataclasses.dataclass(frozen=True)
class GQASpec:
    """Grouped-query attention with per-head q/k RMSNorm weights when qk_norm."""

    heads: int
    kv_heads: int
    head_dim: int
    qk_norm: bool = False

    @property
    def cache_values_per_token(self) -> int:
        return 2 * self.kv_heads * self.head_dim

    def params(self, hidden: int) -> int:
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        return hidden * (h + 2 * kv) * d + h * d * hidden + (2 * d if self.qk_norm else 0)


@dataclasses.dataclass(frozen=True)
class MoESpec:
    """Routed SwiGLU experts, optional zero-computation experts and shared experts.

    ffn_experts_per_token is K_e: the FFN experts a token reaches on average. It equals topk without zero experts;
    LongCat-Flash's bias controller steers it to target_ffn_experts (~8 of 12, reference §6-§7.1).
    """

    n_routed: int
    expert_inner: int
    topk: int
    ffn_experts_per_token: float
    n_zero: int = 0
    n_shared: int = 0
    shared_inner: int = 0
    router_bias: bool = False

    @property
    def router_width(self) -> int:
        return self.n_routed + self.n_zero


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One decoder stack.

    layer_kind "scmoe": each layer is 2 attention sublayers + 2 dense SwiGLUs + 1 shortcut MoE (LongCat-Flash).
    layer_kind "standard": each layer is 1 attention + 1 FFN, the FFN dense for the first `first_dense_layers`
    layers and MoE after that. mtp_kind: None, "dense" (attention + dense FFN) or "moe" (a full MoE layer).
    """

    name: str
    hidden: int
    vocab: int
    num_layers: int
    layer_kind: str
    attention: MLASpec | GQASpec
    moe: MoESpec
    dense_inner: int = 0
    first_dense_layers: int = 0
    mtp_kind: str | None = None
    mtp_own_embedding: bool = False
    tied_embeddings: bool = False
    source: str = ""

    def __post_init__(self):
        if self.layer_kind not in ("scmoe", "standard"):
            raise ValueError(f"{self.name}: layer_kind = {self.layer_kind!r}; valid: 'scmoe', 'standard'")
        if self.mtp_kind not in (None, "dense", "moe"):
            raise ValueError(f"{self.name}: mtp_kind = {self.mtp_kind!r}; valid: None, 'dense', 'moe'")
        if not 0 <= self.first_dense_layers <= self.num_layers:
            raise ValueError(f"{self.name}: first_dense_layers = {self.first_dense_layers} not in [0, num_layers]")

    @property
    def attention_sublayers(self) -> int:
        """Attention blocks (each with its own KV cache) in the main stack."""
        return self.num_layers * (2 if self.layer_kind == "scmoe" else 1)

    @property
    def moe_layers(self) -> int:
        return self.num_layers - self.first_dense_layers

    def expert_params(self) -> int:
        return 3 * self.hidden * self.moe.expert_inner

    def shared_params(self) -> int:
        return 3 * self.hidden * self.moe.shared_inner * self.moe.n_shared

    def dense_ffn_params(self) -> int:
        return 3 * self.hidden * self.dense_inner

    def router_params(self) -> int:
        return self.moe.router_width * (self.hidden + (1 if self.moe.router_bias else 0))

    def param_counts(self) -> dict:
        """Main-stack parameters by group (MTP excluded), counting norms; bias buffers as in reference §6."""
        d = self.hidden
        emb = self.vocab * d
        attn = self.attention.params(d)
        norms_per_layer = (4 if self.layer_kind == "scmoe" else 2) * d
        if self.layer_kind == "scmoe":
            non_expert = 2 * attn + 2 * self.dense_ffn_params() + self.router_params() + norms_per_layer
            dense_layers_total = 0
        else:
            non_expert = attn + self.router_params() + self.shared_params() + norms_per_layer
            dense_layers_total = self.first_dense_layers * (attn + self.dense_ffn_params() + norms_per_layer)
        experts = self.moe.n_routed * self.expert_params()
        total = (emb * (1 if self.tied_embeddings else 2) + d + dense_layers_total
                 + self.moe_layers * (non_expert + experts))
        return dict(embedding=emb, lm_head=0 if self.tied_embeddings else emb, attention=attn,
                    moe_layer_non_expert=non_expert, expert=self.expert_params(),
                    moe_layer_experts=experts, total=total)

    def activated_params(self, ffn_experts: float | None = None) -> float:
        """Activated per token, counting lm_head and not the embedding table (reference §6 convention)."""
        k = self.moe.ffn_experts_per_token if ffn_experts is None else ffn_experts
        c = self.param_counts()
        d = self.hidden
        dense_layers = 0 if self.layer_kind == "scmoe" else self.first_dense_layers * (
            self.attention.params(d) + self.dense_ffn_params() + 2 * d)
        return (self.moe_layers * (c["moe_layer_non_expert"] + k * self.expert_params()) + dense_layers
                + d + c["lm_head"] + (c["embedding"] if self.tied_embeddings else 0))


def from_lcflash(cfg: ModelConfig, name: str = "LongCat-Flash") -> ModelSpec:
    """Any lcflash ModelConfig (configs/longcat_flash.py, configs/small.py, ...) as a ScMoE ModelSpec."""
    return ModelSpec(
        name=name, hidden=cfg.hidden_size, vocab=cfg.vocab_size, num_layers=cfg.num_layers, layer_kind="scmoe",
        attention=MLASpec(heads=cfg.num_attention_heads, q_lora_rank=cfg.q_lora_rank,
                          kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
                          qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim),
        moe=MoESpec(n_routed=cfg.n_routed_experts, expert_inner=cfg.expert_ffn_hidden_size, topk=cfg.moe_topk,
                    ffn_experts_per_token=float(cfg.target_ffn_experts), n_zero=cfg.zero_expert_num,
                    router_bias=True),
        dense_inner=cfg.ffn_hidden_size, mtp_kind="dense" if cfg.num_mtp_layers else None,
        mtp_own_embedding=True, source="lcflash ModelConfig (reference §2, §4)")


def deepseek_v3() -> ModelSpec:
    """DeepSeek-V3 (671B total, 37B activated).

    Source: deepseek-ai/DeepSeek-V3 `config.json` on the Hugging Face hub: hidden_size 7168, num_hidden_layers 61,
    first_k_dense_replace 3, intermediate_size 18432 (dense layers), moe_intermediate_size 2048, n_routed_experts
    256, n_shared_experts 1, num_experts_per_tok 8, num_attention_heads 128, q_lora_rank 1536, kv_lora_rank 512,
    qk_nope_head_dim 128, qk_rope_head_dim 64, v_head_dim 128, vocab_size 129280, num_nextn_predict_layers 1,
    tie_word_embeddings false. The MTP module (DeepSeek-V3 report §2.2) is one full transformer block with an MoE
    FFN plus eh_proj, sharing embedding and output head with the main model.
    """
    return ModelSpec(
        name="DeepSeek-V3", hidden=7168, vocab=129280, num_layers=61, layer_kind="standard",
        attention=MLASpec(heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                          qk_rope_head_dim=64, v_head_dim=128),
        moe=MoESpec(n_routed=256, expert_inner=2048, topk=8, ffn_experts_per_token=8.0, n_shared=1,
                    shared_inner=2048, router_bias=True),
        dense_inner=18432, first_dense_layers=3, mtp_kind="moe", mtp_own_embedding=False,
        source="deepseek-ai/DeepSeek-V3 config.json")


def qwen3_235b_a22b() -> ModelSpec:
    """Qwen3-235B-A22B (235B total, 22B activated).

    Source: Qwen/Qwen3-235B-A22B `config.json` on the Hugging Face hub: hidden_size 4096, num_hidden_layers 94,
    num_attention_heads 64, num_key_value_heads 4, head_dim 128 (q/k RMSNorm), num_experts 128,
    num_experts_per_tok 8, moe_intermediate_size 1536, no shared expert, every layer MoE (decoder_sparse_step 1,
    mlp_only_layers []), vocab_size 151936, tie_word_embeddings false. Qwen3 releases no MTP head; mtp_kind "moe"
    describes the hypothetical DeepSeek-style MTP block (one MoE layer + eh_proj) the report's analysis needs if
    it gives every model the same ~80% acceptance. Turn it off with `mtp=False` in the workload.
    """
    return ModelSpec(
        name="Qwen3-235B-A22B", hidden=4096, vocab=151936, num_layers=94, layer_kind="standard",
        attention=GQASpec(heads=64, kv_heads=4, head_dim=128, qk_norm=True),
        moe=MoESpec(n_routed=128, expert_inner=1536, topk=8, ffn_experts_per_token=8.0),
        mtp_kind="moe", mtp_own_embedding=False, source="Qwen/Qwen3-235B-A22B config.json")


BASELINES = {"deepseek-v3": deepseek_v3, "qwen3-235b-a22b": qwen3_235b_a22b}
