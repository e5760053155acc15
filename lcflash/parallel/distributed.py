"""Multi-process start-up on JAX's own distributed runtime (`jax.distributed.initialize`).

Call `initialize()` first thing in every process, before any JAX computation. Where the settings come from,
first match wins:
  1. arguments (e.g. from command-line flags);
  2. LCFLASH_COORDINATOR (host:port), LCFLASH_NUM_PROCESSES, LCFLASH_PROCESS_ID, optional
     LCFLASH_LOCAL_DEVICE_IDS (comma-separated);
  3. a multi-task SLURM (SLURM_NTASKS > 1) or Open MPI launch, or LCFLASH_DISTRIBUTED=auto for any other
     cluster JAX detects: `jax.distributed.initialize()` with no arguments reads SLURM_* and friends;
  4. none of these: a single process, nothing to do.
On CPU, cross-process collectives need an implementation (gloo); it is selected here. See docs/distributed.md.
"""

from __future__ import annotations

import os

import jax

from lcflash.config import ConfigError

ENV = ("LCFLASH_COORDINATOR", "LCFLASH_NUM_PROCESSES", "LCFLASH_PROCESS_ID")


def _cluster_detected() -> bool:
    """A multi-task SLURM or Open MPI launch, or LCFLASH_DISTRIBUTED=auto (any cluster JAX can detect)."""
    env = os.environ
    if env.get("LCFLASH_DISTRIBUTED") == "auto":
        return True
    return int(env.get("SLURM_NTASKS", "1") or 1) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids=None, cpu_collectives: str = "gloo",
               initialization_timeout: int = 300) -> dict:
    """Starts the distributed runtime if this is a multi-process run; returns what was decided.

    initialization_timeout: seconds to wait for every process to reach the coordinator."""
    env = os.environ
    if coordinator_address is None and env.get("LCFLASH_COORDINATOR"):
        missing = [k for k in ENV[1:] if not env.get(k)]
        if missing:
            raise ConfigError(f"LCFLASH_COORDINATOR is set but {missing} are not; set all of {list(ENV)}")
        coordinator_address = env["LCFLASH_COORDINATOR"]
        num_processes, process_id = int(env["LCFLASH_NUM_PROCESSES"]), int(env["LCFLASH_PROCESS_ID"])
        if env.get("LCFLASH_LOCAL_DEVICE_IDS"):
            local_device_ids = [int(x) for x in env["LCFLASH_LOCAL_DEVICE_IDS"].split(",")]
    if coordinator_address is not None and (num_processes is None or process_id is None):
        raise ConfigError("a coordinator address needs num_processes and process_id too")
    if coordinator_address is None and not _cluster_detected():
        return {"multi_process": False, "process_id": 0, "num_processes": 1}
    if cpu_collectives and hasattr(jax.config, "jax_cpu_collectives_implementation"):
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids,
                               initialization_timeout=initialization_timeout)
    return {"multi_process": True, "process_id": jax.process_index(), "num_processes": jax.process_count()}
