"""Logits, every layer's hidden state and the router's choices equal transformers' in fp32."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import lcflash
from hf_reference import hf_forward, random_hf_model
from numerics import rel
from xla_flags import user_env

# The default case runs in test_default_case_with_xla_default_flags, in a process with XLA's default flags.
CASES = {
    "yarn": dict(rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=128,
                                   beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=0.707)),
    "yarn_attention_factor": dict(rope_scaling=dict(rope_type="yarn", factor=2.0, attention_factor=1.3,
                                                    original_max_position_embeddings=256, truncate=False)),
    "more_experts_top6": dict(n_routed_experts=16, zero_expert_num=8, moe_topk=6, num_layers=3),
    "no_zero_experts": dict(zero_expert_num=0, moe_topk=3, n_routed_experts=6),
    "mostly_zero_experts": dict(n_routed_experts=4, zero_expert_num=12, moe_topk=5, rope_theta=1.0e7),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_hidden_and_routing_match_transformers(case, tmp_path):
    seed = sorted([*CASES, "default"]).index(case)   # the seeds from before the default case moved
    hf = random_hf_model(seed, **CASES[case])
    hf.save_pretrained(tmp_path)
    model = lcflash.from_pretrained(str(tmp_path), dtype="float32")
    rng = np.random.default_rng(seed + 100)
    tokens = rng.integers(0, hf.config.vocab_size, size=(2, 23))
    ref_logits, ref_hidden, ref_experts = hf_forward(hf, tokens)

    out = model.forward(tokens, return_layer_hidden=True)
    assert rel(np.asarray(out.logits), ref_logits) <= 1e-5
    for layer in range(ref_hidden.shape[0]):
        got = np.asarray(out.layer_hidden[layer])
        # transformers reports the last layer's output after the final norm.
        ref = ref_hidden[layer]
        if layer == ref_hidden.shape[0] - 1:
            got = np.asarray(out.hidden)
        assert rel(got, ref) <= 1e-5, f"layer {layer}"
    ours = np.asarray(out.moe_stats["experts_btk"]).reshape(ref_experts.shape)
    np.testing.assert_array_equal(np.sort(ours, -1), np.sort(ref_experts, -1))
    # Routing must exercise both kinds of expert, or the test would not check the zero-expert path.
    n = hf.config.n_routed_experts
    assert (ours < n).any() and ((ours >= n).any() or hf.config.zero_expert_num == 0)


# A user's process: XLA's default flags and matmul precision, not this suite's (tests/conftest.py). It runs the
# "default" cases of the test above and of test_generate.py's greedy parity, which run here only, and prints JSON.
DEFAULT_FLAGS_SCRIPT = """
import json, sys, torch, numpy as np, lcflash
from hf_reference import hf_forward, random_hf_model
from numerics import rel
hf = random_hf_model(0)
hf.save_pretrained(sys.argv[1] + "/parity")
model = lcflash.from_pretrained(sys.argv[1] + "/parity", dtype="float32")
tokens = np.random.default_rng(100).integers(0, hf.config.vocab_size, size=(2, 23))
logits, hidden, experts = hf_forward(hf, tokens)
out = model.forward(tokens, return_layer_hidden=True)
got_hidden = [np.asarray(out.layer_hidden[i]) for i in range(len(hidden) - 1)] + [np.asarray(out.hidden)]
ours = np.asarray(out.moe_stats["experts_btk"]).reshape(experts.shape)
hf = random_hf_model(20)
hf.save_pretrained(sys.argv[1] + "/greedy")
model = lcflash.from_pretrained(sys.argv[1] + "/greedy", dtype="float32")
prompts, eos = [[5, 17, 3, 44, 9], [60, 2, 8, 8, 11, 71, 30, 3, 12], [33, 1, 90]], hf.config.eos_token_id
rows = model.generate(prompts, 12, eos_id=eos)
with torch.no_grad():
    ref = [hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=eos,
                       pad_token_id=eos)[0].tolist() for p in prompts]
print(json.dumps({
    "logits_rel": float(rel(np.asarray(out.logits), logits)),
    "hidden_rel": max(float(rel(g, h)) for g, h in zip(got_hidden, hidden)),
    "tokens_routed_unlike": int((np.sort(ours, -1) != np.sort(experts, -1)).any(-1).sum()),
    "expert_kinds": [bool((ours < hf.config.n_routed_experts).any()), bool((ours >= hf.config.n_routed_experts).any())],
    "generated": [list(map(int, r)) for r in rows], "reference": ref, "eos": eos}))
"""


def test_default_case_with_xla_default_flags(tmp_path):
    """The default model's logits, every layer's hidden state, routing and greedy tokens against transformers, in
    a fresh process with XLA's default flags. Every other test compiles with tests/xla_flags.py's fast-compile
    flags, under which XLA:CPU computed a layer scan's routing right where its defaults did not: with jaxlib
    0.10.2 and 0.11.2 the rank-counting top-k of softmax + bias (router.top_k_by_rank) gave two experts one rank,
    and these logits were 0.14 (relative) off transformers'. CPUs now take lax.top_k (router.top_k_select)."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = user_env()
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([here, os.path.dirname(here)]))
    out = subprocess.run([sys.executable, "-c", DEFAULT_FLAGS_SCRIPT, str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["logits_rel"] <= 1e-5 and got["hidden_rel"] <= 1e-5, got
    assert got["tokens_routed_unlike"] == 0 and got["expert_kinds"] == [True, True], got
    for row, ref in zip(got["generated"], got["reference"]):
        assert row[:len(ref)] == ref and all(t == got["eos"] for t in row[len(ref):])
