"""The ScMoE decoder layer, in the exact order of the reference (§3.7).

The MoE branch reads the first post-attention norm `n0` and joins at the very end of the layer, so its
dispatch, expert GEMMs and combine can overlap dense FFN 0, attention 1 and dense FFN 1. With
`cfg.moe_overlap = False` (config `moe.overlap`) an optimization barrier makes the dense path wait for the MoE
output instead: the same values, with nothing to overlap, the baseline for measuring what the overlap hides.
"""

import jax
from flax import nnx

from lcflash.config import ModelConfig
from lcflash.model.mla import MLA
from lcflash.model.mlp import MLP
from lcflash.model.moe import MoE
from lcflash.model.norm import RMSNorm


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, pd, eps = cfg.hidden_size, cfg.jnp_param_dtype, cfg.rms_norm_eps
        self.input_norm_0 = RMSNorm(D, eps, pd)
        self.attn_0 = MLA(cfg, rngs)
        self.post_attn_norm_0 = RMSNorm(D, eps, pd)
        self.mlp_0 = MLP(D, cfg.ffn_hidden_size, pd, cfg.initializer_range, rngs)
        self.input_norm_1 = RMSNorm(D, eps, pd)
        self.attn_1 = MLA(cfg, rngs)
        self.post_attn_norm_1 = RMSNorm(D, eps, pd)
        self.mlp_1 = MLP(D, cfg.ffn_hidden_size, pd, cfg.initializer_range, rngs)
        self.moe = MoE(cfg, rngs)
        self.overlap = cfg.moe_overlap

    def __call__(self, h_btd, cos, sin, mask_bts, caches=(None, None), write_start_b=None, reference_moe=False,
                 mask_kind="given"):
        """Returns (h, (kv_0, kv_1), moe_stats). mask_kind: what mask_bts is (lcflash.model.mla.MASK_KINDS)."""
        a0, kv0 = self.attn_0(self.input_norm_0(h_btd), cos, sin, mask_bts, caches[0], write_start_b, mask_kind)
        h_btd = h_btd + a0
        n0 = self.post_attn_norm_0(h_btd)
        # MoE dispatch here, combine at the end: dense FFN 0, attention 1 and dense FFN 1 overlap the transfers.
        # Named scopes mark the overlap window in HLO and profiles (tests/test_parallel.py checks it).
        with jax.named_scope("moe_dispatch"):
            moe_pending = self.moe.dispatch(n0, reference=reference_moe)
        if not self.overlap:
            with jax.named_scope("moe_combine"):
                moe_btd, stats = self.moe.combine(moe_pending)
            # XLA may not schedule anything that reads the barrier's outputs before all its inputs exist, and
            # every dense-path op reads n0: mlp_0, attn_1 and mlp_1 wait for the finished MoE (its backward too,
            # since the barrier's transpose ties the cotangents the same way).
            n0, moe_btd = jax.lax.optimization_barrier((n0, moe_btd))
        with jax.named_scope("mlp_0"):
            h_btd = h_btd + self.mlp_0(n0)
        with jax.named_scope("attn_1"):
            a1, kv1 = self.attn_1(self.input_norm_1(h_btd), cos, sin, mask_bts, caches[1], write_start_b, mask_kind)
        h_btd = h_btd + a1
        with jax.named_scope("mlp_1"):
            h_btd = h_btd + self.mlp_1(self.post_attn_norm_1(h_btd))
        if self.overlap:
            with jax.named_scope("moe_combine"):
                moe_btd, stats = self.moe.combine(moe_pending)
        h_btd = h_btd + moe_btd
        return h_btd, (kv0, kv1), stats
