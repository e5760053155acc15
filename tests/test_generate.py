"""Generation: greedy parity with transformers, cached decode == full forward, MTP speculation == greedy,
compilation once per shape bucket, clear errors before compiling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lcflash
from hf_reference import random_hf_model
from lcflash.config import load_config, model_config
from lcflash.infer import decode, generation as gen_mod
from lcflash.infer.cache import DecodeCache
from lcflash.infer.generation import GenerateError, Generator, generator_for
from lcflash.model import LongcatFlash
from numerics import rel

# The default case runs in tests/test_hf_parity.py::test_default_case_with_xla_default_flags (XLA's default flags).
HF_CASES = {
    "yarn": dict(rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=128,
                                   beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=0.707)),
    "more_experts_top6": dict(n_routed_experts=16, zero_expert_num=8, moe_topk=6, num_layers=3),
}
PROMPTS = [[5, 17, 3, 44, 9], [60, 2, 8, 8, 11, 71, 30, 3, 12], [33, 1, 90]]


@pytest.fixture(scope="module")
def tiny():
    cfg = model_config(load_config("configs/tiny.py")).replace(dtype="float32", max_position_embeddings=64)
    return LongcatFlash(cfg, nnx.Rngs(7))


def full_greedy(model, prompts, n):
    """Greedy by recomputing the whole sequence each step (no cache): the slow reference. Rows are right-padded
    to one length (causal, so the padding is never seen) and advanced together, to compile once."""
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda st, x, i_b: jnp.take_along_axis(nnx.merge(graphdef, st)(x), i_b[:, None, None], 1)[:, 0])
    lens = np.array([len(p) for p in prompts])
    x = np.zeros((len(prompts), lens.max() + n), np.int32)
    for r, p in enumerate(prompts):
        x[r, :len(p)] = p
    for k in range(n):
        x[np.arange(len(prompts)), lens + k] = np.asarray(jnp.argmax(fwd(state, x, jnp.asarray(lens + k - 1)), -1))
    return [list(x[r, :lens[r] + n]) for r in range(len(prompts))]


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_greedy_matches_transformers(case, tmp_path):
    """Token for token against transformers' generate(do_sample=False), each prompt alone there and all three
    (different lengths) batched here; eos is the config's, so rows may stop at different steps."""
    import torch

    seed = sorted([*HF_CASES, "default"]).index(case)   # the seeds from before the default case moved
    hf = random_hf_model(seed + 20, **HF_CASES[case])
    hf.save_pretrained(tmp_path)
    model = lcflash.from_pretrained(str(tmp_path), dtype="float32")
    n_new = 12
    ours = model.generate(PROMPTS, n_new, eos_id=hf.config.eos_token_id)
    for prompt, row in zip(PROMPTS, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False,
                              eos_token_id=hf.config.eos_token_id, pad_token_id=hf.config.eos_token_id)[0].numpy()
        np.testing.assert_array_equal(row[:len(ref)], ref)
        assert np.all(row[len(ref):] == hf.config.eos_token_id)   # finished rows are padded with eos


@pytest.mark.parametrize("attn_impl,moe_impl", [("absorbed", "gather"), ("absorbed", "dense")])
def test_cached_forward_equals_model_forward(tiny, attn_impl, moe_impl):
    """Prefill 6 tokens (expanded, model MoE), then decode 2 + 1 with absorbed attention and decode MoE: the
    logits equal the plain forward over the whole sequence."""
    dm = decode.DecodeModel(tiny, attn_impl)
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, tiny.cfg.vocab_size)

    @jax.jit
    def run(w, tokens):
        cache = DecodeCache.zeros(tiny.cfg, 2, 64)
        h0, cache, _ = decode.forward(dm.graphs, w, tokens[:, :6], cache, jnp.zeros(2, jnp.int32), prefill=True,
                                      moe_impl="model")
        h1, cache, _ = decode.forward(dm.graphs, w, tokens[:, 6:8], cache, jnp.full((2,), 6, jnp.int32),
                                      prefill=False, moe_impl=moe_impl)
        h2, cache, n_e = decode.forward(dm.graphs, w, tokens[:, 8:], cache, jnp.full((2,), 8, jnp.int32),
                                        prefill=False, moe_impl=moe_impl)
        return decode.logits(w, jnp.concatenate([h0, h1, h2], axis=1)), n_e

    got, n_experts = run(dm.weights, tokens)
    graphdef, state = nnx.split(tiny)
    want = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))(state, tokens)
    assert rel(got, want) < 1e-5
    assert n_experts.shape == (tiny.cfg.num_layers,)
    assert np.all((np.asarray(n_experts) >= 1) & (np.asarray(n_experts) <= tiny.cfg.n_routed_experts))


def test_mtp_cached_equals_mtp_logits(tiny):
    """The MTP slot of the decode cache (prefill pairs, then absorbed decode pairs) gives model.mtp_logits."""
    dm = decode.DecodeModel(tiny, "absorbed")
    tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, tiny.cfg.vocab_size)
    graphdef, state = nnx.split(tiny)

    @jax.jit
    def full(st, tokens):
        m = nnx.merge(graphdef, st)
        hidden = m.forward(tokens).hidden
        return hidden, m.mtp_logits(hidden[:, :-1], tokens[:, 1:])

    hidden, want = full(state, tokens)

    @jax.jit
    def cached(w, hidden, tokens):
        cache = DecodeCache.zeros(tiny.cfg, 2, 64, mtp=True)
        a, cache = decode.mtp_forward(dm.graphs, w, hidden[:, :5], tokens[:, 1:6], cache, jnp.zeros(2, jnp.int32),
                                      prefill=True)
        b, cache = decode.mtp_forward(dm.graphs, w, hidden[:, 5:8], tokens[:, 6:9], cache,
                                      jnp.full((2,), 5, jnp.int32), prefill=False)
        return jnp.concatenate([a, b], axis=1)

    assert rel(cached(dm.weights, hidden, tokens), want) < 1e-5


def test_ragged_batch_greedy_equals_full_recompute(tiny):
    prompts = [[3, 4, 5], [10, 11, 12, 13, 14, 15, 16], [7]]
    out = tiny.generate(prompts, 9)
    assert [list(r) for r in out] == full_greedy(tiny, prompts, 9)
    # A [B, T] array in gives a [B, T + new] array out.
    arr = tiny.generate(np.array([[3, 4, 5], [9, 9, 2]]), 4)
    assert arr.shape == (2, 7) and list(arr[0]) == list(out[0][:7])


def test_compiles_once_per_shape_bucket(tiny):
    g = Generator(tiny)
    g.generate([[1, 2, 3], [4, 5, 6, 7, 8]], 5)
    g.generate([[9, 8, 7, 6, 5, 4, 3], [2]], 11, eos_id=3)          # same buckets (prompt 16, new 16)
    g.generate([[1, 2], [3, 4]], 9, temperature=0.7, top_p=0.9, seed=3)   # sampling: one more of each
    g.generate([[1, 2], [3, 4]], 16, temperature=1.3, top_p=0.5, seed=4)
    assert g.traces == {"prefill": 2, "decode": 2}
    g.generate([[1] * 20, [2, 3]], 5)       # prompt bucket 32: a new prefill; the cache length (64) is unchanged
    assert g.traces == {"prefill": 3, "decode": 2}
    g.generate([[1, 2], [3, 4]], 40)        # new-token bucket 64: a longer cache, so both recompile
    assert g.traces == {"prefill": 4, "decode": 3}


def test_decode_loops_compile_with_the_generators_xla_options(tiny):
    """The decode loops carry DECODE_XLA_OPTIONS (concurrent CUDA-graph nodes on a GPU) or the caller's: an invalid
    value reaches XLA and fails there, a valid one gives the default's tokens."""
    assert gen_mod.DECODE_XLA_OPTIONS == {"xla_gpu_command_buffer_scheduling_mode": "CONCURRENT"}
    want = Generator(tiny).generate([[3, 4, 5]], 4)
    same = Generator(tiny, xla_options={"xla_gpu_command_buffer_scheduling_mode": "LHS"}).generate([[3, 4, 5]], 4)
    assert [list(r) for r in same] == [list(r) for r in want]
    bad = Generator(tiny, xla_options={"xla_gpu_command_buffer_scheduling_mode": "SIDEWAYS"})
    with pytest.raises(Exception, match="xla_gpu_command_buffer_scheduling_mode"):
        bad.generate([[3, 4, 5]], 4)


class OracleMTP:
    """Stands in for decode.mtp_forward: drafts the true greedy token except where (index % 3 == 0), so the
    speculative loop sees accepted and rejected drafts on every row."""

    def __init__(self, truth_bs, vocab):
        self.truth, self.vocab, self.real = jnp.asarray(truth_bs), vocab, decode.mtp_forward

    def __call__(self, graphs, w, hidden, next_tokens, cache, start_b, **kw):
        _, cache = self.real(graphs, w, hidden, next_tokens, cache, start_b, **kw)
        B, T = next_tokens.shape
        idx = start_b[:, None] + jnp.arange(T)[None, :] + 2
        right = jnp.take_along_axis(self.truth, jnp.minimum(idx, self.truth.shape[1] - 1), axis=1)
        draft = jnp.where(idx % 3 == 0, (right + 1) % self.vocab, right)
        return jax.nn.one_hot(draft, self.vocab) * 10.0, cache


def test_mtp_speculative_equals_greedy(tiny, monkeypatch):
    prompts = [[3, 4, 5], [10, 11, 12, 13, 14, 15, 16], [7, 7]]
    n_new = 13
    greedy = tiny.generate(prompts, n_new)
    # The real (random) MTP head: output identical, acceptance reported.
    spec, stats = tiny.generate(prompts, n_new, speculative="mtp", return_stats=True)
    assert [list(r) for r in spec] == [list(r) for r in greedy]
    assert 0.0 <= stats["acceptance_rate"] <= 1.0 and stats["drafts"] >= stats["iterations"]
    # An oracle drafter: about 2/3 of drafts accepted, output still identical, fewer main-model steps.
    truth = np.zeros((3, 64), np.int32)
    for i, (p, r) in enumerate(zip(prompts, greedy)):
        truth[i, :len(r)] = r
    monkeypatch.setattr(decode, "mtp_forward", OracleMTP(truth, tiny.cfg.vocab_size))
    g = Generator(tiny)
    spec = g.generate(prompts, n_new, speculative="mtp")
    assert [list(r) for r in spec] == [list(r) for r in greedy]
    st = g.last_stats
    assert 0.4 < st["acceptance_rate"] < 0.9, st
    assert st["iterations"] < n_new - 1
    # With eos: the speculative rows stop and pad exactly as greedy ones do.
    eos = int(greedy[1][len(prompts[1]) + 4])
    want = tiny.generate(prompts, n_new, eos_id=eos, pad_id=0)
    got = g.generate(prompts, n_new, speculative="mtp", eos_id=eos, pad_id=0)
    assert [list(r) for r in got] == [list(r) for r in want]


def test_eos_stops_rows_and_pads(tiny):
    prompts = [[3, 4, 5], [10, 11, 12, 13]]
    free = tiny.generate(prompts, 10)
    eos = int(free[0][len(prompts[0]) + 2])                  # row 0's third new token
    out = tiny.generate(prompts, 10, eos_id=eos, pad_id=0)
    row0 = list(out[0][len(prompts[0]):])
    assert row0[:3] == list(free[0][3:6]) and all(t == 0 for t in row0[3:])
    stop1 = [i for i, t in enumerate(free[1][4:]) if t == eos]
    if stop1:   # row 1 may hit the same eos later; up to there it is unchanged
        assert list(out[1][4:4 + stop1[0] + 1]) == list(free[1][4:4 + stop1[0] + 1])
    else:
        assert list(out[1]) == list(free[1][:len(out[1])])


def test_sampling_is_seeded_and_top_p_small_is_greedy(tiny):
    prompts = [[3, 4, 5], [6]]
    a = tiny.generate(prompts, 8, temperature=1.0, seed=1)
    b = tiny.generate(prompts, 8, temperature=1.0, seed=1)
    c = tiny.generate(prompts, 8, temperature=1.0, seed=2)
    assert [list(r) for r in a] == [list(r) for r in b]
    assert [list(r) for r in a] != [list(r) for r in c]
    near_greedy = tiny.generate(prompts, 8, temperature=1.0, top_p=1e-6, seed=5)
    assert [list(r) for r in near_greedy] == [list(r) for r in tiny.generate(prompts, 8)]


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompt_ids=[]), "empty"),
    (dict(prompt_ids=[[1, 2], []]), "prompt 1 is empty"),
    (dict(prompt_ids=[[1, 512]]), "token id 512 at position 1, outside the vocabulary"),
    (dict(prompt_ids=[[1, -3]]), "token id -3"),
    (dict(prompt_ids=np.array([[1.5, 2.0]])), "must be integers"),
    (dict(prompt_ids=[[1] * 60], max_new_tokens=5), "65 > max_position_embeddings = 64"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(top_p=0.0), "top_p"),
    (dict(temperature=-1.0), "temperature"),
    (dict(eos_id=999), "eos_id"),
    (dict(speculative="eagle"), "speculative"),
    (dict(speculative="mtp", temperature=0.5), "temperature=0"),
])
def test_bad_requests_fail_before_compiling(tiny, kwargs, match):
    req = dict(prompt_ids=[[1, 2, 3]], max_new_tokens=4)
    req.update(kwargs)
    before = dict(gen_mod._GENERATORS.get(tiny, {}))
    traces = {k: dict(v[1].traces) for k, v in before.items()}
    with pytest.raises(GenerateError, match=match):
        tiny.generate(req.pop("prompt_ids"), req.pop("max_new_tokens"), **req)
    after = gen_mod._GENERATORS.get(tiny, {})
    assert set(after) == set(before) and {k: dict(v[1].traces) for k, v in after.items()} == traces


def test_speculative_needs_mtp_head(tiny):
    no_mtp = LongcatFlash(tiny.cfg.replace(num_mtp_layers=0), nnx.Rngs(0))
    with pytest.raises(GenerateError, match="MTP head"):
        no_mtp.generate([[1, 2]], 3, speculative="mtp")
    assert no_mtp not in gen_mod._GENERATORS


def test_generator_is_cached_and_rebuilt_when_weights_change(tiny):
    g = generator_for(tiny)
    assert generator_for(tiny) is g
    copy = nnx.clone(tiny)
    assert generator_for(copy) is not g


def test_cli_hf_directory_and_trainer_workdir(tiny, tmp_path, capsys):
    """load_model reads a HF directory and a trainer-style workdir (config.json + checkpoints/<step>);
    python -m lcflash.generate on the workdir prints the text model.generate gives, in byte tokens."""
    from lcflash.checkpoint import Checkpointer, checkpoint_dir
    from lcflash.data.tokenize import BOS, ByteTokenizer
    from lcflash.defaults import base_config
    from lcflash.generate import main
    from lcflash.infer.load import load_model
    from lcflash.model.common import RouterBias

    prompt = "ab"
    ids = [BOS] + [int(i) for i in ByteTokenizer().encode(prompt.encode())]
    want = tiny.generate([ids], 6, eos_id=2)[0][len(ids):]
    want = want[:list(want).index(2)] if 2 in want else want
    want_text = prompt + ByteTokenizer().decode(want).decode("utf-8", errors="replace")

    hf_dir = tmp_path / "hf"
    lcflash.save_pretrained(tiny, str(hf_dir))
    model, tok = load_model(str(hf_dir), dtype="float32")
    assert tok == "" and model.cfg.vocab_size == tiny.cfg.vocab_size and model.mtp is not None

    workdir = tmp_path / "run"
    cfg = base_config(**{f: getattr(tiny.cfg, f) for f in ("vocab_size", "hidden_size", "num_layers",
                                                            "num_attention_heads", "q_lora_rank", "kv_lora_rank",
                                                            "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                                                            "ffn_hidden_size", "expert_ffn_hidden_size",
                                                            "n_routed_experts", "zero_expert_num", "moe_topk",
                                                            "target_ffn_experts", "max_position_embeddings",
                                                            "rope_theta", "dtype")})
    workdir.mkdir()
    (workdir / "config.json").write_text(cfg.to_json_best_effort())
    _, params, bias = nnx.split(tiny, nnx.Param, RouterBias)
    ck = Checkpointer(checkpoint_dir(str(workdir)), async_save=False)
    ck.save(3, {"params": nnx.to_pure_dict(params), "bias": nnx.to_pure_dict(bias), "step": 3}, {}, force=True)
    ck.close()
    model, tok = load_model(str(workdir))
    assert tok == "" and model.cfg == tiny.cfg
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(tiny))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert main([f"--checkpoint={workdir}", f"--prompt={prompt}", "--max_new_tokens=6"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == want_text
    # --mesh: a mesh the devices cannot form is refused before anything is read (tests/test_parallel.py loads onto one)
    assert main([f"--checkpoint={workdir}", f"--prompt={prompt}", "--mesh=expert=3"]) == 2
    assert "axes multiply to 3 but there are 1 devices" in capsys.readouterr().err
    assert main([f"--checkpoint={tmp_path / 'missing'}", "--prompt=x"]) == 2
