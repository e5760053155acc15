"""A tiny LongCat-shaped model: forward and backward in seconds on 2 CPU cores."""

from lcflash.defaults import base_config


def get_config():
    cfg = base_config(
        vocab_size=512, hidden_size=64, num_layers=2, num_attention_heads=4,
        q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        ffn_hidden_size=128, expert_ffn_hidden_size=32,
        n_routed_experts=8, zero_expert_num=4, moe_topk=4, target_ffn_experts=3.0,
        max_position_embeddings=4096, rope_theta=10000.0,
        param_dtype="float32", dtype="float32",
    )
    # Training: ~1-2 minutes on 2 CPU cores over the stdlib corpus (bytes), loss far below ln(256).
    cfg.data.seq_len = 128
    cfg.train.update(steps=300, batch_size=8, log_every=10, eval_batches=8)
    cfg.optim.update(lr=3e-3, warmup_steps=30)
    cfg.checkpoint.every_steps = 100
    cfg.loss.lb_groups = 2          # two "devices" of 4 FFN experts each, plus the zero-expert group
    return cfg
