"""A ~2B-total LongCat-shaped model (same ratios: 2:1 FFN:zero experts, top-12, dense FFN = 2x width,
expert FFN ~ width/3) that trains on one 80 GB GPU in bf16 compute with fp32 master weights."""

from lcflash.defaults import base_config


def get_config():
    cfg = base_config(
        vocab_size=512, hidden_size=1024, num_layers=12, num_attention_heads=8,
        q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        ffn_hidden_size=2048, expert_ffn_hidden_size=384,
        n_routed_experts=128, zero_expert_num=64, moe_topk=12, target_ffn_experts=8.0,
        max_position_embeddings=32768, rope_theta=1.0e7,
        param_dtype="float32", dtype="bfloat16",
        # Flash attention on a GPU: our kernels for packed documents on a Hopper GPU (130,074 -> 137,929 tokens/s
        # at 32 x 1024 on an H200 against cuDNN given the documents as a mask), cuDNN for other masks; XLA
        # elsewhere (experiments/HISTORY.md).
        train_attn_impl="auto",
        # With remat (batch 16 and up on one GPU), keep every matmul's and kernel's output and recompute only
        # elementwise work. With the router line below: 90,735 -> 106,716 tokens/s at 16 x 1024 on an H200, 56.0 GiB
        # peak (experiments/HISTORY.md).
        remat_policy="dots",
        # ... and also the dense FFNs' SwiGLU outputs, the attention queries and the dispatched expert rows:
        # 147,166 -> 150,438 tokens/s at 32 x 1024 on an H200, peak 90.1 -> 91.0 GiB; and the routing choices, so
        # the backward runs neither the top-k sort nor the slot sort again: 153,979 -> 157,014 (experiments/HISTORY.md).
        remat_keep="swiglu,queries,dispatch,routing",
        # The router's products on tensor cores: each operand split exactly into three bf16 parts (bit masks), one
        # bf16 product of the parts' concatenations, fp32 accumulation; as exact as fp32 FMA (max relative error
        # 1.54e-6 against 1.73e-6) at a third of its time. 157,365 -> 160,126 tokens/s at 32 x 1024 on an H200, against
        # fp32 forward and a 3-pass bf16 backward (experiments/HISTORY.md).
        router_precision="bf16_split", router_grad_precision="bf16_split",
    )
    # Training on one H100: batch 4 x 1024 fits without remat (batch 8 x 1024 ran out of memory,
    # experiments/bench_train.json); bytes of the stdlib corpus by default.
    cfg.data.seq_len = 1024
    # Gate and up as one grouped matmul against [gate | up] (768 columns): 125,691 -> 127,178 tokens/s at 32 x 1024
    # on an H200 (experiments/HISTORY.md).
    cfg.moe.fuse_gate_up = True
    # The 12 layers unrolled in the compiled step: 50,631 against 36,452 tokens/s looped at 4 x 1024 on an H200
    # (experiments/HISTORY.md), for ~90 s more compile time.
    cfg.model.scan_unroll = 12
    cfg.train.update(steps=20000, batch_size=4, log_every=50, eval_every=1000, eval_batches=16)
    cfg.optim.update(lr=1e-3, warmup_steps=500)
    cfg.checkpoint.every_steps = 1000
    return cfg
