"""Hot-path kernels. Each has an `api.py` switch and a pure-JAX reference beside it."""
