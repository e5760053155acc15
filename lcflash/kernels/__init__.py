"""Hot-path kernels. Each has an `api.py` switch and a pure-JAX reference beside it."""

# `jax.ad_checkpoint.checkpoint_name` of a kernel's forward output, for remat policies that keep it
# (lcflash/model/common.py). Mosaic GPU kernels bind no primitive a policy could match by name: plgpu.kernel wraps
# its call in custom_vmap.
KERNEL_OUTPUT = "kernel_output"
