"""Pure-JAX grouped matmuls: the numerical references every kernel is tested against."""

import jax
import jax.numpy as jnp

from lcflash.kernels import accumulation_dtype


def group_ids(group_sizes_g: jax.Array, m: int) -> jax.Array:
    """Group index of each of the m rows; rows past sum(group_sizes) get index G (no group)."""
    ends_g = jnp.cumsum(group_sizes_g)
    return jnp.searchsorted(ends_g, jnp.arange(m), side="right")


def gmm_loop(lhs_mk, rhs_gkn, group_sizes_g, preferred_element_type=None):
    """Per-group loop: each group is a dense matmul of all rows, masked to its own rows.

    O(G) dense matmuls, so only for tests and tiny shapes; rows outside every group are zero.
    """
    out_dtype = preferred_element_type or lhs_mk.dtype
    acc = accumulation_dtype(lhs_mk.dtype)
    gid_m = group_ids(group_sizes_g, lhs_mk.shape[0])
    out = jnp.zeros((lhs_mk.shape[0], rhs_gkn.shape[-1]), acc)
    for g in range(rhs_gkn.shape[0]):
        y = jnp.dot(lhs_mk, rhs_gkn[g], preferred_element_type=acc)
        out = jnp.where((gid_m == g)[:, None], y, out)
    return out.astype(out_dtype)


def gmm_ragged_dot(lhs_mk, rhs_gkn, group_sizes_g, preferred_element_type=None):
    """XLA's ragged_dot; rows past sum(group_sizes) are forced to zero."""
    out_dtype = preferred_element_type or lhs_mk.dtype
    y = jax.lax.ragged_dot(lhs_mk, rhs_gkn, group_sizes_g.astype(jnp.int32),
                           preferred_element_type=accumulation_dtype(lhs_mk.dtype))
    valid_m = jnp.arange(lhs_mk.shape[0]) < jnp.sum(group_sizes_g)
    return jnp.where(valid_m[:, None], y, 0).astype(out_dtype)


def gmm_ragged_dot_nt(lhs_mk, rhs_gnk, group_sizes_g, preferred_element_type=None):
    """gmm_ragged_dot against rhs[g]^T, contracting rhs's last axis in place (no transposed copy in the program)."""
    out_dtype = preferred_element_type or lhs_mk.dtype
    dims = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([1], [2]), ([], [])),
                                             lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
    y = jax.lax.ragged_dot_general(lhs_mk, rhs_gnk, group_sizes_g.astype(jnp.int32), dims,
                                   preferred_element_type=accumulation_dtype(lhs_mk.dtype))
    valid_m = jnp.arange(lhs_mk.shape[0]) < jnp.sum(group_sizes_g)
    return jnp.where(valid_m[:, None], y, 0).astype(out_dtype)


def swiglu_from_gmm(gmm_fn, x_mk, w_gate_gkn, w_up_gkn, group_sizes_g):
    """silu(x @ w_gate) * (x @ w_up) from two grouped matmuls, activation in fp32, result in x's dtype."""
    gate = gmm_fn(x_mk, w_gate_gkn, group_sizes_g, preferred_element_type=jnp.float32)
    up = gmm_fn(x_mk, w_up_gkn, group_sizes_g, preferred_element_type=jnp.float32)
    return (jax.nn.silu(gate) * up).astype(x_mk.dtype)
