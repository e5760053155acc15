"""experiments/plot_moe_gemm.py reads bench_moe_gemm.py's JSON: medians against the einsum, whiskers over rounds."""

import json

import pytest

from experiment_scripts import load

plot = load("plot_moe_gemm")


def test_ratios_take_balanced_longcat_cases_and_their_rounds(tmp_path):
    ours = {"fwd_ms": 2.0, "bwd_ms": 4.0, "fwd_vs_einsum_rounds": [0.4, 0.6, 0.5]}
    ein = {"fwd_ms": 1.0, "bwd_ms": 3.0}
    rows = [dict(config="longcat", proj="down", tokens_per_expert=512, load="balanced",
                 impls={"pallas_chain": ours, "einsum": ein}),
            dict(config="longcat", proj="down", tokens_per_expert=64, load="balanced",     # below 512: left out
                 impls={"pallas_chain": ours, "einsum": ein}),
            dict(config="longcat", proj="down", tokens_per_expert=512, load="skewed",      # no einsum bound
                 impls={"pallas_chain": ours}),
            dict(config="small", proj="down", tokens_per_expert=512, load="balanced",
                 impls={"pallas_chain": ours, "einsum": ein})]
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"results": rows}))
    got = plot.ratios(str(path))
    assert set(got) == {("down", 512, "fwd"), ("down", 512, "bwd")}
    assert got[("down", 512, "fwd")] == pytest.approx((0.5, 0.4, 0.6))
    assert got[("down", 512, "bwd")] == pytest.approx((0.75, 0.75, 0.75))   # one round: no whisker
