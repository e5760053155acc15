"""Batched generation with the latent KV cache: bucketed prefill, one compiled decode loop, MTP speculation.

    tokens = lcflash.infer.generate(model, prompt_ids, max_new_tokens=64)            # or model.generate(...)

Prompts may differ in length: they are right-padded to a power-of-two bucket, prefilled together (expanded
attention, the model's MoE), and each row then writes its own cache index (`write_start_b`), so no row's padding
is ever attended. Decoding runs inside one `jax.lax.while_loop` (the decode weight layout of decode.py, absorbed
attention, decode-shaped MoE), compiled once per (batch, prompt bucket, new-token bucket); prompt lengths,
`max_new_tokens`, temperature, top-p, seed and eos are traced values. Finished rows are filled with `pad_id`
(default: eos), and generation stops when every row has finished, as transformers' `generate` does.

`speculative="mtp"` (greedy only): the MTP head drafts one token, one main forward over [last token, draft]
verifies it; every emitted token is the main model's argmax, so the output equals plain greedy decoding.
"""

from __future__ import annotations

import collections
import math
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcflash.infer import decode
from lcflash.infer.cache import DecodeCache, bucket, cache_length
from lcflash.infer.sampling import sample
from lcflash.infer.split import MeshSplit

ATTN_IMPLS = ("absorbed", "pallas", "expanded")
# XLA options of the compiled decode loops. A small-batch decode step is a chain of ~500 small kernels in one CUDA
# graph: XLA's default (LHS) links the graph's nodes in its schedule's order, CONCURRENT by their buffers' data
# dependencies, so independent kernels (the ScMoE branch beside the dense chain, attention's query and key paths)
# run at once. Batch 1, configs/small.py on an H200: 1.126-1.306 -> 1.022-1.037 ms per token, same tokens
# (experiments/HISTORY.md). The option means nothing off the GPU.
DECODE_XLA_OPTIONS = {"xla_gpu_command_buffer_scheduling_mode": "CONCURRENT"}


class GenerateError(ValueError):
    """A generation request is invalid; raised before anything is compiled."""


def _as_prompts(prompt_ids, vocab_size: int):
    """(list of int32 arrays, kind) where kind says how to shape the result: 'array', 'list' or 'single'."""
    if isinstance(prompt_ids, (np.ndarray, jax.Array)):
        arr = np.asarray(prompt_ids)
        if arr.ndim == 1:
            rows, kind = [arr], "single"
        elif arr.ndim == 2:
            rows, kind = list(arr), "array"
        else:
            raise GenerateError(f"prompt_ids has shape {arr.shape}; expected [T] or [B, T] token ids")
    elif isinstance(prompt_ids, (list, tuple)):
        if len(prompt_ids) == 0:
            raise GenerateError("prompt_ids is empty: give at least one prompt with at least one token")
        if all(isinstance(x, (int, np.integer)) for x in prompt_ids):
            rows, kind = [np.asarray(prompt_ids)], "single"
        else:
            rows, kind = [np.asarray(r) for r in prompt_ids], "list"
    else:
        raise GenerateError(f"prompt_ids must be an array or a list of token-id sequences, got {type(prompt_ids)}")
    if not rows:
        raise GenerateError("prompt_ids holds no prompt")
    out = []
    for i, r in enumerate(rows):
        if r.ndim != 1:
            raise GenerateError(f"prompt {i} has shape {r.shape}; each prompt must be a 1-D sequence of token ids")
        if r.size == 0:
            raise GenerateError(f"prompt {i} is empty: each prompt needs at least one token (e.g. bos)")
        if not np.issubdtype(r.dtype, np.integer):
            raise GenerateError(f"prompt {i} has dtype {r.dtype}; token ids must be integers")
        bad = (r < 0) | (r >= vocab_size)
        if bad.any():
            j = int(np.argmax(bad))
            raise GenerateError(f"prompt {i} has token id {int(r[j])} at position {j}, outside the vocabulary "
                                f"[0, {vocab_size})")
        out.append(r.astype(np.int32))
    return out, kind


def validate_request(cfg, prompt_ids, max_new_tokens, temperature, top_p, eos_id, pad_id, speculative, has_mtp):
    prompts, kind = _as_prompts(prompt_ids, cfg.vocab_size)
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise GenerateError(f"max_new_tokens = {max_new_tokens!r} must be an integer >= 0")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise GenerateError(f"the longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) is "
                            f"{longest + max_new_tokens} > max_position_embeddings = {cfg.max_position_embeddings}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise GenerateError(f"temperature = {temperature!r} must be a finite number >= 0 (0 = greedy)")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise GenerateError(f"top_p = {top_p!r} must be in (0, 1]")
    for name, v in (("eos_id", eos_id), ("pad_id", pad_id)):
        if v is not None and not (isinstance(v, (int, np.integer)) and 0 <= v < cfg.vocab_size):
            raise GenerateError(f"{name} = {v!r} must be None or a token id in [0, {cfg.vocab_size})")
    if speculative not in (None, "mtp"):
        raise GenerateError(f"speculative = {speculative!r}; supported: None, 'mtp'")
    if speculative == "mtp":
        if not has_mtp:
            raise GenerateError("speculative='mtp' needs a model with an MTP head (model.num_mtp_layers = 1)")
        if temperature != 0:
            raise GenerateError("speculative='mtp' verifies greedy drafts; use temperature=0")
    return prompts, kind


class Generator:
    """Compiled prefill / decode loops for one model (weights split per layer once: see decode.DecodeModel)."""

    def __init__(self, model, attn_impl: str = "absorbed", moe_impl: str = "auto", prefill_moe_impl: str = "model",
                 weights: decode.DecodeWeights | None = None, xla_options: dict | None = None):
        """weights: another Generator's `dm.weights` of the same model, to share one per-layer copy.
        xla_options: the decode loops' XLA compiler options (default DECODE_XLA_OPTIONS)."""
        if attn_impl not in ATTN_IMPLS:
            raise GenerateError(f"attn_impl = {attn_impl!r} must be one of {ATTN_IMPLS}")
        for name, v in (("moe_impl", moe_impl), ("prefill_moe_impl", prefill_moe_impl)):
            if v not in decode.MOE_IMPLS:
                raise GenerateError(f"{name} = {v!r} must be one of {decode.MOE_IMPLS}")
        self.dm = decode.DecodeModel(model, attn_impl, weights)
        self.cfg = model.cfg
        # On a mesh: each row shard holds its rows' cache, for batches it divides (lcflash/infer/split.py).
        self.split = MeshSplit.of(self.dm.weights, model.cfg.num_attention_heads)
        self.moe_impl, self.prefill_moe_impl = moe_impl, prefill_moe_impl
        self.traces = collections.Counter()     # how often each compiled function was traced
        self.last_stats: dict = {}
        self.prefill = jax.jit(self._prefill, static_argnames=("cache_len", "greedy", "with_mtp"))
        opts = dict(DECODE_XLA_OPTIONS if xla_options is None else xla_options)
        self.decode_loop = jax.jit(self._decode_loop, static_argnames=("out_len", "greedy"),
                                   donate_argnames=("cache",), compiler_options=opts)
        self.spec_loop = jax.jit(self._spec_loop, static_argnames=("out_len",), donate_argnames=("cache",),
                                 compiler_options=opts)

    # ------------------------------------------------------------------------------------- compiled parts
    def _prefill(self, w, tokens_bt, lens_b, key, temperature, top_p, *, cache_len, greedy, with_mtp):
        self.traces["prefill"] += 1
        g = self.dm.graphs
        B, T = tokens_bt.shape
        split = self.split.for_batch(B)
        tokens_bt, lens_b = split.by_rows((tokens_bt, lens_b))
        zeros_b = jnp.zeros((B,), jnp.int32)
        cache = DecodeCache.zeros(self.cfg, B, cache_len, mtp=with_mtp)
        hidden, cache, _ = decode.forward(g, w, tokens_bt, cache, zeros_b, prefill=True,
                                          moe_impl=self.prefill_moe_impl, split=split)
        last_b1d = jnp.take_along_axis(hidden, (lens_b - 1)[:, None, None], axis=1)
        y0 = sample(decode.logits(w, last_b1d)[:, 0], jax.random.fold_in(key, 0), temperature, top_p, greedy)
        if not with_mtp:
            return y0, cache, y0
        t = jnp.arange(T, dtype=jnp.int32)
        nxt_bt = jnp.concatenate([tokens_bt[:, 1:], jnp.zeros((B, 1), jnp.int32)], axis=1)
        nxt_bt = jnp.where(t[None, :] == (lens_b - 1)[:, None], y0[:, None], nxt_bt)
        mtp_logits, cache = decode.mtp_forward(g, w, hidden, nxt_bt, cache, zeros_b, prefill=True, split=split)
        draft = jnp.argmax(jnp.take_along_axis(mtp_logits, (lens_b - 1)[:, None, None], axis=1)[:, 0], -1)
        return y0, cache, draft.astype(jnp.int32)

    def _decode_loop(self, w, cache, y0_b, start_b, max_new, eos, pad, key, temperature, top_p, *, out_len,
                     greedy):
        """Tokens 1.. of each row (token 0 is y0, from prefill): returns (out [B, out_len], count_b, steps,
        distinct FFN experts summed over steps [L], cache)."""
        self.traces["decode"] += 1
        g = self.dm.graphs
        B = y0_b.shape[0]
        split = self.split.for_batch(B)
        out = jnp.full((B, out_len), pad, jnp.int32).at[:, 0].set(y0_b)
        done = (y0_b == eos) | (max_new <= 1)
        n_exp = jnp.zeros((self.cfg.num_layers,), jnp.int32)

        def cond(c):
            step, _, _, _, _, done, _, _ = c
            return (step < max_new) & ~jnp.all(done)

        def body(c):
            step, cache, tok, pos, out, done, count, n_exp = c
            hidden, cache, n_e = decode.forward(g, w, tok[:, None], cache, pos, prefill=False,
                                                moe_impl=self.moe_impl, split=split)
            y = sample(decode.logits(w, hidden)[:, 0], jax.random.fold_in(key, step), temperature, top_p, greedy)
            y = jnp.where(done, pad, y)
            out = jax.lax.dynamic_update_slice_in_dim(out, y[:, None], step, axis=1)
            count = count + (~done).astype(jnp.int32)
            done = done | (y == eos)
            return step + 1, cache, y, pos + 1, out, done, count, n_exp + n_e

        init = (jnp.int32(1), cache, y0_b, start_b, out, done, jnp.ones((B,), jnp.int32), n_exp)
        step, cache, _, _, out, _, count, n_exp = jax.lax.while_loop(cond, body, init)
        return out, count, step - 1, n_exp, cache

    def _spec_loop(self, w, cache, y0_b, draft_b, start_b, max_new, eos, pad, *, out_len):
        """Greedy MTP speculation. Returns (out [B, out_len + 1], count_b, iterations, drafts_b, accepted_b,
        distinct FFN experts summed over iterations [L], cache)."""
        self.traces["speculative"] += 1
        g = self.dm.graphs
        B = y0_b.shape[0]
        split = self.split.for_batch(B)
        rows = jnp.arange(B)
        out = jnp.full((B, out_len + 1), pad, jnp.int32).at[:, 0].set(y0_b)
        done = (y0_b == eos) | (max_new <= 1)
        zero_b = jnp.zeros((B,), jnp.int32)

        def cond(c):
            return ~jnp.all(c[6])

        def body(c):
            it, cache, tok, d, pos, out, done, count, n_prop, n_acc, n_exp = c
            active = ~done
            hidden, cache, n_e = decode.forward(g, w, jnp.stack([tok, d], axis=1), cache, pos, prefill=False,
                                                moe_impl=self.moe_impl, split=split)
            y_b2 = jnp.argmax(decode.logits(w, hidden), axis=-1).astype(jnp.int32)
            y1, y2 = y_b2[:, 0], y_b2[:, 1]
            acc = (d == y1) & (y1 != eos) & active
            out = out.at[rows, count].set(jnp.where(active, y1, pad), mode="drop")
            out = out.at[rows, count + 1].set(jnp.where(acc, y2, pad), mode="drop")
            count = count + active.astype(jnp.int32) + acc.astype(jnp.int32)
            new_done = done | (y1 == eos) | (acc & (y2 == eos)) | (count >= max_new)
            # MTP pairs: (hidden at pos, y1) and (hidden at pos+1, y2); the second is garbage unless accepted and
            # is then overwritten by the next step, which writes from the new position on.
            mtp_logits, cache = decode.mtp_forward(g, w, hidden, y_b2, cache, pos, prefill=False, split=split)
            dn = jnp.argmax(mtp_logits, axis=-1).astype(jnp.int32)
            d_next = jnp.where(acc, dn[:, 1], dn[:, 0])
            tok_next = jnp.where(acc, y2, y1)
            pos_next = pos + active.astype(jnp.int32) + acc.astype(jnp.int32)
            keep = done   # finished rows keep their state
            return (it + 1, cache, jnp.where(keep, tok, tok_next), jnp.where(keep, d, d_next),
                    jnp.where(keep, pos, pos_next), out, new_done, count, n_prop + active.astype(jnp.int32),
                    n_acc + acc.astype(jnp.int32), n_exp + n_e)

        init = (jnp.int32(0), cache, y0_b, draft_b, start_b, out, done, jnp.ones((B,), jnp.int32), zero_b, zero_b,
                jnp.zeros((self.cfg.num_layers,), jnp.int32))
        it, cache, _, _, _, out, _, count, n_prop, n_acc, n_exp = jax.lax.while_loop(cond, body, init)
        return out, count, it, n_prop, n_acc, n_exp, cache

    # ------------------------------------------------------------------------------------- entry point
    def generate(self, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, eos_id: int | None = None, speculative: str | None = None, *,
                 pad_id: int | None = None):
        cfg = self.cfg
        prompts, kind = validate_request(cfg, prompt_ids, max_new_tokens, temperature, top_p, eos_id, pad_id,
                                         speculative, self.dm.has_mtp)
        if max_new_tokens == 0:
            return _shape_result([p for p in prompts], kind)
        pad = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
        eos = -1 if eos_id is None else int(eos_id)
        lens = np.array([len(p) for p in prompts], np.int32)
        B, T_b, N_b = len(prompts), bucket(int(lens.max())), bucket(max_new_tokens)
        S = cache_length(T_b, N_b)
        tokens = np.zeros((B, T_b), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = p
        greedy = temperature == 0
        key = jax.random.key(seed)
        temp = jnp.float32(temperature if not greedy else 1.0)
        w = self.dm.weights
        y0, cache, draft = self.prefill(w, jnp.asarray(tokens), jnp.asarray(lens), key, temp, jnp.float32(top_p),
                                        cache_len=S, greedy=greedy, with_mtp=speculative == "mtp")
        if speculative == "mtp":
            out, count, steps, n_prop, n_acc, n_exp, _ = self.spec_loop(
                w, cache, y0, draft, jnp.asarray(lens), jnp.int32(max_new_tokens), jnp.int32(eos), jnp.int32(pad),
                out_len=N_b)
            n_prop, n_acc = int(jnp.sum(n_prop)), int(jnp.sum(n_acc))
            self.last_stats = dict(speculative="mtp", iterations=int(steps), drafts=n_prop, accepted=n_acc,
                                   acceptance_rate=n_acc / max(n_prop, 1))
        else:
            out, count, steps, n_exp, _ = self.decode_loop(
                w, cache, y0, jnp.asarray(lens), jnp.int32(max_new_tokens), jnp.int32(eos), jnp.int32(pad), key,
                temp, jnp.float32(top_p), out_len=N_b, greedy=greedy)
            self.last_stats = dict(speculative=None, iterations=int(steps))
        count = np.minimum(np.asarray(count), max_new_tokens)
        n_new = int(count.max())
        out = np.asarray(out)[:, :n_new]
        self.last_stats.update(new_tokens=count.tolist(), distinct_experts_per_layer_step=(
            np.asarray(n_exp) / max(int(steps), 1)).tolist())
        if kind == "array":
            return np.concatenate([np.stack(prompts), out], axis=1)
        return _shape_result([np.concatenate([p, out[i]]) for i, p in enumerate(prompts)], kind)


def _shape_result(rows, kind):
    if kind == "single":
        return rows[0]
    if kind == "array":
        return np.stack(rows)
    return rows


_GENERATORS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def generator_for(model, attn_impl: str = "absorbed", moe_impl: str = "auto") -> Generator:
    """The cached Generator of `model` for these implementations; rebuilt when the model's arrays change."""
    leaves = tuple(id(x) for x in jax.tree.leaves(nnx.state(model)))
    per_model = _GENERATORS.setdefault(model, {})
    hit = per_model.get((attn_impl, moe_impl))
    if hit is None or hit[0] != leaves:
        hit = (leaves, Generator(model, attn_impl, moe_impl))
        per_model[(attn_impl, moe_impl)] = hit
    return hit[1]


def generate(model, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             eos_id: int | None = None, speculative: str | None = None, *, pad_id: int | None = None,
             attn_impl: str = "absorbed", moe_impl: str = "auto", return_stats: bool = False):
    """Prompt plus new tokens, like transformers' generate. prompt_ids: [B, T] array, [T] array / list of ints
    (one prompt), or a list of sequences of different lengths (returns a list). Greedy when temperature == 0.
    attn_impl: decode attention ("absorbed" XLA, "pallas" Mosaic GPU kernel, "expanded"); moe_impl: see
    lcflash/infer/decode.py. return_stats adds a dict (MTP acceptance rate, iterations, experts touched)."""
    validate_request(model.cfg, prompt_ids, max_new_tokens, temperature, top_p, eos_id, pad_id, speculative,
                     model.mtp is not None)
    gen = generator_for(model, attn_impl, moe_impl)
    out = gen.generate(prompt_ids, max_new_tokens, temperature, top_p, seed, eos_id, speculative, pad_id=pad_id)
    return (out, dict(gen.last_stats)) if return_stats else out


__all__ = ["generate", "Generator", "GenerateError", "generator_for"]
