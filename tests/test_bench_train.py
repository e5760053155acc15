"""experiments/bench_train.py's flags: refused before any model is built or compiled."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import bench_train  # noqa: E402


@pytest.mark.parametrize("switch,msg", [
    ("CONTRACT_ZERO_EMPTY=1", "CONTRACT_ZERO_EMPTY is a bool"),
    ("CONTRACT_ZERO_EMPTY=True,False", "one value per switch"),
    ("NO_SUCH_SWITCH=1", "not a switch of pallas_gmm or mgpu_kernels"),
])
def test_a_bad_gmm_switch_is_refused_before_any_work(monkeypatch, capsys, switch, msg):
    from lcflash.kernels.gmm import mgpu_kernels

    monkeypatch.setattr(mgpu_kernels, "CONTRACT_ZERO_EMPTY", mgpu_kernels.CONTRACT_ZERO_EMPTY)
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--gmm_switch", switch])
    monkeypatch.setattr(bench_train, "bench", lambda *a, **k: pytest.fail("ran a step before refusing the flags"))
    with pytest.raises(SystemExit):
        bench_train.main()
    assert msg in capsys.readouterr().err
