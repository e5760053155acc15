"""Token slots <-> expert-sorted rows: the permutation the dropless MoE path runs its grouped matmuls in.

Each token has K slots (its top-K experts). `sort_slots` orders the T*K slots by FFN expert; slots of zero
experts sort past every group and are never read by the grouped matmuls. `dispatch_rows` and `combine_rows` move
rows between the two orders with gathers in both directions, forward and backward (a scatter-add runs with
atomics: 1.6 ms per layer for a 16k-token batch on an H200, experiments/HISTORY.md), and they skip the zero-expert
slots: those gather row 0 (cached) and are masked, so the bytes read scale with the FFN slots, not with T*K.
With GATHER_KERNEL on a Hopper GPU, and where the caller says no consumer reads the rows past the FFN slots
(`tail_unread`: our grouped matmuls; XLA's ragged_dot and the per-expert loop would multiply them by zeros, and
NaN * 0 is NaN), the dispatch gather and the combine's backward (the same gather, scaled by the routing weights)
are a kernel that leaves those rows unwritten (lcflash/kernels/row_gather.py), so the bytes written scale with the
FFN slots too.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lcflash.kernels import accumulation_dtype, on_hopper
from lcflash.parallel.vma import match_vma


class Slots(NamedTuple):
    order_m: jax.Array        # [M] slot (t*K + k) held by sorted row m, M = T*K
    tok_m: jax.Array          # [M] token of sorted row m; 0 where the row holds a zero-expert slot
    valid_m: jax.Array        # [M] the row holds an FFN slot (the first sum(group_sizes) rows)
    row_tk: jax.Array         # [T, K] sorted row of slot (t, k); 0 for zero-expert slots
    ffn_tk: jax.Array         # [T, K] the slot chose an FFN expert
    group_sizes_g: jax.Array  # [N] rows per FFN expert


def sort_slots(experts_tk, n_ffn: int) -> Slots:
    """Stable sort of the slots by FFN expert (zero experts last). Group sizes count the sorted ids below each
    bound in one fused comparison-reduction: a bincount would be a scatter-add into N+1 bins, and searchsorted's
    default binary search is a while loop of ~100 small kernels per call on a GPU."""
    T, K = experts_tk.shape
    M = T * K
    e_m = jnp.minimum(experts_tk, n_ffn).reshape(-1).astype(jnp.int32)
    sorted_e_m, order_m = jax.lax.sort((e_m, jnp.arange(M, dtype=jnp.int32)), num_keys=1, is_stable=True)
    bounds = jnp.searchsorted(sorted_e_m, jnp.arange(n_ffn + 1, dtype=jnp.int32), side="left",
                            method="compare_all").astype(jnp.int32)
    valid_m = sorted_e_m < n_ffn
    ffn_tk = experts_tk < n_ffn
    row_m = jnp.zeros((M,), jnp.int32).at[order_m].set(jnp.arange(M, dtype=jnp.int32), unique_indices=True)
    return Slots(order_m=order_m, tok_m=jnp.where(valid_m, order_m // K, 0), valid_m=valid_m,
                 row_tk=jnp.where(ffn_tk, row_m.reshape(T, K), 0), ffn_tk=ffn_tk,
                 group_sizes_g=jnp.diff(bounds))


def _sum_slots(rows_md, slots: Slots, w_tk=None):
    """Σ_k over each token's FFN slots of rows[row_tk] (times w_tk), at least fp32, [T, D]. One term per k, so XLA
    fuses the K gathers into one elementwise kernel instead of materialising [T, K, D]."""
    K = slots.row_tk.shape[1]
    out = None
    for k in range(K):
        r = rows_md[slots.row_tk[:, k]].astype(accumulation_dtype(rows_md.dtype))
        if w_tk is not None:
            r = r * w_tk[:, k, None]
        r = jnp.where(slots.ffn_tk[:, k, None], r, 0.0)
        out = r if out is None else out + r
    return out


def dispatch_rows(x_td, slots: Slots, tail_unread: bool = False):
    """[M, D] rows in sorted order: row m is its token's row (row 0 of x where it holds a zero-expert slot; with
    tail_unread, undefined past the FFN slots' next whole tile)."""
    return _dispatch_rows(*match_vma(x_td, slots), tail_unread)


# The dispatch gather kernel on a Hopper GPU: 0.503 -> 0.251 ms per layer at 32 x 1024 tokens on an H200
# (experiments/bench_rows.py); experiments/bench_train.py --no_dispatch_gather_kernel is the A/B baseline.
GATHER_KERNEL = True


def _gather_kernel(x_td, slots: Slots, tail_unread: bool, scale_m=None):
    """The FFN slots' rows by row_gather.take_rows (rows past them unwritten) where it applies, else None."""
    if not (tail_unread and GATHER_KERNEL and on_hopper()):
        return None
    from lcflash.kernels import row_gather  # imported on first use: keeps CPU-only imports light

    if row_gather.supported(x_td, slots.tok_m.shape[0]) is not None:
        return None
    return row_gather.take_rows(x_td, slots.tok_m, jnp.sum(slots.group_sizes_g), scale_m,
                                interpret=jax.default_backend() != "gpu")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dispatch_rows(x_td, slots: Slots, tail_unread: bool):
    rows_md = _gather_kernel(x_td, slots, tail_unread)
    return x_td[slots.tok_m] if rows_md is None else rows_md


def _dispatch_fwd(x_td, slots, tail_unread):
    return _dispatch_rows(x_td, slots, tail_unread), slots


def _dispatch_bwd(tail_unread, slots, g_md):
    return _sum_slots(g_md, slots).astype(g_md.dtype), None


_dispatch_rows.defvjp(_dispatch_fwd, _dispatch_bwd)


def combine_rows(y_md, w_tk, slots: Slots, out_dtype=None, tail_unread: bool = False):
    """Σ_k w[t, k] y[row of slot (t, k)] over each token's FFN slots, [T, D] in fp32 (or y's wider dtype).
    out_dtype: the dtype the caller casts the sum to (MoE.combine: y's). Its gradient then holds values of that
    dtype, and the backward's gather kernel reads it in y's dtype, half the bytes of fp32, with the same result.
    tail_unread: d_y's rows past the FFN slots may be left undefined (see the module's docstring)."""
    return _combine_rows(*match_vma(y_md, w_tk, slots), None if out_dtype is None else jnp.dtype(out_dtype),
                         tail_unread)


# The combine's backward by the gather kernel (d_y with the rows past the FFN slots unwritten): 0.572 ms per layer by
# XLA at 32 x 1024 tokens on an H200 before (experiments/HISTORY.md, session 26); experiments/bench_train.py
# --no_combine_grad_kernel is the A/B baseline.
COMBINE_GRAD_KERNEL = True


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _combine_rows(y_md, w_tk, slots: Slots, out_dtype, tail_unread: bool):
    return _sum_slots(y_md, slots, w_tk)


def _combine_fwd(y_md, w_tk, slots, out_dtype, tail_unread):
    return _combine_rows(y_md, w_tk, slots, out_dtype, tail_unread), (y_md, w_tk, slots)


def _combine_bwd(out_dtype, tail_unread, res, g_td):
    y_md, w_tk, slots = res
    acc = accumulation_dtype(y_md.dtype)
    g_td = g_td.astype(acc)
    w_m = jnp.where(slots.valid_m, w_tk.reshape(-1)[slots.order_m], 0.0)
    # d_y in sorted order: one gather of the token's gradient per row, zero past the FFN rows (the kernel: zero up to
    # the next whole tile, unwritten after; the grouped matmuls read no further).
    d_y_md = None
    if COMBINE_GRAD_KERNEL and out_dtype == y_md.dtype:
        d_y_md = _gather_kernel(g_td.astype(y_md.dtype), slots, tail_unread, w_m)
    if d_y_md is None:
        d_y_md = jnp.where(slots.valid_m[:, None], w_m[:, None] * g_td[slots.tok_m], 0.0).astype(y_md.dtype)
    # d_w[t, k] = <g[t], y[row_tk]>: rows gathered into a row reduction, zero for zero-expert slots. (Reading the rows
    # in sorted order instead, d_w beside d_y from one gathered g, measured 0.626 against 0.607 ms per layer at
    # 32 x 1024 on an H200, and one Mosaic GPU kernel for both 0.592: experiments/HISTORY.md, sessions 15-16.)
    y_tkd = y_md[slots.row_tk].astype(acc)
    d_w_tk = jnp.where(slots.ffn_tk, jnp.sum(g_td[:, None, :] * y_tkd, axis=-1), 0.0).astype(w_tk.dtype)
    return d_y_md, d_w_tk, None


_combine_rows.defvjp(_combine_fwd, _combine_bwd)
