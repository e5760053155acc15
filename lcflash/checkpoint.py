"""Orbax checkpoints of the whole training state.

A step directory `DIR/<step>/` holds three items:
  params  the model parameters and the router correction biases (`RouterBias`, not parameters)
  train   optimizer state, bias-controller state, step counter and RNG
  meta    JSON: step, data-loader position, corpus fingerprint, wall time
so evaluation and growth read only `params`. Saves are asynchronous. Orbax writes each save to a temporary
`<step>.orbax-checkpoint-tmp-*` directory and renames it when every item is written, so a process killed
mid-save leaves no directory that `latest_step()` or `restore()` would pick up.
"""

from __future__ import annotations

import os
import time

import jax
import orbax.checkpoint as ocp

PARAM_KEYS = ("params", "bias")


class CheckpointError(RuntimeError):
    """A checkpoint is missing or cannot be restored into the requested model; the message says which."""


def _with_default_sharding(abstract):
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def fix(x):
        if isinstance(x, jax.ShapeDtypeStruct) and getattr(x, "sharding", None) is None:
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev)
        return x
    return jax.tree.map(fix, abstract)


def split_state(state: dict) -> tuple[dict, dict]:
    return {k: state[k] for k in PARAM_KEYS}, {k: v for k, v in state.items() if k not in PARAM_KEYS}


class Checkpointer:
    def __init__(self, directory: str, every_steps: int = 1, keep: int | None = 3, async_save: bool = True,
                 read_only: bool = False):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(int(every_steps), 1),
            max_to_keep=keep if keep and keep > 0 and not read_only else None,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only, read_only=read_only,
            create=not read_only)
        if read_only and not os.path.isdir(self.directory):
            raise CheckpointError(f"no checkpoint directory {self.directory!r}")
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("params", "train", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self.manager.should_save(step)

    def save(self, step: int, state: dict, meta: dict, force: bool = False) -> bool:
        params, train = split_state(state)
        meta = dict(meta, step=int(step), saved_unix_time=time.time())
        return self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), train=ocp.args.StandardSave(train), meta=ocp.args.JsonSave(meta)),
            force=force)

    def _step(self, step):
        step = self.latest_step() if step is None else step
        if step is None or step not in self.manager.all_steps():
            raise CheckpointError(f"no complete checkpoint{'' if step is None else f' for step {step}'} in "
                                  f"{self.directory!r} (steps present: {self.all_steps()})")
        return step

    def restore(self, abstract_state: dict, step: int | None = None) -> tuple[dict, dict]:
        """Restores the full state into the structure, dtypes and shardings of `abstract_state`."""
        step = self._step(step)
        a_params, a_train = split_state(_with_default_sharding(abstract_state))
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(a_params), train=ocp.args.StandardRestore(a_train),
                meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint step {step} in {self.directory!r} does not match this model/optimizer "
                                  f"config: {e}") from e
        return dict(out["params"], **out["train"]), dict(out["meta"])

    def restore_params(self, abstract_params: dict | None = None, step: int | None = None) -> tuple[dict, dict]:
        """Only {'params', 'bias'} (and meta); with no abstract tree, as saved (numpy-like arrays)."""
        step = self._step(step)
        target = None if abstract_params is None else _with_default_sharding(abstract_params)
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return dict(out["params"]), dict(out["meta"])

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, "checkpoints")


def resolve(path: str) -> tuple[str, int | None]:
    """A workdir, its checkpoints dir, or one step dir -> (checkpoints dir, step or None for the latest)."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints"), None
    base = os.path.basename(path)
    if base.isdigit() and os.path.isdir(path):
        return os.path.dirname(path), int(base)
    if os.path.isdir(path):
        return path, None
    raise CheckpointError(f"{path!r} is not a workdir, checkpoint directory or step directory")
