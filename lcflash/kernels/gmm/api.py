"""Grouped matmul over tokens sorted by expert: one switch, several implementations.

`gmm(lhs [M, K], rhs [G, K, N], group_sizes [G])` multiplies rows `[start_g, start_g + size_g)` of lhs
by `rhs[g]`. Rows past `sum(group_sizes)` (slots of zero-computation experts, padding) come back as zeros.
`gmm_swiglu(x, w_gate, w_up, group_sizes)` is silu(gmm(x, w_gate)) * gmm(x, w_up); for `pallas` it is two gmm
kernels, which measured faster than our fused gate+up+SwiGLU kernel (`pallas_gmm.gmm_swiglu_fused`, kept for
experiments; see experiments/gmm_notes.md). `gmm_swiglu_halves(x, [w_gate | w_up], group_sizes)` is the same
from one concatenated weight (the model's `moe.fuse_gate_up`): for `pallas` and `pallas_chain` one kernel applies
SwiGLU in its epilogue. `gmm_swiglu_ffn(x, [w_gate | w_up], w_down, group_sizes)` is the whole expert FFN; for
`pallas_chain` the down projection's d_lhs kernel also applies SwiGLU's backward before its store.
`gmm_nt(lhs, rhs [G, N, K], group_sizes)` and `gmm_nt_swiglu` multiply by rhs[g]^T, forward only: decode keeps
its experts contraction-last, and our kernels (the d_lhs product's path) read them so, with no transposed copy.
The environment variable `LCFLASH_GMM_IMPL` overrides the configured implementation for A/B runs.

Implementations:
  ragged_dot  XLA's jax.lax.ragged_dot (any backend; slow on H100, see experiments/gmm_notes.md)
  reference   per-group dense loop (tests and tiny shapes only)
  pallas      ours: Mosaic GPU kernels for Hopper with explicit VJP (lcflash/kernels/gmm/pallas_gmm.py); on a
              non-GPU backend it runs in Pallas' GPU interpreter (slow; tests only). bf16/fp16 inputs only.
  pallas_chain  `pallas` with one flat pipeline per CTA in every kernel (Tiles.chain): the TMA warpgroup loads
              the next tile during this tile's tail and epilogue. Faster than `pallas` at LongCat expert shapes
              on an H200 (0.84-0.92 of the einsum bound against 0.82-0.90; experiments/HISTORY.md).
  jax_mgpu    JAX's example kernels (jax.experimental.pallas.ops.gpu.ragged_dot_mgpu), GPU only; the peer.
  auto        pallas_chain on a Hopper GPU for operands it takes (bf16/fp16, K and N multiples of 128), else
              ragged_dot (chosen per call).
  tokamax     tokamax's ragged_dot (its Mosaic GPU kernels and VJP; lcflash/kernels/gmm/tokamax_gmm.py), GPU only,
              where tokamax is installed (>= 0.0.17: Python >= 3.12, JAX >= 0.11.1); the ecosystem's peer.
"""

import functools
import os

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from lcflash.kernels import on_hopper
from lcflash.kernels.gmm import reference
from lcflash.kernels.gmm.swiglu import swiglu_halves


def _pallas_gmm(lhs_mk, rhs_gkn, group_sizes_g, preferred_element_type=None, chain=False, zero_tail=True):
    from lcflash.kernels.gmm import pallas_gmm  # imported on first use: keeps CPU-only imports light

    return pallas_gmm.gmm(lhs_mk, rhs_gkn, group_sizes_g, preferred_element_type=preferred_element_type,
                          chain=chain, zero_tail=zero_tail)


def _jax_mgpu_gmm(lhs_mk, rhs_gkn, group_sizes_g, preferred_element_type=None):
    from lcflash.kernels.gmm import jax_mgpu

    return jax_mgpu.gmm(lhs_mk, rhs_gkn, group_sizes_g, preferred_element_type=preferred_element_type)


def _tokamax_gmm(lhs_mk, rhs_gkn, group_sizes_g, preferred_element_type=None):
    from lcflash.kernels.gmm import tokamax_gmm

    return tokamax_gmm.gmm(lhs_mk, rhs_gkn, group_sizes_g, preferred_element_type=preferred_element_type)


def _pallas_gmm_swiglu(x_mk, w_gate_gkn, w_up_gkn, group_sizes_g, chain=False):
    from lcflash.kernels.gmm import pallas_gmm

    return pallas_gmm.gmm_swiglu(x_mk, w_gate_gkn, w_up_gkn, group_sizes_g, chain=chain)


def _pallas_gmm_swiglu_halves(x_mk, w_gkf2, group_sizes_g, chain=False, zero_tail=True):
    from lcflash.kernels.gmm import pallas_gmm

    return pallas_gmm.gmm_swiglu_halves(x_mk, w_gkf2, group_sizes_g, chain=chain, zero_tail=zero_tail)


IMPLEMENTATIONS = {
    "ragged_dot": reference.gmm_ragged_dot,
    "reference": reference.gmm_loop,
    "pallas": _pallas_gmm,
    "pallas_chain": functools.partial(_pallas_gmm, chain=True),
    "jax_mgpu": _jax_mgpu_gmm,
    "tokamax": _tokamax_gmm,
}

# Implementations that can leave the rows past the groups unwritten (gmm's zero_tail=False).
_TAIL_OPTIONAL = ("pallas", "pallas_chain")
# Benchmarks store the tails anyway for A/B runs (experiments/bench_train.py --zero_tails).
SKIP_TAILS = True

# gate+up+SwiGLU entry points with their own VJP or kernels; implementations not listed here compose two gmm calls
# with fp32 gate/up.
SWIGLU_IMPLEMENTATIONS = {
    "pallas": _pallas_gmm_swiglu,
    "pallas_chain": functools.partial(_pallas_gmm_swiglu, chain=True),
}
# The same from one [gate | up] weight (gmm_swiglu_halves): SwiGLU in the kernel's epilogue; the others apply
# swiglu_halves to one gmm.
SWIGLU_HALVES_IMPLEMENTATIONS = {
    "pallas": _pallas_gmm_swiglu_halves,
    "pallas_chain": functools.partial(_pallas_gmm_swiglu_halves, chain=True),
}
# Benchmarks turn the epilogue off for A/B runs (experiments/bench_train.py --no_swiglu_epilogue).
SWIGLU_EPILOGUE = True
# gmm_swiglu_ffn: SwiGLU's backward in the down projection's d_lhs epilogue (flat kernels only); benchmarks turn
# it off for A/B runs (experiments/bench_train.py --no_swiglu_grad_epilogue).
SWIGLU_GRAD_EPILOGUE = True


def auto_impl(lhs_mk, rhs_gkn, backend: str | None = None, compute_capability: str | None = None) -> str:
    """"auto": our kernels on a Hopper GPU for the operands they take (pallas_gmm.supports: bf16/fp16, K and N
    multiples of 128), XLA's ragged_dot otherwise."""
    if not on_hopper(backend, compute_capability):
        return "ragged_dot"
    from lcflash.kernels.gmm import pallas_gmm

    return "pallas_chain" if pallas_gmm.supports(lhs_mk, rhs_gkn) else "ragged_dot"


def _resolve(impl: str, lhs_mk, rhs_gkn) -> str:
    impl = os.environ.get("LCFLASH_GMM_IMPL", impl)
    if impl == "auto":
        impl = auto_impl(lhs_mk, rhs_gkn)
    if impl == "tokamax":   # optional: say what to install before anything is traced
        from lcflash.kernels.gmm import tokamax_gmm

        try:
            tokamax_gmm.load()
        except ImportError as e:
            raise ValueError(f"{e}; or use 'pallas_chain' or 'jax_mgpu'") from None
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"gmm impl {impl!r} is not available here; available: {sorted(IMPLEMENTATIONS)}")
    return impl


def reads_groups_only(impl: str, lhs_mk, rhs_gkn) -> bool:
    """Whether `impl`, for these operands, ignores the lhs and d_out rows past sum(group_sizes) beyond the next whole
    128-row tile, so that callers may leave those undefined. Our kernels read no further and mask what they read
    there; XLA's ragged_dot and the per-expert loop multiply such rows by zeros, and NaN * 0 is NaN."""
    return _resolve(impl, lhs_mk, rhs_gkn) in _TAIL_OPTIONAL


def gmm(lhs_mk, rhs_gkn, group_sizes_g, *, impl: str = "ragged_dot", preferred_element_type=None,
        zero_tail: bool = True):
    """zero_tail=False: rows past sum(group_sizes) of the output and of d_lhs may be left undefined (our kernels
    then skip storing them), for callers that never read them."""
    impl = _resolve(impl, lhs_mk, rhs_gkn)
    kw = {} if zero_tail or not SKIP_TAILS or impl not in _TAIL_OPTIONAL else {"zero_tail": False}
    return IMPLEMENTATIONS[impl](lhs_mk, rhs_gkn, group_sizes_g, preferred_element_type=preferred_element_type, **kw)


def gmm_swiglu(x_mk, w_gate_gkn, w_up_gkn, group_sizes_g, *, impl: str = "ragged_dot"):
    """silu(x @ w_gate[g]) * (x @ w_up[g]) per group, in x's dtype; rows past sum(group_sizes) are zero."""
    impl = _resolve(impl, x_mk, w_gate_gkn)
    if impl in SWIGLU_IMPLEMENTATIONS:
        return SWIGLU_IMPLEMENTATIONS[impl](x_mk, w_gate_gkn, w_up_gkn, group_sizes_g)
    return reference.swiglu_from_gmm(IMPLEMENTATIONS[impl], x_mk, w_gate_gkn, w_up_gkn, group_sizes_g)


def gmm_swiglu_halves(x_mk, w_gkf2, group_sizes_g, *, impl: str = "ragged_dot", zero_tail: bool = True):
    """silu(g) * u of [g | u] = x @ w per group, w = [w_gate | w_up] [G, K, 2F], in x's dtype; rows past
    sum(group_sizes) are zero. `pallas`/`pallas_chain`: one kernel applies SwiGLU before its store.
    zero_tail=False: with the epilogue, the residual's and d_x's rows past sum(group_sizes) may be left undefined
    (h's stay zero: the down projection's weight gradient reads them)."""
    impl = _resolve(impl, x_mk, w_gkf2)
    if impl in SWIGLU_HALVES_IMPLEMENTATIONS and SWIGLU_EPILOGUE:
        return SWIGLU_HALVES_IMPLEMENTATIONS[impl](x_mk, w_gkf2, group_sizes_g,
                                                   zero_tail=zero_tail or not SKIP_TAILS)
    return swiglu_halves(IMPLEMENTATIONS[impl](x_mk, w_gkf2, group_sizes_g))  # h's tail must be zero: keep gu's


def _down_supported(x_mk, w_down_gfn) -> bool:
    from lcflash.kernels.gmm import pallas_gmm

    h = jax.ShapeDtypeStruct((x_mk.shape[0], w_down_gfn.shape[1]), x_mk.dtype)
    return pallas_gmm.supports(h, w_down_gfn)


def gmm_swiglu_ffn(x_mk, w_gkf2, w_down_gfn, group_sizes_g, *, impl: str = "ragged_dot", zero_tail: bool = True,
                   h_names: tuple[str, ...] = ()):
    """gmm(gmm_swiglu_halves(x, [w_gate | w_up]), w_down): the expert FFN. `pallas_chain` (with both epilogues on)
    runs it as one custom gradient whose down-projection d_lhs kernel applies SwiGLU's backward before its store
    (pallas_gmm.gmm_swiglu_ffn); the others compose the two calls. h_names: checkpoint names for h (the SwiGLU
    output), applied where h is visible to a remat policy."""
    impl = _resolve(impl, x_mk, w_gkf2)
    if impl == "pallas_chain" and SWIGLU_EPILOGUE and SWIGLU_GRAD_EPILOGUE and _down_supported(x_mk, w_down_gfn):
        from lcflash.kernels.gmm import pallas_gmm

        return pallas_gmm.gmm_swiglu_ffn(x_mk, w_gkf2, w_down_gfn, group_sizes_g,
                                         zero_tail=zero_tail or not SKIP_TAILS, h_names=h_names)
    h = gmm_swiglu_halves(x_mk, w_gkf2, group_sizes_g, impl=impl, zero_tail=zero_tail)
    for name in h_names:
        h = checkpoint_name(h, name)
    return gmm(h, w_down_gfn, group_sizes_g, impl=impl, zero_tail=zero_tail)


def _swapped(rhs_gnk):
    return jax.ShapeDtypeStruct(rhs_gnk.shape[:1] + rhs_gnk.shape[:0:-1], rhs_gnk.dtype)


def gmm_nt(lhs_mk, rhs_gnk, group_sizes_g, *, impl: str = "ragged_dot", preferred_element_type=None,
           zero_tail: bool = True):
    """gmm against rhs[g]^T, rhs [G, N, K] (contraction last), forward only (no VJP for our kernels). `pallas` /
    `pallas_chain` read rhs as stored; ragged_dot contracts its last axis in place; the others multiply by a
    transposed copy. zero_tail=False: as in gmm."""
    impl = _resolve(impl, lhs_mk, _swapped(rhs_gnk))
    if impl in _TAIL_OPTIONAL:
        from lcflash.kernels.gmm import pallas_gmm

        return pallas_gmm.gmm_nt(lhs_mk, rhs_gnk, group_sizes_g, chain=impl == "pallas_chain",
                                 zero_tail=zero_tail or not SKIP_TAILS, out_dtype=preferred_element_type)
    if impl == "ragged_dot":
        return reference.gmm_ragged_dot_nt(lhs_mk, rhs_gnk, group_sizes_g, preferred_element_type)
    return IMPLEMENTATIONS[impl](lhs_mk, rhs_gnk.swapaxes(1, 2), group_sizes_g,
                                 preferred_element_type=preferred_element_type)


def gmm_nt_swiglu(x_mk, w_gate_gnk, w_up_gnk, group_sizes_g, *, impl: str = "ragged_dot", zero_tail: bool = True):
    """silu(x @ w_gate[g]^T) * (x @ w_up[g]^T) in x's dtype, weights [G, N, K], forward only: for `pallas` /
    `pallas_chain` one kernel with SwiGLU before its store, else two gmm_nt with fp32 outputs."""
    impl = _resolve(impl, x_mk, _swapped(w_gate_gnk))
    if impl in _TAIL_OPTIONAL:
        from lcflash.kernels.gmm import pallas_gmm

        return pallas_gmm.gmm_nt_swiglu(x_mk, w_gate_gnk, w_up_gnk, group_sizes_g, chain=impl == "pallas_chain",
                                        zero_tail=zero_tail or not SKIP_TAILS)
    nt = functools.partial(gmm_nt, impl=impl, preferred_element_type=jnp.float32)
    return reference.swiglu_from_gmm(nt, x_mk, w_gate_gnk, w_up_gnk, group_sizes_g)
