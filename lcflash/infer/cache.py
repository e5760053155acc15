"""The decode cache: one latent buffer per attention sublayer, plus the MTP head's own slot.

Each of the 2L sublayers (and the MTP attention) stores `c` [B, S, kv_lora_rank] and `k_pe` [B, S, rope_dim]:
kv_lora_rank + qk_rope_head_dim values per token, never per-head keys or values (reference §8.1). The buffers are
separate arrays, not slices of one stacked [L, 2, ...] array, so a decode step updates each in place and the
attention (XLA or the Pallas kernel) reads it directly without a per-step copy of a slice.

Shape buckets: prompt lengths and new-token counts round up to powers of two, and the cache length follows from
them, so one compiled prefill and one compiled decode loop serve every request in a bucket.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lcflash.config import ModelConfig
from lcflash.model.mla import LatentKV

MIN_BUCKET = 16
CACHE_ALIGN = 64      # the Pallas kernel reads the cache in blocks of 64 tokens


class DecodeCache(NamedTuple):
    """layers: 2L LatentKV in order (layer 0 attn_0, layer 0 attn_1, layer 1 attn_0, ...); mtp: LatentKV or None."""

    layers: tuple
    mtp: LatentKV | None

    @property
    def length(self) -> int:
        return self.layers[0].c_bsr.shape[1]

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, length: int, dtype=None, mtp: bool = False):
        dtype = dtype or cfg.jnp_dtype

        def slot():
            return LatentKV(jnp.zeros((batch, length, cfg.kv_lora_rank), dtype),
                            jnp.zeros((batch, length, cfg.qk_rope_head_dim), dtype))

        return cls(tuple(slot() for _ in range(2 * cfg.num_layers)), slot() if mtp else None)

    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """Smallest power of two >= max(n, minimum)."""
    b = minimum
    while b < n:
        b *= 2
    return b


def cache_length(prompt_bucket: int, new_bucket: int) -> int:
    """Cache capacity for a (prompt, new tokens) bucket: room for one speculative token more, 64-aligned."""
    need = prompt_bucket + new_bucket + 2
    return -(-need // CACHE_ALIGN) * CACHE_ALIGN


def bytes_per_token(cfg: ModelConfig, dtype=None, mtp: bool = False) -> int:
    """Cache bytes per token: (kv_lora_rank + rope_dim) values per sublayer."""
    itemsize = jnp.dtype(dtype or cfg.jnp_dtype).itemsize
    slots = 2 * cfg.num_layers + (1 if mtp else 0)
    return slots * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * itemsize
