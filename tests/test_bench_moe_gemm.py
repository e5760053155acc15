"""experiments/bench_moe_gemm.py's main table on the CPU at a toy shape: alternating rounds, medians, and each
round's ratio to the einsum of the same round."""

import numpy as np

from experiment_scripts import load

bench = load("bench_moe_gemm")


def test_rounds_alternate_and_report_medians(monkeypatch):
    monkeypatch.setitem(bench.SHAPES, ("toy", "gate_up"), (64, 32, 4))
    order = []
    timings = iter(np.arange(1.0, 100.0))
    # Each call's "time" is the next number: the rounds' order is visible in the figures.
    monkeypatch.setattr(bench, "time_ms", lambda f, args, **_: (order.append(len(args)) or (next(timings),) * 3))
    rows = []
    row = bench.run_case("toy", "gate_up", 8, "balanced", ["einsum", "ragged_dot"], 1000.0, rows, rounds=3)
    assert rows == [row] and order == [2, 3] * 6     # forward then forward + backward, impl by impl, round by round
    ein, rd = row["impls"]["einsum"], row["impls"]["ragged_dot"]
    assert ein["fwd_ms_rounds"] == [1.0, 5.0, 9.0] and rd["fwd_ms_rounds"] == [3.0, 7.0, 11.0]
    assert rd["bwd_ms_rounds"] == [1.0, 1.0, 1.0] and rd["fwd_ms"] == 7.0 and rd["fwdbwd_ms"] == 8.0
    assert rd["fwd_ms_range"] == [3.0, 11.0]
    np.testing.assert_allclose(rd["fwd_vs_einsum_rounds"], [1 / 3, 5 / 7, 9 / 11])
    assert "fwd_vs_einsum_rounds" not in ein
    assert row["bytes_floor_fwd_ms"] > 0
    table = bench.format_table(rows).splitlines()
    assert table[2].split()[:5] == ["toy/gate_up", "T=8", "balanced", "ragged_dot", "7.000"]   # the medians
    assert table[2].split()[6] == "0.71"                                                      # 5 / 7


def test_one_round_times_each_product_once(monkeypatch):
    monkeypatch.setitem(bench.SHAPES, ("toy", "down"), (32, 64, 4))
    rows = []
    row = bench.run_case("toy", "down", 8, "skewed", ["reference"], 1000.0, rows)
    rec = row["impls"]["reference"]
    assert len(rec["fwd_ms_rounds"]) == 1 and rec["fwd_ms"] > 0 and rec["bwd_ms"] == rec["bwd_ms_rounds"][0]
    assert "einsum" not in row["impls"]        # the skewed rows take the balanced case's einsum as their bound
