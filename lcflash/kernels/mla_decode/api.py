"""Absorbed MLA attention over the latent cache: one switch, several implementations.

`mla_decode(q_lat [B,T,H,R], q_pe [B,T,H,P], c [B,S,R], k_pe [B,S,P], scale=..., mask_bts=..., q_start_b=...)`
returns the latent output o_lat [B,T,H,R] (the caller applies W_UV). Implementations:

* "xla": plain einsums over the whole cache with any mask (`reference.mla_decode_reference`); runs anywhere.
* "split_reference": the kernel's split-K arithmetic in plain JAX (causal mask from q_start_b); for tests.
* "pallas": the Mosaic GPU kernel (`pallas_mgpu`), causal mask from q_start_b; Hopper GPUs, bf16/fp16.

The environment variable `LCFLASH_MLA_DECODE_IMPL` overrides the configured implementation for A/B runs.
"""

import os

from lcflash.kernels.mla_decode import reference

IMPLS = ("xla", "split_reference", "pallas")


def mla_decode(q_lat_bthr, q_pe_bthd, c_bsr, kpe_bsd, *, scale: float, mask_bts=None, q_start_b=None,
               impl: str = "xla", **kernel_kwargs):
    impl = os.environ.get("LCFLASH_MLA_DECODE_IMPL", impl)
    if impl not in IMPLS:
        raise ValueError(f"mla_decode impl {impl!r} is not one of {IMPLS}")
    T, S = q_lat_bthr.shape[1], c_bsr.shape[1]
    if impl == "xla":
        if mask_bts is None:
            if q_start_b is None:
                raise ValueError("mla_decode(impl='xla') needs mask_bts or q_start_b")
            mask_bts = reference.causal_decode_mask(q_start_b, T, S)
        return reference.mla_decode_reference(q_lat_bthr, q_pe_bthd, c_bsr, kpe_bsd, mask_bts, scale)
    if q_start_b is None:
        raise ValueError(f"mla_decode(impl={impl!r}) applies the causal mask itself and needs q_start_b "
                         "(the cache index of each row's first query)")
    if impl == "split_reference":
        return reference.mla_decode_split_reference(q_lat_bthr, q_pe_bthd, c_bsr, kpe_bsd, q_start_b, scale,
                                                    kernel_kwargs.get("num_splits", 1),
                                                    kernel_kwargs.get("block_kv", 64))
    from lcflash.kernels.mla_decode import pallas_mgpu   # imports Mosaic GPU only when asked for

    return pallas_mgpu.mla_decode_pallas(q_lat_bthr, q_pe_bthd, c_bsr, kpe_bsd, q_start_b, scale=scale,
                                         **kernel_kwargs)
