"""lcflash: LongCat-Flash in JAX/Flax NNX."""

from lcflash.config import ConfigError, ModelConfig, load_config, model_config  # noqa: F401
from lcflash.convert import CheckpointError, from_pretrained, save_pretrained  # noqa: F401
from lcflash.model import LongcatFlash  # noqa: F401

__version__ = "0.1.0"
