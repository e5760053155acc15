"""The parallel settings the model reads while it is traced: mesh, rules table, MoE transport.

Model code calls `current()`; with no context it runs the single-device path unchanged. `use(ctx)` is
entered *inside* the function being traced (see `lcflash.parallel.sharding.sharded`), so a jitted function
always traces with the settings it closes over and jit's cache cannot return a trace made under others.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lcflash.config import ConfigError
from lcflash.parallel.rules import DEFAULT_RULES, Rules, logical_to_spec, mesh_axes_for

TRANSPORTS = ("all_to_all", "ragged_all_to_all")


@dataclasses.dataclass(frozen=True)
class ParallelContext:
    mesh: Mesh
    rules: Rules = DEFAULT_RULES
    # Expert-parallel transport: fixed-capacity `all_to_all` (any backend) or dropless `ragged_all_to_all`
    # (GPU only: XLA:CPU cannot compile it).
    transport: str = "all_to_all"
    # Slots per (source device, expert) = ceil(capacity_factor * local_tokens * top_k / n_experts), capped at
    # local_tokens (a token picks an expert at most once, so that cap never drops).
    capacity_factor: float = 2.0

    def __post_init__(self):
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"moe.transport = {self.transport!r} is invalid: must be one of {TRANSPORTS}")
        if not self.capacity_factor > 0:
            raise ConfigError(f"moe.capacity_factor = {self.capacity_factor!r} is invalid: must be > 0")

    @property
    def mesh_shape(self) -> dict[str, int]:
        return dict(self.mesh.shape)

    def axes(self, logical: str) -> tuple[str, ...]:
        """Mesh axes (of size > 1) that a logical name maps to."""
        return tuple(a for a in mesh_axes_for(self.rules, logical) if self.mesh.shape.get(a, 1) > 1)

    def size(self, logical: str) -> int:
        n = 1
        for a in self.axes(logical):
            n *= self.mesh.shape[a]
        return n

    def spec(self, logical_axes, shape=None) -> P:
        return logical_to_spec(logical_axes, self.rules, self.mesh_shape, shape)

    def sharding(self, logical_axes, shape=None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical_axes, shape))


_CURRENT: contextvars.ContextVar[ParallelContext | None] = contextvars.ContextVar("lcflash_parallel", default=None)


@contextlib.contextmanager
def use(ctx: ParallelContext | None):
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)


def current() -> ParallelContext | None:
    return _CURRENT.get()


def multi_device() -> bool:
    """Whether the active context's mesh spans devices: kernels without a sharding rule run only outside one."""
    ctx = current()
    return ctx is not None and ctx.mesh.size > 1


def constrain(x, logical_axes):
    """Sharding constraint on an activation by logical axes; identity outside a parallel context."""
    ctx = current()
    if ctx is None:
        return x
    return jax.lax.with_sharding_constraint(x, ctx.sharding(logical_axes, x.shape))
