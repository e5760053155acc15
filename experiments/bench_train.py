"""Training throughput and MFU of a config (default configs/small.py) on the local accelerator.

Runs the real train step (losses, MTP, controller, AdamW on fp32 master weights, bf16 compute) on packed
stdlib batches, times `--steps` steps after `--warmup` compile/warm-up steps, and reports tokens/s and MFU.

Model FLOPs per token (training = 3 x forward; `lcflash.params.train_flops_per_token`, which the trainer's
metrics use too):
    6 * activated matmul parameters (non-embedding: attention, dense MLPs, router, the measured mean number of
        FFN experts per token, LM head; MTP block + LM head again when loss.mtp_weight > 0)
  + 6 * attention sublayers * heads * (qk_head_dim + v_head_dim) * T/2   (causal: each query sees T/2 keys
        on average; the kernel computes the full T x T, so hardware FLOPs are higher)
MFU = model FLOPs per second / the device's dense bf16 peak (`lcflash.perfmodel.hardware.peak_bf16_flops`).

    python experiments/bench_train.py [--config configs/small.py] [--batch 4] [--seq 1024] \
        [--gmm_impl pallas,ragged_dot]
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments.gpu_clocks import ClockSampler  # noqa: E402 -- after the path

def profile_steps(step, state, batches, out_dir: str, tag: str) -> dict:
    """Trace two steps of the compiled `step` (it donates `state`) and join the kernels to its HLO op names
    (decode_profile.profile): the time per JAX op of one training step."""
    import jax

    from experiments.decode_profile import print_kernels, profile
    from lcflash.parallel.trace_overlap import record_trace

    def run(state):
        for b in batches[:2]:
            state, m = step(state, b)
        return jax.block_until_ready(m)

    hlo = step.as_text()
    os.makedirs(out_dir, exist_ok=True)
    trace = os.path.join(out_dir, f"trace_train_{tag}.json.gz")
    record_trace(lambda: run(state), trace)
    with open(os.path.join(out_dir, f"hlo_train_{tag}.txt"), "w") as f:
        f.write(hlo)
    res = profile(hlo, trace, steps=2, top=150)
    res["by_op"] = res["by_op"][:120]
    print(f"profile {tag}: {res['kernels_per_step']:.0f} kernels, {res['busy_us_per_step'] / 1e3:.1f} ms busy per step, "
          f"device idle {res['device_idle_us_per_step'] / 1e3:.2f} ms in {res['device_gaps_per_step']:.1f} gaps")
    for g in res["idle_between"]:
        print(f"  idle {g['us_per_step'] / 1e3:6.2f} ms in {g['gaps_per_step']:5.1f} gaps: {g['after'][:45]} -> "
              f"{g['before'][:45]}")
    for g in res["long_gaps"]:
        print(f"  gap {g['us'] / 1e3:6.2f} ms at {g['at_ms']:8.2f} ms: {g['after'][:40]} -> {g['before'][:40]}")
        for thread, h in g["host"].items():
            print(f"      {thread[:30]:30} in {str(h['spanning'])[:60]}; ran {h['inside'][:2]}")
    for o in res["by_part"]:
        print(f"  {o['kernels_per_step']:7.1f} {o['us_per_step'] / 1e3:8.2f} ms  {o['part']}")
    for o in res["by_op"][:15]:
        print(f"  {o['kernels_per_step']:7.1f} {o['us_per_step'] / 1e3:8.2f} ms  {o['op'][:100]}")
    print_kernels(res["top_kernels"][:60])
    return res


def bench(cfg, warmup: int, steps: int, profile_dir: str | None = None, repeat_check: int = 0,
          xla_options: dict | None = None):
    import jax
    import numpy as np

    from lcflash.config import model_config
    from lcflash.data import PackedLoader, load_corpus
    from lcflash.train.step import init_state, make_train_step

    mc = model_config(cfg)
    corpus = load_corpus(cfg.data, mc)
    loader = PackedLoader(corpus.train, cfg.data.seq_len, cfg.train.batch_size, corpus.tokenizer.bos_id, seed=0)
    t0 = time.time()
    state = init_state(cfg, jax.random.PRNGKey(0))
    jax.block_until_ready(state)
    t_init = time.time() - t0
    batches = [loader.next() for _ in range(warmup + steps)]
    t0 = time.time()
    # Compiled once ahead of time, so the profile reads this executable's HLO instead of compiling it again.
    step = jax.jit(make_train_step(cfg, mc), donate_argnums=0).lower(state, batches[0]).compile(xla_options or None)
    compiled_memory = compiled_memory_gib(step)
    print(f"compiled step's memory (GiB): {compiled_memory}", flush=True)
    try:
        for i in range(warmup):
            state, m = step(state, batches[i])
        jax.block_until_ready(m)
    except Exception as e:  # out of memory: main() reports what the compiler planned beside the error
        raise StepFailed(f"{type(e).__name__}: {str(e)[:400]}", compiled_memory) from e
    t_warm = time.time() - t0
    ffn = []
    with ClockSampler() as clocks:  # the board's power cap lowers the SM clock under sustained work
        t0 = time.time()
        for i in range(warmup, warmup + steps):
            state, m = step(state, batches[i])
            ffn.append(m["ffn_experts_per_token"])
        jax.block_until_ready(m)
        dt = time.time() - t0
    m = jax.device_get(m)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    stats = jax.devices()[0].memory_stats() or {}  # absent on some backends (CPU)
    memory = {k: round(stats[k] / 2**30, 3) for k in ("peak_bytes_in_use", "bytes_limit") if k in stats}
    prof = profile_steps(step, state, batches[warmup:], profile_dir, cfg.moe.gmm_impl) if profile_dir else None
    del state  # donated to the profile's steps, and the rerun starts from a fresh one
    repeat = rerun_losses(step, cfg, batches, float(m["loss"]), repeat_check) if repeat_check else None
    return {"step_time_s": dt / steps, "tokens_per_s": cfg.train.batch_size * cfg.data.seq_len * steps / dt,
            "init_s": t_init, "compile_and_warmup_s": t_warm, "loss_last": float(m["loss"]), "ce_last": float(m["ce"]),
            "ffn_experts_per_token": float(np.mean(jax.device_get(ffn))), "total_params": n_params,
            # the last step's busiest FFN expert per layer, over the mean FFN-expert load (routing skew)
            "expert_load_max": [round(float(x), 2) for x in np.ravel(m["expert_load_max"])],
            "device_memory_gib": memory, "compiled_memory_gib": compiled_memory, "clocks": clocks.summary,
            **({"profile": prof} if prof else {}), **({"repeat": repeat} if repeat else {})}


def clock_cells(clocks: dict | None) -> str:
    """The table's mean SM clock and peak board power of the timed steps (gpu_clocks.ClockSampler)."""
    if not clocks:
        return f"{'n/a':>7} {'n/a':>6}"
    return f"{clocks['sm_clock_mhz_mean']:7.0f} {clocks['power_w_max']:6.0f}"


class StepFailed(RuntimeError):
    """The compiled step failed to run (e.g. out of memory); `extra` holds what the compiler had planned."""

    def __init__(self, message: str, compiled_memory: dict):
        super().__init__(message)
        self.extra = {"compiled_memory_gib": compiled_memory}


def compiled_memory_gib(compiled) -> dict:
    """XLA's own account of the executable's buffers (temporaries, arguments, outputs, donated aliases), in GiB."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes")
    return {f.removesuffix("_size_in_bytes"): round(getattr(m, f) / 2**30, 3) for f in fields if hasattr(m, f)}


def rerun_losses(step, cfg, batches, loss_last: float, times: int) -> dict:
    """The same executable run again `times` times from the same initial state on the same batches: whether the
    last loss is bitwise the same tells run-to-run differences inside one program (races, atomics) from
    differences between compilations (autotuning picks)."""
    import jax

    from lcflash.train.step import init_state

    again = []
    for _ in range(times):
        state = None  # two states at once do not fit next to the step's buffers at batch 32
        state = init_state(cfg, jax.random.PRNGKey(0))
        for b in batches:
            state, m = step(state, b)
        again.append(float(jax.device_get(m["loss"])))
    print(f"repeat check: loss {loss_last!r}, then {again} (same executable)", flush=True)
    return {"loss_last_reruns": again, "reruns_differing": sum(a != loss_last for a in again)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "small.py"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--gmm_impl", default="", help="comma-separated gmm implementations to compare "
                    "(default: the config's)")
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. --set model.train_attn_impl=cudnn (repeatable)")
    ap.add_argument("--profile_dir", default=None, help="also trace two steps: trace, HLO and time per op here")
    ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "bench_train.json"))
    ap.add_argument("--no_swiglu_epilogue", action="store_true", help="fused gate/up without SwiGLU in the kernel's "
                    "epilogue ([gate | up], SwiGLU by XLA): the A/B baseline of lcflash.kernels.gmm.api.SWIGLU_EPILOGUE")
    ap.add_argument("--pallas_assembled_heads", action="store_true", help="our attention kernels on per-head keys "
                    "[k_nope | rope key] and v copied out of kv (the A/B baseline of "
                    "lcflash.model.mla.PALLAS_MLA_FORM)")
    ap.add_argument("--no_q_parts", action="store_true", help="the q projection as one product, sliced, and our "
                    "attention kernels reading q = [nope | rope] (the A/B baseline of lcflash.model.mla.Q_PARTS)")
    ap.add_argument("--repeat_check", type=int, default=0, metavar="N", help="run the compiled steps N more times "
                    "from the initial state and report whether the last loss is bitwise the same")
    ap.add_argument("--no_swiglu_grad_epilogue", action="store_true", help="SwiGLU's backward by XLA between the "
                    "down projection's d_lhs and the [gate | up] backward (the A/B baseline of "
                    "lcflash.kernels.gmm.api.SWIGLU_GRAD_EPILOGUE)")
    ap.add_argument("--xla_option", action="append", default=[], metavar="KEY=VALUE", help="an XLA compiler option for "
                    "the train step (its jit), e.g. xla_gpu_command_buffer_scheduling_mode=CONCURRENT, which links "
                    "the step's CUDA-graph nodes by their buffers so independent kernels run side by side (at "
                    "32 x 1024 on an H200: -3.6%% tokens/s and +34 GiB of temporaries, experiments/HISTORY.md)")
    ap.add_argument("--no_dispatch_gather_kernel", action="store_true", help="the MoE dispatch gather by XLA, "
                    "every row written (the A/B baseline of lcflash.model.slots.GATHER_KERNEL)")
    ap.add_argument("--no_combine_grad_kernel", action="store_true", help="the MoE combine's backward by XLA, "
                    "every row of d_y written (the A/B baseline of lcflash.model.slots.COMBINE_GRAD_KERNEL)")
    ap.add_argument("--attn_depths", default=None, metavar="A,B,C", help="blocks our attention's forward, dq and "
                    "dk/dv kernels load ahead (lcflash.kernels.doc_attention.pallas_mgpu.DEPTHS)")
    ap.add_argument("--attn_masked_runs", action="store_true", help="our attention kernels mask every block they "
                    "visit, also the whole ones next to the diagonal (the A/B baseline of "
                    "lcflash.kernels.doc_attention.pallas_mgpu.UNMASKED_RUNS)")
    ap.add_argument("--attn_dq_recompute", action="store_true", help="our attention's dq kernel recomputes dS "
                    "instead of reading the dk/dv kernel's (the A/B baseline of "
                    "lcflash.kernels.doc_attention.pallas_mgpu.DQ_FROM_DS)")
    ap.add_argument("--zero_tails", action="store_true", help="store the MoE row buffers' tails as zeros (the A/B "
                    "baseline of lcflash.kernels.gmm.api.SKIP_TAILS)")
    ap.add_argument("--norm_whole", action="store_true", help="the clip's global norm as one sum per leaf (the A/B "
                    "baseline of lcflash.train.optimizer.NORM_BY_LAYER)")
    ap.add_argument("--z_loss_stacked", action="store_true", help="the hidden z-loss over the stacked outputs of "
                    "every layer (the A/B baseline of lcflash.train.step.Z_LOSS_IN_SCAN)")
    ap.add_argument("--layer_fn_on_output", action="store_true", help="the hidden z-loss's per-layer log-sum-exp "
                    "taken from each layer's output inside the layer (the A/B baseline of "
                    "lcflash.model.transformer.LAYER_FN_ON_INPUT)")
    ap.add_argument("--top_k", default=None, choices=("sort", "argmax", "padded"), help="how the router finds its "
                    "top-k at training sizes (default: lcflash.model.router.LARGE_TOP_K)")
    ap.add_argument("--time_budget_s", type=float, default=1e9, help="skip remaining impls once this is spent")
    ap.add_argument("--contract_deal", default=None, help="how the flat d_rhs kernel deals its tiles to the CTAs, "
                    "one of lcflash.kernels.gmm.mgpu_kernels.CONTRACT_DEALS (default: its CONTRACT_DEAL)")
    ap.add_argument("--rows_band", type=int, default=None, help="the flat expert rows kernel's column bands "
                    "(lcflash.kernels.gmm.pallas_gmm.ROWS_BAND; 0: none; default: its value)")
    ap.add_argument("--contract_band", type=int, default=None, help="the flat d_rhs kernel's column bands "
                    "(lcflash.kernels.gmm.pallas_gmm.CONTRACT_BAND; 0: none; default: its value)")
    ap.add_argument("--gmm_switch", action="append", default=[], metavar="NAME=VALUE", help="set a module switch "
                    "of lcflash.kernels.gmm.pallas_gmm or mgpu_kernels (as contract_ab.py --gmm-switch), e.g. "
                    "CONTRACT_ZERO_EMPTY=False; repeatable")
    ap.add_argument("--mem_fraction", type=float, default=None, help="share of the GPU's memory XLA may use "
                    "(XLA_PYTHON_CLIENT_MEM_FRACTION; JAX's default 0.75): 0.95 fits batch 48 x 1024 of "
                    "configs/small.py with remat on an H200")
    args = ap.parse_args()
    xla_options = {}
    for kv in args.xla_option:
        key, eq, value = kv.partition("=")
        if not (eq and key.startswith("xla_") and value):
            ap.error(f"--xla_option {kv!r}: want KEY=VALUE with an XLA option name (xla_...)")
        # XLA parses a bool option from a Python bool only ('false' is rejected), so spell booleans as such.
        xla_options[key] = {"true": True, "false": False}.get(value.lower(), value)
    if args.mem_fraction is not None:
        if not 0.0 < args.mem_fraction <= 1.0:
            ap.error(f"--mem_fraction {args.mem_fraction} must be in (0, 1]")
        os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(args.mem_fraction)  # read when the backend starts
    from absl import logging
    logging.set_verbosity(logging.WARNING)
    import jax

    from lcflash import load_config
    from lcflash.config import model_config, parse_override
    from lcflash.kernels.gmm import api as gmm_api
    from lcflash.model import mla
    from lcflash.params import train_flops_per_token
    from lcflash.perfmodel.hardware import peak_bf16_flops
    from lcflash.train.trainer import throughput, trains_mtp
    gmm_api.SWIGLU_EPILOGUE = not args.no_swiglu_epilogue
    gmm_api.SKIP_TAILS = not args.zero_tails
    gmm_api.SWIGLU_GRAD_EPILOGUE = not args.no_swiglu_grad_epilogue
    from lcflash.kernels.gmm import mgpu_kernels
    if args.contract_deal not in (None, *mgpu_kernels.CONTRACT_DEALS):
        ap.error(f"--contract_deal {args.contract_deal!r}: must be one of {mgpu_kernels.CONTRACT_DEALS}")
    mgpu_kernels.CONTRACT_DEAL = args.contract_deal or mgpu_kernels.CONTRACT_DEAL
    from lcflash.kernels.gmm import pallas_gmm
    try:
        pallas_gmm.set_bands(args.rows_band, args.contract_band)
    except ValueError as e:
        ap.error(f"--rows_band / --contract_band: {e}")
    from experiments.contract_ab import parse_switch, switch_home
    gmm_switches = {}
    for text in args.gmm_switch:
        try:
            name, values = parse_switch(text)
        except ValueError as e:
            ap.error(str(e))
        if len(values) != 1:
            ap.error(f"--gmm_switch {text!r}: one value per switch (NAME=VALUE)")
        setattr(switch_home(name), name, values[0])
        gmm_switches[name] = values[0]
    from lcflash.model import slots
    slots.GATHER_KERNEL = not args.no_dispatch_gather_kernel
    slots.COMBINE_GRAD_KERNEL = not args.no_combine_grad_kernel
    mla.PALLAS_MLA_FORM = not args.pallas_assembled_heads
    mla.Q_PARTS = not args.no_q_parts
    from lcflash.kernels.doc_attention import pallas_mgpu
    pallas_mgpu.UNMASKED_RUNS = not args.attn_masked_runs
    pallas_mgpu.DQ_FROM_DS = not args.attn_dq_recompute
    from lcflash.train import step as train_step
    train_step.Z_LOSS_IN_SCAN = not args.z_loss_stacked
    from lcflash.train import optimizer
    optimizer.NORM_BY_LAYER = not args.norm_whole
    from lcflash.model import transformer
    transformer.LAYER_FN_ON_INPUT = not args.layer_fn_on_output
    from lcflash.model import router
    router.LARGE_TOP_K = args.top_k or router.LARGE_TOP_K
    if args.attn_depths:
        pallas_mgpu.DEPTHS = tuple(int(d) for d in args.attn_depths.split(","))
    base = {"train.batch_size": args.batch, "data.seq_len": args.seq, "train.progress": False}
    if args.remat:
        base["model.remat"] = True
    base.update(parse_override(kv) for kv in args.set)
    impls = [x for x in args.gmm_impl.split(",") if x] or [None]
    dev = jax.devices()[0]
    peak = peak_bf16_flops(dev.device_kind)
    rows, t_start = [], time.time()
    for impl in impls:
        if time.time() - t_start > args.time_budget_s:
            rows.append({"gmm_impl": impl, "skipped": "time budget"})
            continue
        ov = dict(base, **({"moe.gmm_impl": impl} if impl else {}))
        try:
            cfg = load_config(args.config, ov)
            mc = model_config(cfg)
            r = bench(cfg, args.warmup, args.steps, args.profile_dir, args.repeat_check, xla_options)
        except Exception as e:  # report and go on to the next implementation
            rows.append({"gmm_impl": impl, "error": str(e) if isinstance(e, StepFailed) else
                         f"{type(e).__name__}: {str(e)[:400]}", **getattr(e, "extra", {})})
            print(rows[-1], flush=True)
            continue
        fpt, p = train_flops_per_token(mc, args.seq, r["ffn_experts_per_token"], trains_mtp(cfg, mc))
        rate = throughput(cfg, mc, 1, dev.device_kind)(r["tokens_per_s"], r["ffn_experts_per_token"])
        r.update(gmm_impl=mc.gmm_impl, model_flops_per_token=fpt, activated_params=p["total"],
                 model_tflops_per_s=rate["tflops_per_s_per_device"], mfu=rate.get("mfu"))
        rows.append(r)
        print(json.dumps(r), flush=True)

    import flax
    import optax
    out = {
        "config": os.path.relpath(args.config, ROOT), "batch": args.batch, "seq_len": args.seq,
        "remat": args.remat, "overrides": args.set, "swiglu_epilogue": gmm_api.SWIGLU_EPILOGUE,
        "swiglu_grad_epilogue": gmm_api.SWIGLU_GRAD_EPILOGUE,
        "dispatch_gather_kernel": slots.GATHER_KERNEL,
        "combine_grad_kernel": slots.COMBINE_GRAD_KERNEL,
        "attn_depths": list(pallas_mgpu.DEPTHS), "attn_unmasked_runs": pallas_mgpu.UNMASKED_RUNS,
        "attn_dq_from_ds": pallas_mgpu.DQ_FROM_DS,
        "skip_tails": gmm_api.SKIP_TAILS, "pallas_mla_form": mla.PALLAS_MLA_FORM,
        "q_parts": mla.Q_PARTS,
        "z_loss_in_scan": train_step.Z_LOSS_IN_SCAN, "norm_by_layer": optimizer.NORM_BY_LAYER,
        "layer_fn_on_input": transformer.LAYER_FN_ON_INPUT,
        "top_k": router.LARGE_TOP_K,
        **pallas_gmm.tiling_settings(),
        "gmm_switches": gmm_switches,
        "xla_options": xla_options,
        "steps_timed": args.steps, "warmup_steps": args.warmup,
        "device": f"{dev.platform}: {dev.device_kind}", "device_count": jax.device_count(),
        "peak_bf16_flops": peak,
        "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION")},
        "versions": {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
                     "optax": optax.__version__,
                     **({"tokamax": __import__("tokamax").__version__} if "tokamax" in
                        (*impls, base.get("moe.gmm_impl"), base.get("model.train_attn_impl")) else {})},
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
        "flops_note": "model FLOPs: 6 x activated matmul params (measured FFN experts/token) + causal attention",
        "results": rows,
    }
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=2)
    print(f"\n{out['device']}  {out['config']}  batch {args.batch} x seq {args.seq}  (jax {jax.__version__})")
    print(f"{'gmm_impl':>10} {'step s':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'FFN/tok':>7} {'compile s':>9} "
          f"{'SM MHz':>7} {'W max':>6}")
    for r in rows:
        if "tokens_per_s" in r:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            print(f"{r['gmm_impl']:>10} {r['step_time_s']:8.3f} {r['tokens_per_s']:10.0f} "
                  f"{r['model_tflops_per_s']:8.1f} {mfu:>6} {r['ffn_experts_per_token']:7.2f} "
                  f"{r['compile_and_warmup_s']:9.1f} {clock_cells(r.get('clocks'))}")
        else:
            print(f"{str(r['gmm_impl']):>10} {r.get('error') or r.get('skipped')}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
