"""Grouped matmul over tokens sorted by expert: one switch, several implementations.

`gmm(lhs [M, K], rhs [G, K, N], group_sizes [G])` multiplies rows `[start_g, start_g + size_g)` of lhs
by `rhs[g]`. Rows past `sum(group_sizes)` (slots of zero-computation experts, padding) come back as zeros.
The environment variable `LCFLASH_GMM_IMPL` overrides the configured implementation for A/B runs.
"""

import os

from lcflash.kernels.gmm import reference

IMPLEMENTATIONS = {
    "ragged_dot": reference.gmm_ragged_dot,
    "reference": reference.gmm_loop,
}


def gmm(lhs_mk, rhs_gkn, group_sizes_g, *, impl: str = "ragged_dot", preferred_element_type=None):
    impl = os.environ.get("LCFLASH_GMM_IMPL", impl)
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"gmm impl {impl!r} is not available here; available: {sorted(IMPLEMENTATIONS)}")
    return IMPLEMENTATIONS[impl](lhs_mk, rhs_gkn, group_sizes_g, preferred_element_type=preferred_element_type)
