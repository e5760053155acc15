"""Where a grouped-matmul kernel's time goes, from Mosaic GPU's in-kernel profiler (per-warpgroup timelines).

    python experiments/gmm_profile.py --out experiments/gmm_profile_h200.json [--proj down] [--groups 8] [--t 512]

The benchmark (bench_moe_gemm.py) only sees whole kernels, so its per-tile cost model cannot tell a slow main-loop
step from a fixed per-tile cost (gmm_notes.md, session 4). This runs one forward of a LongCat expert projection
(balanced, `--t` tokens per expert, `--groups` experts: fewer than LongCat's 64 so that every warpgroup's event
buffer fits in shared memory) for `pallas` and `pallas_chain` with 3-stage rings (the profile buffer takes the
4th stage's shared memory), checks each output against the einsum of the equal groups, and reports, per compute
warpgroup and averaged over CTAs: time inside the kernels' named
scopes ("mma": wgmma issue and wait per step; "epilogue": a tile's store; "next_tile": the flat pipeline's
schedule loads) and the rest ("other": ring-barrier waits and pipeline bookkeeping), per step and per tile. The
kernel is also timed without the profiler, and the profiled trace is copied beside the JSON.

    python experiments/gmm_profile.py --kernels plain,halves,grad_halves --groups 8 --t 1536 \
        --out experiments/gmm_profile_swiglu_h200.json

`--impls d_rhs` profiles the flat d_rhs kernel (bf16 output, 3 stages, bands of 4) at the same shapes, where an
epilogue ("epilogue", and in it "store_wait": the wait for the staging buffer's last TMA store) stops both
compute warpgroups every `--t / 64` steps:

    python experiments/gmm_profile.py --impls d_rhs --proj gate_up --groups 4 --t 512 \
        --out experiments/gmm_profile_d_rhs_h100.json

(4 groups at T = 512: 12 tiles of 8 steps per CTA, ~230 scopes per warpgroup, within `--space`'s 512.)

`--kernels` profiles the products configs/small.py trains instead, at its shapes (K 1024, [gate | up] 2 x 384) with
the flat pipeline: "plain" x @ [gate | up] stored as it is, "halves" the same with SwiGLU in the epilogue (h and
[g | u] stored), "grad_halves" the down projection's d_lhs with SwiGLU's backward in the epilogue (reads [g | u],
stores [d_g | d_u]). Each is also timed unprofiled with the tiles it trains with (`prod_ms`).
"""

import argparse
import collections
import dataclasses
import datetime
import glob
import json
import os
import shutil
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_moe_gemm import SHAPES, sync, time_ms  # noqa: E402  (experiments/ is on sys.path as a script)
from lcflash.kernels.gmm import api, mgpu_kernels, pallas_gmm  # noqa: E402

N_WARPGROUPS = 3  # per CTA: two wgmma warpgroups, then the TMA warpgroup (mgpu_kernels._persistent_call)


def summarize(trace: dict) -> dict:
    """Per-warpgroup time in each named scope of a Mosaic GPU profiler trace (Chrome "B"/"E" events; tid - 1 is
    the warpgroup's linear index, N_WARPGROUPS per CTA). Nested scopes count toward the innermost one only;
    "other" is the span from a warpgroup's first to its last event outside any scope."""
    per_wg = collections.defaultdict(list)
    for ev in trace["traceEvents"]:
        per_wg[ev["tid"]].append(ev)
    rows = collections.defaultdict(lambda: collections.defaultdict(list))  # wg -> name -> [per-CTA totals]
    counts = collections.defaultdict(lambda: collections.defaultdict(list))
    for tid, evs in per_wg.items():
        wg = (tid - 1) % N_WARPGROUPS
        evs = sorted(evs, key=lambda e: e["ts"])
        stack, own = [], collections.defaultdict(float)
        n = collections.Counter()
        last = evs[0]["ts"]
        for ev in evs:
            own[stack[-1] if stack else "other"] += ev["ts"] - last
            last = ev["ts"]
            if ev["ph"] == "B":
                stack.append(ev["name"])
                n[ev["name"]] += 1
            elif stack:
                stack.pop()
        for name, us in own.items():
            rows[wg][name].append(us)
        for name, c in n.items():
            counts[wg][name].append(c)
        rows[wg]["span"].append(evs[-1]["ts"] - evs[0]["ts"])
    out = {}
    for wg, by_name in sorted(rows.items()):
        out[f"wg{wg}"] = {name: dict(mean_us=float(np.mean(v)), max_us=float(np.max(v)),
                                     count=float(np.mean(counts[wg][name])) if counts[wg][name] else None)
                          for name, v in sorted(by_name.items())}
    return out


VARIANTS = {  # name -> (api impl, rows-kernel tiles); 3 stages leave shared memory for the profile buffer
    "pallas": ("pallas", mgpu_kernels.Tiles(128, 128, 64, 3, 64)),
    "pallas_chain": ("pallas_chain", mgpu_kernels.Tiles(128, 128, 64, 3, 64, chain=True)),
}


def fresh_jit(fn):
    """jax.jit of a new function object: jit caches by function, and the tiles and the profiler switch are read
    when it traces."""
    return jax.jit(lambda *a: fn(*a))


def profiled_trace(fn, args, space: int, keep_path: str) -> dict:
    """Runs fn(*args) once, freshly jitted, with Mosaic GPU's profiler on; returns its trace, copied to keep_path."""
    with tempfile.TemporaryDirectory() as d:
        mgpu_kernels.PROFILE = dict(profile_space=space, profile_dir=d)
        try:
            sync(fresh_jit(fn)(*args))
            jax.effects_barrier()  # the trace is written by a host callback
        finally:
            mgpu_kernels.PROFILE = None
        path = sorted(glob.glob(os.path.join(d, "*-trace.json")))[-1]
        with open(path) as f:
            trace = json.load(f)
        shutil.copy(path, keep_path)
    return trace


def profile_one(variant: str, proj: str, groups: int, t: int, space: int, keep_dir: str):
    k, n, _ = SHAPES[("longcat", proj)]
    m = groups * t
    keys = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    w = (jax.random.normal(keys[1], (groups, k, n), jnp.float32) / np.sqrt(k)).astype(jnp.bfloat16)
    sizes = jnp.full((groups,), t, jnp.int32)
    impl, pallas_gmm.ROWS_TILES = VARIANTS[variant]
    try:
        plain = jax.jit(lambda a, b: api.gmm(a, b, sizes, impl=impl))
        want = jnp.einsum("gtk,gkn->gtn", x.reshape(groups, t, k), w).reshape(m, n)
        got = plain(x, w)
        err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
        ms = time_ms(plain, (x, w))[0]
        trace = profiled_trace(lambda a, b: api.gmm(a, b, sizes, impl=impl), (x, w), space,
                               os.path.join(keep_dir, f"gmm_trace_{variant}_{proj}.json"))
    finally:
        pallas_gmm.ROWS_TILES = None
    flops = 2.0 * m * k * n
    return dict(impl=variant, proj=proj, groups=groups, tokens_per_expert=t, K=k, N=n, unprofiled_ms=ms,
                unprofiled_tflops=flops / ms / 1e9, max_abs_err_vs_einsum=err, tiles=str(VARIANTS[variant][1]),
                warpgroups=summarize(trace))


# The flat d_rhs kernel's default tiles at LongCat's shapes with a 3-deep ring (the profile buffer takes the 4th).
CONTRACT_TILES = mgpu_kernels.Tiles(128, 128, 64, 3, 64, chain=True, band=4)


def profile_contract(proj: str, groups: int, t: int, space: int, keep_dir: str):
    """d_rhs of a LongCat projection (lhs^T @ dout per group, bf16 output as the backward writes it) through the
    flat contract kernel: checked against the einsum, timed unprofiled with its default tiles (prod_ms) and with
    CONTRACT_TILES, then profiled with CONTRACT_TILES."""
    k, n, _ = SHAPES[("longcat", proj)]
    m = groups * t
    keys = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    dy = jax.random.normal(keys[1], (m, n), jnp.bfloat16)
    sizes = jnp.full((groups,), t, jnp.int32)
    fn = lambda a, b: pallas_gmm.contract_matmul(a, b, sizes, out_dtype=jnp.bfloat16, chain=True)  # noqa: E731
    want = jnp.einsum("gtk,gtn->gkn", x.reshape(groups, t, k), dy.reshape(groups, t, n),
                      preferred_element_type=jnp.float32)
    prod_ms = time_ms(fresh_jit(fn), (x, dy))[0]
    pallas_gmm.CONTRACT_TILES = CONTRACT_TILES
    try:
        got = fresh_jit(fn)(x, dy)
        err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)))
        ms = time_ms(fresh_jit(fn), (x, dy))[0]
        trace = profiled_trace(fn, (x, dy), space, os.path.join(keep_dir, f"gmm_trace_d_rhs_{proj}.json"))
    finally:
        pallas_gmm.CONTRACT_TILES = None
    flops = 2.0 * m * k * n
    return dict(impl="d_rhs", proj=proj, groups=groups, tokens_per_expert=t, K=k, N=n, prod_ms=prod_ms,
                unprofiled_ms=ms, unprofiled_tflops=flops / ms / 1e9, max_abs_err_vs_einsum=err,
                max_rel_err_vs_einsum=err / float(jnp.max(jnp.abs(want))), tiles=str(CONTRACT_TILES),
                warpgroups=summarize(trace))


SMALL_TILES = mgpu_kernels.Tiles(128, 64, 64, 3, 64, chain=True)  # 64-column halves; 3 stages (profile buffer)
SMALL_KERNELS = ("plain", "halves", "grad_halves")  # _small_case's products


def _small_case(kernel: str, groups: int, t: int):
    """(fn(*args) -> output checked, args, reference output, FLOPs) of one of configs/small.py's products."""
    k, n, _ = SHAPES[("small", "gate_up")]  # d_model 1024 -> 384 per half
    m = groups * t
    keys = jax.random.split(jax.random.key(0), 3)
    sizes = jnp.full((groups,), t, jnp.int32)
    per_group = lambda a: a.reshape(groups, t, a.shape[-1])  # noqa: E731
    if kernel in ("plain", "halves"):
        x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
        w = (jax.random.normal(keys[1], (groups, k, 2 * n), jnp.float32) / np.sqrt(k)).astype(jnp.bfloat16)
        gu = jnp.einsum("gtk,gkn->gtn", per_group(x), w, preferred_element_type=jnp.float32).reshape(m, 2 * n)
        if kernel == "plain":
            return (lambda a, b: pallas_gmm.rows_matmul(a, [b], sizes, chain=True)), (x, w), gu, 2.0 * m * k * 2 * n
        h = jax.nn.silu(gu[:, :n]) * gu[:, n:]
        return (lambda a, b: pallas_gmm.rows_matmul(a, [b], sizes, swiglu=kernel, chain=True,
                                                    zero_tail=(True, False))[0]), (x, w), h, 2.0 * m * k * 2 * n
    dy = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    w_down = (jax.random.normal(keys[1], (groups, n, k), jnp.float32) / np.sqrt(n)).astype(jnp.bfloat16)
    gu = jax.random.normal(keys[2], (m, 2 * n), jnp.bfloat16)
    dh = jnp.einsum("gtk,gnk->gtn", per_group(dy), w_down, preferred_element_type=jnp.float32).reshape(m, n)
    g, u = gu[:, :n].astype(jnp.float32), gu[:, n:].astype(jnp.float32)
    sig = jax.nn.sigmoid(g)
    d_g, d_u = dh * u * sig * (1 + g * (1 - sig)), dh * g * sig
    want = jnp.concatenate([d_g, d_u], axis=1)
    fn = lambda a, b, c: pallas_gmm.rows_matmul(a, [b], sizes, transpose_rhs=True, swiglu=kernel,  # noqa
                                                gu_mn2=c, chain=True, zero_tail=(False,))
    return fn, (dy, w_down, gu), want, 2.0 * m * k * n


def profile_small(kernel: str, groups: int, t: int, space: int, keep_dir: str):
    fn, args, want, flops = _small_case(kernel, groups, t)
    prod = jax.jit(fn)
    got = prod(*args)
    err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)))
    prod_ms = time_ms(prod, args)[0]
    pallas_gmm.ROWS_TILES = SMALL_TILES
    try:
        ms = time_ms(fresh_jit(fn), args)[0]
        trace = profiled_trace(fn, args, space, os.path.join(keep_dir, f"gmm_trace_small_{kernel}.json"))
    finally:
        pallas_gmm.ROWS_TILES = None
    return dict(impl=kernel, config="small", groups=groups, tokens_per_expert=t, prod_ms=prod_ms,
                unprofiled_ms=ms, unprofiled_tflops=flops / ms / 1e9, max_abs_err_vs_einsum=err,
                tiles=str(SMALL_TILES), warpgroups=summarize(trace))


def tiles_ab(kernels, groups: int, t: int, rounds: int = 2) -> list:
    """Unprofiled wall time of each of configs/small.py's products with the tiles it trains with (prod) and with
    3- and 4-stage flat rings of 64-column halves, `rounds` times in turn."""
    rows = []
    variants = (("prod", None), ("s3", SMALL_TILES), ("s4", dataclasses.replace(SMALL_TILES, stages=4)))
    for kernel in kernels:
        fn, args, _, flops = _small_case(kernel, groups, t)
        for rnd in range(rounds):
            for name, tiles in variants:
                pallas_gmm.ROWS_TILES = tiles
                try:
                    ms = time_ms(fresh_jit(fn), args)
                finally:
                    pallas_gmm.ROWS_TILES = None
                rows.append(dict(kernel=kernel, groups=groups, tokens_per_expert=t, round=rnd, tiles=name,
                                 ms=ms[0], ms_min=ms[1], ms_max=ms[2], tflops=flops / ms[0] / 1e9))
                print(f"{kernel:12} {groups:4} x {t:5} round {rnd} {name:5} {ms[0]:.4f} ms ({ms[1]:.4f}-{ms[2]:.4f}) "
                      f"{rows[-1]['tflops']:.0f} TFLOP/s", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="experiments/gmm_profile.json")
    ap.add_argument("--proj", default="down", choices=("gate_up", "down"))
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--t", type=int, default=512)
    ap.add_argument("--impls", default=",".join(VARIANTS), help=f"of {list(VARIANTS)} (the forward) and d_rhs "
                    "(the flat d_rhs kernel, bf16 output)")
    ap.add_argument("--kernels", default=None, help="instead of --impls: configs/small.py's products, of "
                    "plain, halves, grad_halves (flat pipeline, 3 stages)")
    ap.add_argument("--tiles-ab", action="store_true", help="with --kernels: time them unprofiled, as trained "
                    "and with 3- and 4-stage rings (no profile)")
    ap.add_argument("--space", type=int, default=512, help="profiler scopes per warpgroup (shared memory: 16 "
                    "bytes each; more scopes than this overwrite shared memory past the buffer)")
    args = ap.parse_args()
    names = args.kernels.split(",") if args.kernels else args.impls.split(",")
    known = SMALL_KERNELS if args.kernels else (*VARIANTS, "d_rhs")
    if set(names) - set(known):
        ap.error(f"--{'kernels' if args.kernels else 'impls'} {sorted(set(names) - set(known))}: not among "
                 f"{list(known)}")
    dev = jax.devices()[0]
    report = dict(device=dev.device_kind, jax=jax.__version__,
                  date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  command="python " + " ".join(sys.argv), results=[])
    keep = os.path.dirname(os.path.abspath(args.out))
    if args.tiles_ab:
        report["results"] = tiles_ab((args.kernels or "halves,plain").split(","), args.groups, args.t)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        return
    for impl in names:
        try:
            if args.kernels:
                rec = profile_small(impl, args.groups, args.t, args.space, keep)
            elif impl == "d_rhs":
                rec = profile_contract(args.proj, args.groups, args.t, args.space, keep)
            else:
                rec = profile_one(impl, args.proj, args.groups, args.t, args.space, keep)
        except Exception as e:  # noqa: BLE001  (one failing variant must not lose the others)
            rec = dict(impl=impl, error=f"{type(e).__name__}: {str(e)[:400]}")
        report["results"].append(rec)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(f"{'variant':21} {'ms':>7} {'err':>7} {'wg':>4} {'scope':10} {'mean us':>9} {'count':>6} {'us/each':>8}")
    for rec in report["results"]:
        if "error" in rec:
            print(f"{rec['impl']:21} {rec['error'][:100]}")
            continue
        if "prod_ms" in rec:
            print(f"{rec['impl']:21} with its default tiles (4 stages where they fit): {rec['prod_ms']:.3f} ms")
        for wg, scopes in rec["warpgroups"].items():
            for name, v in scopes.items():
                each = v["mean_us"] / v["count"] if v["count"] else float("nan")
                print(f"{rec['impl']:21} {rec['unprofiled_ms']:7.3f} {rec['max_abs_err_vs_einsum']:7.1e} {wg:>4} "
                      f"{name:10} {v['mean_us']:9.1f} {v['count'] or 0:6.0f} {each:8.3f}")


if __name__ == "__main__":
    main()
