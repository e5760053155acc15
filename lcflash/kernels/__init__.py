"""Hot-path kernels. Each has an `api.py` switch and a pure-JAX reference beside it."""

import jax
import jax.numpy as jnp


def on_hopper(backend: str | None = None, compute_capability: str | None = None) -> bool:
    """Whether our Mosaic GPU kernels (wgmma, TMA) can run here: a Hopper GPU, compute capability 9.x. Without
    arguments, the default backend's first device; tests pass both."""
    if backend is None:
        backend = jax.default_backend()
        compute_capability = getattr(jax.devices()[0], "compute_capability", None) if backend == "gpu" else None
    return backend == "gpu" and str(compute_capability or "").startswith("9.")


def interpret_params(interpret: bool):
    """plgpu.kernel's `interpret` argument: Pallas' CPU simulation of Mosaic GPU when asked for, else None.

    The simulation calls JAX from inside callbacks of the running computation: with XLA:CPU's asynchronous dispatch
    (JAX's default) an op dispatched meanwhile can deadlock with them (jax-ml/jax#25861): turn it off before the
    first computation, `jax.config.update("jax_cpu_enable_async_dispatch", False)`, as tests/conftest.py does."""
    if not interpret:
        return None
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


# The tokamax release the peers' wrappers were written and checked against (the newest, 2026-10; on JAX 0.11.2 on a
# CPU). 0.0.12, the last for Python 3.11, failed on JAX 0.11.2; every release since 0.0.13 needs Python >= 3.12.
TOKAMAX_VERSION = "0.0.17"


def load_in_layout(ref, layout, optimized: bool = True):
    """plgpu.load of a whole ref into registers in `layout`. JAX 0.11 takes the ref alone and deprecates an index
    beside it; JAX 0.10 requires one."""
    import inspect

    from jax.experimental.pallas import mosaic_gpu as plgpu

    if inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty:
        return plgpu.load(ref, (), layout=layout, optimized=optimized)
    return plgpu.load(ref, layout=layout, optimized=optimized)


def load_tokamax(what: str):
    """The tokamax module, or an ImportError naming `what` needs it and what to install. Optional: the peers'
    wrappers (gmm/tokamax_gmm.py, doc_attention/tokamax_attention.py) import it on first use."""
    try:
        import tokamax
    except ImportError as e:
        raise ImportError(f"{what} needs the tokamax package (tokamax>={TOKAMAX_VERSION}: Python >= 3.12, JAX >= "
                          f"0.11.1); import failed: {e}") from e
    return tokamax


def accumulation_dtype(dtype):
    """fp32 for bf16/fp16/fp32 operands; a wider dtype stays (float64 in the x64 tests)."""
    return jnp.promote_types(dtype, jnp.float32)


# `jax.ad_checkpoint.checkpoint_name` of a kernel's forward output, for remat policies that keep it
# (lcflash/model/common.py). Mosaic GPU kernels bind no primitive a policy could match by name: plgpu.kernel wraps
# its call in custom_vmap.
KERNEL_OUTPUT = "kernel_output"

# The expert weight stacks cast to the compute dtype (lcflash/model/moe.py): the "dots" policy keeps them, so the
# backward pass does not cast ~3.6 GB of fp32 weights again per step (configs/small.py: 2.6 ms of 263 on an H200).
COMPUTE_WEIGHTS = "compute_weights"
