"""experiments/bench_moe_gemm.py's main table on the CPU at a toy shape: alternating rounds, medians, and each
round's ratio to the einsum of the same round."""

import numpy as np
import pytest

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


def test_device_time_rounds_beside_the_wall_time(monkeypatch):
    monkeypatch.setitem(bench.SHAPES, ("toy", "down"), (32, 64, 4))
    monkeypatch.setattr(bench, "time_ms", lambda f, args, **_: (float(len(args)),) * 3)   # fwd 2, fwd + bwd 3
    device = iter([0.25, 0.75, 0.5, 1.25])          # round 1: fwd, fwd + bwd; round 2: the same
    monkeypatch.setattr(bench, "device_ms", lambda f, args, kernels_us: kernels_us.update(k=1.0) or next(device))
    row = bench.run_case("toy", "down", 8, "balanced", ["einsum"], 1000.0, [], rounds=2, device_time=True)
    rec = row["impls"]["einsum"]
    assert rec["fwd_device_ms_rounds"] == [0.25, 0.5] and rec["bwd_device_ms_rounds"] == [0.5, 0.75]
    assert rec["fwd_device_ms"] == 0.375 and rec["bwd_device_ms"] == 0.625
    assert rec["fwd_ms"] == 2.0 and rec["bwd_ms"] == 1.0           # the wall time as before
    assert rec["fwd_device_kernels_us"] == rec["fwdbwd_device_kernels_us"] == {"k": 1.0}
    assert rec["bwd_device_tflops"] == pytest.approx(2 * rec["fwd_device_tflops"] * 0.375 / 0.625)
    table = bench.format_table([row]).splitlines()
    assert table[2].split()[:4] == ["by", "device", "0.375", f"{rec['fwd_device_tflops']:.0f}"]
    assert table[2].split()[6:8] == ["|", "0.625"]


def test_busy_time_counts_overlapping_kernels_once():
    ev = bench.trace_overlap.Event
    kernels = [ev("b", 5.0, 10.0, "s1"), ev("a", 0.0, 10.0, "s0"), ev("c", 30.0, 2.0, "s0"), ev("d", 31.0, 0.5, "s1")]
    assert bench.busy_us(kernels) == 15.0 + 2.0
    assert bench.busy_us([]) == 0.0


def test_device_ms_refuses_a_trace_without_device_kernels():
    import jax
    import jax.numpy as jnp

    if jax.default_backend() != "cpu":
        pytest.skip("the CPU's trace has no device kernels; a GPU's has")
    with pytest.raises(RuntimeError, match="no device kernels"):
        bench.device_ms(jax.jit(lambda a: a + 1), (jnp.ones(8),), calls=2)


def test_tile_sweep_runs_at_the_chosen_shapes(monkeypatch):
    """--small-sweep at --sweep-config longcat: the einsum bound and every pinned variant at LongCat's products."""
    cases = []
    monkeypatch.setattr(bench, "run_case", lambda cfg, proj, t, load, impls, *a, **k: (
        cases.append((cfg, proj, t, load, tuple(impls))) or {"impls": {impls[0]: {"fwd_ms": 1.0}}}))
    monkeypatch.setattr(bench.pallas_gmm, "ROWS_TILES", None)
    out = bench.small_sweep(1000.0, 4096, lambda: True, "longcat")
    assert {c[:4] for c in cases} == {("longcat", p, 4096, "balanced") for p in ("gate_up", "down")}
    per_proj = len(cases) // 2
    assert per_proj > 2 and [c[4] for c in cases[:per_proj]] == [("einsum",)] + [("pallas_chain",)] * (per_proj - 1)
    assert len(out) == len(cases) and out[0]["proj"] == "gate_up"
    bench.small_sweep(1000.0, 512, lambda: True)
    assert {c[:2] for c in cases[2 * per_proj:]} == {("small", "gate_up_fused"), ("small", "down")}


def test_deal_ab_times_each_deal_and_band(monkeypatch):
    """--deal-ab with --deals and --deal-bands: one variant per (deal, band), each traced under its settings, timed
    once per round beside the einsum bound (whose product it must match), and the switches restored afterwards."""
    for proj, shape in (("gate_up", (64, 32, 4)), ("down", (32, 64, 4))):
        monkeypatch.setitem(bench.SHAPES, ("longcat", proj), shape)
    traced = []

    def contract(a, b, s, **kw):   # d_rhs per group; equal groups here
        traced.append((bench.mgpu_kernels.CONTRACT_DEAL, bench.pallas_gmm.CONTRACT_BAND))
        g = s.shape[0]
        return bench.jnp.einsum("gtk,gtn->gkn", a.reshape(g, -1, a.shape[1]), b.reshape(g, -1, b.shape[1]),
                                preferred_element_type=kw["out_dtype"])

    monkeypatch.setattr(bench.pallas_gmm, "contract_matmul", contract)
    timings = iter(np.arange(1.0, 100.0))   # each call's "time" is the next number: the rounds' order shows
    monkeypatch.setattr(bench, "time_ms", lambda f, args, **_: (next(timings),) * 3)
    before = bench.mgpu_kernels.CONTRACT_DEAL, bench.pallas_gmm.CONTRACT_BAND
    out = bench.deal_ab(8, "longcat", (None,), rounds=3, deals=["round_robin", "snake"], bands=(0, 8))
    assert [r["proj"] for r in out] == ["gate_up", "down"]
    assert traced == [("round_robin", 0), ("snake", 0), ("round_robin", 8), ("snake", 8)] * 2
    assert list(out[0]["ms"]) == ["round_robin", "snake", "round_robin+band8", "snake+band8", "einsum"]
    # rotated rounds: round r starts at variant r; the einsum bound (equal groups) is timed among them
    assert out[0]["ms"] == {"round_robin": [1.0, 10.0, 14.0], "snake": [2.0, 6.0, 15.0],
                            "round_robin+band8": [3.0, 7.0, 11.0], "snake+band8": [4.0, 8.0, 12.0],
                            "einsum": [5.0, 9.0, 13.0]}
    assert out[0]["per_einsum"]["round_robin"] == 9.0 / 10.0 and out[0]["rel_err_vs_einsum"] < 1e-6
    assert out[0]["bitwise_equal"]
    assert (bench.mgpu_kernels.CONTRACT_DEAL, bench.pallas_gmm.CONTRACT_BAND) == before


def test_deal_ab_nomask_and_zeros_time_each_deal_with_the_switch(monkeypatch):
    """--deal-nomask: each deal once more with mgpu_kernels.CONTRACT_MASK off at trace time; those variants' wrong
    gradients stay out of the bitwise check. --deal-zeros: each deal once more with CONTRACT_ZERO_EMPTY on, the
    others with it off, all in the bitwise check. The switches are restored afterwards."""
    monkeypatch.setitem(bench.SHAPES, ("longcat", "gate_up"), (64, 32, 4))
    monkeypatch.setitem(bench.PROJS, "longcat", ("gate_up",))
    monkeypatch.setattr(bench.mgpu_kernels, "CONTRACT_ZERO_EMPTY", True)
    traced = []

    def contract(a, b, s, **kw):   # a masked variant is exact; an unmasked one is off by one (as skipping would be)
        mk = bench.mgpu_kernels
        traced.append((mk.CONTRACT_DEAL, mk.CONTRACT_MASK, mk.CONTRACT_ZERO_EMPTY))
        g = s.shape[0]
        out = bench.jnp.einsum("gtk,gtn->gkn", a.reshape(g, -1, a.shape[1]), b.reshape(g, -1, b.shape[1]),
                               preferred_element_type=kw["out_dtype"])
        return out if mk.CONTRACT_MASK else out + 1

    monkeypatch.setattr(bench.pallas_gmm, "contract_matmul", contract)
    monkeypatch.setattr(bench, "time_ms", lambda f, args, **_: (1.0,) * 3)
    out = bench.deal_ab(8, "longcat", (None,), rounds=1, deals=["round_robin", "snake"], nomask=True)
    assert traced == [("round_robin", True, True), ("snake", True, True), ("round_robin", False, True),
                      ("snake", False, True)]
    assert list(out[0]["ms"]) == ["round_robin", "snake", "round_robin+nomask", "snake+nomask", "einsum"]
    assert out[0]["bitwise_equal"] and set(out[0]["per_einsum"]) == set(out[0]["ms"]) - {"einsum"}
    assert bench.mgpu_kernels.CONTRACT_MASK is True
    traced.clear()
    out = bench.deal_ab(8, "longcat", (None,), rounds=1, deals=["round_robin"], zeros=True)
    assert traced == [("round_robin", True, False), ("round_robin", True, True)]
    assert list(out[0]["ms"]) == ["round_robin", "round_robin+zeros", "einsum"] and out[0]["bitwise_equal"]
    assert bench.mgpu_kernels.CONTRACT_ZERO_EMPTY is True


def test_rotated_starts_each_round_one_place_later():
    assert [bench.rotated("abc", r) for r in range(4)] == [list("abc"), list("bca"), list("cab"), list("abc")]
    assert bench.rotated([], 3) == []


def test_rows_ab_rounds_rotate_the_einsum_and_the_variants(monkeypatch):
    """--rows-ab: no variant runs first in every round (session 41's row-major baseline always followed the
    einsum); each call's "time" is the next number, so the figures show the order."""
    monkeypatch.setitem(bench.SHAPES, ("longcat", "gate_up"), (64, 32, 4))
    monkeypatch.setattr(bench.pallas_gmm, "rows_matmul", lambda a, bs, s, transpose_rhs=False, chain=True: (
        bench.jnp.einsum("gtn,gkn->gtk" if transpose_rhs else "gtk,gkn->gtn", a.reshape(4, 8, -1), bs[0])
        .reshape(32, -1)))
    timings = iter(np.arange(1.0, 100.0))
    monkeypatch.setattr(bench, "time_ms", lambda f, args, **_: (next(timings),) * 3)
    fwd, d_lhs = bench.rows_ab("gate_up", 8, ["flat", "band4"], rounds=2)
    assert fwd["einsum_ms"] == [1.0, 6.0] and fwd["flat"]["ms"] == [2.0, 4.0] and fwd["band4"]["ms"] == [3.0, 5.0]
    assert d_lhs["einsum_ms"] == [7.0, 12.0] and d_lhs["band4"]["bit_identical_to_flat"]
    assert bench.pallas_gmm.ROWS_TILES is None


def test_bad_flags_are_refused_by_name_before_any_timing(monkeypatch, capsys):
    monkeypatch.setattr(bench, "time_ms", lambda *a, **k: (_ for _ in ()).throw(AssertionError("timed")))
    for flags, named in ((["--deal-bands", "0,-4"], "--deal-bands"), (["--deal-bands", "0,x"], "--deal-bands"),
                         (["--rows-band", "-1"], "--rows-band"), (["--rows-ab", "flat,nope"], "--rows-ab")):
        monkeypatch.setattr(bench.sys, "argv", ["bench_moe_gemm.py", *flags])
        with pytest.raises(SystemExit) as e:
            bench.main()
        assert e.value.code == 2 and named in capsys.readouterr().err


def test_device_ms_calls_back_to_back_and_keeps_only_the_last_output():
    """Each call's output is dropped at the next (twenty of LongCat's T = 4096 backward outputs did not fit)."""
    import weakref

    class Out:
        pass

    made = []

    def f(x):
        made.append(weakref.ref(out := Out()))
        return out

    last = bench._last_of(f, (1,), calls=5)
    assert len(made) == 5 and made[-1]() is last
    assert all(r() is None for r in made[:-1])
