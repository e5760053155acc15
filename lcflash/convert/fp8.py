"""Block-scaled FP8 checkpoints (`meituan-longcat/LongCat-Flash-Chat-FP8`, reference §5.3), dequantized on load.

Each quantised linear stores an e4m3 `weight` and a `weight_scale_inv` with one fp32 scale per block of
`quantization_config.weight_block_size` = [rows, cols] (DeepSeek-V3's layout): w[i, j] = w_fp8[i, j] *
scale_inv[i // rows, j // cols]. The product is taken in fp32 and rounded once to the model's dtype, as DeepSeek's
`weight_dequant` and transformers' `Fp8Dequantize` do. The last block of a row or column may be partial (576 =
4.5 x 128 rows of `kv_a_proj_with_mqa`), so the scale grid is ceil(shape / block).
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

from lcflash.config import ConfigError

SCALE_SUFFIX = "_scale_inv"          # "...weight" -> "...weight_scale_inv"
FP8_DTYPES = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))
QUANT_METHODS = ("fp8",)


@dataclasses.dataclass(frozen=True)
class BlockFP8:
    block: tuple[int, int] | None    # [rows, cols] of one scale; None: one scale per tensor

    def grid(self, shape: tuple) -> tuple:
        """The scale shape a weight of `shape` ([..., out, in]) must have."""
        if self.block is None:
            return ()
        return tuple(shape[:-2]) + tuple(-(-n // b) for n, b in zip(shape[-2:], self.block))

    def dequantize(self, w, scale_inv) -> np.ndarray:
        """fp32 values of a quantised weight [..., out, in]."""
        w32 = np.asarray(w, np.float32)
        s = np.asarray(scale_inv, np.float32)
        if self.block is None:
            return w32 * s.reshape(())
        (r, c), (br, bc) = w32.shape[-2:], self.block
        s = np.repeat(np.repeat(s, br, axis=-2), bc, axis=-1)[..., :r, :c]
        return w32 * s


def from_config(raw: dict, source: str) -> BlockFP8 | None:
    """The checkpoint's quantisation from config.json's `quantization_config` (None when it has none)."""
    q = raw.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ConfigError(f"{source}: quantization_config must be an object, got {q!r}")
    method = q.get("quant_method")
    if method not in QUANT_METHODS:
        raise ConfigError(f"{source}: quantization_config.quant_method = {method!r} is not supported; valid: "
                          f"{QUANT_METHODS} (block-scaled FP8 weights with weight_scale_inv, as DeepSeek-V3's)")
    if q.get("fmt", "e4m3") not in ("e4m3", "e5m2"):
        raise ConfigError(f"{source}: quantization_config.fmt = {q['fmt']!r}; valid: 'e4m3', 'e5m2'")
    block = q.get("weight_block_size")
    if block is not None:
        if (not isinstance(block, (list, tuple)) or len(block) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            raise ConfigError(f"{source}: quantization_config.weight_block_size = {block!r} must be two positive "
                              "integers [rows, cols], or absent for one scale per tensor")
        block = tuple(block)
    return BlockFP8(block)
