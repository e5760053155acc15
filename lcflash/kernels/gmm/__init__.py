from lcflash.kernels.gmm.api import (  # noqa: F401
    IMPLEMENTATIONS, gmm, gmm_nt, gmm_nt_swiglu, gmm_swiglu, gmm_swiglu_ffn, gmm_swiglu_halves,
    reads_groups_only)
