"""The full experiment config with every section at its default; config files override what they change."""

import ml_collections

from lcflash.config import ModelConfig, MODEL_FIELDS


def model_defaults(**overrides) -> ml_collections.ConfigDict:
    """The released LongCat-Flash architecture as a ConfigDict, with `overrides` applied."""
    base = ModelConfig()
    d = {f: getattr(base, f) for f in MODEL_FIELDS}
    unknown = sorted(set(overrides) - set(d))
    if unknown:
        raise KeyError(f"unknown model field(s) {unknown}")
    d.update(overrides)
    # Optional ints/floats must be typed placeholders so command-line overrides parse.
    cd = ml_collections.ConfigDict()
    for k, v in d.items():
        if v is None:
            ftype = int if "max_position" in k else float
            cd[k] = ml_collections.config_dict.placeholder(ftype)
        else:
            cd[k] = v
    return cd


def base_config(**model_overrides) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.model = model_defaults(**model_overrides)
    # Implementation switches for the MoE: see lcflash/kernels/gmm/api.py and lcflash/parallel/.
    cfg.moe = ml_collections.ConfigDict(dict(gmm_impl="ragged_dot", transport="all_to_all", capacity_factor=2.0))
    # Device mesh: -1 takes the remaining devices (see lcflash/parallel/).
    cfg.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
    cfg.seed = 0
    return cfg
