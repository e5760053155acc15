"""Decode throughput of configs/small.py in bf16: lcflash (XLA absorbed attention and the Pallas kernel) against
the memory-bandwidth floor and transformers (torch, bf16, same GPU, its own cache).

    python experiments/bench_decode.py --out_dir=OUT          # all parts; needs a GPU
    python experiments/bench_decode.py --part=jax  --json=OUT/jax.json --export=DIR
    python experiments/bench_decode.py --part=peer --checkpoint=DIR --json=OUT/peer.json
    python experiments/bench_decode.py --part=report --inputs=OUT/jax.json,OUT/peer.json \
        --json=experiments/bench_decode.json

Per point (batch B, context C): the latent cache holds C random tokens (random weights and cache are fine: the
cost of a step does not depend on the values, except for which experts the routing touches, which is measured),
and one compiled `while_loop` decodes `--steps` tokens per row (Generator.decode_loop, as generate() runs it).
TPOT = wall time / steps; tokens/s = B / TPOT.

Floor per step = (weights read + cache read) / HBM bandwidth, with the bandwidth measured by a large device copy
(bytes read + written, over time). Weights read = every non-expert weight (LM head, router, attention, dense
MLPs, norms) + the B embedding rows + the distinct FFN experts the step's tokens were routed to (measured per
layer and step). Cache read = 2L sublayers x B x C x (kv_lora_rank + rope_dim) x 2 bytes.

The transformers peer runs `generate` on the checkpoint written by `lcflash.save_pretrained(...,
transformers_compat=True)`; its TPOT is (time for 1 + N new tokens - time for 1 new token) / N, so its prefill
is excluded, at a few (B, C) points only (it is slow).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


# "+name" suffixes of a variant ("pallas+cc"): XLA options its programs are compiled with.
# The Generator's own (generation.DECODE_XLA_OPTIONS) apply first.
XLA_OPTIONS = {
    # CUDA-graph nodes linked in XLA's schedule order: XLA's default, and ours before session 22.
    "lhs": {"xla_gpu_command_buffer_scheduling_mode": "LHS"},
    # ... by their buffers' data dependencies: independent kernels may run at once (the Generator's default).
    "cc": {"xla_gpu_command_buffer_scheduling_mode": "CONCURRENT"},
    "pdl": {"xla_gpu_enable_pdl": True},
    # The whole while loop as one CUDA graph (conditional nodes), not one graph launch per decode step.
    "while": {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,WHILE,"
                                               "CONDITIONAL"},
}


# As before session 22: "+unmerged", absorbed attention through W_UK and W_UV in turn, without the merged products;
# "+eager_norms", every norm applied before its matvec (decode.DEFER_NORMS off). (The session's "+merge3" measured
# a one-reduction merge of the kernel's splits, commit 786b589, against these three kernels: no gain, reverted. Session
# 24's "+cluster_merge" merged them inside the kernel, in a thread-block cluster, commit 3968d79: no gain, reverted.
# Session 36's "+q_x" / "+no_q_x" took the query straight from the layer input, commit 318b143: batch 8 2-8% faster,
# batches 1 and 64 6-16% slower, reverted. Session 39's "+l2" pulled each sublayer's matrices into L2 while the one
# before ran, commit cf38910: batch 1 5-6% slower, batch 8 1-2% faster on an H100 (session 40), removed. Session
# 39's "+kmerge" had the attention kernel's last split merge the splits behind a GMEM semaphore, commit 5b7620f: on
# an H100 (session 41) batch 1 6-9% slower, batch 8 5-7% slower, removed.) "+gather_dot": the gather MoE's matvecs as
# einsums (decode.GATHER_FORM "einsum"), as before session 60; "+slots_inner": GATHER_FORM "reduce_slots_inner".
VARIANTS = ("unmerged", "eager_norms", "gather_dot", "slots_inner")


def attn_impl(impl: str) -> str:
    """The model's attn_impl of a benchmark variant name ("pallas@s1+cc" -> "pallas")."""
    return impl.partition("+")[0].partition("@")[0]


def suffixes(key: str) -> list[str]:
    """The +name suffixes of a variant or generator key ("pallas+unmerged+cc/auto" -> ["unmerged", "cc"])."""
    return key.split("/")[0].split("+")[1:]


def xla_options(key: str) -> dict:
    """The XLA options of a variant or generator key ("pallas+cc/auto" -> CONCURRENT scheduling)."""
    out = {}
    for name in suffixes(key):
        if name not in XLA_OPTIONS and name not in VARIANTS:
            raise SystemExit(f"variant {key!r}: unknown suffix +{name}; known: "
                             f"{sorted(XLA_OPTIONS) + list(VARIANTS)}")
        out.update(XLA_OPTIONS.get(name, {}))
    return out


def file_tag(key: str) -> str:
    """A variant key ("pallas/auto") as a file-name part the device tool returns."""
    return key.replace("/", "_").replace("+", "_").replace("@", "_")


def versions():
    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "numpy", "torch", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except Exception:   # noqa: BLE001 - a missing package is recorded, not fatal
            out[name] = None
    return out


def device_name():
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:   # noqa: BLE001
        return platform.processor() or "unknown"


def now_utc():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------------------------- JAX part
def measure_bandwidth(jax, jnp, nbytes=2 << 30, reps=20):
    """HBM bandwidth from a large device copy: (bytes read + bytes written) / time, median of `reps`."""
    x = jax.random.normal(jax.random.key(0), (nbytes // 4,), jnp.float32)
    copy = jax.jit(lambda x: x * 1.0001)
    copy(x).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        copy(x).block_until_ready()
        times.append(time.perf_counter() - t)
    del x
    return 2 * nbytes / float(np.median(times))


def weight_bytes(cfg, weights):
    """(bytes always read per decode step excluding embedding rows, bytes of one FFN expert). Attention counts
    the arrays absorbed decode reads: merged products in place of the pairs they replace."""
    import jax

    from lcflash.infer.decode import read_by_decode

    expert_names = ("w_gate", "w_up", "w_down")
    always = weights.norm.nbytes + weights.lm_head.nbytes
    expert_total = 0
    for st in weights.layers:
        st = st._replace(attn_0=read_by_decode(st.attn_0), attn_1=read_by_decode(st.attn_1))
        for path, v in jax.tree_util.tree_flatten_with_path(st)[0]:
            keys = [getattr(k, "key", getattr(k, "name", str(k))) for k in path]
            if "moe" in keys and any(n in keys for n in expert_names):
                expert_total += v.nbytes
            else:
                always += v.nbytes
    per_expert = expert_total // (cfg.num_layers * cfg.n_routed_experts)
    return always, per_expert


def run_jax(args):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from lcflash.config import load_config, model_config, parse_override
    from lcflash.infer.cache import DecodeCache, bytes_per_token
    from lcflash.infer.generation import Generator
    from lcflash.model import LongcatFlash

    result = {"device": device_name(), "jax_devices": [str(d) for d in jax.devices()], "versions": versions(),
              "date_utc": now_utc(), "command": " ".join([sys.executable] + sys.argv), "points": [],
              "speculative": [], "errors": []}

    def log(*a):
        print(*a, flush=True)

    bw = measure_bandwidth(jax, jnp, args.bw_bytes)
    result["hbm_bandwidth_Bps"] = bw
    log(f"measured copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")

    overrides = dict(parse_override(kv) for kv in args.set)
    cfg = model_config(load_config(args.config, overrides)).replace(param_dtype="bfloat16", dtype="bfloat16")
    t = time.perf_counter()
    model = LongcatFlash(cfg, nnx.Rngs(args.seed))
    base = Generator(model, "absorbed", args.moe_impl)
    jax.block_until_ready(base.dm.weights)
    log(f"model built and split in {time.perf_counter() - t:.1f}s")
    always, per_expert = weight_bytes(cfg, base.dm.weights)
    result["model"] = {"config": args.config, "overrides": args.set, "dtype": "bfloat16",
                       "always_read_bytes": always, "expert_bytes": per_expert,
                       "cache_bytes_per_token": bytes_per_token(cfg)}
    if args.export:
        import lcflash

        t = time.perf_counter()
        lcflash.save_pretrained(model, args.export, transformers_compat=True)
        log(f"exported to {args.export} in {time.perf_counter() - t:.1f}s")

    gens = {"absorbed": base}

    def generator(impl, moe):
        key = impl + ("" if moe == args.moe_impl else f"/{moe}")
        if key not in gens:
            w = base.dm.weights
            if "unmerged" in suffixes(impl):
                from lcflash.infer.decode import without_absorbed_products
                w = without_absorbed_products(w)
            gens[key] = Generator(model, attn_impl(impl), moe, weights=w)
        return key

    extra = []   # (impl, moe_impl, B, C): the dense MoE at small batch, where "auto" picks "gather"
    if args.moe_impl == "auto" and args.dense_moe_rows:
        extra = [("absorbed", "dense", B, args.contexts[0]) for B in (1, 8) if B in args.batches]

    steps = args.steps
    out_len = 1
    while out_len < steps + 1:
        out_len *= 2
    i32 = jax.ShapeDtypeStruct((), jnp.int32)
    f32 = jax.ShapeDtypeStruct((), jnp.float32)

    def cache_len(C, impl="absorbed"):
        """The XLA path reads the whole cache, so its capacity is the context plus the new tokens; the kernel
        reads only the filled blocks, so one capacity (the longest context's) serves every context, as in
        generate() where the capacity is a bucket."""
        if attn_impl(impl) == "pallas":
            C = max(args.contexts)
        return -(-(C + steps + 2) // 256) * 256

    def program(job):
        impl, gkey, moe, B, C, kind = job
        return (gkey, B, cache_len(C, impl), kind)

    jobs = []   # (impl, gen key, moe, B, C, kind)
    for C in args.contexts:
        for B in args.batches:
            for impl in args.impls:
                for moe in args.moe_impls:
                    jobs.append((impl, generator(impl, moe), moe, B, C, "decode"))
    for impl, moe, B, C in extra:
        jobs.append((impl, generator(impl, moe), moe, B, C, "decode"))
    if args.speculative:
        for impl in args.impls:
            jobs.append((impl, generator(impl, args.moe_impl), args.moe_impl, 1, args.contexts[0], "speculative"))

    def lower(prog):
        gkey, B, S, kind = prog
        g = gens[gkey]
        # "pallas@sN": the kernel with at most N context splits
        splits = gkey.split("/")[0].partition("+")[0].partition("@s")[2]
        from lcflash.kernels.mla_decode import pallas_mgpu
        pallas_mgpu.MAX_SPLITS = int(splits) if splits else None   # read while tracing: choose_splits
        from lcflash.infer import decode
        decode.DEFER_NORMS = "eager_norms" not in suffixes(gkey)   # read while tracing
        decode.GATHER_FORM = ("einsum" if "gather_dot" in suffixes(gkey) else
                              "reduce_slots_inner" if "slots_inner" in suffixes(gkey) else "reduce")
        cache = jax.eval_shape(lambda: DecodeCache.zeros(cfg, B, S, mtp=kind == "speculative"))
        b32 = jax.ShapeDtypeStruct((B,), jnp.int32)
        if kind == "speculative":
            return g.spec_loop.lower(g.dm.weights, cache, b32, b32, b32, i32, i32, i32, out_len=out_len)
        return g.decode_loop.lower(g.dm.weights, cache, b32, b32, i32, i32, i32, jax.random.key(0), f32, f32,
                                   out_len=out_len, greedy=True)

    t = time.perf_counter()
    lowered = {}
    for prog in dict.fromkeys(program(job) for job in jobs):
        try:
            lowered[prog] = lower(prog)
        except Exception as e:   # noqa: BLE001 - one failing variant must not stop the others
            result["errors"].append(f"lower {prog}: {type(e).__name__}: {e}"[:2000])
            log("LOWER FAILED", prog, repr(e)[:500])
    log(f"lowered {len(lowered)} programs for {len(jobs)} measurements in {time.perf_counter() - t:.1f}s")

    def compile_one(item):
        job, low = item
        t0 = time.perf_counter()
        return job, low.compile(compiler_options=xla_options(job[0]) or None), time.perf_counter() - t0

    def launches(exe):
        """Kernels per compiled program (fusions + custom calls + library calls in the optimised HLO): at
        batch 1 a decode step is as long as its chain of small kernels."""
        try:
            text = exe.as_text()
        except Exception:   # noqa: BLE001
            return None
        return {k: text.count(k) for k in (" fusion(", " custom-call(", " while(", "__cublas", "mosaic")}

    compiled = {}
    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.compile_threads) as pool:
        futures = [pool.submit(compile_one, item) for item in lowered.items()]
        for f in concurrent.futures.as_completed(futures):
            try:
                job, exe, dt = f.result()
                compiled[job] = (exe, dt)
            except Exception as e:   # noqa: BLE001
                result["errors"].append(f"compile: {type(e).__name__}: {e}"[:2000])
                log("COMPILE FAILED", repr(e)[:500])
    log(f"compiled {len(compiled)} programs in {time.perf_counter() - t:.1f}s (parallel)")
    if args.dump_hlo:
        for (gkey, B, S, kind), (exe, _) in compiled.items():
            if B == 1 and kind == "decode":
                path = os.path.join(os.path.dirname(os.path.abspath(args.json)), f"hlo_{file_tag(gkey)}_b1.txt")
                with open(path, "w") as f:
                    f.write(exe.as_text())

    def random_cache(B, S, mtp):
        @jax.jit
        def make(key):
            z = DecodeCache.zeros(cfg, B, S, mtp=mtp)
            leaves, tree = jax.tree.flatten(z)
            keys = jax.random.split(key, len(leaves))
            return jax.tree.unflatten(tree, [jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype)
                                             for k, x in zip(keys, leaves)])
        return make(jax.random.key(B * 7919 + S))

    for rnd, job in ((r, j) for r in range(args.rounds) for j in jobs):   # rounds alternate the variants
        if program(job) not in compiled:
            continue
        impl, gkey, moe, B, C, kind = job
        exe, compile_s = compiled[program(job)]
        S = cache_len(C, impl)
        try:
            cache = random_cache(B, S, kind == "speculative")
            rng = np.random.default_rng(B + C)
            y0 = jnp.asarray(rng.integers(3, cfg.vocab_size, B), jnp.int32)
            start = jnp.full((B,), C, jnp.int32)
            times = []
            for rep in range(args.reps + 1):
                t0 = time.perf_counter()
                if kind == "speculative":
                    out = exe(gens[gkey].dm.weights, cache, y0, y0, start, jnp.int32(steps + 1), jnp.int32(-1),
                              jnp.int32(0))
                    cache = out[-1]
                    n_steps = int(out[2])
                else:
                    out = exe(gens[gkey].dm.weights, cache, y0, start, jnp.int32(steps + 1), jnp.int32(-1),
                              jnp.int32(0), jax.random.key(0), jnp.float32(1.0), jnp.float32(1.0))
                    cache = out[-1]
                    n_steps = int(out[2])
                jax.block_until_ready(out)
                if rep:
                    times.append(time.perf_counter() - t0)
            dt = float(np.median(times))
            n_exp = np.asarray(out[-2]) / max(n_steps, 1)
            row = dict(kind=kind, impl=impl, moe_impl=moe, batch=B, context=C, cache_len=S, steps=n_steps,
                       round=rnd,
                       seconds=dt, compile_seconds=compile_s, distinct_experts_per_layer=n_exp.tolist(),
                       first_row_tokens=np.asarray(out[0])[0, :n_steps + 1].tolist(),
                       hlo_counts=launches(exe) if B == 1 else None)
            if kind == "speculative":
                row.update(ms_per_iteration=1e3 * dt / n_steps, drafts=int(np.sum(out[3])),
                           accepted=int(np.sum(out[4])))
                result["speculative"].append(row)
                log(f"spec {impl:9s} B={B} C={C}: {row['ms_per_iteration']:.3f} ms/iteration "
                    f"(accepted {row['accepted']}/{row['drafts']})")
            else:
                always_read = weight_bytes(cfg, gens[gkey].dm.weights)[0]   # this variant's attention arrays
                weights_read = always_read + B * cfg.hidden_size * 2 + float(np.sum(n_exp)) * per_expert
                cache_read = 2 * cfg.num_layers * B * C * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2
                floor_s = (weights_read + cache_read) / bw
                tpot = dt / n_steps
                row.update(tpot_ms=1e3 * tpot, tokens_per_s=B / tpot, weights_read_bytes=weights_read,
                           cache_read_bytes=cache_read, floor_ms=1e3 * floor_s, floor_tokens_per_s=B / floor_s,
                           fraction_of_floor=floor_s / tpot)
                result["points"].append(row)
                log(f"{impl:9s} moe={moe:7s} B={B:3d} C={C:6d}: "
                    f"TPOT {row['tpot_ms']:.3f} ms, "
                    f"{row['tokens_per_s']:.0f} tok/s, floor {row['floor_ms']:.3f} ms "
                    f"({100 * row['fraction_of_floor']:.0f}% of floor)")
            del cache, out
        except Exception as e:   # noqa: BLE001
            result["errors"].append(f"run {job}: {type(e).__name__}: {e}"[:2000])
            log("RUN FAILED", job, repr(e)[:500])
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.profile:
        profile_points(args, jax, jnp, jobs, compiled, gens, cfg, cache_len, program, random_cache, result, log)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)


def profile_points(args, jax, jnp, jobs, compiled, gens, cfg, cache_len, program, random_cache, result, log):
    """A perfetto trace of one batch-1 decode loop per attention impl (where a step's time goes)."""
    from lcflash.parallel.trace_overlap import record_trace

    for job in jobs:
        impl, gkey, moe, B, C, kind = job
        if kind != "decode" or B != 1 or C != args.contexts[0] or moe != args.moe_impl:
            continue
        if program(job) not in compiled:
            continue
        exe = compiled[program(job)][0]
        try:
            cache = random_cache(B, cache_len(C, impl), False)
            y0 = jnp.full((B,), 7, jnp.int32)
            start = jnp.full((B,), C, jnp.int32)
            call = lambda cache: exe(gens[gkey].dm.weights, cache, y0, start, jnp.int32(args.steps + 1),  # noqa
                                     jnp.int32(-1), jnp.int32(0), jax.random.key(0), jnp.float32(1.0),
                                     jnp.float32(1.0))
            cache = call(cache)[-1]
            jax.block_until_ready(cache)
            name = f"trace_decode_b1_{file_tag(gkey)}.json.gz"
            dst = os.path.join(os.path.dirname(os.path.abspath(args.json)), name)
            record_trace(lambda: jax.block_until_ready(call(cache)), dst)
            result.setdefault("traces", []).append(dict(impl=impl, generator=gkey, batch=B, context=C,
                                                        steps=args.steps, file=name))
            log(f"trace of {impl} B=1 C={C} -> {dst}")
        except Exception as e:   # noqa: BLE001
            result["errors"].append(f"profile {job}: {type(e).__name__}: {e}"[:2000])
            log("PROFILE FAILED", job, repr(e)[:300])


# ----------------------------------------------------------------------------------------------- peer
def run_peer(args):
    import torch
    from transformers import LongcatFlashForCausalLM

    result = {"device": device_name(), "versions": versions(), "date_utc": now_utc(),
              "command": " ".join([sys.executable] + sys.argv), "peer": [], "errors": []}
    t = time.perf_counter()
    dev = args.peer_device
    model = LongcatFlashForCausalLM.from_pretrained(args.checkpoint, dtype=torch.bfloat16).to(dev).eval()
    print(f"transformers model loaded in {time.perf_counter() - t:.1f}s", flush=True)
    vocab = model.config.vocab_size
    n = args.peer_steps
    t_start = time.perf_counter()

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def gen(ids, new):
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 pad_token_id=0, attention_mask=torch.ones_like(ids))
        sync()
        return time.perf_counter() - t0, out.shape[1] - ids.shape[1]

    gen(torch.randint(3, vocab, (1, 16), device=dev), 2)   # warm-up
    for point in args.peer_points:
        B, C = point
        if time.perf_counter() - t_start > args.peer_budget_s:
            result["errors"].append(f"skipped B={B} C={C}: peer time budget {args.peer_budget_s}s spent")
            continue
        try:
            ids = torch.randint(3, vocab, (B, C), device=dev)
            gen(ids, 1)                      # first call at this shape: allocator and kernel warm-up
            t1, _ = gen(ids, 1)
            t2, got = gen(ids, 1 + n)
            tpot = (t2 - t1) / (got - 1)
            row = dict(batch=B, context=C, new_tokens=got, prefill_plus_one_s=t1, total_s=t2, tpot_ms=1e3 * tpot,
                       tokens_per_s=B / tpot)
            result["peer"].append(row)
            print(f"transformers B={B} C={C}: TPOT {row['tpot_ms']:.1f} ms, {row['tokens_per_s']:.1f} tok/s",
                  flush=True)
        except Exception as e:   # noqa: BLE001
            result["errors"].append(f"peer B={B} C={C}: {type(e).__name__}: {e}"[:2000])
            print("PEER FAILED", B, C, repr(e)[:500], flush=True)
        if dev == "cuda":
            torch.cuda.empty_cache()
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)


# ----------------------------------------------------------------------------------------------- report
def summarize_trace(path: str, steps: int, top: int = 12) -> dict:
    """Device-side events of a perfetto trace: kernels per decode step, busy time per step, the costliest names."""
    from lcflash.parallel.trace_overlap import kernel_totals

    by_name, kernels, seen = kernel_totals(path)
    if not kernels:
        return {"device_events": 0, "processes": seen["processes"]}
    t0 = min(e.start for e in kernels)
    t1 = max(e.start + e.dur for e in kernels)
    busy = sum(v[1] for v in by_name.values())
    return {"device_events": len(kernels), "events_per_step": len(kernels) / steps,
            "device_busy_us_per_step": busy / steps, "device_span_us_per_step": (t1 - t0) / steps,
            "top": [dict(name=n[:120], count=c, us_per_step=t / steps)
                    for n, (c, t) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]]}


def report(args):
    parts = [json.load(open(p)) for p in args.inputs]
    jax_part = next(p for p in parts if "points" in p)
    peer_part = next((p for p in parts if "peer" in p), {"peer": [], "errors": []})
    peer = {(r["batch"], r["context"]): r for r in peer_part["peer"]}
    rows = []
    for r in jax_part["points"]:
        p = peer.get((r["batch"], r["context"]))
        r = dict(r)
        if p is not None:
            r["transformers_tpot_ms"] = p["tpot_ms"]
            r["speedup_vs_transformers"] = p["tpot_ms"] / r["tpot_ms"]
        rows.append(r)
    hdr = (f"{'impl':9s} {'moe':7s} {'B':>3s} {'ctx':>6s} {'TPOT ms':>9s} {'tok/s':>9s} {'floor ms':>9s} "
           f"{'floor tok/s':>11s} {'% floor':>7s} {'experts/L':>9s} {'HF ms':>8s} {'x HF':>6s}")
    lines = [hdr, "-" * len(hdr)]
    for r in sorted(rows, key=lambda r: (r["context"], r["batch"], r["impl"], r["moe_impl"])):
        lines.append(
            f"{r['impl']:9s} {r['moe_impl']:7s} {r['batch']:3d} {r['context']:6d} {r['tpot_ms']:9.3f} "
            f"{r['tokens_per_s']:9.0f} {r['floor_ms']:9.3f} {r['floor_tokens_per_s']:11.0f} "
            f"{100 * r['fraction_of_floor']:6.1f}% {np.mean(r['distinct_experts_per_layer']):9.1f} "
            + (f"{r['transformers_tpot_ms']:8.1f} {r['speedup_vs_transformers']:6.1f}"
               if "transformers_tpot_ms" in r else f"{'-':>8s} {'-':>6s}"))
    for s in jax_part.get("speculative", []):
        plain = next((r for r in rows if r["impl"] == s["impl"] and r["batch"] == s["batch"]
                      and r["context"] == s["context"] and r["moe_impl"] == s["moe_impl"]), None)
        if plain:
            s["plain_tpot_ms"] = plain["tpot_ms"]
            s["break_even_acceptance"] = s["ms_per_iteration"] / plain["tpot_ms"] - 1
            lines.append(f"MTP speculative ({s['impl']}, B={s['batch']}, ctx={s['context']}): "
                         f"{s['ms_per_iteration']:.3f} ms per verify+draft iteration vs {plain['tpot_ms']:.3f} ms "
                         f"per plain step: faster than plain decoding above {100 * s['break_even_acceptance']:.0f}% "
                         f"acceptance (random weights: {s['accepted']}/{s['drafts']} accepted)")
    for r in rows:
        if r["impl"] != "absorbed":
            ref = next((x for x in rows if x["impl"] == "absorbed" and x["moe_impl"] == r["moe_impl"]
                        and x["batch"] == r["batch"] and x["context"] == r["context"]), None)
            if ref is not None:
                a, b = np.array(r["first_row_tokens"]), np.array(ref["first_row_tokens"])
                n = min(len(a), len(b))
                r["token_agreement_with_absorbed"] = float(np.mean(a[:n] == b[:n]))
        base = r["impl"].partition("+")[0]
        twin = next((x for x in rows if x["impl"] == base and x["moe_impl"] == r["moe_impl"]
                     and x["batch"] == r["batch"] and x["context"] == r["context"]), None)
        if base != r["impl"] and twin is not None:   # a variant against its base ("pallas+cc" against "pallas")
            r["tokens_equal_to_base"] = r["first_row_tokens"] == twin["first_row_tokens"]
    agree = [r["token_agreement_with_absorbed"] for r in rows if "token_agreement_with_absorbed" in r]
    if agree:
        lines.append(f"pallas vs absorbed (XLA), same cache and first token: greedy tokens of row 0 agree "
                     f"{100 * float(np.mean(agree)):.1f}% on average (bf16: a near-tie may flip, then the rows "
                     "diverge)")
    differ = [f"{r['impl']} B={r['batch']} ctx={r['context']}" for r in rows if r.get("tokens_equal_to_base") is False]
    if any("tokens_equal_to_base" in r for r in rows):
        lines.append("variants against their base impl: row 0's greedy tokens "
                     + (f"differ in {', '.join(differ)}" if differ else "are the same in every row"))
    for tr in jax_part.get("traces", []):
        path = os.path.join(os.path.dirname(os.path.abspath(args.inputs[0])), tr["file"])
        if os.path.exists(path):
            tr["summary"] = summarize_trace(path, tr["steps"])
            sm = tr["summary"]
            if sm.get("device_events"):
                lines.append(f"trace {tr['impl']} B=1 ctx={tr['context']}: {sm['events_per_step']:.0f} device events "
                             f"per step, busy {sm['device_busy_us_per_step']:.0f} us of a "
                             f"{sm['device_span_us_per_step']:.0f} us span per step")
    table = "\n".join(lines)
    print(table)
    out = {"device": jax_part["device"], "versions": jax_part["versions"], "date_utc": jax_part["date_utc"],
           "commands": {"jax": jax_part["command"], "transformers": peer_part.get("command"),
                        "report": " ".join([sys.executable] + sys.argv)},
           "hbm_bandwidth_Bps": jax_part["hbm_bandwidth_Bps"], "model": jax_part["model"], "points": rows,
           "transformers": peer_part["peer"], "speculative": jax_part.get("speculative", []),
           "traces": jax_part.get("traces", []), "errors": jax_part["errors"] + peer_part["errors"],
           "note": args.note, "table": table}
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="all", choices=("all", "jax", "peer", "report"))
    ap.add_argument("--out_dir", default="experiments")
    ap.add_argument("--json", default=None)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "small.py"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. --set model.num_layers=4 (repeatable)")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--contexts", default="1024,8192,32768")
    ap.add_argument("--impls", default="absorbed,pallas", help="attention: absorbed (XLA), pallas (our kernel), "
                    "pallas@sN (the kernel with at most N context splits; pallas@s1: no merge kernels); +name suffixes: "
                    "XLA options (XLA_OPTIONS: lhs, cc, pdl, while) or the decode path as before session 22 "
                    "(VARIANTS: unmerged, eager_norms, gather_dot, slots_inner), e.g. pallas+unmerged+eager_norms+lhs")
    ap.add_argument("--moe_impl", default="auto", help="decode's MoE (decode.MOE_IMPLS), or several comma-separated, "
                    "each timed at every point in turn (the first is the one speculative decoding and profiles use)")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--speculative", action=argparse.BooleanOptionalAction, default=True,
                    help="also time MTP speculative decoding (batch 1, first context)")
    ap.add_argument("--dense_moe_rows", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the dense MoE at batch 1 and 8 (with --moe_impl=auto)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="time every variant this many times, in turn")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile_threads", type=int, default=12)
    ap.add_argument("--export", default=None, help="write the model here for the transformers peer")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--peer_points", default="1x1024,8x1024,1x8192")
    ap.add_argument("--peer_steps", type=int, default=16)
    ap.add_argument("--peer_budget_s", type=float, default=120.0)
    ap.add_argument("--peer_device", default="cuda")
    ap.add_argument("--bw_bytes", type=int, default=2 << 30)
    ap.add_argument("--inputs", default=None)
    ap.add_argument("--profile", action="store_true", help="write a perfetto trace of batch-1 decode per impl")
    ap.add_argument("--dump_hlo", action="store_true", help="write the batch-1 decode programs' optimised HLO")
    ap.add_argument("--note", default="", help="free text stored in the report JSON")
    args = ap.parse_args()
    args.batches = [int(x) for x in args.batches.split(",")]
    args.contexts = [int(x) for x in args.contexts.split(",")]
    args.impls = args.impls.split(",")
    args.moe_impls = args.moe_impl.split(",")
    args.moe_impl = args.moe_impls[0]
    if args.part in ("all", "jax"):
        from lcflash.infer.decode import MOE_IMPLS
        bad = [m for m in args.moe_impls if m not in MOE_IMPLS]
        if bad:
            raise SystemExit(f"--moe_impl: {bad} not in {MOE_IMPLS}")
    for impl in args.impls:
        xla_options(impl)   # an unknown +suffix fails here, before any compilation
    args.peer_points = [tuple(int(v) for v in p.split("x")) for p in args.peer_points.split(",") if p]
    if args.part == "jax":
        args.json = args.json or os.path.join(args.out_dir, "bench_decode_jax.json")
        return run_jax(args)
    if args.part == "peer":
        args.json = args.json or os.path.join(args.out_dir, "bench_decode_peer.json")
        return run_peer(args)
    if args.part == "report":
        args.inputs = args.inputs.split(",")
        args.json = args.json or os.path.join(args.out_dir, "bench_decode.json")
        return report(args)
    # all: each part in its own process, so JAX and torch never hold GPU memory at the same time.
    os.makedirs(args.out_dir, exist_ok=True)
    ckpt = os.path.join("/tmp", "lcflash_bench_decode_ckpt")
    jax_json = os.path.join(args.out_dir, "bench_decode_jax.json")
    peer_json = os.path.join(args.out_dir, "bench_decode_peer.json")
    common = [f"--config={args.config}", f"--steps={args.steps}", f"--reps={args.reps}"]
    common += [f"--set={kv}" for kv in args.set]
    py = [sys.executable, os.path.abspath(__file__)]
    subprocess.run(py + ["--part=jax", f"--json={jax_json}", f"--export={ckpt}",
                         f"--batches={','.join(map(str, args.batches))}",
                         f"--contexts={','.join(map(str, args.contexts))}", f"--impls={','.join(args.impls)}",
                         f"--moe_impl={','.join(args.moe_impls)}", f"--compile_threads={args.compile_threads}",
                         f"--bw_bytes={args.bw_bytes}"] + (["--profile"] if args.profile else []) + common)
    inputs = [jax_json]
    if args.peer_points:
        subprocess.run(py + ["--part=peer", f"--checkpoint={ckpt}", f"--json={peer_json}",
                             f"--peer_points={','.join(f'{b}x{c}' for b, c in args.peer_points)}",
                             f"--peer_steps={args.peer_steps}", f"--peer_budget_s={args.peer_budget_s}",
                             f"--peer_device={args.peer_device}"])
        if os.path.exists(peer_json):
            inputs.append(peer_json)
    if os.path.exists(jax_json):
        subprocess.run(py + ["--part=report", f"--inputs={','.join(inputs)}",
                             f"--json={args.json or os.path.join(args.out_dir, 'bench_decode.json')}"])


if __name__ == "__main__":
    main()
