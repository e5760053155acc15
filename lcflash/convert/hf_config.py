"""HF `config.json` <-> ModelConfig, for the release style (`rope_theta`, `rope_scaling`) and the
transformers-5 style (`rope_parameters`). Fields a file leaves out take the released model's values."""

from __future__ import annotations

import json
import os

from lcflash.config import ConfigError, ModelConfig, validate

# HF name -> ModelConfig field, where they are the same quantity.
_SAME = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
         "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "ffn_hidden_size", "expert_ffn_hidden_size",
         "n_routed_experts", "zero_expert_num", "moe_topk", "routed_scaling_factor", "mla_scale_q_lora",
         "mla_scale_kv_lora", "rms_norm_eps", "max_position_embeddings", "initializer_range", "bos_token_id",
         "eos_token_id")
_ALIASES = {"num_local_experts": "n_routed_experts", "num_experts_per_tok": "moe_topk",
            "intermediate_size": "ffn_hidden_size", "moe_intermediate_size": "expert_ffn_hidden_size"}
_YARN = {"factor": "rope_factor", "original_max_position_embeddings": "rope_original_max_position_embeddings",
         "beta_fast": "rope_beta_fast", "beta_slow": "rope_beta_slow", "mscale": "rope_mscale",
         "mscale_all_dim": "rope_mscale_all_dim", "attention_factor": "rope_attention_factor",
         "truncate": "rope_truncate"}
# Values the architecture requires; anything else in a config.json is a model lcflash does not implement.
_REQUIRED = {"hidden_act": "silu", "attention_bias": False, "router_bias": False, "tie_word_embeddings": False,
             "norm_topk_prob": False, "zero_expert_type": "identity"}


def read_config_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (a LongCat-Flash checkpoint directory needs config.json)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def from_hf_dict(d: dict, source: str = "config.json", **overrides) -> ModelConfig:
    mt = d.get("model_type")
    if mt != "longcat_flash":
        raise ConfigError(f"{source}: model_type is {mt!r}; lcflash loads only 'longcat_flash'")
    kw = {}
    for hf, ours in _ALIASES.items():
        if hf in d and ours not in d:
            kw[ours] = d[hf]
    for f in _SAME:
        if f in d and d[f] is not None:
            kw[f] = d[f]
    if isinstance(kw.get("eos_token_id"), list):
        kw["eos_token_id"] = kw["eos_token_id"][0]
    if "num_layers" not in d and "num_hidden_layers" in d:
        kw["num_layers"] = d["num_hidden_layers"] // 2
    for key, want in _REQUIRED.items():
        if key in d and d[key] is not None and d[key] != want:
            raise ConfigError(f"{source}: {key} = {d[key]!r} is not supported; LongCat-Flash uses {want!r}")
    rope_dim = kw.get("qk_rope_head_dim", ModelConfig.qk_rope_head_dim)
    if d.get("head_dim") not in (None, rope_dim):
        raise ConfigError(f"{source}: head_dim = {d['head_dim']} must equal qk_rope_head_dim = {rope_dim} "
                          "(transformers sizes the rotary table from head_dim)")
    nope = kw.get("qk_nope_head_dim", ModelConfig.qk_nope_head_dim)
    if d.get("qk_head_dim") not in (None, nope + rope_dim):
        raise ConfigError(f"{source}: qk_head_dim = {d['qk_head_dim']} must be qk_nope_head_dim + qk_rope_head_dim")
    heads = kw.get("num_attention_heads", ModelConfig.num_attention_heads)
    if d.get("num_key_value_heads") not in (None, heads):
        raise ConfigError(f"{source}: num_key_value_heads = {d['num_key_value_heads']} must equal num_attention_heads")
    rp = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(rp, dict):
        raise ConfigError(f"{source}: rope_parameters/rope_scaling must be an object, got {rp!r}")
    if any(isinstance(v, dict) for v in rp.values()):
        raise ConfigError(f"{source}: per-layer-type rope_parameters are not supported")
    theta = rp.get("rope_theta", d.get("rope_theta"))
    if theta is not None:
        kw["rope_theta"] = float(theta)
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    kw["rope_type"] = rope_type
    if rope_type == "yarn":
        if rp.get("factor") is None and rp.get("original_max_position_embeddings") is None:
            raise ConfigError(f"{source}: yarn rope needs 'factor' or 'original_max_position_embeddings'")
        for hf, ours in _YARN.items():
            if rp.get(hf) is not None:
                kw[ours] = rp[hf]
        if rp.get("factor") is None:
            kw["rope_factor"] = d.get("max_position_embeddings", ModelConfig.max_position_embeddings) / rp[
                "original_max_position_embeddings"]
    if "target_ffn_experts" not in overrides:
        # Not in config.json: keep the release's ratio (8 FFN experts of 12 slots), within the valid range.
        k = kw.get("moe_topk", ModelConfig.moe_topk)
        lo = max(0, k - kw.get("zero_expert_num", ModelConfig.zero_expert_num))
        hi = min(k, kw.get("n_routed_experts", ModelConfig.n_routed_experts))
        kw["target_ffn_experts"] = float(min(max(k * 2 / 3, lo), hi))
    kw.update(overrides)
    try:
        return validate(ModelConfig(**kw))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except TypeError as e:
        raise ConfigError(f"{source}: {e}") from None


def to_hf_dict(cfg: ModelConfig, dtype_name: str) -> dict:
    """Release-style config.json (rope_theta, rope_scaling for yarn) that transformers also reads."""
    d = {"architectures": ["LongcatFlashForCausalLM"], "model_type": "longcat_flash"}
    d.update({f: getattr(cfg, f) for f in _SAME})
    d.update(head_dim=cfg.qk_rope_head_dim, qk_head_dim=cfg.qk_head_dim, num_key_value_heads=cfg.num_attention_heads,
             hidden_act="silu", attention_bias=False, tie_word_embeddings=False, zero_expert_type="identity",
             rope_theta=cfg.rope_theta, torch_dtype=dtype_name, num_nextn_predict_layers=cfg.num_mtp_layers)
    if cfg.rope_type == "yarn":
        rs = {"rope_type": "yarn", "factor": cfg.rope_factor}
        for hf, ours in _YARN.items():
            if hf != "factor" and getattr(cfg, ours) is not None and not (hf == "truncate" and cfg.rope_truncate):
                rs[hf] = getattr(cfg, ours)
        d["rope_scaling"] = rs
    return d


def load_hf_config(directory: str, **overrides) -> ModelConfig:
    path = os.path.join(directory, "config.json")
    return from_hf_dict(read_config_json(path), path, **overrides)
