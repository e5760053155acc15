"""The training loop: corpus -> packed batches -> jitted train step -> metrics and Orbax checkpoints.

`train(cfg, workdir)` resumes from the newest complete checkpoint in `workdir/checkpoints` when there is one.
A non-finite loss or gradient norm stops training before anything non-finite is saved.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np

from lcflash.checkpoint import Checkpointer, checkpoint_dir
from lcflash.config import ConfigError, model_config
from lcflash.data import PackedLoader, load_corpus
from lcflash.params import train_flops_per_token
from lcflash.perfmodel.hardware import peak_bf16_flops
from lcflash.train import bias_controller
from lcflash.train.metrics import MetricsWriter
from lcflash.train.optimizer import MU_DTYPES, SCHEDULES
from lcflash.parallel.sharding import shard_batch
from lcflash.parallel.step import (abstract_state_sharded, init_state_sharded, make_sharded_train_step,
                                   trainer_context)
from lcflash.train.step import abstract_state, grad_accum_steps, init_state, make_eval_step, make_train_step

DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; nothing after the last good checkpoint was saved."""


def set_deterministic():
    """Adds XLA's deterministic-ops flag (GPU) to XLA_FLAGS; must run before JAX starts its backend."""
    flags = os.environ.get("XLA_FLAGS", "")
    if DETERMINISTIC_FLAG in flags:
        return
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized() and jax.default_backend() == "gpu":
        raise ConfigError("train.deterministic = True needs XLA_FLAGS=" + DETERMINISTIC_FLAG +
                          " before JAX starts; set it in the environment or pass it to the CLI before any JAX work")
    os.environ["XLA_FLAGS"] = (flags + " " + DETERMINISTIC_FLAG).strip()


def _require(cond, field, value, allowed):
    if not cond:
        raise ConfigError(f"{field} = {value!r} is invalid: {allowed}")


def validate(cfg, model_cfg):
    """Checks the training sections once, before any data is read or anything is compiled."""
    t, o, c, lo, ct, d = cfg.train, cfg.optim, cfg.checkpoint, cfg.loss, cfg.controller, cfg.data
    for f, v in (("train.steps", t.steps), ("train.batch_size", t.batch_size), ("train.log_every", t.log_every),
                 ("data.seq_len", d.seq_len), ("checkpoint.every_steps", c.every_steps),
                 ("loss.lb_groups", lo.lb_groups)):
        _require(isinstance(v, int) and v > 0, f, v, "must be a positive integer")
    grad_accum_steps(cfg)   # divides train.batch_size
    _require(0 <= t.stop_at <= t.steps, "train.stop_at", t.stop_at, f"must be in [0, train.steps = {t.steps}]")
    _require(o.schedule in SCHEDULES, "optim.schedule", o.schedule, f"must be one of {SCHEDULES}")
    _require(o.get("mu_dtype", "float32") in MU_DTYPES, "optim.mu_dtype", o.get("mu_dtype"),
             f"must be one of {MU_DTYPES}")
    _require(ct.decay in bias_controller.DECAYS, "controller.decay", ct.decay,
             f"must be one of {bias_controller.DECAYS}")
    _require(ct.decay_steps > 0, "controller.decay_steps", ct.decay_steps, "must be > 0")
    _require(model_cfg.n_routed_experts % lo.lb_groups == 0, "loss.lb_groups", lo.lb_groups,
             f"must divide model.n_routed_experts = {model_cfg.n_routed_experts}")
    _require(o.lr >= 0 and o.eps > 0 and 0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optim", dict(o),
             "needs lr >= 0, eps > 0, 0 <= b1, b2 < 1")
    _require(0 <= o.decay_fraction <= 1, "optim.decay_fraction", o.decay_fraction, "must be in [0, 1]")
    for f in ("mtp_weight", "lb_coef", "z_coef"):
        _require(lo[f] >= 0, f"loss.{f}", lo[f], "must be >= 0")
    _require(d.seq_len <= model_cfg.max_position_embeddings, "data.seq_len", d.seq_len,
             f"must be <= model.max_position_embeddings = {model_cfg.max_position_embeddings}")


class Evaluator:
    """Held-out loss and bits per byte over the first `batches` validation batches (in order, no shuffle)."""

    def __init__(self, cfg, model_cfg, corpus, batches: int):
        self.loader = PackedLoader(corpus.val, cfg.data.seq_len, cfg.train.batch_size, corpus.tokenizer.bos_id,
                                   shuffle=False)
        self.batches = max(1, min(batches, self.loader.n_windows // cfg.train.batch_size)) if batches > 0 else \
            max(1, self.loader.n_windows // cfg.train.batch_size)
        self.token_bytes = jax.numpy.asarray(corpus.token_bytes(model_cfg.vocab_size))
        self.step = cached_jit("eval", cfg, lambda: jax.jit(make_eval_step(cfg, model_cfg)))

    def __call__(self, params, bias) -> dict:
        tot = {"nll_sum": 0.0, "tokens": 0.0, "bytes": 0.0}
        for i in range(self.batches):
            out = jax.device_get(self.step(params, bias, self.loader.batch_at(i * self.loader.batch_size),
                                           self.token_bytes))
            tot = {k: tot[k] + float(out[k]) for k in tot}
        loss = tot["nll_sum"] / max(tot["tokens"], 1.0)
        bpb = tot["nll_sum"] / math.log(2) / max(tot["bytes"], 1.0)
        return {"val_loss": loss, "val_bpb": bpb, "val_tokens": int(tot["tokens"])}


# Config fields that do not change the compiled train/eval/init programs.
_NOT_IN_PROGRAM = {"train": ("stop_at", "progress", "eval_every", "eval_batches"), "checkpoint": None,
                   "data": ("path", "tokenizer", "shuffle", "val_fraction"), "init": ("grow_from",)}
_JIT_CACHE: dict = {}


def _program_key(kind: str, cfg) -> str:
    d = cfg.to_dict()
    for section, fields in _NOT_IN_PROGRAM.items():
        if section in d:
            if fields is None:
                d.pop(section)
            else:
                for f in fields:
                    d[section].pop(f, None)
    return kind + json.dumps(d, sort_keys=True, default=str)


def cached_jit(kind: str, cfg, build):
    """One jitted function per (kind, program-relevant config) in this process, so repeated `train()` calls
    (resume, notebooks, tests) reuse compiled executables instead of recompiling."""
    key = _program_key(kind, cfg)
    if key not in _JIT_CACHE:
        if len(_JIT_CACHE) > 16:
            _JIT_CACHE.clear()
        _JIT_CACHE[key] = build()
    return _JIT_CACHE[key]


def _check_finite(step: int, m: dict, ckpt: Checkpointer):
    loss, gn = float(m["loss"]), float(m["grad_norm"])
    if math.isfinite(loss) and math.isfinite(gn):
        return
    ckpt.wait()
    parts = ", ".join(f"{k}={float(m[k]):.4g}" for k in ("loss", "ce", "mtp_loss", "lb_loss", "z_loss", "grad_norm"))
    last = ckpt.latest_step()
    raise TrainingDiverged(
        f"non-finite loss at step {step} ({parts}); training stopped and nothing after it was saved. "
        + (f"The last good checkpoint is step {last} in {ckpt.directory}; re-running resumes from it "
           f"(lower optim.lr or optim.clip_norm first)." if last is not None else "No checkpoint had been saved yet."))


def trains_mtp(cfg, model_cfg) -> bool:
    """Whether the train step runs the MTP head (its loss weighted and the head built), so its FLOPs count."""
    return cfg.loss.mtp_weight > 0 and model_cfg.num_mtp_layers > 0


def throughput(cfg, model_cfg, n_devices: int, device_kind: str):
    """Returns f(tokens_per_s, ffn_experts_per_token) -> {tflops_per_s_per_device[, mfu]}: model FLOPs as
    `train_flops_per_token` counts them (at the measured FFN experts per token), and MFU where the device's bf16
    peak is known."""
    with_mtp = trains_mtp(cfg, model_cfg)
    peak = peak_bf16_flops(device_kind)

    def f(tokens_per_s: float, ffn_per_token: float) -> dict:
        fpt, _ = train_flops_per_token(model_cfg, cfg.data.seq_len, ffn_per_token, with_mtp)
        per_device = fpt * tokens_per_s / n_devices
        return {"tflops_per_s_per_device": per_device / 1e12, **({"mfu": per_device / peak} if peak else {})}
    return f


def _summary_line(rec: dict) -> str:
    e = rec.get("ffn_experts_per_token")
    mfu = f" MFU {100 * rec['mfu']:.1f}%" if "mfu" in rec else ""
    return (f"step {rec['step']}: loss {rec['loss']:.4f} ce {rec['ce']:.4f} mtp {rec['mtp_loss']:.4f} "
            f"lb {rec['lb_loss']:.4f} z {rec['z_loss']:.3g} lr {rec['lr']:.3g} |g| {rec['grad_norm']:.3g} "
            f"ffn/tok {['%.2f' % x for x in e] if e else e} tok/s {rec['tokens_per_s']:.0f}{mfu}")


def train(cfg, workdir: str, log=print) -> dict:
    """Trains (or resumes) to `train.steps` (or `train.stop_at`); returns the last logged record."""
    if cfg.train.deterministic:
        set_deterministic()
    model_cfg = model_config(cfg)
    validate(cfg, model_cfg)
    os.makedirs(workdir, exist_ok=True)
    t0 = time.time()
    corpus = load_corpus(cfg.data, model_cfg)
    log(f"corpus {corpus.source}: {corpus.n_train_files} train / {corpus.n_val_files} val files, "
        f"{len(corpus.train):,} / {len(corpus.val):,} tokens ({corpus.tokenizer.name}) in {time.time() - t0:.1f}s")
    ctx = trainer_context(cfg, model_cfg)   # None on one device
    if ctx is not None:
        log(f"mesh {dict(ctx.mesh.shape)} over {jax.device_count()} devices ({jax.process_count()} processes), "
            f"moe.transport {ctx.transport}")
    ckpt = Checkpointer(checkpoint_dir(workdir), cfg.checkpoint.every_steps, cfg.checkpoint.keep,
                        cfg.checkpoint.async_save)
    latest = ckpt.latest_step()
    if latest is not None:
        state, meta = ckpt.restore(abstract_state(cfg) if ctx is None else abstract_state_sharded(cfg, ctx), latest)
        position = int(meta["data_position"])
        if meta.get("corpus") != corpus.fingerprint:
            log(f"warning: the corpus differs from the one checkpoint {latest} was trained on "
                f"({meta.get('corpus')} -> {corpus.fingerprint}); the loader position is kept")
        log(f"resumed from step {latest} in {ckpt.directory}")
    elif ctx is not None:
        state = init_state_sharded(cfg, jax.random.PRNGKey(cfg.seed), ctx)
        position = 0
    else:
        state = init_state(cfg, jax.random.PRNGKey(cfg.seed), jit=lambda f: cached_jit("init", cfg, lambda: jax.jit(f)))
        # Committed like restored arrays, so a fresh run and a resumed one hit the same compiled step.
        state = jax.device_put(state, jax.devices()[0])
        position = 0
        if cfg.init.grow_from:
            log(f"grew {model_cfg.num_layers} layers from {cfg.init.grow_from} (order [1..n, 1..n])")
    # Written once the state is known to fit this config, so a failed resume leaves the old one in place.
    with open(os.path.join(workdir, "config.json"), "w") as fh:
        fh.write(cfg.to_json_best_effort(indent=2))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    start = int(state["step"])
    end = cfg.train.stop_at or cfg.train.steps
    if start >= end:
        ckpt.close()
        log(f"nothing to do: the checkpoint is at step {start}, training stops at {end} "
            f"(raise --config.train.steps to continue)")
        return {}
    B, T = cfg.train.batch_size, cfg.data.seq_len
    log(f"model: {n_params:,} parameters; steps {start} -> {end} of {cfg.train.steps}, batch {B} x {T} tokens")

    loader = PackedLoader(corpus.train, T, B, corpus.tokenizer.bos_id, seed=cfg.seed, shuffle=cfg.data.shuffle,
                          position=position)
    if ctx is None:
        step_fn = cached_jit("train", cfg, lambda: jax.jit(make_train_step(cfg, model_cfg), donate_argnums=0))
        put = lambda b: b  # noqa: E731
    else:
        step_fn = make_sharded_train_step(cfg, ctx, model_cfg)
        put = lambda b: shard_batch(b, ctx)  # noqa: E731
    evaluator = Evaluator(cfg, model_cfg, corpus, cfg.train.eval_batches)
    rates = throughput(cfg, model_cfg, 1 if ctx is None else jax.device_count(), jax.devices()[0].device_kind)
    writer = MetricsWriter(workdir, start)
    meta = lambda: {"data_position": loader.position, "corpus": corpus.fingerprint,  # noqa: E731
                    "tokens_seen": loader.position * T}
    from tqdm import tqdm
    bar = tqdm(total=end, initial=start, disable=not cfg.train.progress, unit="step", dynamic_ncols=True)
    rec, prev = None, None
    t_last, ffn_since = time.time(), []   # the interval's steps past the compile: their FFN experts per token
    try:
        for s in range(start, end):
            state, m = step_fn(state, put(loader.next()))
            step_no = s + 1
            if s == start:
                jax.block_until_ready(m)
                log(f"first step (compile + run) {time.time() - t_last:.1f}s; {time.time() - t0:.1f}s since start")
                t_last = time.time()
            if prev is not None:        # one step behind, so dispatch stays ahead of the device
                _check_finite(*prev, ckpt)
            prev = (step_no, m)
            if s > start:
                ffn_since.append(m["ffn_experts_per_token"])
            final = step_no == cfg.train.steps
            do_eval = final or (cfg.train.eval_every and step_no % cfg.train.eval_every == 0)
            if step_no % cfg.train.log_every == 0 or step_no == end or do_eval:
                _check_finite(step_no, m, ckpt)
                vals = jax.device_get(m)
                now = time.time()
                vals["tokens_per_s"] = len(ffn_since) * B * T / max(now - t_last, 1e-9)
                vals["ffn_experts_per_token_mean"] = float(np.mean(vals["ffn_experts_per_token"]))
                if ffn_since:   # the FLOP rate at the interval's mean FFN experts per token, logged beside it
                    vals["ffn_experts_per_token_interval"] = float(np.mean(jax.device_get(ffn_since)))
                    vals.update(rates(vals["tokens_per_s"], vals["ffn_experts_per_token_interval"]))
                vals["epoch"] = loader.epoch
                if do_eval:
                    vals.update(evaluator(state["params"], state["bias"]))
                rec = writer.write(step_no, vals)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                                **({"mfu": f"{100 * rec['mfu']:.1f}%"} if "mfu" in rec else {}))
                if not cfg.train.progress and step_no != end:
                    log(_summary_line(rec))
                t_last, ffn_since = time.time(), []
            if step_no % cfg.checkpoint.every_steps == 0 or step_no == end:
                _check_finite(step_no, m, ckpt)
                ckpt.save(step_no, state, meta(), force=True)
            bar.update(1)
    finally:
        bar.close()
        writer.close()
        ckpt.close()
    if rec is not None:
        line = _summary_line(rec)
        if "val_loss" in rec:
            line += f"; held-out loss {rec['val_loss']:.4f} nats, {rec['val_bpb']:.4f} bits/byte"
        log(line)
        log(f"done in {time.time() - t0:.1f}s; checkpoints in {ckpt.directory}")
    return rec or {}


def load_workdir_config(workdir: str):
    """The config a workdir was trained with (written by `train`)."""
    import ml_collections
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{workdir!r} has no config.json; is it a workdir written by `python -m lcflash.train`?")
    with open(path) as fh:
        return ml_collections.ConfigDict(json.load(fh))

