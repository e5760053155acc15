"""Checkpoint layouts users really have, round trips, and clear errors on bad input."""

import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch

import lcflash
from lcflash.convert import hf as hfconv
from lcflash.convert.safetensors_io import SafetensorsFile, write_safetensors
from hf_reference import hf_forward, random_hf_model
from numerics import rel


@pytest.fixture(scope="module")
def hf_model():
    return random_hf_model(7, num_layers=2)


@pytest.fixture(scope="module")
def tokens(hf_model):
    return np.random.default_rng(11).integers(0, hf_model.config.vocab_size, size=(2, 17))


@pytest.fixture(scope="module")
def reference(hf_model, tokens):
    return hf_forward(hf_model, tokens)[0]


@pytest.fixture()
def saved(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def _logits(path, tokens, **kw):
    return np.asarray(lcflash.from_pretrained(str(path), dtype="float32", **kw)(tokens))


def _rewrite(path, fn):
    with open(path / "config.json") as f:
        d = json.load(f)
    fn(d)
    with open(path / "config.json", "w") as f:
        json.dump(d, f)


def test_sharded_checkpoint_with_index(hf_model, tokens, reference, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert rel(_logits(tmp_path, tokens), reference) <= 1e-5


def test_release_style_config_and_missing_fields_take_release_defaults(saved, tokens, reference):
    def release_style(d):
        theta = d.pop("rope_parameters")["rope_theta"]
        d["rope_theta"] = theta
        for k in ("routed_scaling_factor", "rms_norm_eps", "mla_scale_q_lora", "head_dim", "qk_head_dim",
                  "initializer_range", "bos_token_id", "eos_token_id"):
            d.pop(k, None)  # all equal the released values
    _rewrite(saved, release_style)
    assert rel(_logits(saved, tokens), reference) <= 1e-5


def test_release_style_yarn_rope_scaling(tmp_path):
    rs = dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=1.0)
    hf = random_hf_model(3, rope_scaling=rs)
    tokens = np.random.default_rng(0).integers(0, hf.config.vocab_size, size=(1, 30))
    ref = hf_forward(hf, tokens)[0]
    hf.save_pretrained(tmp_path)

    def release_style(d):
        p = d.pop("rope_parameters")
        d["rope_theta"] = p.pop("rope_theta")
        p["type"] = p.pop("rope_type")
        d["rope_scaling"] = p
    _rewrite(tmp_path, release_style)
    assert rel(_logits(tmp_path, tokens), ref) <= 1e-5


def test_release_layout_round_trip_is_bit_identical(hf_model, saved, tokens, reference, tmp_path):
    model = lcflash.from_pretrained(str(saved), dtype="float32")
    out = tmp_path / "ours"
    lcflash.save_pretrained(model, str(out))
    ours, theirs = SafetensorsFile(str(out / "model.safetensors")), SafetensorsFile(str(saved / "model.safetensors"))
    N = hf_model.config.n_routed_experts
    zero_rows = {k for k in theirs.keys() if ".experts." in k and int(k.split(".experts.")[1].split(".")[0]) >= N}
    assert zero_rows, "transformers should have written zero-expert rows"
    assert set(ours.keys()) == set(theirs.keys()) - zero_rows  # released layout: no zero-expert weights
    for k in ours.keys():
        np.testing.assert_array_equal(ours.get(k), theirs.get(k), err_msg=k)
    assert rel(_logits(out, tokens), reference) <= 1e-5


def test_bf16_round_trip_is_bit_identical(hf_model, tmp_path):
    copy.deepcopy(hf_model).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = lcflash.from_pretrained(str(tmp_path / "bf16"))
    assert model.cfg.param_dtype == "bfloat16" and model.embed[...].dtype == np.dtype("bfloat16")
    lcflash.save_pretrained(model, str(tmp_path / "again"))
    a = SafetensorsFile(str(tmp_path / "bf16" / "model.safetensors"))
    b = SafetensorsFile(str(tmp_path / "again" / "model.safetensors"))
    for k in b.keys():
        np.testing.assert_array_equal(a.get(k).view(np.uint16) if a.get(k).dtype.itemsize == 2 else a.get(k),
                                      b.get(k).view(np.uint16) if b.get(k).dtype.itemsize == 2 else b.get(k),
                                      err_msg=k)


def test_transformers_compat_export_loads_in_transformers(saved, tokens, reference, tmp_path):
    from transformers import LongcatFlashForCausalLM

    model = lcflash.from_pretrained(str(saved), dtype="float32")
    lcflash.save_pretrained(model, str(tmp_path / "compat"), transformers_compat=True, max_shard_bytes=30_000)
    assert os.path.isfile(tmp_path / "compat" / "model.safetensors.index.json")
    back = LongcatFlashForCausalLM.from_pretrained(str(tmp_path / "compat")).eval()
    assert rel(hf_forward(back, tokens)[0], reference) <= 1e-5


def test_fused_expert_layout(hf_model, tokens, reference, tmp_path):
    """transformers' in-memory fused tensors (experts.gate_up_proj [N+Z, 2I, D], experts.down_proj [N, D, I])."""
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in sd)
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    hf_model.config.save_pretrained(tmp_path)
    assert rel(_logits(tmp_path, tokens), reference) <= 1e-5


def _mtp_reference(hf_model, mtp_sd, hidden, next_tokens):
    """The MTP head written with transformers' own MLA/MLP/RMSNorm modules (reference §4)."""
    from transformers.models.longcat_flash import modeling_longcat_flash as M

    cfg = hf_model.config
    cfg._attn_implementation = "eager"
    mla, mlp = M.LongcatFlashMLA(cfg, 0), M.LongcatFlashMLP(cfg)
    norms = {n: M.LongcatFlashRMSNorm(cfg.hidden_size, cfg.rms_norm_eps) for n in ("e", "h", "in", "post", "f")}
    P = "model.mtp.layers.0."
    with torch.no_grad():
        for n in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
            getattr(mla, n).weight.copy_(mtp_sd[P + f"self_attn.{n}.weight"])
        mla.q_a_layernorm.weight.copy_(mtp_sd[P + "self_attn.q_a_layernorm.weight"])
        mla.kv_a_layernorm.weight.copy_(mtp_sd[P + "self_attn.kv_a_layernorm.weight"])
        for n in ("gate_proj", "up_proj", "down_proj"):
            getattr(mlp, n).weight.copy_(mtp_sd[P + f"transformer_layer.mlp.{n}.weight"])
        for n, key in (("e", P + "enorm.m.weight"), ("h", P + "hnorm.m.weight"), ("in", P + "input_layernorm.weight"),
                       ("post", P + "post_attention_layernorm.weight"), ("f", "model.mtp.norm.weight")):
            norms[n].weight.copy_(mtp_sd[key])
        e = torch.nn.functional.embedding(next_tokens, mtp_sd["model.mtp.embed_tokens.weight"])
        z = torch.cat([norms["e"](e), norms["h"](hidden)], -1) @ mtp_sd[P + "eh_proj.weight"].T
        T = z.shape[1]
        pos = torch.arange(T)[None]
        cos_sin = hf_model.model.rotary_emb(z, pos)
        mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
        z = z + mla(norms["in"](z), cos_sin, mask)[0]
        z = z + mlp(norms["post"](z))
        return hf_model.lm_head(norms["f"](z)).numpy()


def test_mtp_weights_load_into_the_mtp_head(hf_model, saved, tokens, tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = hf_model.config
    D, V, g = cfg.hidden_size, cfg.vocab_size, torch.Generator().manual_seed(5)
    P = "model.mtp.layers.0."
    shapes = {"model.mtp.embed_tokens.weight": (V, D), "model.mtp.norm.weight": (D,), P + "enorm.m.weight": (D,),
              P + "hnorm.m.weight": (D,), P + "eh_proj.weight": (D, 2 * D), P + "input_layernorm.weight": (D,),
              P + "post_attention_layernorm.weight": (D,)}
    for k, v in hf_model.model.layers[0].self_attn[0].state_dict().items():
        shapes[P + "self_attn." + k] = tuple(v.shape)
    for k, v in hf_model.model.layers[0].mlps[0].state_dict().items():
        shapes[P + "transformer_layer.mlp." + k] = tuple(v.shape)
    mtp_sd = {k: (1.0 + 0.2 * torch.randn(s, generator=g)) if len(s) == 1 else 0.3 * torch.randn(s, generator=g)
              for k, s in shapes.items()}
    sd = load_file(str(saved / "model.safetensors"))
    sd.update(mtp_sd)
    save_file(sd, str(saved / "model.safetensors"), metadata={"format": "pt"})

    model = lcflash.from_pretrained(str(saved), dtype="float32")
    assert model.mtp is not None
    out = model.forward(tokens)
    nxt = np.roll(tokens, -1, axis=1)
    got = np.asarray(model.mtp_logits(out.hidden, nxt))
    ref = _mtp_reference(hf_model, mtp_sd, torch.tensor(np.asarray(out.hidden)), torch.tensor(nxt))
    assert rel(got, ref) <= 1e-5
    # and the MTP keys survive a save/load round trip
    lcflash.save_pretrained(model, str(tmp_path / "with_mtp"))
    again = SafetensorsFile(str(tmp_path / "with_mtp" / "model.safetensors"))
    for k, v in mtp_sd.items():
        np.testing.assert_array_equal(again.get(k), v.numpy(), err_msg=k)


# ------------------------------------------------------------------------------------------- bad input
def test_wrong_model_type(saved):
    _rewrite(saved, lambda d: d.update(model_type="deepseek_v3"))
    with pytest.raises(lcflash.ConfigError, match="model_type"):
        lcflash.from_pretrained(str(saved))


def test_missing_config_and_directory(saved, tmp_path):
    with pytest.raises(lcflash.CheckpointError, match="not a directory"):
        lcflash.from_pretrained(str(tmp_path / "nope"))
    os.remove(saved / "config.json")
    with pytest.raises(lcflash.ConfigError, match="config.json"):
        lcflash.from_pretrained(str(saved))


def test_impossible_config_value_names_the_field(saved):
    _rewrite(saved, lambda d: d.update(moe_topk=99))
    with pytest.raises(lcflash.ConfigError, match="moe_topk"):
        lcflash.from_pretrained(str(saved))


def _edit_tensors(path, fn):
    f = SafetensorsFile(str(path / "model.safetensors"))
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    del f
    fn(tensors)
    write_safetensors(str(path / "model.safetensors"),
                      [(k, v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()], {"format": "pt"})


def test_missing_key(saved):
    _edit_tensors(saved, lambda t: t.pop("model.layers.1.self_attn.0.kv_b_proj.weight"))
    with pytest.raises(lcflash.CheckpointError, match=r"missing key.*layers\.1\.self_attn\.0\.kv_b_proj"):
        lcflash.from_pretrained(str(saved))


def test_unexpected_key(saved):
    _edit_tensors(saved, lambda t: t.update({"model.layers.0.mlp.shared_expert.weight": np.zeros(3, np.float32)}))
    with pytest.raises(lcflash.CheckpointError, match="unexpected key.*shared_expert"):
        lcflash.from_pretrained(str(saved))


def test_wrong_shape(saved):
    def shrink(t):
        t["model.layers.0.mlps.1.up_proj.weight"] = t["model.layers.0.mlps.1.up_proj.weight"][:-1]
    _edit_tensors(saved, shrink)
    with pytest.raises(lcflash.CheckpointError, match=r"mlps\.1\.up_proj.*shape"):
        lcflash.from_pretrained(str(saved))


def test_corrupt_and_truncated_files(saved):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(lcflash.CheckpointError, match="model.safetensors.*truncated"):
        lcflash.from_pretrained(str(saved))
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + data[24:])
    with pytest.raises(lcflash.CheckpointError, match="model.safetensors.*corrupt"):
        lcflash.from_pretrained(str(saved))


def test_index_naming_a_missing_shard(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    os.remove(sorted(tmp_path.glob("*.safetensors"))[-1])
    with pytest.raises(lcflash.CheckpointError, match="does not exist"):
        lcflash.from_pretrained(str(tmp_path))


def test_failed_save_keeps_the_previous_checkpoint(saved, tokens, reference, monkeypatch):
    model = lcflash.from_pretrained(str(saved), dtype="float32")
    before = sorted(os.listdir(saved))

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(hfconv, "write_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        lcflash.save_pretrained(model, str(saved))
    assert sorted(os.listdir(saved)) == before
    assert not [p for p in os.listdir(saved.parent) if ".tmp-" in p]
    assert rel(_logits(saved, tokens), reference) <= 1e-5
    shutil.rmtree(saved)


# ------------------------------------------------------------------------------------------- FP8 checkpoints
def _quantize_fp8(w, block):
    """DeepSeek-V3-style e4m3 weight and fp32 weight_scale_inv, one scale per block (partial blocks at the edges)."""
    import ml_dtypes

    (r, c), (br, bc) = w.shape, block
    R, C = -(-r // br), -(-c // bc)
    padded = np.zeros((R * br, C * bc), np.float32)
    padded[:r, :c] = w
    blocks = padded.reshape(R, br, C, bc)
    scale = np.maximum(np.abs(blocks).max(axis=(1, 3)), 1e-12).astype(np.float32) / np.float32(448.0)
    q = np.clip(blocks / scale[:, None, :, None], -448, 448).reshape(R * br, C * bc)[:r, :c]
    return q.astype(ml_dtypes.float8_e4m3fn), scale


def _write_fp8(src, dst, block):
    """src's checkpoint with every 2-D `*_proj.weight` (attention, dense MLPs, experts) in block-scaled FP8."""
    f = SafetensorsFile(str(src / "model.safetensors"))
    out = []
    for k in f.keys():
        w = np.array(f.get(k))
        if k.endswith("_proj.weight") and w.ndim == 2:
            q, s = _quantize_fp8(w.astype(np.float32), block)
            out += [(k, q), (k + "_scale_inv", s)]
        else:
            out.append((k, w))
    os.makedirs(dst)
    write_safetensors(str(dst / "model.safetensors"), [(k, v.shape, v.dtype, lambda v=v: v) for k, v in out],
                      {"format": "pt"})
    shutil.copy(src / "config.json", dst / "config.json")
    _rewrite(dst, lambda d: d.update(quantization_config={"quant_method": "fp8", "activation_scheme": "dynamic",
                                                          "fmt": "e4m3", "weight_block_size": list(block)}))
    return dst


def test_fp8_checkpoint_matches_transformers_dequantized(saved, tokens, tmp_path):
    """The released FP8 layout (reference §5.3) against transformers' own FP8 loader with dequantize=True, which
    takes whole blocks only (every dimension of this model divides by 8)."""
    from transformers import FineGrainedFP8Config, LongcatFlashForCausalLM

    fp8_dir = _write_fp8(saved, tmp_path / "fp8", (8, 8))
    hf = LongcatFlashForCausalLM.from_pretrained(
        str(fp8_dir), dtype=torch.float32, quantization_config=FineGrainedFP8Config(dequantize=True)).eval()
    ref = hf_forward(hf, tokens)[0]
    assert rel(_logits(fp8_dir, tokens), ref) <= 1e-5
    assert rel(np.asarray(lcflash.from_pretrained(str(fp8_dir))(tokens)), ref) <= 0.05   # bf16, config's dtype


def test_fp8_partial_blocks_dequantize_exactly(saved, tmp_path):
    """128 x 128 blocks do not divide LongCat-Flash's 576 kv_a rows: edge blocks are partial. Here 16 x 16 blocks on
    dimensions 24, 48 and 80: each weight equals its e4m3 values times its block's scale, in fp32."""
    from flax import nnx

    fp8_dir = _write_fp8(saved, tmp_path / "fp8", (16, 16))
    f = SafetensorsFile(str(fp8_dir / "model.safetensors"))
    exact = {}
    for k in f.keys():
        if k.endswith("_scale_inv"):
            continue
        w = np.array(f.get(k)).astype(np.float32)
        if k + "_scale_inv" in f.keys():
            s = np.array(f.get(k + "_scale_inv"))
            for i in range(w.shape[0]):
                for j in range(w.shape[1]):
                    w[i, j] *= s[i // 16, j // 16]
        exact[k] = w
    os.makedirs(tmp_path / "exact")
    write_safetensors(str(tmp_path / "exact" / "model.safetensors"),
                      [(k, v.shape, v.dtype, lambda v=v: v) for k, v in exact.items()], {"format": "pt"})
    shutil.copy(saved / "config.json", tmp_path / "exact" / "config.json")
    assert any(s % 16 for s in f.shape("model.layers.0.mlp.experts.0.gate_proj.weight"))
    got = nnx.to_flat_state(nnx.state(lcflash.from_pretrained(str(fp8_dir), dtype="float32")))
    want = dict(nnx.to_flat_state(nnx.state(lcflash.from_pretrained(str(tmp_path / "exact"), dtype="float32"))))
    for path, v in got:
        np.testing.assert_array_equal(np.asarray(v.get_value()), np.asarray(want[path].get_value()), err_msg=path)


def test_fp8_bad_input(saved, tmp_path):
    fp8_dir = _write_fp8(saved, tmp_path / "fp8", (16, 16))
    _rewrite(fp8_dir, lambda d: d["quantization_config"].update(quant_method="awq"))
    with pytest.raises(lcflash.ConfigError, match="quantization_config.quant_method.*'awq'.*valid"):
        lcflash.from_pretrained(str(fp8_dir))
    _rewrite(fp8_dir, lambda d: d["quantization_config"].update(quant_method="fp8", weight_block_size=[16]))
    with pytest.raises(lcflash.ConfigError, match="weight_block_size"):
        lcflash.from_pretrained(str(fp8_dir))
    _rewrite(fp8_dir, lambda d: d["quantization_config"].update(weight_block_size=[8, 8]))
    with pytest.raises(lcflash.CheckpointError, match=r"q_a_proj\.weight_scale_inv: shape \(2, 3\), expected \(3, 6\)"):
        lcflash.from_pretrained(str(fp8_dir))
    _rewrite(fp8_dir, lambda d: d.pop("quantization_config"))
    with pytest.raises(lcflash.CheckpointError, match="weight_scale_inv, but config.json has no quantization_config"):
        lcflash.from_pretrained(str(fp8_dir))
    _rewrite(fp8_dir, lambda d: d.update(quantization_config={"quant_method": "fp8", "weight_block_size": [16, 16]}))
    _edit_tensors(fp8_dir, lambda t: t.pop("model.layers.1.mlps.0.down_proj.weight_scale_inv"))
    with pytest.raises(lcflash.CheckpointError, match=r"mlps\.0\.down_proj\.weight is float8_e4m3fn without"):
        lcflash.from_pretrained(str(fp8_dir))
