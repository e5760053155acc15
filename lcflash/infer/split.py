"""Data-parallel attention for generation on a device mesh: the batch's rows split where the weights are not.

On a mesh the attention weights are split over `tensor` (heads) only, so every `expert` (and `data`, `fsdp`)
shard would otherwise hold the whole latent cache and attend over every row. `MeshSplit` gives each of those
shards its own rows instead (the activation rule `batch` of lcflash/parallel/rules.py): the cache, the
attention and the dense FFNs run on a device's rows only, and the rows are gathered where the MoE reads them,
whose experts are split over `expert`, and split again after it. What moves per layer is the MoE's input and
output activations; the cache per device shrinks by the split's size. A batch the split does not divide keeps
every row on every shard (`for_batch`): padding it would add rows to every MoE, e.g. 8 tokens where a batch-1
request on 8 expert shards has 1.

With no mesh, or a one-device one, every method is the identity (`NO_SPLIT`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lcflash.model.mla import LatentKV, write_latents
from lcflash.parallel.context import ParallelContext

U = P.UNCONSTRAINED


@dataclasses.dataclass(frozen=True)
class MeshSplit:
    mesh: Mesh | None = None
    rows_axes: tuple[str, ...] = ()     # mesh axes the batch's rows are split over
    heads_axes: tuple[str, ...] = ()    # mesh axes the attention heads are split over

    @classmethod
    def of(cls, weights, num_heads: int) -> MeshSplit:
        """The split for weights placed on a mesh (the mesh of their first NamedSharding), else NO_SPLIT."""
        mesh = next((x.sharding.mesh for x in jax.tree.leaves(weights)
                     if isinstance(getattr(x, "sharding", None), NamedSharding)), None)
        if mesh is None or mesh.size == 1:
            return NO_SPLIT
        ctx = ParallelContext(mesh)
        return cls(mesh, ctx.axes("batch"), ctx.axes("heads") if num_heads % ctx.size("heads") == 0 else ())

    @property
    def active(self) -> bool:
        return self.mesh is not None

    @property
    def rows(self) -> int:
        """How many shards the rows split into (1: none)."""
        return math.prod(self.mesh.shape[a] for a in self.rows_axes) if self.active else 1

    def for_batch(self, batch: int) -> MeshSplit:
        """This split for a batch of `batch` rows (a static shape): its rows unsplit where the shards do not divide
        it."""
        return self if batch % self.rows == 0 else dataclasses.replace(self, rows_axes=())

    def _constrain(self, tree, first):
        if not self.active or not self.rows_axes:
            return tree

        def one(x):
            return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P(first, *[U] * (x.ndim - 1))))

        return jax.tree.map(one, tree)

    def by_rows(self, tree):
        """Each array's leading (batch) axis split over the row shards; the other axes as XLA chooses."""
        return self._constrain(tree, self.rows_axes)

    def whole(self, tree):
        """Every row on every shard (before the MoE, whose experts are split instead)."""
        return self._constrain(tree, None)

    def rowwise(self, fn: Callable, *args):
        """fn(*args) on each shard's rows: for row-indexed writes, which XLA would otherwise partition by gathering
        every row's update and index to every shard."""
        if not self.active or not self.rows_axes:
            return fn(*args)
        return jax.shard_map(fn, mesh=self.mesh, in_specs=P(self.rows_axes), out_specs=P(self.rows_axes),
                             check_vma=False)(*args)

    def write_latents(self, cache: LatentKV, new: LatentKV, start_b) -> LatentKV:
        """mla.write_latents on each shard's rows (the model's MLA takes it as its `write`)."""
        return self.rowwise(write_latents, cache, new, start_b)

    def attention(self, fn: Callable, q_bthr, q_pe_bthd, c_bsr, kpe_bsd, start_b):
        """fn(q, q_pe, c, kpe, start_b) -> [B, T, H, R], a kernel XLA cannot partition, run per shard: rows over
        the row shards, heads over the head shards (each head attends alone)."""
        if not self.active:
            return fn(q_bthr, q_pe_bthd, c_bsr, kpe_bsd, start_b)
        rows, heads = self.rows_axes or None, self.heads_axes or None
        q_spec = P(rows, None, heads, None)
        return jax.shard_map(fn, mesh=self.mesh, in_specs=(q_spec, q_spec, P(rows), P(rows), P(rows)),
                             out_specs=q_spec, check_vma=False)(q_bthr, q_pe_bthd, c_bsr, kpe_bsd, start_b)


NO_SPLIT = MeshSplit()
