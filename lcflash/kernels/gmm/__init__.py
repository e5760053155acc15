from lcflash.kernels.gmm.api import gmm, gmm_swiglu, gmm_swiglu_ffn, gmm_swiglu_halves, IMPLEMENTATIONS  # noqa: F401
