"""Causal attention over packed documents in plain JAX, and the block ranges the kernels visit.

A "causal_docs" mask is causal AND same segment. Its rows name their segment by `first_bt[b, i]`, the first key
row i may see (the first token of its segment in the row): first[i] == first[j] exactly when i and j share a
segment, for any segment ids, contiguous or not, and `first_visible` reads it off the boolean mask. The kernels
visit, per query block, the key blocks from the one holding the block's smallest `first` up to the diagonal
(the rest of the causal triangle holds no visible key) and mask inside them, except in the run of blocks next to
the diagonal whose every pair is visible (`unmasked_runs`: inside one document), where masking changes nothing.
"""

import jax
import jax.numpy as jnp

from lcflash.kernels.mla_decode.reference import LOG2E, NEG_INF  # noqa: F401 -- shared by the kernels


def first_visible(mask_bts):
    """[B, T] int32: the first key each query row sees (row i of a causal mask always sees key i)."""
    return jnp.argmax(mask_bts, axis=-1).astype(jnp.int32)


def doc_mask(first_bt):
    """[B, T, T]: key j visible to query i iff j <= i and both lie in one segment."""
    idx = jnp.arange(first_bt.shape[1], dtype=jnp.int32)
    return (idx[None, None, :] <= idx[None, :, None]) & (first_bt[:, :, None] == first_bt[:, None, :])


def attention_reference(q_bthk, k_bshk, v_bshv, first_bt, scale: float):
    """Softmax in fp32, output in q's dtype (the expanded XLA form of lcflash.model.mla)."""
    logits_bhts = jnp.einsum("bthk,bshk->bhts", q_bthk, k_bshk, preferred_element_type=jnp.float32) * scale
    logits_bhts = jnp.where(doc_mask(first_bt)[:, None], logits_bhts, NEG_INF)
    probs_bhts = jax.nn.softmax(logits_bhts, axis=-1).astype(q_bthk.dtype)
    return jnp.einsum("bhts,bshv->bthv", probs_bhts, v_bshv)


def kv_block_ranges(first_bt, block_q: int, block_kv: int):
    """Key blocks [lo, hi) each query block visits, two [B, T // block_q] int32 arrays."""
    B, T = first_bt.shape
    nq = T // block_q
    lo = jnp.min(first_bt.reshape(B, nq, block_q), axis=-1) // block_kv
    hi = (jnp.arange(1, nq + 1, dtype=jnp.int32) * block_q + block_kv - 1) // block_kv
    return lo.astype(jnp.int32), jnp.broadcast_to(hi, (B, nq)).astype(jnp.int32)


def q_block_ranges(first_bt, block_q: int, block_kv: int):
    """Query blocks [lo, hi) that see some key of each key block, two [B, T // block_kv] int32 arrays: from the
    block holding the key block's first row (causal) to the last row whose `first` is in or before the block."""
    B, T = first_bt.shape
    nk = T // block_kv
    key_end = jnp.arange(1, nk + 1, dtype=jnp.int32) * block_kv - 1                       # [nk]
    rows = jnp.arange(T, dtype=jnp.int32)
    last = jnp.max(jnp.where(first_bt[:, None, :] <= key_end[None, :, None], rows, -1), axis=-1)  # [B, nk]
    lo = jnp.arange(nk, dtype=jnp.int32) * block_kv // block_q
    return jnp.broadcast_to(lo, (B, nk)).astype(jnp.int32), (last // block_q + 1).astype(jnp.int32)


def unmasked_runs(first_bt, block: int):
    """The blocks next to the diagonal whose every (query, key) pair is visible, so the kernels skip masking them
    (block b on both sides, T // block blocks): query block b sees key blocks [kv_from[b], b) whole, and key block b
    is seen whole by query blocks [b + 1, q_to[b]). Two [B, T // block] int32 arrays, inside the ranges above. For
    contiguous segments these are all the whole blocks; otherwise a whole block past a masked one stays masked,
    which is still exact."""
    B, T = first_bt.shape
    nb = T // block
    f = first_bt.reshape(B, nb, block)
    f_b, uniform_b = f[..., 0], jnp.all(f == f[..., :1], axis=-1)              # one segment per block
    idx = jnp.arange(nb, dtype=jnp.int32)
    q_idx, k_idx = idx[None, :, None], idx[None, None, :]
    whole_bqk = ((k_idx < q_idx) & uniform_b[:, :, None] & uniform_b[:, None, :]
                 & (f_b[:, :, None] == f_b[:, None, :]))                        # [B, query block, key block]
    broken = ~whole_bqk
    kv_from = jnp.max(jnp.where(broken & (k_idx < q_idx), k_idx + 1, 0), axis=2)
    q_to = jnp.min(jnp.where(broken & (q_idx > k_idx), q_idx, nb), axis=1)
    return kv_from.astype(jnp.int32), q_to.astype(jnp.int32)
