"""experiments/bench_train.py's flags: refused before any model is built or compiled."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import bench_train  # noqa: E402


@pytest.mark.parametrize("switch,msg", [
    ("NEXT_TILE_IN_EPILOGUE=1", "NEXT_TILE_IN_EPILOGUE is a bool"),
    ("NEXT_TILE_IN_EPILOGUE=True,False", "one value per switch"),
    ("NO_SUCH_SWITCH=1", "not a switch of pallas_gmm or mgpu_kernels"),
])
def test_a_bad_gmm_switch_is_refused_before_any_work(monkeypatch, capsys, switch, msg):
    from lcflash.kernels.gmm import mgpu_kernels

    monkeypatch.setattr(mgpu_kernels, "NEXT_TILE_IN_EPILOGUE", mgpu_kernels.NEXT_TILE_IN_EPILOGUE)
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--gmm_switch", switch])
    monkeypatch.setattr(bench_train, "bench", lambda *a, **k: pytest.fail("ran a step before refusing the flags"))
    with pytest.raises(SystemExit):
        bench_train.main()
    assert msg in capsys.readouterr().err
