"""experiments/contract_ab.py on the CPU with the kernels stubbed: each tiling variant traced with its own pinned
tiles, the bitwise check, the switch A/B alternating and restoring the switch, and bad flags refused by name."""

import jax.numpy as jnp
import numpy as np
import pytest

from experiment_scripts import load

ab = load("contract_ab")


def test_parse_case_and_variant_name_what_is_wrong():
    assert ab.parse_case("longcat/down/4096") == ("longcat", "down", 4096, "balanced")
    assert ab.parse_case("longcat/down/512/skewed") == ("longcat", "down", 512, "skewed")
    assert ab.parse_case("small/down/512/0.5") == ("small", "down", 512, 0.5)
    assert ab.parse_variant("default") == {} and ab.parse_variant("stages=3+band=4") == {"stages": 3, "band": 4}
    assert ab.parse_variant("overlap_mma=1") == {"overlap_mma": True}
    assert ab.variant_tiles(2048, 6144, 512, {"overlap_mma": True}).overlap_mma
    assert ab.variant_tiles(2048, 6144, 512, {}).stages == ab.pallas_gmm.CONTRACT_STAGES
    assert ab.variant_tiles(2048, 6144, 4096, {}).stages == ab.pallas_gmm.CONTRACT_DEEP_STAGES
    for bad in ("longcat/down", "longcat/up/512", "small/down/0", "small/down/x", "small/down/512/lopsided",
                "small/down/512/0", "small/down/512/skewed/1"):
        with pytest.raises(ValueError, match="config/proj/T"):
            ab.parse_case(bad)
    for bad in ("stages", "stagez=3", "stages=three", "chain=1+x"):
        with pytest.raises(ValueError, match="field=int"):
            ab.parse_variant(bad)
    with pytest.raises(ValueError, match="not a switch"):
        ab.switch_home("NO_SUCH_SWITCH")


def test_kernel_ab_pins_each_variant_and_checks_bitwise(monkeypatch):
    monkeypatch.setitem(ab.bench.SHAPES, ("toy", "down"), (128, 1024, 2))   # 4 n tiles of 256 columns
    monkeypatch.setattr(ab.pallas_gmm, "CONTRACT_BAND", 2)
    monkeypatch.setattr(ab.pallas_gmm, "CONTRACT_STAGES", 4)
    traced = []

    def contract(a, d, s, **kw):   # "stages=2" sums in another order: off by one
        tiles = ab.pallas_gmm.CONTRACT_TILES
        traced.append((tiles.stages, tiles.band))
        g = s.shape[0]
        out = jnp.einsum("gtk,gtn->gkn", a.reshape(g, -1, a.shape[1]), d.reshape(g, -1, d.shape[1]))
        return out + (tiles.stages == 2)

    monkeypatch.setattr(ab.pallas_gmm, "contract_matmul", contract)
    monkeypatch.setattr(ab.bench, "time_ms", lambda f, args, **_: (2.0,) * 3)
    (rec,) = ab.kernel_ab([("toy", "down", 8, "balanced")], {"default": {}, "band=0": {"band": 0}}, rounds=1)
    assert traced == [(4, 2), (4, 0)] and ab.pallas_gmm.CONTRACT_TILES is None
    assert rec["bitwise_equal"] and list(rec["ms"]) == ["default", "band=0", "einsum"]
    assert rec["per_einsum"]["default"] == 1.0 and ", band=0" in rec["tiles"]["band=0"]
    (rec,) = ab.kernel_ab([("toy", "down", 8, "balanced")], {"default": {}, "stages=2": {"stages": 2}}, rounds=1)
    assert not rec["bitwise_equal"]
    traced.clear()   # each variant on the unpinned tiles, not on the variant pinned before it
    (rec,) = ab.kernel_ab([("toy", "down", 8, "balanced")], {"default": {}, "overlap_mma=1": {"overlap_mma": True},
                                                  "band=0": {"band": 0}}, rounds=1)
    assert traced == [(4, 2), (4, 2), (4, 0)]
    assert "overlap_mma=True" in rec["tiles"]["overlap_mma=1"] and "overlap_mma=False" in rec["tiles"]["band=0"]


def test_gmm_switch_ab_alternates_and_restores(monkeypatch):
    seen = []

    def run_case(config, proj, t, load, impls, bw, results, check=True, device_time=False):
        seen.append((ab.pallas_gmm.CONTRACT_BAND, device_time))
        ms = 1.0 + ab.pallas_gmm.CONTRACT_BAND
        ours, ein = dict(fwd_ms=ms, bwd_ms=2 * ms), dict(fwd_ms=1.0, bwd_ms=2.0)
        if device_time:   # the device's busy time: a third of the wall time in this fake
            for rec in (ours, ein):
                rec.update(fwd_device_ms=rec["fwd_ms"] / 3, bwd_device_ms=rec["bwd_ms"] / 3)
        return dict(impls={"pallas_chain": ours, "einsum": ein}, bytes_floor_fwd_ms=0.5, bytes_floor_bwd_ms=1.0)

    monkeypatch.setattr(ab.bench, "run_case", run_case)
    before = ab.pallas_gmm.CONTRACT_BAND
    out = ab.gmm_switch_ab([("longcat", "down", 64, "balanced")], {"CONTRACT_BAND": [0, 4]}, rounds=2, bw_gbs=1.0)
    assert seen == [(0, False), (4, False), (4, False), (0, False)] and ab.pallas_gmm.CONTRACT_BAND == before
    assert [r["value"] for r in out] == [0, 4, 4, 0] and "fwd_device_ms" not in out[0]
    np.testing.assert_allclose([r["bwd_per_einsum"] for r in out], [1.0, 0.2, 0.2, 1.0])
    np.testing.assert_allclose([r["fwd_per_floor"] for r in out], [2.0, 10.0, 10.0, 2.0])

    seen.clear()
    out = ab.gmm_switch_ab([("small", "down", 64, "balanced")], {"CONTRACT_BAND": [0, 4]}, rounds=1, bw_gbs=1.0,
                           device_time=True)
    assert seen == [(0, True), (4, True)]
    np.testing.assert_allclose([r["bwd_device_ms"] for r in out], [2 / 3, 10 / 3])
    np.testing.assert_allclose([r["fwd_device_per_einsum"] for r in out], [1.0, 0.2])
    np.testing.assert_allclose([r["fwd_device_per_floor"] for r in out], [2 / 3, 10 / 3])
    np.testing.assert_allclose([r["einsum_bwd_device_per_floor"] for r in out], [2 / 3, 2 / 3])

    both, stages = [], ab.pallas_gmm.CONTRACT_STAGES   # two switches set together, each restored
    monkeypatch.setattr(ab.bench, "run_case", lambda *a, **kw: both.append(
        (ab.pallas_gmm.CONTRACT_BAND, ab.pallas_gmm.CONTRACT_STAGES)) or run_case(*a, **kw))
    out = ab.gmm_switch_ab([("small", "down", 64, "balanced")], {"CONTRACT_BAND": [4, 2], "CONTRACT_STAGES": [4, 3]},
                           rounds=2, bw_gbs=1.0)
    assert both == [(4, 4), (2, 3), (2, 3), (4, 4)] and out[0]["switch"] == "CONTRACT_BAND+CONTRACT_STAGES"
    assert [r["value"] for r in out] == [[4, 4], [2, 3], [2, 3], [4, 4]]
    assert (ab.pallas_gmm.CONTRACT_BAND, ab.pallas_gmm.CONTRACT_STAGES) == (before, stages)


def test_gmm_switch_ab_bounds_a_skewed_load_by_the_einsum_on_equal_groups(monkeypatch):
    """run_case times no einsum under a skewed load; the bound comes from a balanced run of the same case."""
    calls = []

    def run_case(config, proj, t, load, impls, bw, results, check=True, device_time=False):
        calls.append((load, tuple(impls)))
        impls_ = {"pallas_chain": dict(fwd_ms=4.0, bwd_ms=8.0)} if "pallas_chain" in impls else {}
        if load == "balanced":
            impls_["einsum"] = dict(fwd_ms=2.0, bwd_ms=4.0)
        return dict(impls=impls_, bytes_floor_fwd_ms=1.0, bytes_floor_bwd_ms=2.0)

    monkeypatch.setattr(ab.bench, "run_case", run_case)
    (rec,) = ab.gmm_switch_ab([("longcat", "down", 512, "skewed")], {"CONTRACT_BAND": [2]}, rounds=1, bw_gbs=1.0)
    assert calls == [("skewed", ("pallas_chain", "einsum")), ("balanced", ("einsum",))]
    assert rec["load"] == "skewed" and rec["bwd_per_einsum"] == 0.5 and rec["fwd_per_floor"] == 4.0


def test_device_time_without_a_switch_is_refused_before_any_timing(monkeypatch, capsys):
    monkeypatch.setattr(ab.sys, "argv", ["contract_ab.py", "--device-time"])
    monkeypatch.setattr(ab.jax, "devices", lambda: pytest.fail("timed before refusing the flags"))
    with pytest.raises(SystemExit):
        ab.main()
    assert "--device-time: only --gmm-switch" in capsys.readouterr().err


@pytest.mark.parametrize("switch", ["CONTRACT_BAND=", "CONTRACT_BAND=4,", "CONTRACT_BAND"])
def test_gmm_switch_without_a_value_is_refused_before_any_timing(monkeypatch, capsys, switch):
    monkeypatch.setattr(ab.sys, "argv", ["contract_ab.py", "--gmm-switch", switch])
    monkeypatch.setattr(ab.jax, "devices", lambda: pytest.fail("timed before refusing the flags"))
    with pytest.raises(SystemExit):
        ab.main()
    assert "want NAME=A[,B,...]" in capsys.readouterr().err


def test_parse_switches_pairs_switches_of_as_many_values():
    assert ab.parse_switches(["CONTRACT_STAGES=4,3", "CONTRACT_BAND=4,2"]) == {"CONTRACT_STAGES": [4, 3],
                                                                               "CONTRACT_BAND": [4, 2]}
    assert ab.parse_switches([]) == {}
    with pytest.raises(ValueError, match="as many values each"):
        ab.parse_switches(["CONTRACT_STAGES=4,3", "CONTRACT_BAND=4"])
    with pytest.raises(ValueError, match="named twice"):
        ab.parse_switches(["CONTRACT_BAND=4", "CONTRACT_BAND=2"])


def test_parse_switch_takes_values_of_the_defaults_type():
    assert ab.parse_switch("CONTRACT_BAND=2,4") == ("CONTRACT_BAND", [2, 4])
    assert ab.parse_switch("CONTRACT_ZERO_EMPTY=False,True") == ("CONTRACT_ZERO_EMPTY", [False, True])
    assert ab.parse_switch("CONTRACT_DEAL=snake") == ("CONTRACT_DEAL", ["snake"])
    for text, msg in (("CONTRACT_ZERO_EMPTY=1", "is a bool"), ("CONTRACT_BAND=True", "is a int"),
                      ("NO_SUCH_SWITCH=1", "not a switch"), ("_SMEM_BYTES=1", "not a switch"),
                      ("ROWS_TILES=1", "holds a NoneType")):
        with pytest.raises(ValueError, match=msg):
            ab.parse_switch(text)
