import os
import signal

import pytest

# Parity tests compare float32 models at 1e-5: make CPU matmuls exact fp32 (XLA:CPU may otherwise use faster
# reduced-precision paths on some builds). Set before JAX initialises.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite is compile-bound (tiny shapes): LLVM -O0 for XLA:CPU's generated kernels compiles ~20% faster
# (tests/test_generate.py: 93 s -> 75 s). Subprocesses (tests/parallel_worker.py) inherit and extend it.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()


@pytest.fixture
def hang_guard():
    """An exception inside Pallas' GPU interpreter can leave its simulated threads waiting forever: SIGALRM ends
    such a test after 300 s instead of stalling CI."""
    signal.alarm(300)
    yield
    signal.alarm(0)


@pytest.fixture
def mosaic_gpu_trace(monkeypatch):
    """Our Mosaic GPU kernels traced and lowered for an H100-sized GPU on any backend (not run): no interpreter,
    132 SMs."""
    from lcflash.kernels.gmm import mgpu_kernels, pallas_gmm

    monkeypatch.setattr(pallas_gmm, "_interpret", lambda: False)
    monkeypatch.setattr(mgpu_kernels, "_num_sms", lambda interpret: 132)
