"""Load a model for generation from a Hugging Face directory or a trainer workdir, plus its tokenizer.

* HF directory (config.json + safetensors): `lcflash.from_pretrained`; tokenizer: its tokenizer.json if present,
  else byte tokens.
* Trainer workdir (`python -m lcflash.train --workdir=DIR`), its checkpoints/ directory, or one step directory:
  the config the run saved (DIR/config.json) and the parameters and router biases of the newest (or the given)
  step via `lcflash.checkpoint`; tokenizer: the run's `data.tokenizer` (empty = byte tokens).

With a `mesh` (lcflash's axes, `mesh_from_spec`), every variable is read straight onto its shards by the training
rules (lcflash/parallel/rules.py: experts over `expert`, heads, FFN width and vocabulary over `tensor`, the width
over `fsdp`), so no device ever holds the whole model: the way to serve the 560B release. Generation then needs
nothing more: XLA partitions the prefill and the decode loop from the weights' shardings, the decode layout inherits
them, and only activations move between devices (tests/test_parallel.py, docs/inference.md).
"""

from __future__ import annotations

import os

from flax import nnx

from lcflash.config import ConfigError


def _workdir_of(path: str) -> str | None:
    """The workdir holding config.json for a workdir, checkpoints dir or step dir, else None."""
    p = os.path.abspath(path)
    for cand in (p, os.path.dirname(p), os.path.dirname(os.path.dirname(p))):
        if os.path.isfile(os.path.join(cand, "config.json")) and os.path.isdir(os.path.join(cand, "checkpoints")):
            return cand
    return None


def mesh_from_spec(spec: str):
    """A device mesh over all devices from "axis=size,...", e.g. "expert=4,tensor=2" (one size may be -1: the
    rest); unnamed axes of data, fsdp, expert, tensor have size 1."""
    from lcflash.parallel.mesh import make_mesh
    from lcflash.parallel.rules import MESH_AXES

    sizes = {}
    for part in [p for p in spec.split(",") if p.strip()]:
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in MESH_AXES:
            raise ConfigError(f"--mesh {spec!r}: {part!r} is not axis=size with an axis of {MESH_AXES}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ConfigError(f"--mesh {spec!r}: the size of {name!r} must be an integer, got {value!r}") from None
    return make_mesh(sizes)


def load_model(path: str, dtype: str | None = None, step: int | None = None, mesh=None, **overrides):
    """(model, tokenizer spec) where the spec is '' for byte tokens or a tokenizer.json path. mesh: a
    jax.sharding.Mesh with lcflash's axes to load onto (see the module docstring); default one device."""
    if not os.path.exists(path):
        raise ConfigError(f"--checkpoint {path!r} does not exist (give a HF directory or a trainer workdir)")
    workdir = _workdir_of(path)
    if workdir is None:
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"{path!r} is neither a HF checkpoint (config.json + *.safetensors) nor a trainer "
                              "workdir (config.json + checkpoints/)")
        import lcflash

        if step is not None:
            raise ConfigError(f"--step applies to trainer workdirs; {path!r} is a HF directory")
        model = lcflash.from_pretrained(path, dtype=dtype, mesh=mesh, **overrides)
        tok = os.path.join(path, "tokenizer.json")
        return model, tok if os.path.isfile(tok) else ""
    return _load_workdir(path, workdir, dtype, step, mesh, overrides)


def _load_workdir(path, workdir, dtype, step, mesh, overrides):
    import jax.numpy as jnp

    from lcflash.checkpoint import Checkpointer, resolve
    from lcflash.config import model_config
    from lcflash.model import LongcatFlash
    from lcflash.model.common import RouterBias
    from lcflash.train.trainer import load_workdir_config

    cfg = load_workdir_config(workdir)
    model_cfg = model_config(cfg)
    if overrides:
        model_cfg = model_cfg.replace(**overrides)
    directory, path_step = resolve(path)
    abstract = nnx.eval_shape(lambda: LongcatFlash(model_cfg, nnx.Rngs(0)))
    graphdef, params, bias = nnx.split(abstract, nnx.Param, RouterBias)
    target = {"params": nnx.to_pure_dict(params), "bias": nnx.to_pure_dict(bias)}
    if mesh is not None:   # restored straight onto the shards
        import jax

        from lcflash.parallel.sharding import variable_sharding_fn

        fn = variable_sharding_fn(model_cfg, mesh)
        target = jax.tree_util.tree_map_with_path(
            lambda kp, a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=fn(kp[1:], a.shape)), target)
    saved, _ = Checkpointer(directory, read_only=True).restore_params(target, step if step is not None else path_step)
    nnx.replace_by_pure_dict(params, saved["params"])
    nnx.replace_by_pure_dict(bias, saved["bias"])
    model = nnx.merge(graphdef, params, bias)
    if dtype is not None:
        # Compute dtype and parameter dtype both follow --dtype; the router stays fp32 as in training.
        new_cfg = model_cfg.replace(dtype=jnp.dtype(dtype).name, param_dtype=jnp.dtype(dtype).name)
        state = nnx.state(model)
        cast = jnp.dtype(dtype)

        def to(path, v):
            if "w_router" in [str(getattr(k, "key", k)) for k in path] or isinstance(v, RouterBias):
                return v
            return v.replace(v.get_value().astype(cast))

        import jax

        state = jax.tree_util.tree_map_with_path(to, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        gd = nnx.graphdef(nnx.eval_shape(lambda: LongcatFlash(new_cfg, nnx.Rngs(0))))
        model = nnx.merge(gd, state)
    data = cfg.get("data", {}) if hasattr(cfg, "get") else {}
    return model, (data.get("tokenizer", "") or "")
