"""experiments/gpu_clocks.py: the SM clock and board power that benchmarks record beside their timings."""

import pytest
from experiment_scripts import load


def test_summary_of_sampled_lines():
    """nvidia-smi's csv rows (no header, no units), with an unreadable row and a non-row left out."""
    gc = load("gpu_clocks")
    lines = ["1980, 201.52, Not Active", "1695, 690.49, Active", "[N/A], [N/A], [N/A]", "",
             "1395, 701.67, Active"]
    got = gc.summarize(lines)
    assert got["samples"] == 3
    assert got["sm_clock_mhz_mean"] == pytest.approx((1980 + 1695 + 1395) / 3, abs=0.05)
    assert (got["sm_clock_mhz_min"], got["sm_clock_mhz_max"]) == (1395, 1980)
    assert got["power_w_max"] == pytest.approx(701.67)
    assert got["power_capped_share"] == pytest.approx(2 / 3, abs=1e-3)
    assert gc.summarize(["[N/A], [N/A], [N/A]"]) is None


def test_sampler_without_nvidia_smi_reports_nothing(monkeypatch):
    gc = load("gpu_clocks")
    monkeypatch.setattr(gc.shutil, "which", lambda name: None)
    with gc.ClockSampler() as clocks:
        pass
    assert clocks.summary is None
