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
