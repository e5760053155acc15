"""Compile-speed XLA flags for the test processes (tests/conftest.py, tests/parallel_worker.py); set before JAX
starts. The suite is compile-bound (tiny shapes), and these change how XLA:CPU generates code, not what it
computes."""

import importlib.metadata
import os


def _jaxlib_between(low: tuple[int, int], below: tuple[int, int]) -> bool:
    """Whether the installed jaxlib (read without importing JAX) is in [low, below): XLA aborts the process on a flag
    in XLA_FLAGS that it does not take, and flags come and go between releases."""
    try:
        version = tuple(int(x) for x in importlib.metadata.version("jaxlib").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return low <= version < below


def add_fast_compile_flags(env=os.environ) -> None:
    """Appends to env["XLA_FLAGS"], leaving any flag already there alone:

    * --xla_backend_optimization_level=0: LLVM -O0 for XLA:CPU's kernels, ~20% faster compiles
      (tests/test_generate.py: 93 s -> 75 s).
    * --xla_cpu_use_fusion_emitters=false: XLA:CPU's elemental emitter instead of its MLIR fusion emitters, about
      half the compile time of our models (the tiny model's loss and gradients: 5.4 s -> 2.2 s; test_moe.py
      100 s -> 46 s of CPU). Only on jaxlib 0.10 (checked there; 0.11.2 aborts on it).
    """
    flags = env.get("XLA_FLAGS", "")
    add = []
    if "--xla_backend_optimization_level" not in flags:
        add.append("--xla_backend_optimization_level=0")
    if "--xla_cpu_use_fusion_emitters" not in flags and _jaxlib_between((0, 10), (0, 11)):
        add.append("--xla_cpu_use_fusion_emitters=false")
    if add:
        env["XLA_FLAGS"] = " ".join([flags, *add]).strip()


def default_codegen() -> dict | None:
    """jax.jit compiler_options that restore XLA:CPU's default fusion emitters where add_fast_compile_flags turned
    them off: for the tests whose claim is bit-identical (or 1e-6) values from two differently structured programs
    (remat policies, the MoE overlap switch), which holds for XLA's default code generation; the elemental emitter
    sums some fusions in another order between the two programs."""
    if "--xla_cpu_use_fusion_emitters=false" in os.environ.get("XLA_FLAGS", ""):
        return {"xla_cpu_use_fusion_emitters": True}
    return None


def user_env(env=os.environ) -> dict:
    """A copy of env for a subprocess that compiles as a user's process does: without XLA_FLAGS (this module's
    flags) or tests/conftest.py's JAX_DEFAULT_MATMUL_PRECISION."""
    return {k: v for k, v in env.items() if k not in ("XLA_FLAGS", "JAX_DEFAULT_MATMUL_PRECISION")}
