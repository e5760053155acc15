"""The full experiment config with every section at its default; config files override what they change."""

import ml_collections

from lcflash.config import MOE_SECTION_FIELDS, ModelConfig, MODEL_FIELDS
from lcflash.parallel.rules import rules_config


def model_defaults(**overrides) -> ml_collections.ConfigDict:
    """The released LongCat-Flash architecture as a ConfigDict, with `overrides` applied. Fields set in the `moe`
    section (MOE_SECTION_FIELDS) are left out: a copy here would be silently overridden by cfg.moe."""
    base = ModelConfig()
    in_moe = {field: key for key, field in MOE_SECTION_FIELDS.items()}
    d = {f: getattr(base, f) for f in MODEL_FIELDS if f not in in_moe}
    misplaced = sorted(set(overrides) & set(in_moe))
    if misplaced:
        raise KeyError(f"model field(s) {misplaced} are set in the moe section: "
                       f"{[f'moe.{in_moe[f]}' for f in misplaced]}")
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
    # overlap=False: the no-overlap baseline, the dense path waits for the whole MoE branch (lcflash/model/layer.py).
    # fuse_gate_up: gate and up as one grouped matmul (lcflash/model/moe.py).
    cfg.moe = ml_collections.ConfigDict(dict(gmm_impl="auto", transport="all_to_all", capacity_factor=2.0,
                                             overlap=True, fuse_gate_up=False))
    # Device mesh: -1 takes the remaining devices (see lcflash/parallel/).
    cfg.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
    # Logical axis -> mesh axes, one entry per name (lcflash/parallel/rules.py); e.g. --config.mesh.rules.embed="()"
    cfg.mesh.rules = rules_config()
    cfg.seed = 0
    add_training_sections(cfg)
    return cfg


def add_training_sections(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Sections read by `python -m lcflash.train` and `lcflash.eval`; every field is overridable from the CLI."""
    # Corpus: '' = the interpreter's stdlib sources; else a text file, a directory or a glob (lcflash/data/).
    # document_mask: attention keeps the documents packed in a window apart, positions restarting at each; False
    # is the plain packed-stream recipe, causal across them with the window's positions (cuDNN then needs no
    # mask: 2x faster attention, +8% training tokens/s on an H200, experiments/HISTORY.md).
    cfg.data = ml_collections.ConfigDict(dict(
        path="", tokenizer="", seq_len=128, val_fraction=0.05, shuffle=True, document_mask=True))
    cfg.train = ml_collections.ConfigDict(dict(
        steps=1000, batch_size=8, log_every=10,
        grad_accum_steps=1,             # batch_size runs as this many microbatches, one optimizer update (train/step.py)
        stop_at=0,                      # >0: save and stop after this step, as a preemption would (schedule unchanged)
        eval_every=0, eval_batches=8,   # held-out loss every eval_every steps (0: only at the end)
        progress=True,                  # tqdm bar with loss and tokens/s
        deterministic=False,            # GPU: XLA's deterministic ops; CPU is deterministic already
        grad_ratio_every=-1,            # router grad-norm ratio LB/LM every N steps (-1: log_every, 0: never)
    ))
    # AdamW with the report's tiny epsilon; fp32 master weights come from model.param_dtype.
    cfg.optim = ml_collections.ConfigDict(dict(
        lr=3e-3, b1=0.9, b2=0.95, eps=1e-16, weight_decay=0.1, clip_norm=1.0,
        schedule="wsd",                 # "wsd" (warmup-stable-decay), "cosine" or "constant"
        warmup_steps=100, decay_fraction=0.2, min_lr_ratio=0.0,
        # Adam's first moment: "bfloat16" halves its bytes (AdamW over the expert stacks runs at memory bandwidth);
        # the second moment stays fp32. A run resumed with the other setting casts the restored moment.
        mu_dtype="float32"))
    cfg.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3, async_save=True))
    cfg.loss = ml_collections.ConfigDict(dict(
        mtp_weight=0.3,                 # weight of the MTP (t+2) cross-entropy; 0 skips the MTP head
        lb_coef=0.01,                   # device-level load-balance loss (lcflash/train/losses.py)
        lb_groups=1,                    # FFN-expert groups (EP devices); zero experts are one more group
        z_coef=1e-5,                    # hidden z-loss on every layer's output
    ))
    # Expert-bias controller (lcflash/train/bias_controller.py): steers FFN experts/token to model.target_ffn_experts.
    cfg.controller = ml_collections.ConfigDict(dict(
        enabled=True, rate=0.2, kp=1.0, ki=0.3, kd=0.0,   # tuned on configs/tiny.py (experiments/controller_tiny.json)
        decay="none",                   # "none", "exponential" (half-life decay_steps) or "inverse" (1/(1+s/decay_steps))
        decay_steps=1000, min_rate=0.0, integral_clip=1.0))
    cfg.init = ml_collections.ConfigDict(dict(
        grow_from="",                   # checkpoint dir (or workdir) of a half-depth model: stack its layers [1..n,1..n]
        proxy_width=0,                  # >0: optim.lr and model.initializer_range were tuned at this width (hparam_transfer)
    ))
    return cfg
