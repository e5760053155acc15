"""Parameter accounting reproduces the published LongCat-Flash figures from abstract shapes."""

import json
import subprocess
import sys

from lcflash.config import load_config, model_config
from lcflash.params import count_params


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
