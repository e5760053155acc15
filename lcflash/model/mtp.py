"""The MTP head: drafts token t+2 from the main model's hidden state at t and the embedding of token t+1.

One dense block (MLA + SwiGLU, no MoE) over eh_proj([enorm(emb), hnorm(h)]); its own embedding table,
the main model's LM head (reference §4).
"""

import jax.numpy as jnp
from flax import nnx

from lcflash.config import ModelConfig
from lcflash.model.common import normal_param
from lcflash.model.mla import MLA, write_latents
from lcflash.model.mlp import MLP
from lcflash.model.norm import RMSNorm


class MTPHead(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, pd, eps, std = cfg.hidden_size, cfg.jnp_param_dtype, cfg.rms_norm_eps, cfg.initializer_range
        self.embed = normal_param(rngs, (cfg.vocab_size, D), ("vocab", "embed"), pd, std)
        self.enorm = RMSNorm(D, eps, pd)
        self.hnorm = RMSNorm(D, eps, pd)
        self.w_eh = normal_param(rngs, (2 * D, D), ("mtp_concat", "embed"), pd, std)
        self.input_norm = RMSNorm(D, eps, pd)
        self.attn = MLA(cfg, rngs)
        self.post_attn_norm = RMSNorm(D, eps, pd)
        self.mlp = MLP(D, cfg.ffn_hidden_size, pd, std, rngs)
        self.norm = RMSNorm(D, eps, pd)

    def __call__(self, h_btd, next_tokens_bt, cos, sin, mask_bts, cache=None, write_start_b=None,
                 mask_kind="given", write=write_latents):
        """Returns (normed hidden [B, T, D] to feed the shared LM head, latent KV)."""
        dtype = h_btd.dtype
        e_btd = jnp.take(self.embed[...], next_tokens_bt, axis=0).astype(dtype)
        z = jnp.concatenate([self.enorm(e_btd), self.hnorm(h_btd)], axis=-1)
        z = jnp.einsum("btc,cd->btd", z, self.w_eh[...].astype(dtype))
        a, kv = self.attn(self.input_norm(z), cos, sin, mask_bts, cache, write_start_b, mask_kind, write)
        z = z + a
        z = z + self.mlp(self.post_attn_norm(z))
        return self.norm(z), kv
