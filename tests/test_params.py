"""Parameter accounting reproduces the published LongCat-Flash figures from abstract shapes."""

import json
import math
import subprocess
import sys

import pytest
from flax import nnx

from lcflash.config import load_config, model_config
from lcflash.model import LongcatFlash
from lcflash.params import activated_matmul_params, count_params, train_flops_per_token
from lcflash.perfmodel.hardware import peak_bf16_flops
from lcflash.train.trainer import throughput


def test_released_model_counts():
    c = count_params(model_config(load_config("configs/longcat_flash.py")))
    # reference §6, derived by hand from the module shapes; published: 560.66B, 18.69B..31.38B
    assert c["total"] == 560_664_980_480
    assert c["activated_min"] == 18_693_794_816
    assert c["activated_target"] == 27_149_511_680
    assert c["activated_max"] == 31_377_370_112
    assert c["mtp"] == 1_197_899_776


def test_cli_json():
    out = subprocess.run([sys.executable, "-m", "lcflash.params", "--config=configs/longcat_flash.py", "--json"],
                         capture_output=True, text=True, check=True)
    d = json.loads(out.stdout)
    assert abs(d["total"] / 560.66e9 - 1) < 1e-3
    assert abs(d["activated_min"] / 18.69e9 - 1) < 5e-3 and abs(d["activated_max"] / 31.38e9 - 1) < 5e-3


def test_small_config_is_in_range():
    c = count_params(model_config(load_config("configs/small.py")))
    assert 1e9 <= c["total"] <= 3e9


@pytest.mark.parametrize("config", ["configs/tiny.py", "configs/longcat_flash.py"])
def test_matmul_count_is_the_parameter_count_less_its_vectors(config):
    """The MFU formula's weights (written out by hand) against count_params (from the module shapes): they differ
    by the norms' and the router bias's vectors, and by the LM head, which the MTP block runs again but owns no
    copy of."""
    mc = model_config(load_config(config))
    c = count_params(mc)
    model = nnx.eval_shape(lambda: LongcatFlash(mc.replace(num_mtp_layers=1), nnx.Rngs(0)))
    shapes = {p: v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(model))}

    def vectors(part):
        return sum(math.prod(s) for p, s in shapes.items() if part(p) and len(s) - (p[0] == "layers") <= 1)
    k = mc.target_ffn_experts
    main = activated_matmul_params(mc, k, with_mtp=False)
    assert main["mtp"] == 0 and main["total"] == c["activated_target"] - vectors(lambda p: p[0] not in ("mtp", "embed"))
    mtp = activated_matmul_params(mc, k, with_mtp=True)["mtp"]
    head = mc.hidden_size * mc.vocab_size
    assert mtp == c["mtp_without_embedding"] - vectors(lambda p: p[0] == "mtp" and p[1] != "embed") + head


def test_flops_per_token_and_mfu():
    mc = model_config(load_config("configs/small.py"))
    fpt, p = train_flops_per_token(mc, 1024, 8.0, with_mtp=True)
    attn = 6 * 25 * 8 * (192 + 128) * 512          # 24 attention sublayers + MTP's, causal: 512 keys per query
    assert fpt == 6 * p["total"] + attn
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == peak_bf16_flops("NVIDIA H200") == 989.4e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") is None and peak_bf16_flops("cpu") is None
    cfg = load_config("configs/small.py")
    on_h100 = throughput(cfg, mc, n_devices=2, device_kind="NVIDIA H100 80GB HBM3")(2e5, 8.0)
    assert on_h100["tflops_per_s_per_device"] == pytest.approx(fpt * 1e5 / 1e12)
    assert on_h100["mfu"] == pytest.approx(fpt * 1e5 / 989.4e12)
    assert "mfu" not in throughput(cfg, mc, n_devices=1, device_kind="cpu")(2e5, 8.0)
