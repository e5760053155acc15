import os

# Parity tests compare float32 models at 1e-5: make CPU matmuls exact fp32 (XLA:CPU may otherwise use faster
# reduced-precision paths on some builds). Set before JAX initialises.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
