"""Where a grouped-matmul kernel's time goes, from Mosaic GPU's in-kernel profiler (per-warpgroup timelines).

    python experiments/gmm_profile.py --out experiments/gmm_profile_h200.json [--proj down] [--groups 8] [--t 512]

The benchmark (bench_moe_gemm.py) only sees whole kernels, so its per-tile cost model cannot tell a slow main-loop
step from a fixed per-tile cost (gmm_notes.md, session 4). This runs one forward of a LongCat expert projection
(balanced, `--t` tokens per expert, `--groups` experts: fewer than LongCat's 64 so that every warpgroup's event
buffer fits in shared memory) for `pallas`, `pallas_chain` and `pallas_chain_cluster` (its rows kernel on 2-CTA
clusters, Tiles.cluster_m) with 3-stage rings (the profile buffer takes the 4th stage's shared memory), checks
each output against the einsum of the equal groups, and reports, per compute warpgroup and averaged over CTAs: time inside the kernels' named
scopes ("mma": wgmma issue and wait per step; "epilogue": a tile's store; "next_tile": the flat pipeline's
schedule loads) and the rest ("other": ring-barrier waits and pipeline bookkeeping), per step and per tile. The
kernel is also timed without the profiler, and the profiled trace is copied beside the JSON.
"""

import argparse
import collections
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
    "pallas_chain_cluster": ("pallas_chain", mgpu_kernels.Tiles(128, 128, 64, 3, 64, chain=True, cluster_m=True)),
}


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
        with tempfile.TemporaryDirectory() as d:
            mgpu_kernels.PROFILE = dict(profile_space=space, profile_dir=d)
            try:
                sync(jax.jit(lambda a, b: api.gmm(a, b, sizes, impl=impl))(x, w))
                jax.effects_barrier()  # the trace is written by a host callback
            finally:
                mgpu_kernels.PROFILE = None
            path = sorted(glob.glob(os.path.join(d, "*-trace.json")))[-1]
            with open(path) as f:
                trace = json.load(f)
            shutil.copy(path, os.path.join(keep_dir, f"gmm_trace_{variant}_{proj}.json"))
    finally:
        pallas_gmm.ROWS_TILES = None
    flops = 2.0 * m * k * n
    return dict(impl=variant, proj=proj, groups=groups, tokens_per_expert=t, K=k, N=n, unprofiled_ms=ms,
                unprofiled_tflops=flops / ms / 1e9, max_abs_err_vs_einsum=err, tiles=str(VARIANTS[variant][1]),
                warpgroups=summarize(trace))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="experiments/gmm_profile.json")
    ap.add_argument("--proj", default="down", choices=("gate_up", "down"))
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--t", type=int, default=512)
    ap.add_argument("--impls", default=",".join(VARIANTS))
    ap.add_argument("--space", type=int, default=512, help="profiler events per warpgroup (shared memory)")
    args = ap.parse_args()
    dev = jax.devices()[0]
    report = dict(device=dev.device_kind, jax=jax.__version__,
                  date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  command="python " + " ".join(sys.argv), results=[])
    keep = os.path.dirname(os.path.abspath(args.out))
    for impl in args.impls.split(","):
        try:
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
        for wg, scopes in rec["warpgroups"].items():
            for name, v in scopes.items():
                each = v["mean_us"] / v["count"] if v["count"] else float("nan")
                print(f"{rec['impl']:21} {rec['unprofiled_ms']:7.3f} {rec['max_abs_err_vs_einsum']:7.1e} {wg:>4} "
                      f"{name:10} {v['mean_us']:9.1f} {v['count'] or 0:6.0f} {each:8.3f}")


if __name__ == "__main__":
    main()
