from lcflash.kernels.gmm.api import gmm, gmm_swiglu, IMPLEMENTATIONS  # noqa: F401
