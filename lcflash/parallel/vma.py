"""Varying manual axes (vma): the shard_map axes a value differs over, which custom_vjp rules must respect.

Inside `shard_map`, JAX types each value with the manual mesh axes it varies over, and a custom_vjp's cotangents
must carry their primal's type. A kernel result carries none, and a cotangent built from a more-varying
gradient carries too many: these helpers mark values explicitly (`pcast(..., to="varying")`, whose transpose
is the psum that plain autodiff would insert). Outside shard_map every vma is empty and they do nothing.
"""

import jax


def vma(x) -> frozenset:
    """Manual shard_map axes x varies over (`aval.manual_axis_type.varying`; older JAX: `aval.vma`)."""
    t = jax.typeof(x)
    mat = getattr(t, "manual_axis_type", None)
    return frozenset(mat.varying if mat is not None else (getattr(t, "vma", None) or ()))


def varying(x, axes: frozenset):
    """x marked as varying over `axes` too."""
    missing = tuple(sorted(axes - vma(x)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def match_vma(*trees):
    """Every array in `trees` marked as varying over the union of their axes, so results computed from any of
    them type like each input (custom_vjp rules)."""
    leaves = jax.tree.leaves(trees)
    axes = frozenset().union(*(vma(x) for x in leaves))
    return jax.tree.map(lambda x: varying(x, axes), trees)
