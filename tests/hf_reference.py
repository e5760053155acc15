"""Random tiny LongCat-Flash models built with HF transformers (CPU torch): the reference of truth."""

import numpy as np

torch = None


def _torch():
    global torch
    if torch is None:
        import torch as _t
        torch = _t
    return torch


TINY = dict(vocab_size=97, hidden_size=48, num_layers=2, num_attention_heads=4, q_lora_rank=24, kv_lora_rank=16,
            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, ffn_hidden_size=80, expert_ffn_hidden_size=24,
            n_routed_experts=8, zero_expert_num=4, moe_topk=4, max_position_embeddings=512, rope_theta=10000.0)


def hf_config(**overrides):
    from transformers import LongcatFlashConfig

    kw = dict(TINY)
    kw.update(overrides)
    rope = kw.pop("rope_scaling", None)
    theta = kw.pop("rope_theta")
    params = {"rope_type": "default", "rope_theta": theta}
    if rope:
        params = dict(rope, rope_theta=theta)
    # transformers sizes the rotary table from head_dim: keep it equal to qk_rope_head_dim (reference §3.2).
    return LongcatFlashConfig(head_dim=kw["qk_rope_head_dim"], rope_parameters=params, **kw)


def random_hf_model(seed: int, **overrides):
    """An HF model with every weight random and routing far from uniform (wide router, random bias)."""
    t = _torch()
    from transformers import LongcatFlashForCausalLM

    t.manual_seed(seed)
    model = LongcatFlashForCausalLM(hf_config(**overrides)).eval()
    g = t.Generator().manual_seed(seed + 1)
    with t.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.3 * t.randn(p.shape, generator=g))
            elif "classifier" in name:
                p.copy_(0.6 * t.randn(p.shape, generator=g))
            else:
                p.copy_(p.shape[-1] ** -0.5 * t.randn(p.shape, generator=g))
        for layer in model.model.layers:
            b = layer.mlp.router.e_score_correction_bias
            b.copy_(0.05 * t.randn(b.shape, generator=g))
    return model


def hf_forward(model, tokens: np.ndarray):
    """(logits, per-layer hidden states [L, B, T, D], per-layer top-k expert sets [L, B*T, K])."""
    t = _torch()
    chosen = []  # the router returns (weights, indices) in transformers 5.17, (logits, weights, indices) in 5.23
    hooks = [layer.mlp.router.register_forward_hook(lambda m, i, o: chosen.append(o[-1].numpy()))
             for layer in model.model.layers]
    try:
        with t.no_grad():
            out = model(t.tensor(tokens), output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    hidden = np.stack([h.numpy() for h in out.hidden_states[1:]])
    return out.logits.numpy(), hidden, np.stack(chosen)
