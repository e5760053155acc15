"""Causal flash attention over packed documents as Pallas Mosaic GPU kernels (Hopper: TMA + wgmma), with its VJP.

MLA's training form: queries and keys of qk = 192 (nope | rope), values of 128, every head its own keys. One CTA
(one warpgroup) holds a block of 64 rows and walks the blocks of the other side that hold a visible pair
(`reference.kv_block_ranges` / `q_block_ranges`): packed documents of mean length 400 in rows of 1024 leave
~64% of the causal triangle's 64 x 64 blocks, and a cuDNN call told about the documents (a mask bias) costs
1.8x its plain causal call (experiments/HISTORY.md). With UNMASKED_RUNS, only the blocks where some pair is hidden
are masked: the run of whole blocks next to the diagonal (`reference.unmasked_runs`) is walked by a loop without
the mask. Loads run `depth` blocks ahead of the math. The outputs are staged in a ring slot that the loop has
drained, not in their own buffers: the forward then takes ~105 KB of shared memory at depth 2, so two CTAs share an
SM (0.186 -> 0.151 ms at 16 x 1024 on an H200).

* forward: S = Q K^T, online softmax in log2 units, O = P V; writes O and lse2 = m + log2(l) per row.
* dk, dv: per key block over the query blocks that see it: P from lse2, dP = dO V^T, dS = P (dP - delta),
  dV = P^T dO, dK = scale dS^T Q.
* dq: dQ = scale dS K over the forward's key blocks. With DQ_FROM_DS (the default) it reads the bf16 dS that the
  dk/dv kernel wrote per visited block, one product per visit: five products per visited block in the backward
  instead of seven, for 8 KB written and read per visit, still deterministic (no atomics). Otherwise it recomputes
  P, dP and dS itself.
delta = rowsum(dO * O) comes from XLA.

Each kernel runs a CTA per block. Persistent CTAs (one per SM walking a share of the blocks, loads running on from
one block into the next) gave the same bits and were slower for every kernel: the dk/dv one made forward + backward
41% slower on an H200 (experiments/HISTORY.md, session 36). They are gone; commit 6619fac has them.

In Pallas' GPU interpreter (CPU tests) the products are plain dots: the interpreter's wgmma takes neither transposed
views nor register operands.

`mla_doc_attention` runs the same kernels on MLA's operands where the model computes them (`Form`): q = [nope |
rope], kv = [k_nope | v] (the latent's up projection) and the rope key shared by all heads. S is then the sum of two
products (nope against k_nope, rope against the shared key), each part loaded by its own TMA copy from its columns,
and the gradients are written in the same layouts ([dk_nope | dv] as one array), so XLA neither assembles per-head
keys nor copies v out of kv, forward or backward (`doc_attention(q, k, v)` keeps the plain form).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src.state import types as state_types
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from lcflash.kernels import KERNEL_OUTPUT, interpret_params, load_in_layout
from lcflash.kernels.doc_attention.reference import (LOG2E, NEG_INF, kv_block_ranges, q_block_ranges,
                                                     unmasked_runs)

BLOCK = 64          # rows per CTA and per visited block (the wgmma M of one warpgroup)
# Blocks loaded ahead by the forward, dq and dk/dv kernels; fwd+bwd at 16 x 1024 on an H200: 0.584 ms, (2, 2, 2) 0.590,
# (1, 1, 2) 0.593 (experiments/bench_attention_depths_h200.json). The dk/dv kernel at depth 2 takes ~122 KB of shared
# memory in MLA's form, so one CTA per SM; at depth 1, ~81 KB and two, yet slower: (2, 1, 1) 0.709 ms and -1.8% in
# training (experiments/HISTORY.md, session 16). Two warpgroups per dk/dv CTA (two key blocks sharing the query-side
# ring, warpgroup 0 refilling a slot once both had read it; commit 7885744) gave the same bits and was slower: 0.62-0.70
# against 0.52-0.54 ms fwd+bwd, -2.2% in training (session 19). Read at call time when a call passes no depths.
DEPTHS = (2, 1, 2)
# The dq kernel takes dS from the dk/dv kernel instead of recomputing it (see the module docstring): fwd+bwd at
# 32 x 1024 on an H200 1.204-1.211 -> 1.131 ms, training +1.5% and +1.9% in two A/B pairs with bitwise-equal losses
# (experiments/HISTORY.md, session 27).
# Read at call time; experiments/bench_attention.py's pallas_dq_recompute and bench_train.py --attn_dq_recompute are
# the A/B baseline.
DQ_FROM_DS = True
# Blocks of dS and K that kernel loads ahead, 32 KB each in MLA's form; read at call time.
DQ_DS_DEPTH = 2


def supported(q_bthk, k_bshk, v_bshv) -> str | None:
    """None if the kernels take these operands, else the reason they do not."""
    (B, T, H, dk), dv = q_bthk.shape, v_bshv.shape[-1]
    if jnp.dtype(q_bthk.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {jnp.dtype(q_bthk.dtype).name}: the kernels need bfloat16 or float16 (wgmma operands)"
    if k_bshk.shape != (B, T, H, dk) or v_bshv.shape[:3] != (B, T, H):
        return f"q {q_bthk.shape}, k {k_bshk.shape}, v {v_bshv.shape}: self-attention with one key per head"
    if T % BLOCK:
        return f"sequence length {T} must be a multiple of {BLOCK}"
    if dk % 64 or dv % 64 or dk > 256 or dv > 256:
        return f"head sizes qk {dk} and v {dv} must be multiples of 64, at most 256"
    return None


class _Ops:
    """Register-layout operations, or their plain forms in the interpreter."""

    def __init__(self, interpret: bool):
        self.interpret = interpret

    def full(self, shape, value):
        x = jnp.full(shape, value, jnp.float32)
        if self.interpret:
            return x
        layout = plgpu.Layout.WGMMA if len(shape) == 2 else plgpu.Layout.WGMMA.reduce(1)
        return plgpu.layout_cast(x, layout)

    def iota(self, shape, dim):
        if self.interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

    def transposed(self, ref):
        """A [m, k] product operand from a [k, m] smem tile: a transposed view (wgmma reads it so), or its value."""
        return ref[...].T if self.interpret else ref.transpose((1, 0))

    def vector(self, ref, axis: int, shape):
        """A [n] smem vector broadcast along `axis` of a 2-D tile (axis 1: one value per row)."""
        v = ref[...] if self.interpret else load_in_layout(ref, plgpu.Layout.WGMMA.reduce(axis))
        return lax.broadcast_in_dim(v, shape, [1 - axis])

    def dots(self, *products):
        """(a, b_ref, transpose_b, acc or a result shape) products, issued together and waited for once; a and b_ref
        may be equally long lists, whose products are summed (one accumulator). An `a` that is a `_Later` is computed
        when its product is issued, so that work overlaps the products issued before it."""
        if self.interpret:
            return tuple(self.dot(_now(a), b, transpose_b=t, **({"shape": x} if isinstance(x, tuple) else {"acc": x}))
                         for a, b, t, x in products)

        def issue(acc_refs):
            for acc_ref, (a, b, t, _) in zip(acc_refs, products, strict=True):
                for a_i, b_i in _terms(_now(a), b):
                    plgpu.wgmma(acc_ref, a_i, b_i.transpose((1, 0)) if t else b_i)
        return pl.run_state(issue)(tuple(plgpu.ACC.init(self.full(x, 0.0) if isinstance(x, tuple) else x)
                                         for *_, x in products))

    def dot(self, a, b_ref, *, transpose_b=False, acc=None, shape=None):
        """a @ b (b^T) in fp32, added to acc; a is a smem ref or a register array, b a smem ref (or equally long
        lists of them: the products' sum)."""
        if self.interpret:
            out = acc
            for a_i, b_i in _terms(a, b_ref):
                av = a_i[...] if _is_ref(a_i) else a_i
                bv = b_i[...]
                prod = jnp.dot(av, bv.T if transpose_b else bv, preferred_element_type=jnp.float32)
                out = prod if out is None else out + prod
            return out
        if acc is None and not isinstance(a, (list, tuple)):
            def run(acc_ref):
                plgpu.wgmma(acc_ref, a, b_ref.transpose((1, 0)) if transpose_b else b_ref)
                return acc_ref[...]
            return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))
        return self.dots((a, b_ref, transpose_b, self.full(shape, 0.0) if acc is None else acc))[0]


class _Later:
    """A register operand computed on first use (once): `_Ops.dots` issues the products before it first."""

    def __init__(self, fn):
        self.fn, self.value = fn, None

    def __call__(self):
        if self.value is None:
            self.value = self.fn()
        return self.value


def _now(a):
    return a() if isinstance(a, _Later) else a


def _operand(parts):
    """A product operand from its parts: the one ref of the plain form, else the list whose products are summed."""
    return parts[0] if len(parts) == 1 else list(parts)


def _terms(a, b):
    """The (a, b) operand pairs of a product whose operands may be lists (summed)."""
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), (len(a), len(b))
        return list(zip(a, b))
    return [(a, b)]


def _is_ref(x) -> bool:
    return isinstance(x, state_types.TransformedRef) or isinstance(getattr(x, "aval", None), state_types.AbstractRef)


def _walk(visits_ref, depth, own, ring):
    """This CTA's (batch, head, its block's rows, first visited block, visited count, the visits [p0, p1) that need
    no mask, fetch). visits_ref [4, B, blocks]: the visited blocks [lo, hi) and the unmasked ones [plain_lo,
    plain_hi) inside them. Loads `own` (pairs of gmem view and smem, one barrier each, in the barrier array that
    follows them) and the first `depth` visited blocks of `ring` ((gmem view of a block slice, smem ring, barriers)
    triples); fetch(i, slot) loads visited block i into ring slot `slot`. Waits for `own` only."""
    b, h, blk = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("blk")
    lo = visits_ref[0, b, blk]
    n = visits_ref[1, b, blk] - lo
    plain = (visits_ref[2, b, blk] - lo, visits_ref[3, b, blk] - lo)
    rows = pl.ds(blk * BLOCK, BLOCK)

    def fetch(i, slot):
        part = pl.ds((lo + i) * BLOCK, BLOCK)
        for src, smem, bar in ring:
            plgpu.copy_gmem_to_smem(src(b, h, part), smem.at[slot], bar.at[slot])

    (own, own_bar) = own
    for j, (src, dst) in enumerate(own):
        plgpu.copy_gmem_to_smem(src(b, h, rows), dst, own_bar.at[j])
    for i in range(depth):
        pl.when(i < n)(functools.partial(fetch, i, i))
    for j in range(len(own)):
        plgpu.barrier_wait(own_bar.at[j])
    return b, h, rows, lo, n, plain, fetch


def _visit(n, plain, body, carry):
    """body(i, carry, masked) over visits [0, n), masked=False (static) on the visits `plain` = [p0, p1), whose
    every pair is visible: three loops instead of a mask on every block."""
    p0, p1 = plain
    carry = lax.fori_loop(0, p0, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(p0, p1, functools.partial(body, masked=False), carry)
    return lax.fori_loop(p1, n, functools.partial(body, masked=True), carry)


def _visible(x, fill, key_le_query, first_q, first_k):
    """x where the key is at or before the query and in its segment, else fill."""
    return jnp.where(first_q == first_k, jnp.where(key_le_query, x, fill), fill)


class Form(NamedTuple):
    """Where the kernels read their operands and write the gradients.

    q [B, T, H, sum(widths)] is split into column parts of `widths`, one product each against its key part: part 0
    is the first widths[0] columns of k [B, T, H, *]; with `shared`, part 1 is a key shared by all heads,
    [B, T, widths[1]] (MLA's rope key; its gradient is written per head, [B, T, H, widths[1]], and summed by XLA).
    v is columns [v_col, v_col + dv) of v [B, T, H, *], or of k itself with `v_in_k` (MLA's kv = [k_nope | v]: its
    gradient [dk_nope | dv] is then written as one array). The plain form: one part, v_col 0. With `q_parts`, q comes
    as one array per part ([B, T, H, widths[i]]) and dq goes back so: MLA's queries need no [nope | rope] copy."""
    widths: tuple[int, ...]
    v_col: int
    dv: int
    shared: bool = False
    v_in_k: bool = False
    q_parts: bool = False

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(int(o) for o in np.cumsum((0,) + tuple(self.widths[:-1])))

    @property
    def n_q(self) -> int:
        """Query arrays the kernels take (and dq arrays they write)."""
        return len(self.widths) if self.q_parts else 1

    @property
    def n_k(self) -> int:
        """Key and value arrays the kernels take after q: k, the shared key, v."""
        return 1 + self.shared + (not self.v_in_k)


# gmem views of one block slice: per head ([B, T, H, d] operands, [B, H, T] row statistics) or per row ([B, T]).
_STATS = lambda ref: lambda b, h, sl: ref.at[b, h, sl]       # noqa: E731
_ROWS = lambda ref: lambda b, h, sl: ref.at[b, sl]           # noqa: E731


def _heads(ref, off: int = 0, width: int | None = None, per_head: bool = True):
    """View of columns [off, off + width) of a [B, T, H, d] (or, not per head, [B, T, d]) operand's block slice."""
    width = ref.shape[-1] - off if width is None else width
    cols = () if (off == 0 and width == ref.shape[-1]) else (pl.ds(off, width),)
    if per_head:
        return lambda b, h, sl: ref.at[(b, sl, h) + cols]
    return lambda b, h, sl: ref.at[(b, sl) + cols]


def _q_views(form: Form, q_refs):
    """One view per part: a whole array each with `q_parts`, else column windows of the one q array."""
    if form.q_parts:
        return [_heads(r) for r in q_refs]
    return [_heads(q_refs[0], o, w) for o, w in zip(form.offsets, form.widths)]


def _kv_views(form: Form, kv_refs):
    """(key part views, value view) of the kernels' key/value inputs (k, [shared key], [v])."""
    k_ref = kv_refs[0]
    keys = [_heads(k_ref, 0, form.widths[0])] + ([_heads(kv_refs[1], per_head=False)] if form.shared else [])
    return keys, _heads(k_ref if form.v_in_k else kv_refs[-1], form.v_col, form.dv)


def _fwd_visit(ops, scale, carry, q_ops, keys, v_smem, see, wait_v):
    """One visited key block of the forward kernels: the online softmax of S = Q K^T (log2 units), then O += P V.
    see(s): S with the hidden pairs at NEG_INF (None: all visible); wait_v() waits for V, which S does not need."""
    acc, m_i, l_i = carry
    tile = (BLOCK, BLOCK)
    s = ops.dot(q_ops, keys, transpose_b=True, shape=tile) * (scale * LOG2E)
    if see is not None:
        s = see(s)
    m_new = jnp.maximum(m_i, s.max(axis=1))
    alpha = jnp.exp2(m_i - m_new)
    p = jnp.exp2(s - lax.broadcast_in_dim(m_new, tile, [0]))
    l_i = l_i * alpha + p.sum(axis=1)
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    wait_v()
    return ops.dot(p.astype(v_smem.dtype), v_smem, acc=acc), m_new, l_i


def _fwd_zeros(ops, dv):
    return ops.full((BLOCK, dv), 0.0), ops.full((BLOCK,), -jnp.inf), ops.full((BLOCK,), 0.0)


def _fwd_store(carry, o_smem, lse_smem, o_dst, lse_dst):
    """Stages O = acc / l and lse2 = m + log2(l) and starts their TMA stores. Waits for neither."""
    acc, m_i, l_i = carry
    o_smem[...] = (acc / lax.broadcast_in_dim(l_i, acc.shape, [0])).astype(o_smem.dtype)
    lse_smem[...] = m_i + jnp.log(l_i) * LOG2E
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_dst)
    plgpu.copy_smem_to_gmem(lse_smem, lse_dst)


def _fwd_kernel(visits_ref, first_ref, *refs, form, depth, scale, ops):
    q_refs, refs = refs[:form.n_q], refs[form.n_q:]
    kv_refs, (o_ref, lse_ref, scoped) = refs[:form.n_k], refs[form.n_k:]
    P = len(form.widths)
    smem, (q_bar, *ring_bars) = scoped
    q_s, (fq_smem,), k_s, (v_smem, fk_smem, lse_smem) = smem[:P], smem[P:P + 1], smem[P + 1:2 * P + 1], smem[2 * P + 1:]
    k_bars, (v_bar, fk_bar) = ring_bars[:P], ring_bars[P:]
    k_views, v_view = _kv_views(form, kv_refs)
    b, h, rows, lo, n, plain, fetch = _walk(
        visits_ref, depth, ([*zip(_q_views(form, q_refs), q_s), (_ROWS(first_ref), fq_smem)], q_bar),
        [*zip(k_views, k_s, k_bars), (v_view, v_smem, v_bar), (_ROWS(first_ref), fk_smem, fk_bar)])
    tile = (BLOCK, BLOCK)
    fq = ops.vector(fq_smem, 1, tile)
    row = ops.iota(tile, 0) + rows.start
    col = ops.iota(tile, 1)
    q_ops = _operand(q_s)

    def body(i, carry, masked):
        slot = lax.rem(i, jnp.int32(depth))
        for bar in (*k_bars, fk_bar):
            plgpu.barrier_wait(bar.at[slot])
        see = (lambda s: _visible(s, NEG_INF, col + (lo + i) * BLOCK <= row, fq,
                                  ops.vector(fk_smem.at[slot], 0, tile))) if masked else None
        carry = _fwd_visit(ops, scale, carry, q_ops, _operand([k.at[slot] for k in k_s]), v_smem.at[slot], see,
                           lambda: plgpu.barrier_wait(v_bar.at[slot]))

        @pl.when(i + depth < n)
        def _():
            fetch(i + depth, slot)

        return carry

    carry = _visit(n, plain, body, _fwd_zeros(ops, v_smem.shape[-1]))
    # Every load has landed and been read: the ring's first slot stages the output.
    _fwd_store(carry, v_smem.at[0], lse_smem, o_ref.at[b, rows, h], lse_ref.at[b, h, rows])
    plgpu.wait_smem_to_gmem(0)


def _dq_kernel(visits_ref, first_ref, *refs, form, depth, scale, ops):
    q_refs, refs = refs[:form.n_q], refs[form.n_q:]
    kv_refs, (do_ref, lse_ref, delta_ref, *dq_refs, scoped) = refs[:form.n_k], refs[form.n_k:]
    P = len(form.widths)
    smem, (q_bar, *ring_bars) = scoped
    q_s, (do_smem, fq_smem, lse_smem, delta_smem), k_s, (v_smem, fk_smem) = (
        smem[:P], smem[P:P + 4], smem[P + 4:2 * P + 4], smem[2 * P + 4:])
    k_bars, (v_bar, fk_bar) = ring_bars[:P], ring_bars[P:]
    k_views, v_view = _kv_views(form, kv_refs)
    own = [*zip(_q_views(form, q_refs), q_s), (_heads(do_ref), do_smem), (_ROWS(first_ref), fq_smem),
           (_STATS(lse_ref), lse_smem), (_STATS(delta_ref), delta_smem)]
    b, h, rows, lo, n, plain, fetch = _walk(
        visits_ref, depth, (own, q_bar),
        [*zip(k_views, k_s, k_bars), (v_view, v_smem, v_bar), (_ROWS(first_ref), fk_smem, fk_bar)])
    tile = (BLOCK, BLOCK)
    fq, lse, delta = (ops.vector(r, 1, tile) for r in (fq_smem, lse_smem, delta_smem))
    row = ops.iota(tile, 0) + rows.start
    col = ops.iota(tile, 1)
    dtype = q_s[0].dtype
    q_ops = _operand(q_s)

    def body(i, dqs, masked):
        slot = lax.rem(i, jnp.int32(depth))
        for bar in (*k_bars, fk_bar, v_bar):
            plgpu.barrier_wait(bar.at[slot])
        keys = [k.at[slot] for k in k_s]
        s, dp = ops.dots((q_ops, _operand(keys), True, tile), (do_smem, v_smem.at[slot], True, tile))
        p = jnp.exp2(s * (scale * LOG2E) - lse)
        if masked:
            p = _visible(p, 0.0, col + (lo + i) * BLOCK <= row, fq, ops.vector(fk_smem.at[slot], 0, tile))
        ds = (p * (dp - delta)).astype(dtype)
        dqs = ops.dots(*[(ds, k, False, dq) for k, dq in zip(keys, dqs)])

        @pl.when(i + depth < n)
        def _():
            fetch(i + depth, slot)

        return dqs

    dqs = _visit(n, plain, body, tuple(ops.full((BLOCK, w), 0.0) for w in form.widths))
    _store_dq(dqs, [k.at[0] for k in k_s], form, dq_refs, b, h, rows, scale)


def _pair(q_blk, k_blk):
    """Index of the block pair (query block, key block <= it) in the dS array: the causal triangle, row by row."""
    return q_blk * (q_blk + 1) // 2 + k_blk


def _dkv_visit(ops, scale, carry, k_ops, v_smem, queries, do_smem, lse_smem, delta_smem, see, ds):
    """One visited query block of the dk/dv kernels: (dks, dv) accumulated. see(p): P with the hidden pairs zeroed
    (None: all visible). ds: None, or (stage, ready, store): dS is written to the stage smem once `ready()` has
    waited for its earlier store to read it, and store(stage) writes it out."""
    dks, dv = carry
    tile = (BLOCK, BLOCK)   # [keys, queries]
    dtype = v_smem.dtype
    s_t, dp_t = ops.dots((k_ops, _operand(queries), True, tile), (v_smem, do_smem, True, tile))
    p_t = jnp.exp2(s_t * (scale * LOG2E) - ops.vector(lse_smem, 0, tile))
    if see is not None:
        p_t = see(p_t)

    # dS is computed while the tensor cores run dV's product, then feeds dK's.
    def ds_value():
        return (p_t * (dp_t - ops.vector(delta_smem, 0, tile))).astype(dtype)

    if ds is not None:   # through a two-slot stage, which dK's product reads and a TMA store then writes out
        stage, ready, store = ds
        ready()

        def staged():
            stage[...] = ds_value()
            plgpu.commit_smem()
            return stage
    ds_t = _Later(staged if ds is not None else ds_value)
    dv, *dks = ops.dots((p_t.astype(dtype), do_smem, False, dv),
                        *[(ds_t, q, False, dk) for q, dk in zip(queries, dks)])
    if ds is not None:
        store(stage)
    return tuple(dks), dv


def _dkv_zeros(ops, form):
    return tuple(ops.full((BLOCK, w), 0.0) for w in form.widths), ops.full((BLOCK, form.dv), 0.0)


def _dkv_store(form, outs, stages, dks, dv, b, h, keys, scale):
    """Stages scale * dk and dv (in the smem of `stages`: one per key part, then v's) and starts their TMA stores
    into the outputs: dk (k's shape), [the shared key's, per head], [dv]. Waits for none."""
    dk_views = [_heads(outs[0], 0, form.widths[0])] + ([_heads(outs[1])] if form.shared else [])
    dv_view = _heads(outs[0], form.v_col, form.dv) if form.v_in_k else _heads(outs[-1])
    values = [dk * scale for dk in dks] + [dv]
    for stage, val in zip(stages, values, strict=True):
        stage[...] = val.astype(stage.dtype)
    plgpu.commit_smem()
    for stage, view in zip(stages, dk_views + [dv_view], strict=True):
        plgpu.copy_smem_to_gmem(stage, view(b, h, keys))


def _dkv_kernel(visits_ref, first_ref, *refs, form, depth, scale, ops, ds_out):
    q_refs, refs = refs[:form.n_q], refs[form.n_q:]
    kv_refs, (do_ref, lse_ref, delta_ref, *outs, scoped) = refs[:form.n_k], refs[form.n_k:]
    outs, ds_ref = (outs[:-1], outs[-1]) if ds_out else (outs, None)
    P = len(form.widths)
    smem, (k_bar, *ring_bars) = scoped
    k_s, (v_smem, fk_smem), q_s, (do_smem, fq_smem, lse_smem, delta_smem, *ds_stages) = (
        smem[:P], smem[P:P + 2], smem[P + 2:2 * P + 2], smem[2 * P + 2:])
    q_bars, (do_bar, fq_bar, lse_bar, delta_bar) = ring_bars[:P], ring_bars[P:]
    k_views, v_view = _kv_views(form, kv_refs)
    b, h, keys, lo, n, plain, fetch = _walk(
        visits_ref, depth, ([*zip(k_views, k_s), (v_view, v_smem), (_ROWS(first_ref), fk_smem)], k_bar),
        [*zip(_q_views(form, q_refs), q_s, q_bars), (_heads(do_ref), do_smem, do_bar),
         (_ROWS(first_ref), fq_smem, fq_bar), (_STATS(lse_ref), lse_smem, lse_bar),
         (_STATS(delta_ref), delta_smem, delta_bar)])
    tile = (BLOCK, BLOCK)   # [keys, queries]
    fk = ops.vector(fk_smem, 1, tile)
    key = ops.iota(tile, 0) + keys.start
    qcol = ops.iota(tile, 1)
    k_ops = _operand(k_s)

    def body(i, carry, masked):
        slot = lax.rem(i, jnp.int32(depth))
        for bar in (*q_bars, fq_bar, lse_bar, do_bar, delta_bar):
            plgpu.barrier_wait(bar.at[slot])
        see = (lambda p: _visible(p, 0.0, key <= qcol + (lo + i) * BLOCK, ops.vector(fq_smem.at[slot], 0, tile),
                                  fk)) if masked else None
        ds = None
        if ds_out:
            ds = (ds_stages[0].at[lax.rem(i, jnp.int32(2))],
                  lambda: plgpu.wait_smem_to_gmem(1, wait_read_only=True),   # the store from this slot two visits ago
                  lambda stage: plgpu.copy_smem_to_gmem(stage, ds_ref.at[b, h, _pair(lo + i, lax.axis_index("blk"))]))
        carry = _dkv_visit(ops, scale, carry, k_ops, v_smem, [q.at[slot] for q in q_s], do_smem.at[slot],
                           lse_smem.at[slot], delta_smem.at[slot], see, ds)

        @pl.when(i + depth < n)
        def _():
            fetch(i + depth, slot)

        return carry

    dks, dv = _visit(n, plain, body, _dkv_zeros(ops, form))
    # Staged in the (drained) query and dO rings.
    _dkv_store(form, outs, [q.at[0] for q in q_s] + [do_smem.at[0]], dks, dv, b, h, keys, scale)
    plgpu.wait_smem_to_gmem(0)


def _dq_ds_kernel(visits_ref, ds_ref, *refs, form, depth, scale, ops):
    """dQ = scale dS K over the forward's key blocks, dS read from the dk/dv kernel's output (DQ_FROM_DS): the
    pairs visited here are among those it visits, and its dS is zero wherever a pair is hidden, so no mask."""
    kv_refs, (*dq_refs, scoped) = refs[:form.n_k], refs[form.n_k:]
    P = len(form.widths)
    smem, ring_bars = scoped
    k_s, ds_smem, k_bars, ds_bar = smem[:P], smem[P], ring_bars[:P], ring_bars[P]
    k_views, _ = _kv_views(form, kv_refs)
    q_blk = lax.axis_index("blk")
    ds_view = lambda b, h, part: ds_ref.at[b, h, _pair(q_blk, part.start // BLOCK)]  # noqa: E731
    b, h, rows, _, n, _, fetch = _walk(visits_ref, depth, ([], None),
                                       [*zip(k_views, k_s, k_bars), (ds_view, ds_smem, ds_bar)])

    def body(i, dqs):
        slot = lax.rem(i, jnp.int32(depth))
        for bar in (*k_bars, ds_bar):
            plgpu.barrier_wait(bar.at[slot])
        ds = ops.transposed(ds_smem.at[slot])   # stored [keys, queries]
        dqs = ops.dots(*[(ds, k.at[slot], False, dq) for k, dq in zip(k_s, dqs)])

        @pl.when(i + depth < n)
        def _():
            fetch(i + depth, slot)

        return dqs

    dqs = lax.fori_loop(0, n, body, tuple(ops.full((BLOCK, w), 0.0) for w in form.widths))
    _store_dq(dqs, [k.at[0] for k in k_s], form, dq_refs, b, h, rows, scale)


def _store_dq(dqs, stages, form, dq_refs, b, h, rows, scale):
    """Writes scale * dq through `stages` (smem, one per part) into q's layout and waits for the stores."""
    for stage, dq in zip(stages, dqs):
        stage[...] = (dq * scale).astype(stage.dtype)
    plgpu.commit_smem()
    for stage, view in zip(stages, _q_views(form, dq_refs)):
        plgpu.copy_smem_to_gmem(stage, view(b, h, rows))
    plgpu.wait_smem_to_gmem(0)


def _call(kernel, scratch, barriers, out_type, grid_bhn, inputs, interpret):
    """One CTA per (head, block, batch); scratch and barriers are scoped around the kernel body. The CUDA kernel is
    named after `kernel` (`_dkv_kernel` -> `attn_dkv_mosaic_gpu_kernel`), so a profile tells them apart."""
    B, H, nb = grid_bhn

    def entry(*refs):
        pl.run_scoped(lambda *scoped: kernel(*refs, scoped), tuple(scratch), tuple(barriers))

    entry.__name__ = "attn" + kernel.func.__name__.removesuffix("_kernel")
    return plgpu.kernel(entry, out_type=out_type, grid=(H, nb, B), grid_names=("heads", "blk", "batch"),
                        compiler_params=plgpu.CompilerParams(approx_math=True),
                        interpret=interpret_params(interpret))(*inputs)


def _smem(interpret):
    tiled = () if interpret else (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    return (lambda shape, dtype: plgpu.SMEM(shape, dtype, transforms=tiled),     # wgmma operands
            lambda shape: plgpu.SMEM(shape, jnp.float32))                        # row vectors


# Jitted so that the identical calls of a step's layers lower (Mosaic GPU) once, not once per attention.
@functools.partial(jax.jit, static_argnames=("form", "scale", "depth", "interpret"))
def _forward(q, kv, first_f, visits, *, form, scale, depth, interpret):
    (B, T, H, _), dv, dtype = q[0].shape, form.dv, q[0].dtype
    nb = T // BLOCK
    depth = min(depth, nb)
    tile, vec = _smem(interpret)
    P = len(form.widths)
    ring = ([tile((depth, BLOCK, w), dtype) for w in form.widths]
            + [tile((depth, BLOCK, dv), dtype), vec((depth, BLOCK))])
    ring_bars = (plgpu.Barrier(num_barriers=depth),) * (P + 2)
    out_type = (jax.ShapeDtypeStruct((B, T, H, dv), dtype), jax.ShapeDtypeStruct((B, H, T), jnp.float32))
    ops = _Ops(interpret)
    # The ring's first slot stages O once drained (`_fwd_kernel`).
    return _call(functools.partial(_fwd_kernel, form=form, depth=depth, scale=scale, ops=ops),
                 [tile((BLOCK, w), dtype) for w in form.widths] + [vec((BLOCK,))] + ring + [vec((BLOCK,))],
                 (plgpu.Barrier(num_barriers=P + 1),) + ring_bars, out_type, (B, H, nb), (visits, first_f, *q, *kv),
                 interpret)


@functools.partial(jax.jit, static_argnames=("form", "scale", "depths", "dq_from_ds", "interpret"))
def _backward(q, kv, first_f, o, lse, do, kv_visits, q_visits, *, form, scale, depths, dq_from_ds, interpret):
    """dq_from_ds: 0, the dq kernel recomputes dS; else it reads the dk/dv kernel's, loading this many blocks ahead."""
    (B, T, H, _), dv, dtype = q[0].shape, form.dv, q[0].dtype
    nb = T // BLOCK
    d_dq, d_kv = (min(d, nb) for d in depths)
    P = len(form.widths)
    delta = jnp.einsum("bthv,bthv->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    tile, vec = _smem(interpret)
    ops = _Ops(interpret)
    ins = (first_f, *q, *kv, do, lse, delta)
    dq_type = tuple(jax.ShapeDtypeStruct(x.shape, dtype) for x in q)
    dkv_type = ([jax.ShapeDtypeStruct(kv[0].shape, dtype)]
                + ([jax.ShapeDtypeStruct((B, T, H, form.widths[1]), dtype)] if form.shared else [])
                + ([] if form.v_in_k else [jax.ShapeDtypeStruct(kv[-1].shape, dtype)]))
    ds_out = dq_from_ds > 0
    ds_type = [jax.ShapeDtypeStruct((B, H, nb * (nb + 1) // 2, BLOCK, BLOCK), dtype)] * ds_out
    ring = ([tile((d_kv, BLOCK, w), dtype) for w in form.widths]
            + [tile((d_kv, BLOCK, dv), dtype), vec((d_kv, BLOCK)), vec((d_kv, BLOCK)), vec((d_kv, BLOCK))]
            + [tile((2, BLOCK, BLOCK), dtype)] * ds_out)
    ring_bars = (plgpu.Barrier(num_barriers=d_kv),) * (P + 4)
    dkv = _call(functools.partial(_dkv_kernel, form=form, depth=d_kv, scale=scale, ops=ops, ds_out=ds_out),
                [tile((BLOCK, w), dtype) for w in form.widths] + [tile((BLOCK, dv), dtype), vec((BLOCK,))] + ring,
                (plgpu.Barrier(num_barriers=P + 2),) + ring_bars,
                tuple(dkv_type + ds_type), (B, H, nb), (q_visits, *ins), interpret)
    if ds_out:
        *dkv, ds = dkv
        d = min(dq_from_ds, nb)
        ring = [tile((d, BLOCK, w), dtype) for w in form.widths] + [tile((d, BLOCK, BLOCK), dtype)]
        ring_bars = (plgpu.Barrier(num_barriers=d),) * (P + 1)
        # dq staged in the drained ring's first slots (`_dq_ds_kernel`)
        dq = _call(functools.partial(_dq_ds_kernel, form=form, depth=d, scale=scale, ops=ops), ring, ring_bars,
                   dq_type, (B, H, nb), (kv_visits, ds, *kv), interpret)
        return tuple(dq), tuple(dkv)
    dq = _call(functools.partial(_dq_kernel, form=form, depth=d_dq, scale=scale, ops=ops),
               [tile((BLOCK, w), dtype) for w in form.widths]
               + [tile((BLOCK, dv), dtype), vec((BLOCK,)), vec((BLOCK,)), vec((BLOCK,))]
               + [tile((d_dq, BLOCK, w), dtype) for w in form.widths]
               + [tile((d_dq, BLOCK, dv), dtype), vec((d_dq, BLOCK))],
               (plgpu.Barrier(num_barriers=P + 4),) + (plgpu.Barrier(num_barriers=d_dq),) * (P + 2),
               dq_type, (B, H, nb), (kv_visits, *ins), interpret)
    return tuple(dq), tuple(dkv)


# Walk the whole blocks next to the diagonal without the mask: 172,543 -> 174,550 / 174,033 tokens/s at 32 x 1024
# on an H200, one call (experiments/HISTORY.md, session 32). bench_train.py --attn_masked_runs and
# bench_attention.py's pallas_masked variant turn it off. Read when a call's forward is traced.
UNMASKED_RUNS = True


def _visits(first_bt):
    """Per block, [4, B, T // BLOCK] int32 (lo, hi, plain_lo, plain_hi): the other side's blocks it visits, [lo, hi),
    and those it need not mask, [plain_lo, plain_hi); for query blocks (the forward and dq kernels), then for key
    blocks (dk/dv)."""
    B, T = first_bt.shape
    blk = jnp.broadcast_to(jnp.arange(T // BLOCK, dtype=jnp.int32), (B, T // BLOCK))
    kv_from, q_to = unmasked_runs(first_bt, BLOCK) if UNMASKED_RUNS else (blk, blk + 1)
    return (jnp.stack([*kv_block_ranges(first_bt, BLOCK, BLOCK), kv_from, blk]),
            jnp.stack([*q_block_ranges(first_bt, BLOCK, BLOCK), blk + 1, q_to]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _attention(q, kv, first_bt, form, scale, depths, dq_from_ds, interpret):
    return _attention_fwd(q, kv, first_bt, form, scale, depths, dq_from_ds, interpret)[0]


def _attention_fwd(q, kv, first_bt, form, scale, depths, dq_from_ds, interpret):
    first_f = first_bt.astype(jnp.float32)   # compared as floats in registers: exact below 2^24
    visits = _visits(first_bt)   # both sides' now: the backward takes them as residuals (UNMASKED_RUNS read once)
    o, lse = _forward(q, kv, first_f, visits[0], form=form, scale=scale, depth=depths[0], interpret=interpret)
    # Named in the forward rule's own equations, where a remat policy sees them ("kernels", "dots").
    o, lse = checkpoint_name(o, KERNEL_OUTPUT), checkpoint_name(lse, KERNEL_OUTPUT)
    return o, (q, kv, first_bt, o, lse, visits)


def _attention_bwd(form, scale, depths, dq_from_ds, interpret, res, do):
    q, kv, first_bt, o, lse, visits = res
    dq, dkv = _backward(q, kv, first_bt.astype(jnp.float32), o, lse, do.astype(q[0].dtype), *visits,
                        form=form, scale=scale, depths=depths[1:], dq_from_ds=dq_from_ds, interpret=interpret)
    if form.shared:   # the shared key's gradient, written per head: summed over the heads
        dkv = (dkv[0], dkv[1].sum(axis=2, dtype=jnp.float32).astype(kv[1].dtype)) + dkv[2:]
    return dq, dkv, np.zeros(first_bt.shape, jax.dtypes.float0)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _dq_from_ds() -> int:
    """DQ_FROM_DS and DQ_DS_DEPTH as read at call time, one static value for the backward (0: dq recomputes dS)."""
    if DQ_FROM_DS and not (isinstance(DQ_DS_DEPTH, int) and DQ_DS_DEPTH >= 1):
        raise ValueError(f"DQ_DS_DEPTH {DQ_DS_DEPTH!r} must be a block count >= 1")
    return int(DQ_DS_DEPTH) if DQ_FROM_DS else 0


def _check_depths(depths, first_bt, q_bthk):
    """The depths to use (None: the module's DEPTHS, read at call time so a benchmark can set it)."""
    depths = DEPTHS if depths is None else depths
    if not (isinstance(depths, (tuple, list)) and len(depths) == 3 and min(depths) >= 1):
        raise ValueError(f"depths {depths} must be three block counts >= 1 (forward, dq, dk/dv)")
    if first_bt.shape != q_bthk.shape[:2]:
        raise ValueError(f"first_bt {first_bt.shape} must be [batch, seq] = {q_bthk.shape[:2]}")
    return tuple(map(int, depths))


def doc_attention(q_bthk, k_bshk, v_bshv, first_bt, *, scale: float, depths: tuple[int, int, int] | None = None,
                  interpret: bool = False):
    """Causal attention over packed documents: key j is visible to query i iff j <= i and first[j] == first[i]
    (`reference.first_visible`). Returns [B, T, H, dv] in q's dtype; differentiable in q, k and v. `depths`: how
    many blocks the forward, dq and dk/dv kernels load ahead (a deeper ring costs shared memory, and so CTAs per
    SM); None: DEPTHS."""
    why = supported(q_bthk, k_bshk, v_bshv)
    if why:
        raise NotImplementedError(f"doc_attention pallas kernels: {why}; use train_attn_impl 'cudnn' or 'xla'")
    depths = _check_depths(depths, first_bt, q_bthk)
    form = Form((q_bthk.shape[-1],), 0, v_bshv.shape[-1])
    return _attention((q_bthk,), (k_bshk.astype(q_bthk.dtype), v_bshv.astype(q_bthk.dtype)),
                      first_bt.astype(jnp.int32), form, float(scale), depths, _dq_from_ds(), bool(interpret))


def mla_supported(q_bthk, kv_bshk, kpe_bsd, nope_dim: int) -> str | None:
    """None if `mla_doc_attention` takes these operands, else the reason it does not."""
    if isinstance(q_bthk, (tuple, list)):
        if len(q_bthk) != 2 or q_bthk[0].shape[:3] != q_bthk[1].shape[:3] or q_bthk[0].dtype != q_bthk[1].dtype:
            return (f"q parts {[(x.shape, x.dtype) for x in q_bthk]}: want (q_nope, q_rope) of one dtype, "
                    f"[B, T, H, nope] and [B, T, H, rope]")
        if q_bthk[0].shape[-1] != nope_dim or q_bthk[1].shape[-1] != kpe_bsd.shape[-1]:
            return (f"q parts of {q_bthk[0].shape[-1]} and {q_bthk[1].shape[-1]} columns: want nope = {nope_dim} "
                    f"and the rope key's {kpe_bsd.shape[-1]}")
        q_bthk = jax.ShapeDtypeStruct(q_bthk[0].shape[:3] + (nope_dim + kpe_bsd.shape[-1],), q_bthk[0].dtype)
    (B, T, H, dq), rope_dim = q_bthk.shape, kpe_bsd.shape[-1]
    dv = kv_bshk.shape[-1] - nope_dim
    if kv_bshk.shape[:3] != (B, T, H) or kpe_bsd.shape[:2] != (B, T) or dq != nope_dim + rope_dim:
        return (f"q {q_bthk.shape}, kv {kv_bshk.shape}, rope key {kpe_bsd.shape}: want q [B, T, H, nope + rope], "
                f"kv [B, T, H, nope + v], rope key [B, T, rope] with nope = {nope_dim}")
    if min(nope_dim, rope_dim, dv) <= 0 or nope_dim % 64 or rope_dim % 64 or dv % 64:
        return f"nope {nope_dim}, rope {rope_dim} and v {dv} must be positive multiples of 64"
    return supported(q_bthk, q_bthk, jax.ShapeDtypeStruct((B, T, H, dv), q_bthk.dtype))


def mla_doc_attention(q_bthk, kv_bshk, kpe_bsd, first_bt, *, scale: float, nope_dim: int,
                      depths: tuple[int, int, int] | None = None, interpret: bool = False):
    """`doc_attention` on MLA's operands as the model computes them, with no copy to assemble per-head keys:
    q = [q_nope | q_rope] [B, T, H, nope + rope], or the pair (q_nope, q_rope) as two arrays (then no copy joins
    them either, and dq comes back as a pair), kv = [k_nope | v] [B, T, H, nope + dv] (the latent's up projection)
    and the rope key shared by all heads [B, T, rope]. The same values as `doc_attention(q, [k_nope | rope key],
    v)`; the gradients come back in the same layouts (kv's as one [dk_nope | dv] array)."""
    why = mla_supported(q_bthk, kv_bshk, kpe_bsd, nope_dim)
    if why:
        raise NotImplementedError(f"doc_attention pallas kernels: {why}; use train_attn_impl 'cudnn' or 'xla'")
    parts = isinstance(q_bthk, (tuple, list))
    q = tuple(q_bthk) if parts else (q_bthk,)
    depths = _check_depths(depths, first_bt, q[0])
    rope_dim, dtype = kpe_bsd.shape[-1], q[0].dtype
    form = Form((nope_dim, rope_dim), nope_dim, kv_bshk.shape[-1] - nope_dim, shared=True, v_in_k=True, q_parts=parts)
    return _attention(q, (kv_bshk.astype(dtype), kpe_bsd.astype(dtype)),
                      first_bt.astype(jnp.int32), form, float(scale), depths, _dq_from_ds(), bool(interpret))
