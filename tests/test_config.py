"""Configs load, validate, and reject impossible values with the field's name."""

import pytest

from lcflash.config import ConfigError, ModelConfig, load_config, model_config, parse_override, validate


@pytest.mark.parametrize("name", ["tiny", "small", "longcat_flash"])
def test_configs_load(name):
    cfg = model_config(load_config(f"configs/{name}.py"))
    assert isinstance(cfg, ModelConfig)
    hash(cfg)  # static under jit


def test_released_config_values():
    c = model_config(load_config("configs/longcat_flash.py"))
    assert (c.hidden_size, c.num_layers, c.num_attention_heads, c.n_routed_experts, c.zero_expert_num,
            c.moe_topk, c.routed_scaling_factor, c.rope_theta, c.vocab_size) == (
        6144, 28, 64, 512, 256, 12, 6.0, 1.0e7, 131072)
    assert abs(c.alpha_kv - 12 ** 0.5) < 1e-12 and c.alpha_q == 2.0 and c.qk_head_dim == 192


@pytest.mark.parametrize("field,value,match", [
    ("moe_topk", 13, "moe_topk.*n_routed_experts \\+ zero_expert_num"),
    ("hidden_size", 0, "hidden_size.*positive"),
    ("qk_rope_head_dim", 7, "qk_rope_head_dim.*even"),
    ("rope_type", "ntk", "rope_type.*default"),
    ("target_ffn_experts", 13.0, "target_ffn_experts"),
    ("dtype", "float64", "dtype"),
    ("gmm_impl", "cutlass", "gmm_impl"),
    ("moe_overlap", "yes", "moe_overlap.*bool"),
    ("scan_unroll", 0, "scan_unroll.*num_layers=28"),
    ("num_mtp_layers", 2, "num_mtp_layers"),
    ("eos_token_id", 10 ** 6, "eos_token_id"),
    ("router_precision", "bf16", "router_precision.*highest.*bf16_split"),
])
def test_invalid_values_name_the_field(field, value, match):
    cfg = ModelConfig(n_routed_experts=8, zero_expert_num=4, moe_topk=12, target_ffn_experts=8.0)
    validate(cfg)
    with pytest.raises(ConfigError, match=match):
        cfg.replace(**{field: value})


def test_router_bf16_split_needs_bf16_activations():
    cfg = ModelConfig(n_routed_experts=8, zero_expert_num=4, moe_topk=12, target_ffn_experts=8.0,
                      router_precision="bf16_split")
    validate(cfg)
    with pytest.raises(ConfigError, match="router_precision.*bfloat16.*float32"):
        cfg.replace(dtype="float32")


def test_overrides_and_typos():
    cfg = load_config("configs/tiny.py", {"model.num_layers": 3})
    assert model_config(cfg).num_layers == 3
    with pytest.raises(ConfigError, match="nmu_layers"):
        load_config("configs/tiny.py", {"model.nmu_layers": 3})
    with pytest.raises(ConfigError, match="moe_topk"):
        load_config("configs/tiny.py", {"model.moe_topk": 100})


def test_plan_cli_help_and_bad_flag(monkeypatch, capsys):
    """`python -m lcflash.plan --help` prints the flags; an unknown flag is an error message, not a traceback."""
    import sys

    from lcflash.plan import main

    monkeypatch.setattr(sys, "argv", ["plan"])
    assert main(["--help"]) == 0
    assert "--memory_gb" in capsys.readouterr().out
    assert main(["--no_such_flag=1"]) == 2
    assert "no_such_flag" in capsys.readouterr().err


def test_a_misplaced_override_names_the_field_and_where_it_lives(monkeypatch, capsys):
    """ml_collections rejects `--config.train.remat` with just "'remat'"; the CLIs say which section lacks it, what
    it has, and where a field of that name is."""
    import sys

    from lcflash.config import explain_config_flags
    from lcflash.plan import main

    msg = explain_config_flags(["--config=configs/tiny.py", "--config.model.num_layers=2", "--config.train.remat=1"])
    assert msg.startswith("--config.train.remat: train has no field 'remat'") and "did you mean model.remat?" in msg
    assert "'batch_size'" in msg
    assert "the config has no field 'trian'" in explain_config_flags(["--config", "configs/tiny.py",
                                                                      "--config.trian.steps=3"])
    assert explain_config_flags(["--config=configs/tiny.py", "--config.model.num_layers=x"]) is None  # a type error
    monkeypatch.setattr(sys, "argv", ["plan"])
    assert main(["--config=configs/tiny.py", "--devices=1", "--config.train.remat=True"]) == 2
    assert "did you mean model.remat?" in capsys.readouterr().err


def test_parse_override_types_values_and_names_a_malformed_one():
    pairs = ["model.num_layers=4", "optim.lr=3e-4", "model.remat=True", "moe.gmm_impl=ragged_dot"]
    assert [parse_override(p) for p in pairs] == [("model.num_layers", 4), ("optim.lr", 3e-4),
                                                  ("model.remat", True), ("moe.gmm_impl", "ragged_dot")]
    cfg = load_config("configs/tiny.py", dict(parse_override(p) for p in pairs[:2]))
    assert (cfg.model.num_layers, cfg.optim.lr) == (4, 3e-4)
    for bad in ("model.num_layers", "=4", "model.num_layers="):
        with pytest.raises(ConfigError, match="want KEY=VALUE"):
            parse_override(bad)
