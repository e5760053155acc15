"""Parameter accounting from abstract shapes: no weights are allocated, so the 560B model counts in seconds.

    python -m lcflash.params --config=configs/longcat_flash.py [--json]

Activated parameters per token count the LM head but not the embedding table (a lookup), and the FFN
experts a token actually runs: k of them, for k = 0 (all zero experts), K_e (the controller's target) and
min(K, N) (no zero experts chosen).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import jax
from flax import nnx

from lcflash.config import ModelConfig, load_config, model_config

EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


def count_params(cfg: ModelConfig) -> dict:
    from lcflash.model import LongcatFlash

    model = nnx.eval_shape(lambda: LongcatFlash(cfg.replace(num_mtp_layers=1), nnx.Rngs(0)))
    sizes = {path: math.prod(v.get_value().shape) for path, v in nnx.to_flat_state(nnx.state(model))}
    mtp = sum(n for p, n in sizes.items() if p[0] == "mtp")
    main = sum(n for p, n in sizes.items() if p[0] != "mtp")
    experts = sum(n for p, n in sizes.items() if p[:2] == ("layers", "moe") and p[2] in EXPERT_WEIGHTS)
    per_expert_per_layer = experts // (cfg.num_layers * cfg.n_routed_experts)
    always = main - sizes[("embed",)] - experts

    def activated(k: float) -> int:
        return int(round(always + cfg.num_layers * k * per_expert_per_layer))

    return {
        "total": main,
        "mtp": mtp,
        "mtp_without_embedding": mtp - sizes[("mtp", "embed")],
        "experts": experts,
        "activated_min": activated(max(0, cfg.moe_topk - cfg.zero_expert_num)),
        "activated_target": activated(cfg.target_ffn_experts),
        "activated_max": activated(min(cfg.moe_topk, cfg.n_routed_experts)),
    }


def activated_matmul_params(cfg: ModelConfig, ffn_per_token: float, with_mtp: bool) -> dict:
    """Matmul weights one token runs through, by part: attention, dense MLPs, router, `ffn_per_token` FFN experts
    per layer, LM head, and the MTP block with its LM head when `with_mtp`. Vectors (norms) and the embedding
    lookup do no matmul and are left out."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    mla = (D * cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim + D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
           + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim) + H * cfg.v_head_dim * D)
    mlp = 3 * D * cfg.ffn_hidden_size
    head = D * cfg.vocab_size
    layer = 2 * mla + 2 * mlp + D * cfg.num_experts_total + ffn_per_token * 3 * D * cfg.expert_ffn_hidden_size
    out = {"per_layer": layer, "layers": cfg.num_layers * layer, "head": head,
           "mtp": (2 * D * D + mla + mlp + head) if with_mtp else 0}
    out["total"] = out["layers"] + out["head"] + out["mtp"]
    return out


def train_flops_per_token(cfg: ModelConfig, seq_len: int, ffn_per_token: float, with_mtp: bool):
    """(model FLOPs per trained token, activated_matmul_params): 6 x the matmul weights (forward + backward) plus
    causal attention, where a query sees seq_len / 2 keys on average. Recomputation (remat) and the blocks a
    kernel computes past the mask are not model FLOPs. MFU = these FLOPs per second over the devices' peak."""
    p = activated_matmul_params(cfg, ffn_per_token, with_mtp)
    sublayers = 2 * cfg.num_layers + (1 if with_mtp else 0)
    attn = 6 * sublayers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len / 2
    return 6 * p["total"] + attn, p


def _fmt(n: int) -> str:
    return f"{n:>18,d}  ({n / 1e9:8.3f} B)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lcflash.params", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="an ml_collections config file, e.g. configs/longcat_flash.py")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    cfg = model_config(load_config(args.config))
    with jax.default_device(jax.devices("cpu")[0]):
        counts = count_params(cfg)
    if args.json:
        print(json.dumps(counts))
        return 0
    print(f"config: {args.config}")
    rows = [("total (main model)", counts["total"]), ("MTP head", counts["mtp"]),
            ("MTP head without its embedding", counts["mtp_without_embedding"]),
            ("routed FFN experts", counts["experts"]),
            (f"activated, {max(0, cfg.moe_topk - cfg.zero_expert_num)} FFN experts", counts["activated_min"]),
            (f"activated, K_e = {cfg.target_ffn_experts:g} FFN experts", counts["activated_target"]),
            (f"activated, {min(cfg.moe_topk, cfg.n_routed_experts)} FFN experts", counts["activated_max"])]
    for name, n in rows:
        print(f"  {name:<36s}{_fmt(n)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
