import gc
import os

import pytest

from xla_flags import add_fast_compile_flags

# Parity tests compare float32 models at 1e-5: make CPU matmuls exact fp32 (XLA:CPU may otherwise use faster
# reduced-precision paths on some builds). Set before JAX initialises.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# XLA:CPU's intra-op pool (NPROC threads, else one per core) also runs host callbacks that a program's thunks
# hand it. Pallas' GPU interpreter blocks in such callbacks: each simulated thread at a barrier, each thread_map
# until its threads end. On a 2-core machine two blocked callbacks took the whole pool, and the simulated threads
# they waited for had no thread left to run on (test_gmm's interpreted flat contract kernel, stacks in gdb). The
# interpreter runs a kernel's grid points one after another, each as one thread_map of at most 6 simulated threads
# here (a cluster of 2 CTAs x 3 warpgroups): 7 blocked callbacks per running kernel, and XLA may run independent
# kernels side by side. 32 idle threads cost little. Read when the CPU client starts.
os.environ.setdefault("NPROC", str(max(32, os.cpu_count() or 1)))
# Tracing and lowering allocate millions of objects, and Python's collector runs every 700 net allocations by
# default: thousands of passes per test file. Every 50,000 (a full pass every 10 million) took 2-5% off test_moe.py
# and off test_generate.py + test_doc_attention.py (session 66); cycles are still freed, later.
gc.set_threshold(50_000, 20, 10)
# The suite is compile-bound (tiny shapes): faster XLA:CPU compiles (tests/xla_flags.py). Subprocesses
# (tests/parallel_worker.py) inherit and extend them.
add_fast_compile_flags()


def _compile_interpreter_threads_once():
    """Pallas' interpreters (GPU and TPU) run a kernel's simulated threads through thread_map, whose _run_jaxpr
    traces, lowers and compiles the same per-thread program afresh on every thread and every call (its `_run` is
    a new function object each time, so no JAX cache hits): ~4 s of XLA:CPU compile each, most of test_gmm's time.
    Here each (program, argument types) compiles once and every thread runs that executable: the same program on
    the same arguments. Installed JAX's own `_run` body is reused, so its evaluation is unchanged. JAX 0.11 made
    `_run` a module-level function (its jit cache then does this itself): there, as wherever the module's shape
    differs, nothing is patched."""
    import threading
    import types

    try:
        import jax
        import numpy as np
        from jax._src import config as jax_config
        from jax._src.pallas.mosaic.interpret import thread_map
    except ImportError:
        return
    trace_context = getattr(jax_config, "trace_context", lambda: None)  # the config jit's own caches key on
    orig = getattr(thread_map, "_run_jaxpr", None)
    code = getattr(orig, "__code__", None)
    run_code = [c for c in (code.co_consts if code else ()) if isinstance(c, types.CodeType) and c.co_name == "_run"]
    if len(run_code) != 1 or code.co_freevars or run_code[0].co_freevars or getattr(orig, "_compile_once", False):
        return
    jitted = jax.jit(types.FunctionType(run_code[0], vars(thread_map), "_run"), static_argnums=(0,))
    lock, executables = threading.Lock(), {}

    def sig(x):
        return np.shape(x), str(getattr(x, "dtype", None) or np.asarray(x).dtype), bool(getattr(x, "weak_type", False))

    def _run_jaxpr(jaxpr, consts, *args):
        leaves, tree = jax.tree.flatten((consts, args))
        key = (jaxpr, tree, tuple(sig(x) for x in leaves), trace_context())
        with lock:
            exe = executables.get(key)
            if exe is None:
                exe = executables[key] = jitted.trace(jaxpr, consts, *args).lower().compile()
        exe(consts, *args)

    _run_jaxpr._compile_once = True
    thread_map._run_jaxpr = _run_jaxpr


_compile_interpreter_threads_once()


def _exact_interpreter_wgmma():
    """Pallas' GPU interpreter runs a wgmma as `acc + np.matmul(a, b, dtype=acc_dtype)`, and numpy's BLAS sums a
    product in an order that depends on its operands' memory layout: on an AMD EPYC host the flat and per-tile rows
    kernels (same tiles, same K steps) differed by one bf16 ulp in 1 of 76,800 elements, so their bitwise test
    failed there and passed elsewhere. Here each step's product is summed in float64 and rounded once (bf16 and
    fp16 products are exact in float64, their sums within 2^-53 of exact, far below the fp32 rounding after), so a
    result no longer depends on the layout numpy sees, and the bitwise comparisons between kernel variants test
    their tiles and steps. Only the interpreter's `np` is replaced."""
    import types

    try:
        import numpy as np
        from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    except ImportError:
        return
    if getattr(gpu_callbacks, "np", None) is not np:
        return

    class _ExactMatmulNumpy(types.ModuleType):
        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def matmul(a, b, dtype=None):
            return np.matmul(np.asarray(a, np.float64), np.asarray(b, np.float64)).astype(dtype or np.float64)

    gpu_callbacks.np = _ExactMatmulNumpy("numpy_exact_matmul")


_exact_interpreter_wgmma()


def _interpreter_callbacks_on_host_arrays():
    """Pallas' GPU interpreter runs every simulated load, store, barrier and wgmma as an io_callback. JAX 0.10's
    io_callback_impl first copies the callback's host (numpy) arguments into jax Arrays on the CPU device; the
    interpreter then reads most of them back element by element (`int(x)`, `map(int, request)`), one dispatched op
    each, and builds its results with `jnp.array`, which io_callback_impl turns back into numpy. That was ~45% of an
    interpreted kernel test (py-spy on test_gmm's FFN test). Here the interpreter's callbacks take and build numpy
    arrays; other io_callbacks are untouched. The kernels' outputs and gradients are bitwise the same either way
    (checked on gmm_swiglu_ffn's forward and backward, ragged groups). The suite: 698 -> 567 s in a fresh clone.
    Faster callbacks made the pool starvation described at NPROC above likelier: 2 hangs in 23 runs of the
    interpreted flat kernels with 2 pool threads, none in 24 with 32."""
    import types

    import jax.numpy as jnp
    import numpy as np

    try:
        from jax._src import callback as cb
        from jax._src import config as jax_config
        from jax._src import tree_util, xla_bridge
        from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks, shared_memory
    except ImportError:
        return
    if hasattr(shared_memory, "_to_int"):   # JAX 0.11's interpreter takes jax Arrays only (its _to_int refuses numpy)
        return
    orig = getattr(cb, "io_callback_impl", None)
    if orig is None or getattr(orig, "_host_arrays", False) or getattr(gpu_callbacks, "jnp", None) is not jnp:
        return

    def io_callback_impl(*args, callback, **kwargs):
        fn = getattr(callback, "callback_func", None)
        fn = getattr(fn, "func", fn)   # functools.partial
        if not getattr(fn, "__module__", "").startswith("jax._src.pallas."):
            return orig(*args, callback=callback, **kwargs)
        cpu_device, *_ = xla_bridge.local_devices(backend="cpu")
        with jax_config.default_device(cpu_device):
            return tree_util.tree_map(np.asarray, callback(*(np.asarray(a) for a in args)))

    class _HostJnp(types.ModuleType):
        array, int32 = staticmethod(np.array), np.int32

        def __getattr__(self, name):
            return getattr(jnp, name)

    io_callback_impl._host_arrays = True
    cb.io_callback_impl = io_callback_impl
    gpu_callbacks.jnp = _HostJnp("jnp_on_host")


_interpreter_callbacks_on_host_arrays()


def _synchronous_cpu_dispatch():
    """Pallas' interpreters call JAX from inside io_callbacks of a running computation. With XLA:CPU's asynchronous
    dispatch, the test's next op can be queued while such a computation runs; the callback's own op then waits
    behind it and both wait forever (jax-ml/jax#25861). It hung CI in test_doc_attention's second vjp: the main
    thread in an eager `arange`, the first backward's callback in an eager `array`. Synchronous dispatch runs each
    computation to its end before the caller goes on. A flag, not an environment variable: set before the CPU
    client starts."""
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)


_synchronous_cpu_dispatch()


@pytest.fixture
def mosaic_gpu_trace(monkeypatch):
    """Our Mosaic GPU kernels traced and lowered for an H100-sized GPU on any backend (not run): no interpreter,
    132 SMs."""
    from lcflash.kernels.gmm import mgpu_kernels, pallas_gmm

    monkeypatch.setattr(pallas_gmm, "_interpret", lambda: False)
    monkeypatch.setattr(mgpu_kernels, "_num_sms", lambda interpret: 132)
