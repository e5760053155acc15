"""Sharding over device meshes: mesh from the config, one logical-axis rules table, expert parallelism.

    mesh = make_mesh(cfg)                                   # axes data, fsdp, expert, tensor
    ctx = parallel_context(cfg, mesh, model_cfg, batch)     # rules + MoE transport, validated
    step = lcflash.parallel.step.make_sharded_train_step(cfg, ctx)

Model code reads the context while it is traced (`lcflash.parallel.context`); without one it runs the
single-device path. `expert_parallel` is imported lazily by the MoE (it imports the model).
"""

from lcflash.parallel.context import ParallelContext, constrain, current, use  # noqa: F401
from lcflash.parallel.mesh import check_model_fits, make_mesh, mesh_shape, parallel_context  # noqa: F401
from lcflash.parallel.rules import DEFAULT_RULES, MESH_AXES, logical_to_spec, make_rules, rules_from_config  # noqa: F401
