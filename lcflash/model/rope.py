"""Interleaved RoPE on `qk_rope_head_dim` dims, default or YaRN, computed the way transformers 5.23 does.

Pair (x[2j], x[2j+1]) rotates by angle j; like HF, the output lists the rotated evens, then the odds. q and the
cached rope key get the same permutation, so attention logits are those of the true interleaved layout.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from lcflash.config import ModelConfig


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_tables(cfg: ModelConfig):
    """(inv_freq [d/2] float32 numpy, attention_factor): the frequencies and the cos/sin multiplier."""
    d, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))
    inv_freq = (1.0 / pos_freqs).astype(np.float32)
    if cfg.rope_type == "default":
        return inv_freq, 1.0
    # YaRN (transformers `_compute_yarn_parameters`).
    orig = cfg.rope_original_max_position_embeddings or cfg.max_position_embeddings
    factor = cfg.rope_factor
    attn = cfg.rope_attention_factor
    if attn is None:
        if cfg.rope_mscale and cfg.rope_mscale_all_dim:
            attn = _yarn_mscale(factor, cfg.rope_mscale) / _yarn_mscale(factor, cfg.rope_mscale_all_dim)
        else:
            attn = _yarn_mscale(factor)
    beta_fast = cfg.rope_beta_fast or 32
    beta_slow = cfg.rope_beta_slow or 1

    def correction_dim(rot):
        return (d * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
    if cfg.rope_truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, d - 1)
    if lo == hi:
        hi += 0.001
    ramp = np.clip((np.arange(d // 2, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo), 0, 1)
    keep = (1 - ramp).astype(np.float32)
    inv_interp = (1.0 / (np.float32(factor) * pos_freqs)).astype(np.float32)
    inv_freq = (inv_interp * (1 - keep) + inv_freq * keep).astype(np.float32)
    return inv_freq, float(attn)


def softmax_scale(cfg: ModelConfig) -> float:
    """qk_head_dim^-0.5, times YaRN's mscale(factor, mscale_all_dim)^2 when set (HF `yarn_apply_mscale`)."""
    scale = cfg.qk_head_dim ** -0.5
    if cfg.rope_type != "default" and cfg.rope_mscale_all_dim:
        m = _yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim)
        scale = scale * m * m
    return scale


def rope_cos_sin(cfg: ModelConfig, positions_bt: jax.Array, dtype):
    """cos, sin [B, T, d/2]: angles in fp32 (bf16 would round position 257 to 256), then cast like HF."""
    inv_freq, attn = rope_tables(cfg)
    ang = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return (jnp.cos(ang) * attn).astype(dtype), (jnp.sin(ang) * attn).astype(dtype)


def apply_rope(x_bthd: jax.Array, cos_btd: jax.Array, sin_btd: jax.Array) -> jax.Array:
    """x [..., T, H, d] with cos/sin [..., T, d/2] broadcast over heads."""
    cos, sin = cos_btd[..., None, :], sin_btd[..., None, :]
    a, b = x_bthd[..., 0::2], x_bthd[..., 1::2]
    return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
