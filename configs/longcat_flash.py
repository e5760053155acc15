"""The released LongCat-Flash-Chat (560B total, 18.7B-31.4B activated): exact config.json values."""

from lcflash.defaults import base_config


def get_config():
    cfg = base_config(param_dtype="bfloat16", dtype="bfloat16")
    # Our grouped-matmul kernels on a Hopper GPU, XLA's ragged_dot elsewhere. Decode's MoE "auto" then runs the
    # model's MoE at batch 1 too (lcflash/infer/decode.py: MODEL_MOE_MIN_EXPERT_BYTES).
    cfg.moe.gmm_impl = "auto"
    return cfg
