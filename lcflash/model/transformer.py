"""The LongCat-Flash causal LM: embedding, a scan over stacked ScMoE layers, final norm, untied LM head, MTP."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lcflash.config import ModelConfig, remat_keep_names
from lcflash.model.common import normal_param, scan_modules, stack_modules
from lcflash.model.layer import DecoderLayer
from lcflash.model.mla import LatentKV
from lcflash.model.mtp import MTPHead
from lcflash.model.norm import RMSNorm
from lcflash.model.rope import rope_cos_sin
from lcflash.parallel.context import constrain

# `layer_fn` of each layer's output, taken where the next layer reads it as input (the last layer's after the scan):
# remat keeps that input, so layer_fn's backward needs no value of the layer's recomputed. The same speed and 0.53 GiB
# fewer temporaries at 32 x 1024 on an H200 (experiments/HISTORY.md, session 26). False: inside the layer, from its
# output (the A/B baseline of experiments/bench_train.py --layer_fn_on_output); the values are the same.
LAYER_FN_ON_INPUT = True


class KVCache(NamedTuple):
    """Latent cache of every attention sublayer: c [L, 2, B, S, kv_lora_rank], k_pe [L, 2, B, S, rope_dim]."""

    c: jax.Array
    kpe: jax.Array

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, length: int, dtype=None):
        dtype = dtype or cfg.jnp_dtype
        lead = (cfg.num_layers, 2, batch, length)
        return cls(jnp.zeros(lead + (cfg.kv_lora_rank,), dtype), jnp.zeros(lead + (cfg.qk_rope_head_dim,), dtype))


class ModelOutput(NamedTuple):
    logits: jax.Array             # [B, T, V] float32
    hidden: jax.Array             # [B, T, D] after the final norm (what the LM head and the MTP head read)
    layer_hidden: jax.Array       # [L, B, T, D] output of every layer, or layer_fn of it (empty unless asked for)
    moe_stats: dict               # per layer: counts_be, prob_sum_be, experts_btk, weights_btk
    cache: KVCache | None


def causal_mask(batch: int, q_len: int, kv_len: int, q_start_b=None, segment_ids_bt=None):
    """mask[b, t, s]: query t (absolute index q_start_b + t) may see key s. Segments separate packed docs."""
    q_start_b = jnp.zeros((batch,), jnp.int32) if q_start_b is None else q_start_b
    q_idx_bt = q_start_b[:, None] + jnp.arange(q_len)[None, :]
    mask = jnp.arange(kv_len)[None, None, :] <= q_idx_bt[:, :, None]
    if segment_ids_bt is not None:
        mask = mask & (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :])
    return mask


def causal_mask_kind(segment_ids_bt) -> str:
    """What `causal_mask(..., segment_ids_bt)` without a cache is, for the fused attention (mla.MASK_KINDS)."""
    return "causal" if segment_ids_bt is None else "causal_docs"


class LongcatFlash(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, pd, std = cfg.hidden_size, cfg.jnp_param_dtype, cfg.initializer_range
        self.cfg = cfg
        self.embed = normal_param(rngs, (cfg.vocab_size, D), ("vocab", "embed"), pd, std)
        self.layers = stack_modules(lambda r: DecoderLayer(cfg, r), cfg.num_layers, rngs)
        self.norm = RMSNorm(D, cfg.rms_norm_eps, pd)
        self.lm_head = normal_param(rngs, (D, cfg.vocab_size), ("embed", "vocab"), pd, std)
        self.mtp = MTPHead(cfg, rngs) if cfg.num_mtp_layers else None

    def logits(self, hidden_btd):
        return jnp.einsum("btd,dv->btv", hidden_btd, self.lm_head[...].astype(hidden_btd.dtype),
                          preferred_element_type=jnp.float32)

    def forward(self, tokens_bt, *, positions_bt=None, segment_ids_bt=None, mask_bts=None,
                cache: KVCache | None = None, write_start_b=None, reference_moe: bool = False,
                return_layer_hidden: bool = False, layer_fn=None) -> ModelOutput:
        """Full forward. With `cache`, the new tokens' latents are written at `write_start_b` (per row) and the
        default mask lets each token see the cache up to itself. `layer_fn` maps each layer's output inside the
        layer scan, e.g. to a per-token statistic so that the [L, B, T, D] stack is never built; its stacked
        results are `layer_hidden` (return_layer_hidden: the outputs themselves)."""
        cfg = self.cfg
        if return_layer_hidden and layer_fn is None:
            layer_fn = lambda h: h  # noqa: E731
        B, T = tokens_bt.shape
        dtype = cfg.jnp_dtype
        if cache is not None and write_start_b is None:
            raise ValueError("forward(cache=...) needs write_start_b (the cache index of each row's first new token)")
        if positions_bt is None:
            start = jnp.zeros((B,), jnp.int32) if write_start_b is None else write_start_b
            positions_bt = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        # Our own mask tells the fused attention (cache-free forwards only) what it may skip or drop.
        mask_kind = "given"
        if mask_bts is None:
            if cache is None:
                mask_kind = causal_mask_kind(segment_ids_bt)
            kv_len = T if cache is None else cache.c.shape[3]
            mask_bts = causal_mask(B, T, kv_len, write_start_b, segment_ids_bt if cache is None else None)
        cos, sin = rope_cos_sin(cfg, positions_bt, dtype)
        # Lookup in a table split over the vocabulary only (FSDP shards of the width are gathered first).
        embed_vd = constrain(self.embed[...], ("vocab", None))
        h_btd = constrain(jnp.take(embed_vd, tokens_bt, axis=0).astype(dtype), ("batch", "seq", "act_embed"))

        on_input = layer_fn is not None and LAYER_FN_ON_INPUT

        def body(layer, h, cache_l):
            y = layer_fn(h) if on_input else None  # the previous layer's output (for layer 0, the embedding)
            caches = (None, None) if cache_l is None else (LatentKV(cache_l[0][0], cache_l[1][0]),
                                                          LatentKV(cache_l[0][1], cache_l[1][1]))
            h, (kv0, kv1), stats = layer(h, cos, sin, mask_bts, caches, write_start_b, reference_moe, mask_kind)
            h = constrain(h, ("batch", "seq", "act_embed"))
            new_cache = None if cache_l is None else (jnp.stack([kv0.c_bsr, kv1.c_bsr]),
                                                      jnp.stack([kv0.kpe_bsd, kv1.kpe_bsd]))
            if layer_fn is not None and not on_input:
                y = layer_fn(h)
            return h, (new_cache, stats, y)

        xs = None if cache is None else (cache.c, cache.kpe)
        h_btd, (new_cache, stats, layer_hidden) = scan_modules(self.layers, body, h_btd, xs, remat=cfg.remat,
                                                                    unroll=cfg.scan_unroll,
                                                                    remat_policy=cfg.remat_policy,
                                                                    remat_keep=remat_keep_names(cfg.remat_keep))
        if on_input:
            layer_hidden = jnp.concatenate([layer_hidden[1:], layer_fn(h_btd)[None]], axis=0)
        hidden = self.norm(h_btd)
        return ModelOutput(self.logits(hidden), hidden,
                           jnp.zeros((0,), dtype) if layer_fn is None else layer_hidden, stats,
                           None if cache is None else KVCache(*new_cache))

    def mtp_logits(self, hidden_btd, next_tokens_bt, positions_bt=None, segment_ids_bt=None):
        """MTP logits for position t: predicts token t+2 from hidden[t] and token t+1 (`next_tokens_bt[t]`)."""
        if self.mtp is None:
            raise ValueError("this model has no MTP head (model.num_mtp_layers = 0)")
        B, T, _ = hidden_btd.shape
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        cos, sin = rope_cos_sin(self.cfg, positions_bt, hidden_btd.dtype)
        z, _ = self.mtp(hidden_btd, next_tokens_bt, cos, sin, causal_mask(B, T, T, None, segment_ids_bt),
                        mask_kind=causal_mask_kind(segment_ids_bt))
        return self.logits(z)

    def __call__(self, tokens_bt):
        """int token ids [B, T] -> logits [B, T, vocab] (float32)."""
        return self.forward(tokens_bt).logits

    def generate(self, prompt_ids, max_new_tokens: int, **kwargs):
        """Prompt plus new tokens, like transformers' generate; see lcflash/infer/generation.py for the options."""
        from lcflash.infer.generation import generate

        return generate(self, prompt_ids, max_new_tokens, **kwargs)
