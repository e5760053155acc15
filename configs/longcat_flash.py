"""The released LongCat-Flash-Chat (560B total, 18.7B-31.4B activated): exact config.json values."""

from lcflash.defaults import base_config


def get_config():
    cfg = base_config(param_dtype="bfloat16", dtype="bfloat16")
    return cfg
