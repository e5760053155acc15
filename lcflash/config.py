"""Model configuration: a frozen, hashable dataclass built from an ml_collections config.

The dataclass is static under `jax.jit`; the ml_collections `ConfigDict` is what users edit and override
from the command line. Every field is validated once, before anything is traced or compiled, and errors
name the field and the allowed range.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax.numpy as jnp

ROPE_TYPES = ("default", "yarn")
GMM_IMPLS = ("ragged_dot", "reference", "pallas", "pallas_chain", "jax_mgpu", "tokamax", "auto")
# Attention form for calls that read a KV cache (see lcflash/model/mla.py); calls without a cache are expanded.
ATTN_IMPLS = ("expanded", "absorbed", "pallas")
TRAIN_ATTN_IMPLS = ("xla", "cudnn", "pallas", "auto", "dpa_xla", "tokamax")
REMAT_POLICIES = ("nothing", "kernels", "dots")
# Activations a rematerialised layer can keep besides what its policy keeps (ModelConfig.remat_keep): the names
# lcflash/model binds with checkpoint_name.
REMAT_KEEP_NAMES = ("swiglu", "dispatch", "queries", "norms", "routing")
ROUTER_GRAD_PRECISIONS = ("highest", "bf16_3x", "bf16_split")   # lcflash.model.router.ROUTER_GRAD_PRECISIONS
ROUTER_PRECISIONS = ("highest", "bf16_split")   # lcflash.model.router.ROUTER_PRECISIONS
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# ModelConfig fields an experiment config sets in its `moe` section (cfg.moe.<key>), not in cfg.model.
MOE_SECTION_FIELDS = {"gmm_impl": "gmm_impl", "overlap": "moe_overlap", "fuse_gate_up": "moe_fuse_gate_up"}


class ConfigError(ValueError):
    """A configuration value is impossible; the message names the field and what would be valid."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """LongCat-Flash architecture. Field names follow the HF `config.json` where one exists."""

    vocab_size: int = 131072
    hidden_size: int = 6144
    num_layers: int = 28
    num_attention_heads: int = 64
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    ffn_hidden_size: int = 12288
    expert_ffn_hidden_size: int = 2048
    n_routed_experts: int = 512
    zero_expert_num: int = 256
    moe_topk: int = 12
    routed_scaling_factor: float = 6.0
    # Target number of FFN experts per token that the bias controller steers towards (K_e).
    target_ffn_experts: float = 8.0
    mla_scale_q_lora: bool = True
    mla_scale_kv_lora: bool = True
    rms_norm_eps: float = 1e-5
    # HF builds the MLA latent norms with the RMSNorm default eps, not `rms_norm_eps`.
    mla_norm_eps: float = 1e-6
    max_position_embeddings: int = 131072
    rope_theta: float = 1.0e7
    rope_type: str = "default"
    # YaRN parameters (used only when rope_type == "yarn"); None means "as transformers defaults it".
    rope_factor: float = 1.0
    rope_original_max_position_embeddings: int | None = None
    rope_beta_fast: float | None = None
    rope_beta_slow: float | None = None
    rope_mscale: float | None = None
    rope_mscale_all_dim: float | None = None
    rope_attention_factor: float | None = None
    rope_truncate: bool = True
    initializer_range: float = 0.02
    bos_token_id: int = 1
    eos_token_id: int = 2
    num_mtp_layers: int = 1
    # Numerics and implementation switches.
    param_dtype: str = "float32"
    dtype: str = "bfloat16"
    # The experts' grouped matmul (lcflash/kernels/gmm/api.py): "auto" = our kernels on a Hopper GPU in bf16/fp16,
    # XLA's ragged_dot elsewhere (ragged_dot ran out of memory at configs/small.py's 4 x 1024 on an H100).
    gmm_impl: str = "auto"
    attn_impl: str = "expanded"
    # The cache-free (training / scoring) attention: "xla" materialises the scores; "cudnn" is cuDNN's fused flash
    # attention (GPU only); "pallas" is ours for causal and packed-document masks (lcflash/kernels/doc_attention;
    # Hopper, bf16/fp16, sequence a multiple of 64); "auto" picks pallas for packed documents on a Hopper GPU,
    # cudnn for other masks on a GPU, xla elsewhere; "dpa_xla" is jax.nn.dot_product_attention on XLA (the fused
    # path's q/k assembly and mask kinds, testable on any backend).
    train_attn_impl: str = "xla"
    remat: bool = False
    # What a rematerialised layer keeps for its backward pass (lcflash/model/common.py): "nothing" recomputes the
    # whole layer (least memory); "kernels" keeps the outputs of its fused kernels (grouped expert matmuls, flash
    # attention) and recomputes the rest, which is elementwise work and the dense matmuls; "dots" also keeps every
    # matmul output and the expert weights cast to the compute dtype, so only elementwise work is recomputed.
    remat_policy: str = "nothing"
    # Comma-separated activations kept on top of the policy (REMAT_KEEP_NAMES), memory for recomputation: "swiglu"
    # the SwiGLU outputs h the down projections' weight gradients read (dense FFNs; the experts' when XLA applies
    # SwiGLU), "dispatch" the MoE rows gathered in expert order that the experts' gate/up weight gradient reads,
    # "queries" the fused attention's [nope | roped] queries (train_attn_impl other than "xla"; under "dots" they
    # replace the saved q projection they are built from, so no memory is added), "norms" every RMSNorm's output
    # (the inputs of the projections whose weight gradients read them; otherwise recomputed from the residual stream),
    # "routing" the MoE's choices, integers: each token's top-k experts and the expert-sorted slot permutation
    # (~18 bytes per token and top-k slot; otherwise the backward runs the top-k and the sort again; the
    # single-device path only).
    remat_keep: str = ""
    # The router's forward product, which picks the experts: "highest" (fp32) or "bf16_split" (one bf16 tensor-core
    # product against the fp32 weights split in three bf16 parts; as exact as the fp32 product for bf16 activations,
    # so it needs dtype "bfloat16"; lcflash/model/router.py).
    router_precision: str = "highest"
    # The router's backward products: "highest" (fp32), "bf16_3x" (tensor cores, 3 bf16 passes) or "bf16_split"
    # (one bf16 product each from split operands: the weight gradient as exact as fp32, the bf16 input gradient to
    # ~16 bits; needs dtype "bfloat16").
    router_grad_precision: str = "highest"
    # Layers per iteration of the layer scan (jax.lax.scan's unroll): 1 keeps one compiled layer body; num_layers
    # unrolls the stack, which lets XLA drop the loop's per-layer slicing and stacking (a training-speed A/B).
    scan_unroll: int = 1
    # ScMoE overlap (cfg.moe.overlap): False runs the MoE branch to completion before dense FFN 0, the baseline
    # that measures what the overlap hides (lcflash/model/layer.py). Values are identical either way.
    moe_overlap: bool = True
    # cfg.moe.fuse_gate_up: the routed experts' gate and up projections as one grouped matmul against [gate | up]
    # (lcflash.model.moe.expert_ffn), SwiGLU in our kernel's epilogue. Same products; configs/small.py turns it on
    # (faster on an H200, experiments/HISTORY.md).
    moe_fuse_gate_up: bool = False

    # ------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_experts_total(self) -> int:
        """Router width: FFN experts followed by zero-computation experts."""
        return self.n_routed_experts + self.zero_expert_num

    @property
    def alpha_q(self) -> float:
        return math.sqrt(self.hidden_size / self.q_lora_rank) if self.mla_scale_q_lora else 1.0

    @property
    def alpha_kv(self) -> float:
        return math.sqrt(self.hidden_size / self.kv_lora_rank) if self.mla_scale_kv_lora else 1.0

    @property
    def jnp_param_dtype(self):
        return DTYPES[self.param_dtype]

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    def replace(self, **kw) -> "ModelConfig":
        return validate(dataclasses.replace(self, **kw))


def _require(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{key} = {value!r} is invalid: {allowed}")


def validate(cfg: ModelConfig, keys: dict[str, str] | None = None) -> ModelConfig:
    """Checks every field; returns cfg unchanged or raises ConfigError naming the field by its config key
    (`keys`: field -> key where it was set, e.g. "moe.overlap"; otherwise "model.<field>")."""
    keys = keys or {}

    def req(cond, field, value, allowed):
        _require(cond, keys.get(field, f"model.{field}"), value, allowed)

    positive = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "q_lora_rank",
                "kv_lora_rank", "qk_nope_head_dim", "v_head_dim", "ffn_hidden_size",
                "expert_ffn_hidden_size", "n_routed_experts", "moe_topk", "max_position_embeddings")
    for f in positive:
        v = getattr(cfg, f)
        req(isinstance(v, int) and not isinstance(v, bool) and v > 0, f, v, "must be a positive integer")
    req(isinstance(cfg.zero_expert_num, int) and cfg.zero_expert_num >= 0, "zero_expert_num",
        cfg.zero_expert_num, "must be an integer >= 0")
    req(isinstance(cfg.qk_rope_head_dim, int) and cfg.qk_rope_head_dim > 0 and cfg.qk_rope_head_dim % 2 == 0,
        "qk_rope_head_dim", cfg.qk_rope_head_dim, "must be a positive even integer (rope rotates pairs)")
    req(cfg.moe_topk <= cfg.num_experts_total, "moe_topk", cfg.moe_topk,
        f"must be in [1, n_routed_experts + zero_expert_num = {cfg.num_experts_total}]")
    lo_ke = max(0, cfg.moe_topk - cfg.zero_expert_num)
    hi_ke = min(cfg.moe_topk, cfg.n_routed_experts)
    req(lo_ke <= cfg.target_ffn_experts <= hi_ke, "target_ffn_experts", cfg.target_ffn_experts,
        f"must be in [{lo_ke}, {hi_ke}] (FFN experts a token can choose among its moe_topk slots)")
    req(cfg.routed_scaling_factor > 0, "routed_scaling_factor", cfg.routed_scaling_factor, "must be > 0")
    for f in ("rms_norm_eps", "mla_norm_eps", "initializer_range", "rope_theta"):
        req(getattr(cfg, f) > 0, f, getattr(cfg, f), "must be > 0")
    req(cfg.rope_type in ROPE_TYPES, "rope_type", cfg.rope_type, f"must be one of {ROPE_TYPES}")
    if cfg.rope_type == "yarn":
        req(cfg.rope_factor is not None and cfg.rope_factor >= 1.0, "rope_factor", cfg.rope_factor,
            "must be >= 1 for yarn")
        omp = cfg.rope_original_max_position_embeddings
        req(omp is None or (isinstance(omp, int) and 0 < omp), "rope_original_max_position_embeddings",
            omp, "must be None or a positive integer")
    req(cfg.num_mtp_layers in (0, 1), "num_mtp_layers", cfg.num_mtp_layers, "must be 0 or 1")
    for f in ("param_dtype", "dtype"):
        req(getattr(cfg, f) in DTYPES, f, getattr(cfg, f), f"must be one of {tuple(DTYPES)}")
    req(cfg.gmm_impl in GMM_IMPLS, "gmm_impl", cfg.gmm_impl, f"must be one of {GMM_IMPLS}")
    req(isinstance(cfg.scan_unroll, int) and 1 <= cfg.scan_unroll <= cfg.num_layers, "scan_unroll",
        cfg.scan_unroll, f"must be an int in [1, num_layers={cfg.num_layers}]")
    for f in ("moe_overlap", "moe_fuse_gate_up"):
        req(isinstance(getattr(cfg, f), bool), f, getattr(cfg, f), "must be a bool (True or False)")
    req(cfg.attn_impl in ATTN_IMPLS, "attn_impl", cfg.attn_impl, f"must be one of {ATTN_IMPLS}")
    req(cfg.train_attn_impl in TRAIN_ATTN_IMPLS, "train_attn_impl", cfg.train_attn_impl,
        f"must be one of {TRAIN_ATTN_IMPLS}")
    req(cfg.remat_policy in REMAT_POLICIES, "remat_policy", cfg.remat_policy, f"must be one of {REMAT_POLICIES}")
    req(isinstance(cfg.remat_keep, str) and set(remat_keep_names(cfg.remat_keep)) <= set(REMAT_KEEP_NAMES),
        "remat_keep", cfg.remat_keep, f"must be a comma-separated subset of {REMAT_KEEP_NAMES} (or empty)")
    req(cfg.router_grad_precision in ROUTER_GRAD_PRECISIONS, "router_grad_precision", cfg.router_grad_precision,
        f"must be one of {ROUTER_GRAD_PRECISIONS}")
    req(cfg.router_precision in ROUTER_PRECISIONS, "router_precision", cfg.router_precision,
        f"must be one of {ROUTER_PRECISIONS}")
    for f in ("router_precision", "router_grad_precision"):
        req(getattr(cfg, f) != "bf16_split" or cfg.dtype == "bfloat16", f, getattr(cfg, f),
            f"'bf16_split' needs bfloat16 activations, but dtype is {cfg.dtype!r}: set dtype='bfloat16' or "
            f"{f}='highest'")
    for f in ("bos_token_id", "eos_token_id"):
        v = getattr(cfg, f)
        req(v is None or 0 <= v < cfg.vocab_size, f, v, f"must be None or in [0, vocab_size={cfg.vocab_size})")
    return cfg


def remat_keep_names(remat_keep: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in remat_keep.split(",") if n.strip()) if isinstance(remat_keep, str) else ()


MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


def model_config(cfg) -> ModelConfig:
    """Builds the ModelConfig from an ml_collections config (`cfg.model`, plus the MOE_SECTION_FIELDS keys of
    `cfg.moe` that are present)."""
    model = cfg.model if hasattr(cfg, "model") else cfg
    kw = dict(model.to_dict() if hasattr(model, "to_dict") else model)
    unknown = sorted(set(kw) - set(MODEL_FIELDS))
    if unknown:
        raise ConfigError(f"unknown model field(s) {unknown}; valid fields are {list(MODEL_FIELDS)}")
    moe = getattr(cfg, "moe", None) if hasattr(cfg, "model") else None
    keys = {}
    for key, field in MOE_SECTION_FIELDS.items():
        if moe is not None and key in moe:
            kw[field], keys[field] = moe[key], f"moe.{key}"
    return validate(ModelConfig(**kw), keys)


def _leaf_paths(node, prefix=""):
    for k, v in node.items():
        if hasattr(v, "items"):
            yield from _leaf_paths(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def explain_config_flags(argv) -> str | None:
    """Why ml_collections rejected a `--config.KEY=VALUE` flag (it only says the key): the first override whose
    field does not exist, its section's fields and where a field of that name lives. None if every key exists
    (a value of the wrong type: ml_collections' own message says so)."""
    path, keys, args = None, [], iter(argv)
    for a in args:
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        elif a == "--config":
            path = next(args, None)
        elif a.startswith("--config."):
            keys.append(a[len("--config."):].split("=", 1)[0])
    if path and not os.path.isfile(path) and ":" in path:   # ml_collections' "file.py:arguments" form
        path = path.split(":", 1)[0]
    try:
        cfg = load_config(path) if path else None
    except ConfigError as e:
        return str(e)
    for key in keys if cfg is not None else ():
        node, done = cfg, []
        for part in key.split("."):
            if not hasattr(node, "items") or part not in node:
                where = ".".join(done) or "the config"
                valid = sorted(node.keys()) if hasattr(node, "items") else []
                hint = [p for p in _leaf_paths(cfg) if p.split(".")[-1] == part]
                return (f"--config.{key}: {where} has no field {part!r}; valid: {valid}"
                        + (f"; did you mean {', '.join(hint)}?" if hint else ""))
            node, done = node[part], done + [part]
    return None


def bad_override_message(argv, error: Exception) -> str:
    """The CLIs' one line for an exception ml_collections raised while parsing `--config.*` flags:
    `explain_config_flags`, else the exception's own message (a KeyError's unquoted)."""
    import ast

    msg = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    while len(msg) > 1 and msg[0] == msg[-1] == "'":  # KeyErrors nest the repr of the inner message
        msg = ast.literal_eval(msg)
    return f"bad --config override: {explain_config_flags(argv) or msg}"


def parse_override(text: str) -> tuple[str, object]:
    """'model.num_layers=4' -> ('model.num_layers', 4), for load_config's overrides from a command line: true / false
    become bools, integers and floats numbers, anything else stays a string."""
    key, eq, value = text.partition("=")
    if not (eq and key and value):
        raise ConfigError(f"override {text!r}: want KEY=VALUE, e.g. model.num_layers=4")
    if value.lower() in ("true", "false"):
        return key, value.lower() == "true"
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, value


def load_config(path: str, overrides: dict | None = None):
    """Loads an ml_collections config file (`get_config()`), applies dotted overrides, validates the model."""
    import importlib.util

    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location("_lcflash_cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config()")
    cfg = mod.get_config()
    for key, value in (overrides or {}).items():
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            if p not in node:
                raise ConfigError(f"override {key!r}: no field {p!r}; valid: {sorted(node.keys())}")
            node = node[p]
        if parts[-1] not in node:
            raise ConfigError(f"override {key!r}: no field {parts[-1]!r}; valid: {sorted(node.keys())}")
        node[parts[-1]] = value
    model_config(cfg)
    return cfg
