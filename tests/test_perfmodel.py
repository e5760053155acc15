"""Tests for lcflash.perfmodel: hand-checked arithmetic, monotonicity, schedule properties, CLI."""

import dataclasses
import json

import pytest

from lcflash.config import load_config, model_config
from lcflash.perfmodel import (ACHIEVABLE, PEAK, Cluster, Efficiency, HardwareError, Workload, WorkloadError,
                               deepseek_v3, estimate_step, from_lcflash, get_cluster, memory_per_gpu,
                               predict_decode_step, qwen3_235b_a22b, simulate, step_components)
from lcflash.perfmodel.__main__ import main
from lcflash.perfmodel.estimate import Component, compute_component, expected_touched_experts
from lcflash.perfmodel.models import GQASpec, MLASpec, ModelSpec, MoESpec
from lcflash.perfmodel.schedule import build_step_ops

# A made-up cluster with round numbers so expected times can be worked out by hand (seconds = units / 1e9).
TOY = Cluster(name="toy", bf16_flops=1e9, fp8_flops=2e9, hbm_bw=1e9, hbm_bytes=1e12, nvlink_bw=1e9,
              rdma_bw=1e9, nvlink_latency=0.0, rdma_latency=0.0, gpus_per_node=8)
EXACT = Efficiency(hbm=1.0, gemm=1.0, attention=1.0, network=1.0)


@pytest.fixture(scope="module")
def longcat():
    return from_lcflash(model_config(load_config("configs/longcat_flash.py")))


@pytest.fixture(scope="module")
def small_cfg():
    return model_config(load_config("configs/small.py"))


def report_workload(**kw):
    return Workload(**{**dict(batch_per_gpu=96, context=5000, ep=128, mtp=True, mtp_acceptance=0.8), **kw})


# ------------------------------------------------------------------ hand-checked arithmetic
def test_roofline_takes_the_larger_term():
    c = compute_component("x", TOY, EXACT, nbytes=2e9, flops=1e9, dtype="bf16")
    assert c.seconds == pytest.approx(2.0) and c.bound == "memory"
    c = compute_component("x", TOY, EXACT, nbytes=1e9, flops=3e9, dtype="fp8")
    assert c.seconds == pytest.approx(1.5) and c.bound == "compute"
    half = Efficiency(hbm=0.5, gemm=1.0, attention=1.0, network=1.0)
    assert compute_component("x", TOY, half, nbytes=1e9, flops=0, dtype="bf16").seconds == pytest.approx(2.0)


def test_tiny_dense_step_by_hand():
    """1 layer, GQA (2 heads, 1 KV head, dim 2), SwiGLU 4->8, vocab 16, 1 sequence at context 10, no MTP.

    attn_in: 32 fp8 weights + 12 bf16 activations (24 B) -> 56 ns, plus a 8 B cache append = 64 ns.
    attn_core: 80 B cache + 16 B q/out vs 160 bf16 FLOP -> 160 ns (compute). attn_out: 16 B + 16 B -> 32 ns.
    dense_ffn: 96 B + 64 B -> 160 ns. lm_head: 128 B (bf16) + 40 B -> 168 ns. Total 584 ns.
    """
    spec = ModelSpec(name="toy", hidden=4, vocab=16, num_layers=1, layer_kind="standard",
                     attention=GQASpec(heads=2, kv_heads=1, head_dim=2),
                     moe=MoESpec(n_routed=1, expert_inner=1, topk=1, ffn_experts_per_token=1.0),
                     dense_inner=8, first_dense_layers=1)
    wl = Workload(batch_per_gpu=1, context=10, mtp=False)
    comps = step_components(spec, TOY, EXACT, wl, 1)
    expect_ns = dict(attn_in=64, attn_core=160, attn_out=32, dense_ffn=160, lm_head=168)
    assert set(comps) == set(expect_ns)
    for name, ns in expect_ns.items():
        assert comps[name].seconds == pytest.approx(ns * 1e-9), name
    for sched in ("sequential", "sbo", "tbo"):
        est = estimate_step(spec, TOY, wl, EXACT, sched)
        if sched != "tbo":
            assert est.step_seconds == pytest.approx(584e-9), sched


def test_dispatch_and_combine_bytes(longcat):
    """Report scenario: 96 seqs x 2 verified tokens x K_e=8 slots x 6144; fp8 + 1 fp32 scale per 128 channels."""
    h800 = get_cluster("h800")
    comps = step_components(longcat, h800, PEAK, report_workload(), 96)
    assert comps["dispatch"].bytes == 192 * 8 * 6144 * (1 + 4 / 128) == 9_732_096
    assert comps["combine"].bytes == 192 * 8 * 6144 * 2
    assert comps["dispatch"].seconds == pytest.approx(9_732_096 / 50e9 + 3e-6)
    assert comps["dispatch"].resource == "rdma"
    # Zero-expert slots are not dispatched: traffic scales with K_e = 8, not top-k = 12.
    assert longcat.moe.topk == 12 and longcat.moe.ffn_experts_per_token == 8.0
    # EP inside one node goes over NVLink; EP = 1 has no all-to-all at all.
    assert step_components(longcat, h800, PEAK, report_workload(ep=8), 96)["dispatch"].resource == "nvlink"
    assert "dispatch" not in step_components(longcat, h800, PEAK, report_workload(ep=1), 96)


def test_expert_gemm_by_hand(longcat):
    """Report scenario at peak: 4 local experts (512 / EP 128), all touched; 1536 (token, expert) pairs."""
    h800 = get_cluster("h800")
    c = step_components(longcat, h800, PEAK, report_workload(), 96)["experts"]
    p = 3 * 6144 * 2048
    assert c.flops == 2 * 1536 * p
    touched = 4 * (1 - (1 - 8 / 512) ** (192 * 128))
    assert c.bytes == pytest.approx(touched * p + 1536 * (2 * 6144 + 3 * 2048) * 2)
    assert c.seconds == pytest.approx(max(c.bytes / 3.35e12, c.flops / 1978.9e12))


def test_expected_touched_experts():
    assert expected_touched_experts(4, 1.0, 1, 1) == pytest.approx(1.0)
    assert expected_touched_experts(4, 1.0, 2, 1) == pytest.approx(4 * (1 - 0.75 ** 2))
    # 4 GPUs share 2 experts: one replica each, a token reaches a given replica with probability 1/4.
    assert expected_touched_experts(2, 1.0, 1, 4) == pytest.approx(1 - 0.75 ** 4)
    assert expected_touched_experts(512, 8.0, 192, 128) == pytest.approx(4.0)


def test_parameter_counts_match_reference_and_model_cards(longcat):
    """Reference §6 exact counts for LongCat-Flash; the baselines' own headline totals."""
    assert longcat.attention.params(6144) == 90_572_800
    c = longcat.param_counts()
    assert c["moe_layer_non_expert"] == 638_874_368
    assert c["total"] == 560_664_980_480
    assert longcat.activated_params(0) == 18_693_794_816
    assert longcat.activated_params(8) == 27_149_511_680
    assert longcat.activated_params(12) == 31_377_370_112
    ds, qw = deepseek_v3(), qwen3_235b_a22b()
    assert ds.param_counts()["total"] / 1e9 == pytest.approx(671, rel=2e-3)
    assert ds.activated_params() / 1e9 == pytest.approx(37, rel=0.03)
    assert qw.param_counts()["total"] / 1e9 == pytest.approx(235, rel=2e-3)
    assert qw.activated_params() / 1e9 == pytest.approx(22, rel=0.03)


def test_kv_cache_memory_by_hand(longcat):
    """96 seqs x 5000 tokens x (512 + 64) values x 2 B x (56 sublayers + 1 MTP)."""
    assert memory_per_gpu(longcat, report_workload())["kv_cache"] == 96 * 5000 * 576 * 2 * 57


def test_speculative_decoding_and_cost_formula(longcat):
    est = estimate_step(longcat, get_cluster("h800"), report_workload(), PEAK)
    assert est.expected_tokens == pytest.approx(1.8)
    assert est.tpot_seconds == pytest.approx(est.step_seconds / 1.8)
    assert est.tokens_per_s_per_gpu == pytest.approx(96 * 1.8 / est.step_seconds)
    assert est.usd_per_million_tokens(2.0) == pytest.approx(2.0 / 3600 * est.tpot_seconds / 96 * 1e6)
    plain = estimate_step(longcat, get_cluster("h800"), report_workload(mtp=False), PEAK)
    assert plain.expected_tokens == 1.0
    assert not any(r["name"].startswith("mtp.") for r in plain.components)


# ------------------------------------------------------------------ schedules
def _toy_ops(resource_seconds):
    return {k: Component(k, r, s, 0.0, 0.0, "x") for k, (r, s) in resource_seconds.items()}


def test_sbo_four_stages_by_hand():
    """Two ScMoE layers. Stage 1 = 1+10+1+1, dispatch 20 hides FFN0+attn1-in (6), experts 4, combine 30 hides
    attn1 core/out + FFN1 (16): 13+20+4+30 = 67 per layer; sequential is the plain sum 89 per layer."""
    spec = ModelSpec(name="toy", hidden=4, vocab=4, num_layers=2, layer_kind="scmoe",
                     attention=MLASpec(1, 0, 2, 2, 2, 2),
                     moe=MoESpec(n_routed=2, expert_inner=1, topk=1, ffn_experts_per_token=1.0), dense_inner=4)
    comps = _toy_ops(dict(attn_in=("compute", 1), attn_core=("compute", 10), attn_out=("compute", 1),
                          router=("compute", 1), dispatch=("rdma", 20), dense_ffn=("compute", 5),
                          experts=("compute", 4), combine=("rdma", 30), lm_head=("compute", 0.5)))
    wl = Workload(batch_per_gpu=1, context=1, mtp=False)
    ops = build_step_ops(spec, wl, [comps], comps)
    assert simulate(ops).makespan == pytest.approx(2 * 67 + 0.5)
    assert simulate(ops, serial=True).makespan == pytest.approx(2 * 89 + 0.5)


def test_tbo_halves_by_hand():
    """One MoE layer, two micro-batches, order [pre-dispatch mb0, mb1, rest mb0, rest mb1]:
    attention 6 each -> D0 [6,9], D1 [12,15]; E0 [13,15], C0 [15,20]; E1 [16,18], C1 [20,25]; head [25,26]."""
    spec = ModelSpec(name="toy", hidden=4, vocab=4, num_layers=1, layer_kind="standard",
                     attention=GQASpec(1, 1, 2),
                     moe=MoESpec(n_routed=2, expert_inner=1, topk=1, ffn_experts_per_token=1.0, n_shared=1,
                                 shared_inner=1))
    comps = _toy_ops(dict(attn_in=("compute", 1), attn_core=("compute", 4), attn_out=("compute", 1),
                          router=("compute", 0), dispatch=("rdma", 3), shared_expert=("compute", 1),
                          experts=("compute", 2), combine=("rdma", 5), lm_head=("compute", 1)))
    wl = Workload(batch_per_gpu=2, context=1, mtp=False)
    tl = simulate(build_step_ops(spec, wl, [comps, comps], comps, order="halves"))
    assert tl.makespan == pytest.approx(26.0)


@pytest.mark.parametrize("factory", ["longcat", "deepseek", "qwen"])
def test_schedule_properties(factory, longcat):
    spec = {"longcat": longcat, "deepseek": deepseek_v3(), "qwen": qwen3_235b_a22b()}[factory]
    for eff in (PEAK, ACHIEVABLE):
        for wl in (report_workload(), report_workload(batch_per_gpu=8, context=1000, mtp=False)):
            est = estimate_step(spec, get_cluster("h800"), wl, eff)
            s, b = est.schedule_seconds, est.overlap_bound_seconds
            assert s["sbo"] <= s["sequential"] * (1 + 1e-12)
            for k in ("sbo", "tbo"):
                assert b[k] <= s[k] * (1 + 1e-12)
            # The critical path covers the whole step: its component times add up to the makespan.
            assert sum(r["critical_seconds"] for r in est.components) == pytest.approx(est.step_seconds)
            assert est.schedule == ("sbo" if spec.layer_kind == "scmoe" else "tbo")


# ------------------------------------------------------------------ monotonicity
BATCHES = (1, 16, 96, 128)


@pytest.mark.parametrize("factory", ["longcat", "deepseek", "qwen"])
def test_more_sequences_never_faster_step(factory, longcat):
    spec = {"longcat": longcat, "deepseek": deepseek_v3(), "qwen": qwen3_235b_a22b()}[factory]
    h800 = get_cluster("h800")
    prev = None
    for b in BATCHES:
        cur = estimate_step(spec, h800, report_workload(batch_per_gpu=b), ACHIEVABLE).schedule_seconds
        if prev:
            for k in cur:
                assert cur[k] >= prev[k] * (1 - 1e-12), (b, k)
        prev = cur


@pytest.mark.parametrize("field,factor", [("hbm_bw", 2.0), ("fp8_flops", 2.0), ("bf16_flops", 2.0),
                                          ("rdma_bw", 2.0), ("nvlink_bw", 2.0), ("rdma_latency", 0.0)])
def test_better_hardware_never_slows_a_step(field, factor, longcat):
    base = get_cluster("h800")
    better = base.replace(**{field: getattr(base, field) * factor})
    cases = [(longcat, report_workload()), (longcat, report_workload(batch_per_gpu=4, tp=8, mtp=False)),
             (deepseek_v3(), report_workload()), (qwen3_235b_a22b(), report_workload())]
    for spec, wl in cases:
        a = estimate_step(spec, base, wl, ACHIEVABLE).schedule_seconds
        b = estimate_step(spec, better, wl, ACHIEVABLE).schedule_seconds
        for k in a:
            assert b[k] <= a[k] * (1 + 1e-12), (spec.name, field, k)


def test_report_scenario_within_15_percent_at_peak(longcat):
    """The claim in docs/perfmodel.md: datasheet peaks, context 5000, fp8 weights, bf16 KV, MTP 0.8 for all."""
    h800 = get_cluster("h800")
    for spec, tpot_ms, usd in ((longcat, 16.0, 0.09), (deepseek_v3(), 30.0, 0.17), (qwen3_235b_a22b(), 26.2, None)):
        est = estimate_step(spec, h800, report_workload(), PEAK)
        assert est.tpot_seconds * 1e3 == pytest.approx(tpot_ms, rel=0.15), spec.name
        if usd:
            assert est.usd_per_million_tokens(2.0) == pytest.approx(usd, rel=0.15), spec.name


# ------------------------------------------------------------------ single-GPU prediction
def test_predict_decode_step_single_gpu(small_cfg):
    est = predict_decode_step(small_cfg, "h100", batch=8, context=512)
    names = {r["name"] for r in est.components}
    assert "dispatch" not in names and "combine" not in names and est.schedule == "sequential"
    assert est.step_seconds == pytest.approx(sum(r["total_seconds"] for r in est.components))
    # configs/small.py keeps fp32 weights (4 B) and bf16 activations/cache: D=1024, H=8, rq=256, rkv=128,
    # dn=128, dr=64. attn_in = q_a + q_b + kv_a + W_UK = 262144 + 393216 + 196608 + 131072 weights.
    attn_in = next(r for r in est.components if r["name"] == "attn_in")
    tokens = 8
    assert attn_in["bytes_per_call"] == (4 * 983_040 + tokens * (1024 + 8 * 192) * 2 + tokens * 192 * 2)
    bigger = predict_decode_step(small_cfg, "h100", batch=64, context=512)
    assert bigger.step_seconds >= est.step_seconds
    plain = predict_decode_step(small_cfg, "h100", batch=8, context=4096, mla_absorb=False)
    absorbed = predict_decode_step(small_cfg, "h100", batch=8, context=4096)
    assert plain.step_seconds > absorbed.step_seconds


# ------------------------------------------------------------------ errors
def test_bad_values_raise_clear_errors(longcat):
    with pytest.raises(WorkloadError, match="batch_per_gpu"):
        Workload(batch_per_gpu=0, context=10)
    with pytest.raises(WorkloadError, match="mtp_acceptance"):
        Workload(batch_per_gpu=1, context=10, mtp_acceptance=1.2)
    with pytest.raises(HardwareError, match="hbm"):
        Efficiency(hbm=1.5).replace()
    with pytest.raises(HardwareError, match="unknown cluster"):
        get_cluster("a100")
    with pytest.raises(HardwareError, match="rdma_bw"):
        get_cluster("h800", rdma_bw=-1.0)
    no_mtp = dataclasses.replace(longcat, mtp_kind=None)
    with pytest.raises(WorkloadError, match="no MTP head"):
        step_components(no_mtp, get_cluster("h800"), PEAK, report_workload(), 96)


# ------------------------------------------------------------------ CLI
def test_cli_compare_json(capsys):
    assert main(["--config=configs/longcat_flash.py", "--cluster=h800", "--ep=128", "--batch-per-gpu=96",
                 "--mtp-acceptance=0.8", "--compare", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in out["results"]] == ["LongCat-Flash", "DeepSeek-V3", "Qwen3-235B-A22B"]
    assert out["meta"]["command"].startswith("python -m lcflash.perfmodel")
    lc = out["results"][0]
    assert lc["report_tpot_ms"] == 16.0 and lc["schedule"] == "sbo"
    assert lc["tpot_ms"] == pytest.approx(lc["step_ms"] / 1.8)


def test_cli_table_and_plot(tmp_path, capsys):
    png, js = tmp_path / "tpot.png", tmp_path / "out.json"
    assert main(["--config=configs/small.py", "--ep=8", "--batch-per-gpu=16", "--context=256",
                 f"--plot={png}", f"--json={js}", "--efficiency=achievable"]) == 0
    text = capsys.readouterr().out
    assert "TPOT ms" in text and "lcflash:small" in text and "attn_core" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(js.read_text())["efficiency_profile"] == "achievable"


@pytest.mark.parametrize("argv,needle", [
    (["--ep=0"], "--ep"),
    (["--mtp-acceptance=1.5"], "--mtp-acceptance"),
    (["--config=configs/does_not_exist.py"], "does not exist"),
    (["--tp=16"], "tp"),
    (["--plot=out.jpg"], ".png"),
    (["--cluster=b200"], "--cluster"),
    (["--eff-gemm=0"], "--eff-gemm"),
])
def test_cli_bad_flags(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err
