"""Expert parallelism on one multi-GPU host (issue 6): train-step throughput per transport, scaling vs one
GPU, losses vs the one-device run, and the ScMoE overlap in the compiled GPU schedule and at run time.

Weak scaling: every GPU gets `--batch` sequences; the one-GPU run uses the first device only. For each EP
variant it also compiles the sharded step and runs `lcflash.parallel.hlo_check.overlap_report` on the
scheduled HLO (does the dispatch all-to-all start/done enclose a matmul of dense FFN 0 / attention 1 / FFN 1?).

Variants: `1gpu`, `all_to_all`, `ragged_all_to_all`, and each with `_nooverlap` (config `moe.overlap=False`:
the dense path waits for the whole MoE branch; same values, nothing hidden), the baseline that says what the
overlap saves. `--trace` records a perfetto trace of `--trace_steps` steps per variant (written beside `--out`)
and summarises it with `lcflash.parallel.trace_overlap`: per step, the device time of collective and compute
kernels and the fraction of collective time that runs concurrently with compute on another stream.

    python experiments/bench_ep.py [--config configs/small.py] [--batch 4] [--seq 1024] \
        [--variants 1gpu,all_to_all,all_to_all_nooverlap,ragged_all_to_all,ragged_all_to_all_nooverlap] \
        [--trace] [--out experiments/bench_ep.json]
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
sys.path.insert(0, os.path.join(ROOT, "experiments"))


TRANSPORTS = ("1gpu", "all_to_all", "ragged_all_to_all")
NO_OVERLAP = "_nooverlap"


def parse_variant(variant: str) -> tuple[str, bool]:
    """'ragged_all_to_all_nooverlap' -> ('ragged_all_to_all', False): the transport and moe.overlap."""
    base = variant[:-len(NO_OVERLAP)] if variant.endswith(NO_OVERLAP) else variant
    if base not in TRANSPORTS:
        raise ValueError(f"variant {variant!r}: must be one of {TRANSPORTS}, optionally with {NO_OVERLAP!r}")
    return base, base == variant


def trace_steps(args, variant, step, state, put, batches):
    """Runs `args.trace_steps` more steps under the profiler; returns (state, trace record with its summary)."""
    import jax

    from lcflash.parallel.trace_overlap import record_trace, summarize_trace

    def run(state):
        for i in range(args.trace_steps):
            state, m = step(state, put(batches[i % len(batches)]))
        return jax.block_until_ready((state, m))[0]

    dst = os.path.join(os.path.dirname(os.path.abspath(args.out)), f"trace_ep_{variant}.json.gz")
    state = record_trace(lambda: run(state), dst, python_frames=False)
    return state, {"file": os.path.basename(dst), "steps": args.trace_steps,
                   "summary": summarize_trace(dst, args.trace_steps)}


def run_variant(args, variant, n_dev):
    import jax
    import numpy as np

    from lcflash import load_config
    from lcflash.config import model_config
    from lcflash.data import PackedLoader, load_corpus
    from lcflash.train.step import init_state, make_train_step
    from lcflash.train.trainer import throughput

    transport, overlap_on = parse_variant(variant)
    one = transport == "1gpu"
    ndev = 1 if one else n_dev
    ov = {"train.batch_size": args.batch * ndev, "data.seq_len": args.seq, "train.progress": False,
          "moe.gmm_impl": args.gmm_impl, "loss.lb_groups": ndev, "moe.capacity_factor": args.capacity_factor,
          "moe.overlap": overlap_on}
    if not one:
        ov.update({"mesh.data": 1, "mesh.expert": ndev, "moe.transport": transport})
    cfg = load_config(args.config, ov)
    mc = model_config(cfg)
    corpus = load_corpus(cfg.data, mc)
    loader = PackedLoader(corpus.train, cfg.data.seq_len, cfg.train.batch_size, corpus.tokenizer.bos_id, seed=0)
    batches = [loader.next() for _ in range(args.warmup + args.steps)]
    key = jax.random.PRNGKey(0)
    overlap = None
    if one:
        dev0 = jax.devices()[0]
        state = jax.device_put(jax.jit(lambda k: init_state(cfg, k), device=dev0)(key), dev0)
        put = lambda b: jax.device_put(b, dev0)  # noqa: E731
        # Compiled ahead of time with committed inputs: a later call can never trigger a recompilation.
        step = jax.jit(make_train_step(cfg, mc), donate_argnums=0).lower(state, put(batches[0])).compile()
    else:
        from lcflash.parallel import make_mesh, parallel_context
        from lcflash.parallel.hlo_check import overlap_report
        from lcflash.parallel.sharding import shard_batch
        from lcflash.parallel.step import init_state_sharded, make_sharded_train_step

        ctx = parallel_context(cfg, make_mesh(cfg, jax.devices()[:ndev]), mc, cfg.train.batch_size)
        state = init_state_sharded(cfg, key, ctx)
        step = make_sharded_train_step(cfg, ctx)
        put = lambda b: shard_batch(b, ctx)  # noqa: E731
        compiled = step.lower(state, put(batches[0])).compile()
        step = compiled  # time the executable whose schedule is inspected (no second compilation)
        try:
            hlo = compiled.as_text()
            rep = overlap_report(hlo)
            overlap = {"asynchronous": rep.asynchronous, "enclosed": rep.enclosed,
                       "window_matmuls": {k: len(v) for k, v in rep.window_matmuls.items()},
                       "dependent": rep.dependent}
        except Exception as e:  # the report is a diagnostic: keep the timing
            overlap = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    t0 = time.time()
    losses = []
    for i in range(args.warmup):
        state, m = step(state, put(batches[i]))
        losses.append(float(m["loss"]))
    t_warm = time.time() - t0
    t0 = time.time()
    ffn, dropped = [], []
    for i in range(args.warmup, args.warmup + args.steps):
        state, m = step(state, put(batches[i]))
        ffn.append(m["ffn_experts_per_token"])
        dropped.append(m.get("moe_dropped_slots", 0))
    jax.block_until_ready(m)
    dt = time.time() - t0
    losses.append(float(m["loss"]))
    trace = None
    if args.trace:
        try:
            state, trace = trace_steps(args, variant, step, state, put, batches)
        except Exception as e:  # a diagnostic: keep the timing
            trace = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    tok_s = cfg.train.batch_size * cfg.data.seq_len * args.steps / dt
    ffn_mean = float(np.mean(jax.device_get(ffn)))
    rates = throughput(cfg, mc, ndev, jax.devices()[0].device_kind)(tok_s, ffn_mean)
    return {"variant": variant, "transport": transport, "moe_overlap": overlap_on, "devices": ndev,
            "global_batch": cfg.train.batch_size, "step_time_s": dt / args.steps,
            "tokens_per_s": tok_s, "tokens_per_s_per_gpu": tok_s / ndev, "compile_and_warmup_s": t_warm,
            "mfu": rates.get("mfu"), "ffn_experts_per_token": ffn_mean,
            "dropped_slots_mean": float(np.mean(jax.device_get(dropped))), "losses_first_and_last": losses,
            "overlap": overlap, "trace": trace}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "small.py"))
    ap.add_argument("--batch", type=int, default=4, help="sequences per GPU")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--gmm_impl", default="pallas")
    ap.add_argument("--capacity_factor", type=float, default=2.0)
    ap.add_argument("--variants", default="1gpu,all_to_all,ragged_all_to_all",
                    help=f"comma-separated, from {TRANSPORTS}, each optionally with {NO_OVERLAP!r}")
    ap.add_argument("--trace", action="store_true", help="perfetto trace + collective/compute overlap per variant")
    ap.add_argument("--trace_steps", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "bench_ep.json"))
    args = ap.parse_args()
    variants = args.variants.split(",")
    for v in variants:
        try:
            parse_variant(v)
        except ValueError as e:
            ap.error(str(e))
    if args.trace_steps < 1:
        ap.error("--trace_steps must be >= 1")
    from absl import logging
    logging.set_verbosity(logging.WARNING)
    import jax

    n_dev = jax.device_count()
    rows = []
    for v in variants:
        try:
            rows.append(run_variant(args, v, n_dev))
        except Exception as e:  # record and go on: one transport failing must not hide the others
            rows.append({"variant": v, "error": f"{type(e).__name__}: {str(e)[:600]}"})
        print(json.dumps(rows[-1]), flush=True)
    base = next((r for r in rows if r["variant"] == "1gpu" and "tokens_per_s" in r), None)
    for r in rows:
        if base and "tokens_per_s" in r and r is not base:
            r["scaling_efficiency"] = r["tokens_per_s"] / (r["devices"] * base["tokens_per_s"])
        # What the ScMoE overlap saves: the same transport with moe.overlap=False against moe.overlap=True.
        if r["variant"].endswith(NO_OVERLAP) and "step_time_s" in r:
            on = next((x for x in rows if x["variant"] == r["variant"][:-len(NO_OVERLAP)] and "step_time_s" in x),
                      None)
            if on:
                r["overlap_saves_s"] = r["step_time_s"] - on["step_time_s"]
                r["overlap_speedup"] = r["step_time_s"] / on["step_time_s"]
    import flax
    dev = jax.devices()[0]
    out = {"config": os.path.relpath(args.config, ROOT), "batch_per_gpu": args.batch, "seq_len": args.seq,
           "device": f"{dev.platform}: {dev.device_kind} x{n_dev}",
           "versions": {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__},
           "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]), "results": rows}
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=2)
    print(f"\n{out['device']}  {out['config']}  {args.batch} x {args.seq} tokens per GPU (jax {jax.__version__})")
    print(f"{'variant':>28} {'GPUs':>4} {'step s':>7} {'tok/s':>9} {'tok/s/GPU':>9} {'MFU':>6} {'scale':>6} "
          f"{'dropped':>7} {'encloses':>8} {'coll ms':>7} {'hidden':>6}")
    for r in rows:
        if "tokens_per_s" not in r:
            print(f"{r['variant']:>28} {r['error'][:100]}")
            continue
        ov = r.get("overlap") or {}
        enc = sum(ov.get("enclosed", {}).values()) if ov and "error" not in ov else ("-" if not ov else "err")
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
        tm = ((r.get("trace") or {}).get("summary") or {}).get("mean") or {}
        coll = f"{tm['collective_us'] / 1e3:.2f}" if tm else "-"
        hid = f"{100 * tm['overlap_fraction']:.0f}%" if tm.get("overlap_fraction") is not None else "-"
        print(f"{r['variant']:>28} {r['devices']:4d} {r['step_time_s']:7.3f} {r['tokens_per_s']:9.0f} "
              f"{r['tokens_per_s_per_gpu']:9.0f} {mfu:>6} {r.get('scaling_efficiency', 1.0):6.2f} "
              f"{r['dropped_slots_mean']:7.0f} {str(enc):>8} {coll:>7} {hid:>6}")
        if "overlap_saves_s" in r:
            print(f"{'':>28} overlap on saves {1e3 * r['overlap_saves_s']:.1f} ms per step "
                  f"(x{r['overlap_speedup']:.3f})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
