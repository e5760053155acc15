"""Multi-head latent attention with LongCat's scale corrections (reference §3.4).

The KV state of a token is its latent `c` (after norm and alpha_kv) and its rope key `k_pe` (one head shared
by all heads, after RoPE): kv_lora_rank + qk_rope_head_dim values. That is all the cache ever stores.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lcflash.config import ModelConfig
from lcflash.kernels import KERNEL_OUTPUT, on_hopper
from lcflash.kernels.mla_decode import mla_decode
from lcflash.model.common import ATTENTION_QUERIES, normal_param
from lcflash.model.norm import RMSNorm
from lcflash.model.rope import apply_rope, softmax_scale
from lcflash.parallel.context import multi_device

NEG_INF = -1e30


class LatentKV(NamedTuple):
    """Latent KV of one attention sublayer: c [B, S, kv_lora_rank], k_pe [B, S, qk_rope_head_dim]."""

    c_bsr: jax.Array
    kpe_bsd: jax.Array


def write_latents(cache: LatentKV, new: LatentKV, start_b) -> LatentKV:
    """Each row's new latents written into its cache at start_b[b] (write_rows), in the cache's dtype."""
    return LatentKV(write_rows(cache.c_bsr, new.c_bsr.astype(cache.c_bsr.dtype), start_b),
                    write_rows(cache.kpe_bsd, new.kpe_bsd.astype(cache.kpe_bsd.dtype), start_b))


def write_rows(cache_bs_, new_bt_, start_b):
    """Writes new[b] into cache[b] at offset start_b[b] (each row may be at its own position), with
    dynamic_update_slice's index rules (negative wraps, then clamped to fit).

    Not a vmapped dynamic_update_slice: XLA lowers that scatter with a bounds check that reads the old rows first,
    one extra kernel per cache write (48 of a small-model decode step's ~750)."""
    B, T = new_bt_.shape[:2]
    S = cache_bs_.shape[1]
    start_b = jnp.asarray(start_b, jnp.int32)
    start_b = jnp.clip(jnp.where(start_b < 0, start_b + S, start_b), 0, S - T)
    if B == 1:
        return jax.lax.dynamic_update_slice_in_dim(cache_bs_, new_bt_, start_b[0], axis=1)
    rows_bt = start_b[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    return cache_bs_.at[jnp.arange(B)[:, None], rows_bt].set(new_bt_, mode="promise_in_bounds",
                                                              unique_indices=True)


# What the caller promises about mask_bts, so a fused kernel can skip blocks or drop the mask: "given" (any mask),
# "causal_docs" (causal, and packed documents apart: causal AND same segment), "causal" (exactly causal).
MASK_KINDS = ("given", "causal_docs", "causal")


def expanded_attention(q_nope_bthk, q_pe_bthd, kv: LatentKV, w_kv_b_rhk, mask_bts, scale, qk_nope_dim,
                       impl: str = "xla", mask_kind: str = "given"):
    """Attention with keys/values expanded per head from the latent (training and prefill form). impl "xla"
    materialises the [B, H, T, S] scores; "cudnn" is cuDNN's fused flash attention and "pallas" ours
    (`fused_attention`); "dpa_xla" is `jax.nn.dot_product_attention` on XLA, to test the mask plumbing on any
    backend."""
    dtype = q_nope_bthk.dtype
    kv_bshk = jnp.einsum("bsr,rhk->bshk", kv.c_bsr.astype(dtype), w_kv_b_rhk.astype(dtype))
    if impl != "xla":
        return fused_attention(q_nope_bthk, q_pe_bthd, kv_bshk, kv.kpe_bsd.astype(dtype), mask_bts, scale,
                               impl if impl in ("cudnn", "pallas", "tokamax", "auto") else "xla", mask_kind)
    k_nope_bshk, v_bshv = kv_bshk[..., :qk_nope_dim], kv_bshk[..., qk_nope_dim:]
    logits_bhts = (
        jnp.einsum("bthk,bshk->bhts", q_nope_bthk, k_nope_bshk, preferred_element_type=jnp.float32)
        + jnp.einsum("bthd,bsd->bhts", q_pe_bthd, kv.kpe_bsd.astype(dtype), preferred_element_type=jnp.float32)
    ) * scale
    logits_bhts = jnp.where(mask_bts[:, None], logits_bhts, NEG_INF)
    probs_bhts = jax.nn.softmax(logits_bhts, axis=-1).astype(dtype)
    return jnp.einsum("bhts,bshv->bthv", probs_bhts, v_bshv)


def train_attn_kernel(impl: str) -> str:
    """"auto" is the XLA einsums off a GPU; on a GPU it stays "auto" until `fused_attention` sees the operands."""
    if impl == "auto" and jax.default_backend() != "gpu":
        return "xla"
    return impl


def auto_fused_impl(q_bthk, kv_bshk, kpe_bsd, mask_kind: str, backend: str | None = None,
                    compute_capability: str | None = None) -> str:
    """"auto" on a GPU: our kernels for packed documents on one Hopper GPU where they take the operands (1.9x
    faster than cuDNN given the documents as a mask), cuDNN otherwise (its plain causal call is 1.27x faster than
    ours; experiments/HISTORY.md). Our kernels have no sharding rule yet, so a multi-device mesh keeps cuDNN.
    Operands in MLA's form: q = [nope | rope] or the pair (q_nope, q_rope), kv = [k_nope | v], the shared rope
    key."""
    from lcflash.kernels.doc_attention.pallas_mgpu import mla_supported

    if (mask_kind == "causal_docs" and on_hopper(backend, compute_capability) and not multi_device()
            and mla_supported(q_bthk, kv_bshk, kpe_bsd, _nope_dim(q_bthk, kpe_bsd)) is None):
        return "pallas"
    return "cudnn"


def _nope_dim(q, kpe_bsd) -> int:
    """The nope width of MLA's queries, q = [nope | rope] or the pair (q_nope, q_rope)."""
    return q[0].shape[-1] if isinstance(q, tuple) else q.shape[-1] - kpe_bsd.shape[-1]


def fused_heads(q_nope_bthk, q_pe_bthd, k_nope_bshk, kpe_bsd):
    """Queries and keys as one head each for a fused kernel: [nope | rope], the rope key shared by all heads."""
    return jnp.concatenate([q_nope_bthk, q_pe_bthd], axis=-1), per_head_keys(k_nope_bshk, kpe_bsd)


def per_head_keys(k_nope_bshk, kpe_bsd):
    H = k_nope_bshk.shape[2]
    kpe_bshd = jnp.broadcast_to(kpe_bsd[:, :, None, :], kpe_bsd.shape[:2] + (H, kpe_bsd.shape[-1]))
    return jnp.concatenate([k_nope_bshk, kpe_bshd], axis=-1)


def pad_head(x, d: int):
    """Zero-pads the last (head) axis to d: zeros change neither the scores nor the output."""
    return jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, d - x.shape[-1]),))


# Our kernels read MLA's operands where the model computes them (`mla_doc_attention`); False assembles per-head
# keys [k_nope | rope key] and copies v out of kv first, as before (the A/B baseline of experiments/bench_train.py
# --pallas_assembled_heads).
PALLAS_MLA_FORM = True
# The q projection as two products, nope and rope, and our kernels reading the two as they are: no [nope | rope]
# copy before the kernel (25 x 63 us per step at 32 x 1024 on configs/small.py) and no padded sum of the two parts'
# gradients after it (25 x 81 us; session 28's profile). Our attention alone at 32 x 1024: 1.133 -> 1.010 ms
# fwd+bwd. In training on an H200: 171,024 / 171,243 -> 172,662 / 173,372 tokens/s at 32 x 1024 (two A/B pairs,
# session 31, experiments/HISTORY.md). Only where our kernels take the parts (MLA.__call__); read at trace time
# (bench_train.py --no_q_parts is the baseline).
Q_PARTS = True


def _takes_q_parts(implementation: str) -> bool:
    """Whether the fused attention reads q as (q_nope, q_rope), two arrays (our kernels in MLA's form)."""
    return implementation == "pallas" and PALLAS_MLA_FORM and Q_PARTS


def fused_attention(q_nope_bthk, q_pe_bthd, kv_bshk, kpe_bsd, mask_bts, scale, implementation,
                    mask_kind: str = "given"):
    """Flash attention on MLA's heads: queries/keys are [nope | rope] (the rope key shared by all heads), values
    are kv's columns after the nope key's (kv = [k_nope | v], the latent's up projection). "cudnn" calls cuDNN's
    MLA form (qk 192, v 128) directly: `jax.nn.dot_product_attention` wants one head size, and v padded to 192 cost
    1.3-1.4x; a causal kind skips the hidden blocks, and "causal" drops the mask (the mask as a bias cost 2x;
    experiments/HISTORY.md, bench_attention.py). "pallas" is ours (causal kinds only), reading q, kv and the rope
    key as they are; "auto" picks one of the two (`auto_fused_impl`). "xla" is `jax.nn.dot_product_attention`
    with v zero-padded."""
    if mask_kind not in MASK_KINDS:
        raise ValueError(f"mask_kind {mask_kind!r}: expected one of {MASK_KINDS}")
    nope = q_nope_bthk.shape[-1]
    if implementation == "auto":
        implementation = auto_fused_impl((q_nope_bthk, q_pe_bthd), kv_bshk, kpe_bsd, mask_kind)
    if _takes_q_parts(implementation):
        q_parts = (q_nope_bthk, checkpoint_name(q_pe_bthd, ATTENTION_QUERIES))   # remat_keep: the roped part
        return _pallas_attention(q_parts, (kv_bshk, kpe_bsd), mask_bts, scale, mask_kind, mla_form=True)
    q_bthk = checkpoint_name(jnp.concatenate([q_nope_bthk, q_pe_bthd], axis=-1), ATTENTION_QUERIES)  # remat_keep
    if implementation == "pallas" and PALLAS_MLA_FORM:
        return _pallas_attention(q_bthk, (kv_bshk, kpe_bsd), mask_bts, scale, mask_kind, mla_form=True)
    k_bshk, v_bshv = per_head_keys(kv_bshk[..., :nope], kpe_bsd), kv_bshk[..., nope:]
    if implementation == "pallas":
        return _pallas_attention(q_bthk, (k_bshk, v_bshv), mask_bts, scale, mask_kind)
    if implementation == "tokamax":
        from lcflash.kernels.doc_attention import tokamax_attention

        return tokamax_attention.doc_attention(q_bthk, k_bshk, v_bshv, _first_keys("tokamax", mask_bts, mask_kind),
                                               scale=scale)
    mask_b1ts = None if mask_kind == "causal" else mask_bts[:, None]
    if implementation == "cudnn":
        if jax.default_backend() != "gpu":
            raise ValueError(f"train_attn_impl 'cudnn' needs a GPU backend, not {jax.default_backend()!r}; use 'xla'")
        return _cudnn_attention(q_bthk, k_bshk, v_bshv, mask_b1ts, scale, mask_kind)
    d, dv = max(q_bthk.shape[-1], v_bshv.shape[-1]), v_bshv.shape[-1]
    o_bthk = jax.nn.dot_product_attention(pad_head(q_bthk, d), pad_head(k_bshk, d), pad_head(v_bshv, d),
                                          mask=mask_b1ts, scale=scale, is_causal=mask_kind != "given",
                                          implementation=implementation)
    return o_bthk[..., :dv]


def _pallas_attention(q_bthk, operands, mask_bts, scale, mask_kind, mla_form: bool = False):
    """Our Mosaic GPU kernels (lcflash/kernels/doc_attention): they visit only the blocks holding a visible key of
    a causal or packed-document mask, which they rebuild from each row's first visible key. operands: per-head
    (k, v), or with mla_form (kv = [k_nope | v], the shared rope key; q may then be the pair (q_nope, q_rope)).
    Pallas' GPU interpreter runs them on other backends (tests)."""
    from lcflash.kernels.doc_attention.pallas_mgpu import doc_attention, mla_doc_attention

    first_bt = _first_keys("pallas", mask_bts, mask_kind)
    if first_bt is None:   # plainly causal: every row's first visible key is key 0
        first_bt = jnp.zeros((q_bthk[0] if isinstance(q_bthk, tuple) else q_bthk).shape[:2], jnp.int32)
    interpret = jax.default_backend() != "gpu"
    a, b = operands
    if mla_form:
        return mla_doc_attention(q_bthk, a, b, first_bt, scale=scale, nope_dim=_nope_dim(q_bthk, b),
                                 interpret=interpret)
    return doc_attention(q_bthk, a, b, first_bt, scale=scale, interpret=interpret)


def _first_keys(impl: str, mask_bts, mask_kind: str):
    """The first visible key of each row [B, T] that the block-skipping kernels (ours, tokamax's) rebuild the mask
    from; None for a plainly causal mask. They take causal kinds only, on one device."""
    from lcflash.kernels.doc_attention.reference import first_visible

    if mask_kind == "given":
        raise ValueError(f"train_attn_impl {impl!r} takes causal masks (mask kinds 'causal', 'causal_docs'), not "
                         "an arbitrary mask; use 'cudnn' or 'xla'")
    if multi_device():
        raise ValueError(f"train_attn_impl {impl!r} runs on one device (its kernels have no sharding rule here); "
                         "use 'cudnn' or 'auto' on a multi-device mesh")
    if mask_kind == "causal":
        return None
    # 4 bytes a token, kept like the kernels' outputs: else each layer's backward argmaxes the [B, T, T] mask
    return checkpoint_name(first_visible(mask_bts), KERNEL_OUTPUT)


def _cudnn_attention(q_bthk, k_bshk, v_bshv, mask_b1ts, scale, mask_kind):
    """cuDNN's own entry point (the public jax.nn one cannot take v narrower than q/k). It turns the boolean mask
    into a bias; the backward must not also write that bias's gradient, which nothing reads. JAX 0.11 skips it
    for a boolean mask by itself; older JAX always asks for it (`should_export_dbias`), so that switch is turned
    off while the call is traced (the choice is a static parameter of the traced call, backward included)."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    kind = fa.MaskType.NO_MASK if mask_kind == "given" else fa.MaskType.CAUSAL
    if mask_b1ts is not None and mask_b1ts.dtype != jnp.bool_:
        raise ValueError(f"the attention mask must be boolean, not {mask_b1ts.dtype}")
    call = lambda: fa.dot_product_attention(q_bthk, k_bshk, v_bshv, mask=mask_b1ts, scale=scale,  # noqa: E731
                                            mask_type=kind)
    if mask_b1ts is None or not hasattr(fa, "should_export_dbias"):
        return call()
    export, fa.should_export_dbias = fa.should_export_dbias, lambda *_: False
    try:
        return call()
    finally:
        fa.should_export_dbias = export


def absorbed_attention(q_nope_bthk, q_pe_bthd, kv: LatentKV, w_kv_b_rhk, mask_bts, scale, qk_nope_dim,
                       impl: str = "xla", q_start_b=None):
    """Attention with W_UK folded into the query and W_UV applied after (reference §8.2): every head reads the
    shared latent, never per-head keys/values (decode form). impl: see lcflash.kernels.mla_decode; "pallas" uses
    the causal mask from q_start_b, "xla" uses mask_bts."""
    dtype = q_nope_bthk.dtype
    w_uk_rhk = w_kv_b_rhk[..., :qk_nope_dim].astype(dtype)
    w_uv_rhv = w_kv_b_rhk[..., qk_nope_dim:].astype(dtype)
    q_lat_bthr = jnp.einsum("bthk,rhk->bthr", q_nope_bthk, w_uk_rhk)
    o_lat_bthr = mla_decode(q_lat_bthr, q_pe_bthd, kv.c_bsr, kv.kpe_bsd, scale=scale, mask_bts=mask_bts,
                            q_start_b=q_start_b, impl=impl)
    return jnp.einsum("bthr,rhv->bthv", o_lat_bthr.astype(dtype), w_uv_rhv)


class MLA(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, H, pd, std = cfg.hidden_size, cfg.num_attention_heads, cfg.jnp_param_dtype, cfg.initializer_range
        self.cfg = cfg
        self.w_q_a = normal_param(rngs, (D, cfg.q_lora_rank), ("embed", "q_lora"), pd, std)
        self.q_a_norm = RMSNorm(cfg.q_lora_rank, cfg.mla_norm_eps, pd)
        self.w_q_b = normal_param(rngs, (cfg.q_lora_rank, H, cfg.qk_head_dim), ("q_lora", "heads", "qk_head"), pd, std)
        self.w_kv_a = normal_param(rngs, (D, cfg.kv_lora_rank + cfg.qk_rope_head_dim), ("embed", "kv_lora"), pd, std)
        self.kv_a_norm = RMSNorm(cfg.kv_lora_rank, cfg.mla_norm_eps, pd)
        self.w_kv_b = normal_param(
            rngs, (cfg.kv_lora_rank, H, cfg.qk_nope_head_dim + cfg.v_head_dim), ("kv_lora", "heads", "kv_head"), pd, std)
        self.w_o = normal_param(rngs, (H, cfg.v_head_dim, D), ("heads", "v_head", "embed"), pd, std)

    def latents(self, x_btd, cos_btd, sin_btd, q_parts: bool = False):
        """Queries (nope, roped) and this token's latent KV. q_parts: the two query parts as two products, for an
        attention that reads them as two arrays (Q_PARTS)."""
        cfg, dtype = self.cfg, x_btd.dtype
        cq_btr = self.q_a_norm(jnp.einsum("btd,dr->btr", x_btd, self.w_q_a[...].astype(dtype)))
        n = cfg.qk_nope_head_dim
        if q_parts:   # each part its own product, not a slice of a joined q that XLA would copy
            # alpha_q in the (small) weight, not a pass over q_nope (the same bits where alpha_q is a power of two,
            # as in configs/small.py and longcat_flash.py); the rope product reads the latent through a
            # barrier, so that XLA's dot merger cannot join the two products (or their weight gradients) again into
            # one output that q_nope is then copied out of (both seen in session 30's profile, HISTORY.md).
            w_q_b = (self.w_q_b[...] * cfg.alpha_q).astype(dtype)
            q_nope = jnp.einsum("btr,rhk->bthk", cq_btr, w_q_b[..., :n])
            q_pe = jnp.einsum("btr,rhk->bthk", jax.lax.optimization_barrier(cq_btr), w_q_b[..., n:])
        else:
            q_bthk = jnp.einsum("btr,rhk->bthk", cq_btr, self.w_q_b[...].astype(dtype)) * cfg.alpha_q
            q_nope, q_pe = q_bthk[..., :n], q_bthk[..., n:]
        kva_btr = jnp.einsum("btd,dr->btr", x_btd, self.w_kv_a[...].astype(dtype))
        c_btr = self.kv_a_norm(kva_btr[..., :cfg.kv_lora_rank]) * cfg.alpha_kv
        kpe_btd = apply_rope(kva_btr[..., None, cfg.kv_lora_rank:], cos_btd, sin_btd)[..., 0, :]
        return q_nope, apply_rope(q_pe, cos_btd, sin_btd), LatentKV(c_btr, kpe_btd)

    def train_attention(self, x_btd, mask_kind: str) -> str:
        """The cache-free forward's attention implementation, "auto" resolved from the operands' shapes before the
        q projection runs, which computes q in two parts only for a kernel that takes them."""
        cfg, impl = self.cfg, train_attn_kernel(self.cfg.train_attn_impl)
        if impl != "auto":
            return impl
        (B, T), H, nope, rope = x_btd.shape[:2], cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        sd = lambda *shape: jax.ShapeDtypeStruct(shape, x_btd.dtype)  # noqa: E731
        # The operands as fused_attention hands them on: q as its (nope, rope) pair.
        return auto_fused_impl((sd(B, T, H, nope), sd(B, T, H, rope)), sd(B, T, H, nope + cfg.v_head_dim),
                               sd(B, T, rope), mask_kind)

    def output(self, o_bthv):
        return jnp.einsum("bthv,hvd->btd", o_bthv, self.w_o[...].astype(o_bthv.dtype))

    def __call__(self, x_btd, cos_btd, sin_btd, mask_bts, cache: LatentKV | None = None, write_start_b=None,
                 mask_kind: str = "given", write=write_latents):
        """Returns (output, cache). Without a cache, keys are this call's tokens; with one, the new latents are
        written at `write_start_b` (by `write`, e.g. per shard of a mesh: lcflash/infer/split.py) and `mask_bts`
        spans the whole cache. With a cache, `cfg.attn_impl` picks the form: "expanded", "absorbed" (XLA), or
        "pallas" (the Mosaic GPU kernel, which applies the causal mask from `write_start_b` and ignores
        `mask_bts`). mask_kind: see MASK_KINDS."""
        # The fused kernel serves the cache-free (training / scoring) forward; prefill into a cache keeps XLA.
        impl = self.train_attention(x_btd, mask_kind) if cache is None else "xla"
        q_nope, q_pe, kv = self.latents(x_btd, cos_btd, sin_btd, _takes_q_parts(impl))
        if cache is not None:
            kv = write(cache, kv, write_start_b)
        if cache is not None and self.cfg.attn_impl != "expanded":   # decode: weight absorption
            impl = "pallas" if self.cfg.attn_impl == "pallas" else "xla"
            o_bthv = absorbed_attention(q_nope, q_pe, kv, self.w_kv_b[...], mask_bts, softmax_scale(self.cfg),
                                        self.cfg.qk_nope_head_dim, impl, write_start_b)
        else:
            o_bthv = expanded_attention(q_nope, q_pe, kv, self.w_kv_b[...], mask_bts, softmax_scale(self.cfg),
                                        self.cfg.qk_nope_head_dim, impl, mask_kind)
        return self.output(o_bthv), kv
