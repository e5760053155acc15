"""HF LongCat-Flash checkpoints <-> lcflash models."""

from lcflash.convert.hf import from_pretrained, save_pretrained, CheckpointError  # noqa: F401
