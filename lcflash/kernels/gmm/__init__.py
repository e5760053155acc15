from lcflash.kernels.gmm.api import gmm, IMPLEMENTATIONS  # noqa: F401
