"""Absorbed MLA attention over the latent cache, in plain JAX (reference §8.2).

Every head reads the same latent per cached token, so absorbed attention is MQA with a key of
`kv_lora_rank + rope_dim` values and a value of `kv_lora_rank` values:

    logits[b,h,t,s] = (q_lat[b,t,h] . c[b,s] + q_pe[b,t,h] . k_pe[b,s]) * scale
    o_lat[b,t,h]    = sum_s softmax_s(logits) c[b,s]          (still latent; the caller applies W_UV)

`mla_decode_reference` is the XLA path (any mask). `mla_decode_split_reference` computes the same thing the way
the Pallas kernel does (context split into blocks of keys, one partial softmax per split, then `combine_splits`),
so the split and combine arithmetic is tested on CPU, where the Mosaic GPU kernel cannot run.
"""

import math

import jax
import jax.numpy as jnp

NEG_INF = -1e30          # finite: a fully masked block gives exp2(0) garbage that the next real key wipes out
LOG2E = math.log2(math.e)


def causal_decode_mask(q_start_b, q_len: int, kv_len: int):
    """mask[b, t, s]: query t of row b sits at cache index q_start_b[b] + t and sees keys s <= that index."""
    q_idx_bt = q_start_b[:, None] + jnp.arange(q_len, dtype=jnp.int32)[None, :]
    return jnp.arange(kv_len, dtype=jnp.int32)[None, None, :] <= q_idx_bt[:, :, None]


def mla_decode_reference(q_lat_bthr, q_pe_bthd, c_bsr, kpe_bsd, mask_bts, scale: float):
    """o_lat [B, T, H, R] in the dtype of q_lat; logits and softmax in fp32 (as the expanded form)."""
    dtype = q_lat_bthr.dtype
    logits_bhts = (
        jnp.einsum("bthr,bsr->bhts", q_lat_bthr, c_bsr.astype(dtype), preferred_element_type=jnp.float32)
        + jnp.einsum("bthd,bsd->bhts", q_pe_bthd, kpe_bsd.astype(dtype), preferred_element_type=jnp.float32)
    ) * scale
    logits_bhts = jnp.where(mask_bts[:, None], logits_bhts, NEG_INF)
    probs_bhts = jax.nn.softmax(logits_bhts, axis=-1).astype(dtype)
    return jnp.einsum("bhts,bsr->bthr", probs_bhts, c_bsr.astype(dtype))


def combine_splits(o_bnmr, lse2_bnm):
    """Merges per-split partial outputs (each normalised by its own softmax sum) by their log2-sum-exp2.

    A split that processed no key has lse2 = -inf and an undefined output; its weight is exactly zero and its
    output is never read. o: [B, splits, M, R] fp32, lse2: [B, splits, M] -> [B, M, R] fp32.
    """
    m_bm = jnp.max(lse2_bnm, axis=1)
    w_bnm = jnp.exp2(lse2_bnm - m_bm[:, None])
    o_bnmr = jnp.where((w_bnm > 0)[..., None], o_bnmr, 0.0)
    return jnp.sum(o_bnmr * w_bnm[..., None], axis=1) / jnp.sum(w_bnm, axis=1)[..., None]


def row_query_offset(rows: int, heads: int, q_len: int):
    """Query index t of each kernel row: rows are (t, h) t-major, padding rows act as the last query."""
    return jnp.minimum(jnp.arange(rows, dtype=jnp.int32) // heads, q_len - 1)


def per_split_blocks(n_blocks: int, num_splits: int) -> int:
    """Blocks per split: ceil(n_blocks / splits); the last split may be shorter (same rule as the kernel)."""
    return -(-n_blocks // max(1, min(num_splits, n_blocks)))


def split_partials(q_mr, qpe_md, c_sr, kpe_sd, start, q_off_m, scale: float, num_splits: int, block_kv: int):
    """One batch row, the kernel's arithmetic: per split, an online softmax over its valid key blocks.

    Returns (o [splits, M, R] fp32 normalised per split, lse2 [splits, M]). Blocks past the last visible key
    are skipped, as in the kernel; keys inside a processed block but past a row's position get NEG_INF.
    """
    S = c_sr.shape[0]
    n_blocks = per_split_blocks(S // block_kv, num_splits)
    per_split = n_blocks * block_kv
    num_splits = -(-S // per_split)
    kv_end = start + jnp.max(q_off_m) + 1
    dtype = q_mr.dtype
    s_ms = (jnp.einsum("mr,sr->ms", q_mr, c_sr, preferred_element_type=jnp.float32)
            + jnp.einsum("md,sd->ms", qpe_md, kpe_sd, preferred_element_type=jnp.float32)) * (scale * LOG2E)
    key_s = jnp.arange(S, dtype=jnp.int32)
    s_ms = jnp.where(key_s[None, :] <= (start + q_off_m)[:, None], s_ms, NEG_INF)
    os, lses = [], []
    for j in range(num_splits):
        lo = j * per_split
        n = jnp.clip((kv_end - lo + block_kv - 1) // block_kv, 0, n_blocks)
        processed_s = (key_s >= lo) & (key_s < lo + n * block_kv)
        sj = jnp.where(processed_s[None, :], s_ms, -jnp.inf)
        m = jnp.max(sj, axis=1)
        p = jnp.exp2(sj - m[:, None])
        l_m = jnp.sum(p, axis=1)
        o = jnp.einsum("ms,sr->mr", p.astype(dtype), c_sr, preferred_element_type=jnp.float32) / l_m[:, None]
        os.append(o)
        lses.append(jnp.where(n > 0, m + jnp.log2(l_m), -jnp.inf))
    return jnp.stack(os), jnp.stack(lses)


def mla_decode_split_reference(q_lat_bthr, q_pe_bthd, c_bsr, kpe_bsd, q_start_b, scale: float,
                               num_splits: int, block_kv: int):
    """Same result as `mla_decode_reference` with the causal mask, computed split by split like the kernel."""
    B, T, H, R = q_lat_bthr.shape
    S = c_bsr.shape[1]
    if S % block_kv:
        raise ValueError(f"cache length {S} must be a multiple of block_kv = {block_kv}")
    q_off_m = row_query_offset(T * H, H, T)
    q_bmr = q_lat_bthr.reshape(B, T * H, R)
    qpe_bmd = q_pe_bthd.reshape(B, T * H, -1)
    part = jax.vmap(lambda q, qp, c, k, st: split_partials(q, qp, c.astype(q.dtype), k.astype(q.dtype), st, q_off_m,
                                                          scale, num_splits, block_kv))
    o_bnmr, lse_bnm = part(q_bmr, qpe_bmd, c_bsr, kpe_bsd, q_start_b)
    o_bmr = combine_splits(o_bnmr, lse_bnm)
    return o_bmr.reshape(B, T, H, R).astype(q_lat_bthr.dtype)
