"""Benchmark the MoE expert grouped matmuls: ours (`pallas`), JAX's example kernel (`jax_mgpu`), tokamax's (`tokamax`,
where it is installed: Python >= 3.12), XLA `ragged_dot`.

For every case (config, projection, tokens per expert, load) and implementation it times the forward and the
forward+backward (backward = difference), and reports TFLOP/s, the ratio to a batched einsum of equal FLOPs on
equal groups (the upper bound), and for <= 64 tokens per expert the ratio to the bytes/bandwidth floor (weights +
activations over the measured device-copy bandwidth). The kernels' outputs (ours and the peers') are checked against
the einsum (balanced loads) or a padded einsum (skewed loads) before they are timed. Times are wall-clock medians;
`--device-time` also times the cases of <= 64 tokens per expert by the device's busy time per call (a profiler
trace), since the wall clock cannot resolve products of tens of microseconds (`device_ms`).

    python experiments/bench_moe_gemm.py --out experiments/bench_moe_gemm.json [--quick] [--sweep] [--budget-s S]

`--chain-ab` times only LongCat gate/up and down at T=512 (balanced) for `pallas` (per-tile pipelines),
`pallas_chain` (one flat pipeline per CTA in every kernel) and the einsum bound, then d_rhs alone (contract
kernel per-tile vs one flat pipeline per CTA vs the einsum "gtk,gtn->gkn");
`--rows-ab flat,overlap,...` times only the rows kernel (forward and d_lhs, flat pipeline) in the listed variants
(one wgmma in flight, column bands, ...; `ROWS_VARIANTS`) at LongCat's shapes, T = `--rows-ab-tokens` (512);
`--swiglu-only` times only gate + up + SwiGLU (LongCat and configs/small.py gate/up, T=512): the [gate | up]
kernel with SwiGLU in its epilogue against the same gmm followed by XLA's SwiGLU (`swiglu_cases`);
`--sweep` then adds the flat d_rhs kernel with one wgmma left in flight per step (`Tiles.overlap_mma`) and with a
3-deep ring and 128-column stores;
`--small-sweep T` times only configs/small.py's [gate | up] and down products at T tokens per expert, pallas_chain
with pinned tile variants against the einsum bound; `--deal-ab T` only the flat d_rhs kernel there, its tiles dealt
to the CTAs each way of `mgpu_kernels.CONTRACT_DEALS`, at equal and Dirichlet-skewed expert sizes
(`--deal-config longcat`: at LongCat's shapes).
"""

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lcflash.kernels.gmm import api, mgpu_kernels, pallas_gmm  # noqa: E402
from lcflash.parallel import trace_overlap  # noqa: E402

# (config, projection, K, N, experts): LongCat with 64 local experts (an EP slice of 512), configs/small.py.
SHAPES = {
    ("longcat", "gate_up"): (6144, 2048, 64),
    ("longcat", "down"): (2048, 6144, 64),
    ("small", "gate_up"): (1024, 384, 128),
    ("small", "down"): (384, 1024, 128),
    ("small", "gate_up_fused"): (1024, 768, 128),   # [gate | up] as configs/small.py trains it (moe.fuse_gate_up)
}
# Each config's two expert products as the benches time them (configs/small.py trains [gate | up] fused).
PROJS = {"small": ("gate_up_fused", "down"), "longcat": ("gate_up", "down")}
RAGGED_DOT_MAX_T = 512  # ragged_dot materialises [M, G, N]-sized intermediates: out of memory beyond this
RAGGED_DOT_MAX_T_BWD = 64  # its backward ran out of memory at T=512 on an 80 GB H100


def sync(x):
    jax.tree.map(lambda a: a.block_until_ready(), x)


def time_ms(f, args, min_batch_ms=20.0, repeats=3):
    """Median wall time per call: batches of back-to-back async calls, one sync per batch."""
    sync(f(*args))  # compile + warm
    t0 = time.perf_counter()
    sync(f(*args))
    one = (time.perf_counter() - t0) * 1e3
    inner = max(1, min(50, int(min_batch_ms / max(one, 1e-3))))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = [f(*args) for _ in range(inner)]
        sync(outs)
        times.append((time.perf_counter() - t0) * 1e3 / inner)
        del outs
    return float(np.median(times)), float(np.min(times)), float(np.max(times))


def busy_us(kernels) -> float:
    """Microseconds during which at least one of `kernels` (trace events) runs: overlapping streams count once."""
    return sum(b - a for a, b in trace_overlap.merge_intervals((e.start, e.start + e.dur) for e in kernels))


def device_ms(f, args, calls=20, kernels_us=None):
    """The device's busy time per call, from a profiler trace of `calls` back-to-back calls; `kernels_us` (a dict)
    receives each kernel's microseconds per call. Wall time (time_ms) cannot resolve products of tens of
    microseconds: at configs/small.py's T = 64 its rounds spread 2x and its backward (fwd + bwd less fwd) came out
    below the bytes floor (session 46)."""
    sync(f(*args))
    with tempfile.TemporaryDirectory(prefix="lcflash_bench_") as tdir:
        path = os.path.join(tdir, "trace.json.gz")
        trace_overlap.record_trace(lambda: sync(_last_of(f, args, calls)), path, python_frames=False)
        by_name, kernels, seen = trace_overlap.kernel_totals(path)
    if not kernels:
        raise RuntimeError(f"device_ms: the trace holds no device kernels (processes seen: {seen['processes']}); "
                           "it times GPU kernels, use time_ms elsewhere")
    if kernels_us is not None:
        kernels_us.update({name: us / calls for name, (_, us) in by_name.items()})
    return busy_us(kernels) / calls / 1e3


def _last_of(f, args, calls: int):
    """f(*args) `calls` times back to back, keeping only the last output alive: twenty of LongCat's T = 4096
    backward outputs (4.6 GiB each) ran an H200 out of memory (session 47)."""
    out = None
    for _ in range(calls):
        out = f(*args)
    return out


def rotated(names, r):
    """Round r's order: names started at r (mod their count), so that no variant always runs first, right after
    the einsum's compute-bound burst, or always in one place of the round."""
    r %= max(len(names), 1)
    return list(names[r:]) + list(names[:r])


def rotated_rounds(fns: dict, args, rounds: int) -> dict:
    """{name: [median ms per round]} of each callable in fns on args, each round in rotated order."""
    ms = {name: [] for name in fns}
    for r in range(rounds):
        for name in rotated(list(fns), r):
            ms[name].append(time_ms(fns[name], args)[0])
    return ms


def measure_bandwidth_gbs():
    x = jnp.ones((1 << 30,), jnp.bfloat16)  # 2 GiB
    f = jax.jit(lambda a: a + 1)
    ms, _, _ = time_ms(f, (x,), repeats=5)
    return 2 * x.size * 2 / (ms * 1e-3) / 1e9  # bytes read + written


def measure_matmul_tflops():
    a = jax.random.normal(jax.random.key(0), (8192, 8192), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (8192, 8192), jnp.bfloat16)
    ms, _, _ = time_ms(jax.jit(jnp.dot), (a, b))
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def group_sizes(g, t, load, seed=0):
    """g group sizes summing to g * t: equal ("balanced"), "skewed", or (a float alpha) Dirichlet(alpha) shares."""
    if load == "balanced":
        return np.full(g, t, np.int64)
    rng = np.random.default_rng(seed)
    if isinstance(load, float):
        return rng.multinomial(g * t, rng.dirichlet(np.full(g, load)))
    p = rng.dirichlet(np.full(g, 0.3))  # a few hot experts, many cold or empty ones
    p[rng.choice(g, g // 8, replace=False)] = 0.0
    return rng.multinomial(g * t, p / p.sum())


def rel_err(a, b):
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def padded_reference(x, w, sizes, dy):
    """Forward and grads through a padded batched einsum (rows scattered to [G, Tmax, K])."""
    g, tmax = len(sizes), max(int(sizes.max()), 1)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    idx = np.zeros((g, tmax), np.int64)
    valid = np.zeros((g, tmax), bool)
    for i, (s, n) in enumerate(zip(starts, sizes)):
        idx[i, :n] = np.arange(s, s + n)
        valid[i, :n] = True
    idx, valid = jnp.asarray(idx), jnp.asarray(valid)

    def f(x, w):
        xp = jnp.where(valid[..., None], x[idx], 0)
        yp = jnp.einsum("gtk,gkn->gtn", xp, w, preferred_element_type=jnp.float32)
        y = jnp.zeros((x.shape[0], w.shape[2]), jnp.float32).at[idx].add(jnp.where(valid[..., None], yp, 0))
        return y.astype(x.dtype)

    y, vjp = jax.vjp(f, x, w)
    return (y, *vjp(dy))


def gmm_fn(impl, sizes):
    if impl == "einsum":
        g = sizes.shape[0]
        return lambda x, w: jnp.einsum("gtk,gkn->gtn", x.reshape(g, -1, x.shape[1]), w).reshape(x.shape[0], -1)
    return lambda x, w: api.gmm(x, w, sizes, impl=impl)


def fwd_bwd_fn(f):
    def run(x, w, dy):
        y, vjp = jax.vjp(f, x, w)
        return (y, *vjp(dy))

    return run


# Implementations whose outputs are not checked before they are timed: the bound itself and XLA's.
UNCHECKED = ("einsum", "ragged_dot", "reference")


def check_suffix(impl: str) -> str:
    """Row keys of an impl's correctness check: check_rel_err for pallas, check_rel_err_pallas_chain, ..."""
    return "" if impl == "pallas" else "_" + impl


def run_case(cfg, proj, t, load, impls, bw_gbs, results, check=True, rounds=1, device_time=False):
    k, n, g = SHAPES[(cfg, proj)]
    sizes_np = group_sizes(g, t, load)
    m = g * t
    keys = jax.random.split(jax.random.key(t + k), 3)
    x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    w = (jax.random.normal(keys[1], (g, k, n), jnp.float32) / np.sqrt(k)).astype(jnp.bfloat16)
    dy = jax.random.normal(keys[2], (m, n), jnp.bfloat16)
    sizes = jnp.asarray(sizes_np, jnp.int32)
    flops = 2.0 * m * k * n
    bytes_fwd = 2.0 * (g * k * n + m * k + m * n)
    bytes_bwd = 2.0 * (2 * g * k * n + 2 * m * n + 2 * m * k)
    row = dict(config=cfg, proj=proj, K=k, N=n, G=g, tokens_per_expert=t, load=load, M=m,
               max_group=int(sizes_np.max()), empty_groups=int((sizes_np == 0).sum()), impls={})

    for ours in [i for i in impls if i not in UNCHECKED] if check else []:
        key = check_suffix(ours)
        try:
            got = jax.jit(fwd_bwd_fn(gmm_fn(ours, sizes)))(x, w, dy)
            if load == "balanced":
                want = jax.jit(fwd_bwd_fn(gmm_fn("einsum", sizes)))(x, w, dy)
            elif g * int(sizes_np.max()) * max(k, n) * 2 < 8e9:
                want = padded_reference(x, w, sizes_np, dy)
            else:
                want = None
            if want is not None:
                row["check_rel_err" + key] = dict(zip(("out", "d_lhs", "d_rhs"),
                                                      (rel_err(a, b) for a, b in zip(got, want))))
            del got, want
        except Exception as e:  # noqa: BLE001 - reported in the table
            row["check_error" + key] = f"{type(e).__name__}: {str(e)[:300]}"

    timed = {}   # impl -> (forward, forward + backward or None), compiled on first use
    for impl in impls:
        if impl == "ragged_dot" and t > RAGGED_DOT_MAX_T:
            row["impls"][impl] = dict(skipped=f"t > {RAGGED_DOT_MAX_T}: intermediates exceed memory")
            continue
        if impl == "einsum" and load != "balanced":
            continue
        f = gmm_fn(impl, sizes)
        no_bwd = impl == "ragged_dot" and t > RAGGED_DOT_MAX_T_BWD
        timed[impl] = (jax.jit(f), None if no_bwd else jax.jit(fwd_bwd_fn(f)))
        row["impls"][impl] = {}
    # Rounds alternate the implementations, so that each sees the board in the same states (it runs compute-bound
    # work at its power cap, and its clock drifts over a run); each figure is the median over rounds.
    for _ in range(rounds):
        for impl, (fwd, both) in timed.items():
            rec = row["impls"][impl]
            try:
                for key, f, args in (("fwd", fwd, (x, w)), ("fwdbwd", both, (x, w, dy))):
                    if "error" in rec:
                        break
                    if f is None:
                        rec["bwd_skipped"] = f"t > {RAGGED_DOT_MAX_T_BWD}: out of memory at T=512 (48 GiB intermediate)"
                        continue
                    ms, lo, hi = time_ms(f, args)
                    rec.setdefault(f"{key}_ms_rounds", []).append(ms)
                    span = rec.setdefault(f"{key}_ms_range", [lo, hi])
                    span[:] = [min(span[0], lo), max(span[1], hi)]
                    if device_time:   # each kernel's share from the last round
                        per_kernel = rec.setdefault(f"{key}_device_kernels_us", {})
                        rec.setdefault(f"{key}_device_ms_rounds", []).append(device_ms(f, args, kernels_us=per_kernel))
            except Exception as e:  # noqa: BLE001 - reported in the table
                rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    for rec in row["impls"].values():
        for clock in ("", "_device"):  # wall time; with device_time also the device's busy time
            if f"fwdbwd{clock}_ms_rounds" in rec:
                rec[f"bwd{clock}_ms_rounds"] = [b - f for f, b in zip(rec[f"fwd{clock}_ms_rounds"],
                                                                      rec[f"fwdbwd{clock}_ms_rounds"])]
            for key in ("fwd", "fwdbwd", "bwd"):
                if f"{key}{clock}_ms_rounds" in rec:
                    rec[f"{key}{clock}_ms"] = float(np.median(rec[f"{key}{clock}_ms_rounds"]))
        for key, products in (("fwd", 1), ("bwd", 2)):
            for clock in ("", "_device"):
                if f"{key}{clock}_ms" in rec:
                    rec[f"{key}{clock}_tflops"] = products * flops / rec[f"{key}{clock}_ms"] / 1e9
    ein = row["impls"].get("einsum", {})
    for impl, rec in row["impls"].items():   # each round's ratio to the einsum of the same round
        for key in ("fwd", "bwd"):
            if impl != "einsum" and f"{key}_ms_rounds" in rec and f"{key}_ms_rounds" in ein:
                rec[f"{key}_vs_einsum_rounds"] = [e / o for e, o in zip(ein[f"{key}_ms_rounds"],
                                                                        rec[f"{key}_ms_rounds"])]
    row["bytes_floor_fwd_ms"] = bytes_fwd / (bw_gbs * 1e6)
    row["bytes_floor_bwd_ms"] = bytes_bwd / (bw_gbs * 1e6)
    results.append(row)
    return row


def bound_for(results, row):
    for r in results:
        if (r["config"], r["proj"], r["tokens_per_expert"], r["load"]) == (row["config"], row["proj"],
                                                                           row["tokens_per_expert"], "balanced"):
            return r["impls"].get("einsum", {})
    return {}


def format_table(results):
    lines = [f"{'case':34} {'impl':12} {'fwd ms':>8} {'TF/s':>6} {'/ein':>5} {'/floor':>6} | "
             f"{'bwd ms':>8} {'TF/s':>6} {'/ein':>5} {'/floor':>6} | check"]
    for r in results:
        case = f"{r['config']}/{r['proj']} T={r['tokens_per_expert']} {r['load']}"
        ein = bound_for(results, r)
        for impl, rec in r["impls"].items():
            key = check_suffix(impl)
            chk = r.get("check_rel_err" + key) or r.get("check_error" + key, "")
            if isinstance(chk, dict):
                chk = " ".join(f"{k}={v:.1e}" for k, v in chk.items())
            if "fwd_ms" not in rec:
                lines.append(f"{case:34} {impl:12} {rec.get('error', rec.get('skipped', ''))[:90]}")
                continue
            small = r["tokens_per_expert"] <= 64

            def col(key, clock=""):
                ms = rec.get(f"{key}{clock}_ms")
                if ms is None:
                    return f"{'':>8} {'':>6} {'':>5} {'':>6}"
                ratio = ein.get(f"{key}{clock}_ms", float("nan")) / ms if ein else float("nan")
                floor = ms / r[f"bytes_floor_{key}_ms"] if small else float("nan")
                return f"{ms:8.3f} {rec[f'{key}{clock}_tflops']:6.0f} {ratio:5.2f} {floor:6.2f}"

            lines.append(f"{case:34} {impl:12} {col('fwd')} | {col('bwd')} | "
                         f"{chk if impl not in UNCHECKED else rec.get('error', rec.get('bwd_skipped', ''))[:60]}")
            if "fwd_device_ms" in rec:
                lines.append(f"{'':34} {'  by device':12} {col('fwd', '_device')} | {col('bwd', '_device')} |")
    lines.append("/ein: batched-einsum time / this time (1.00 = at the bound); /floor: this time / bytes-over-bandwidth "
                 "floor (T <= 64 only); bwd = (fwd+bwd) - fwd; 'by device': the device's busy time per call "
                 "(--device-time)")
    return "\n".join(lines)


def cases(quick, chain_ab=False):
    """Cases in priority order (the budget may stop the list early)."""
    if chain_ab:
        return [("longcat", p, 512, "balanced") for p in ("gate_up", "down")]
    if quick:
        return [("longcat", p, t, "balanced") for t in (512, 8) for p in ("gate_up", "down")]
    order = [("longcat", 512, "balanced"), ("swiglu", 512, None), ("longcat", 64, "balanced"),
             ("longcat", 512, "skewed"), ("longcat", 4096, "balanced"), ("small", 512, "balanced"),
             ("longcat", 8, "balanced"), ("longcat", 2048, "balanced"), ("small", 64, "balanced"),
             ("longcat", 4096, "skewed"), ("small", 4096, "balanced"), ("small", 512, "skewed"),
             ("longcat", 64, "skewed"), ("small", 8, "balanced")]
    out = []
    for cfg, t, load in order:
        if cfg == "swiglu":
            out.append(("swiglu", None, t, None))
            continue
        out.extend((cfg, p, t, load) for p in ("gate_up", "down"))
    return out


def sweep(bw_gbs, within_budget):
    """Tile variants of ours at LongCat T=512; the heuristics in pallas_gmm use the winners."""
    T = mgpu_kernels.Tiles
    runs = [("pallas", "gate_up", T(128, 128, 64, 4, 64), None), ("pallas", "down", T(128, 128, 64, 4, 64), None),
            ("pallas", "gate_up", None, T(128, 128, 128, 2, 64)), ("pallas", "down", None, T(128, 128, 128, 2, 64))]
    out = []
    for impl, proj, rows_tiles, contract_tiles in runs:
        if not within_budget():
            break
        out.append(pinned_case("sweep", "longcat", proj, 512, impl, rows_tiles, contract_tiles, bw_gbs))
    return out


def pinned_case(tag, cfg, proj, t, impl, rows_tiles, contract_tiles, bw_gbs):
    """One balanced case of `impl` with pallas_gmm's tiles pinned (None: the heuristics'), as a printed record."""
    pallas_gmm.ROWS_TILES, pallas_gmm.CONTRACT_TILES = rows_tiles, contract_tiles
    try:
        row = run_case(cfg, proj, t, "balanced", [impl], bw_gbs, [], check=False)
    finally:
        pallas_gmm.ROWS_TILES = pallas_gmm.CONTRACT_TILES = None
    rec = dict(proj=proj, tokens_per_expert=t, impl=impl, rows_tiles=str(rows_tiles),
               contract_tiles=str(contract_tiles), **row["impls"][impl])
    print(tag, json.dumps(rec), flush=True)
    return rec


def small_sweep(bw_gbs, t, within_budget, config="small"):
    """configs/small.py's expert products at its training load (T tokens per expert, balanced): pallas_chain with
    the heuristic tiles and with pinned variants (rows kernel: forward and d_lhs; contract kernel: d_rhs), against
    the batched einsum of each projection, the upper bound. The heuristics were tuned at LongCat's shapes on an
    H200; config="longcat" runs the same variants at those shapes (on an H100 its down forward ran at 0.66-0.72 of
    the einsum at T = 4096, session 40)."""
    T = mgpu_kernels.Tiles
    rows_variants = [None, T(128, 64, 64, 4, 64, chain=True), T(64, 128, 64, 4, 128, chain=True),
                     T(128, 128, 128, 2, 128, chain=True), T(128, 128, 64, 3, 128, chain=True)]
    contract_variants = [T(128, 64, 64, 4, 64, chain=True), T(128, 128, 128, 2, 64, chain=True),
                         T(64, 128, 64, 4, 64, chain=True)]
    runs = [(r, None) for r in rows_variants] + [(None, c) for c in contract_variants]
    out = []
    for proj in PROJS[config]:
        row = run_case(config, proj, t, "balanced", ["einsum"], bw_gbs, [], check=False)
        out.append(dict(proj=proj, tokens_per_expert=t, impl="einsum", **row["impls"]["einsum"]))
        print("small_sweep", json.dumps(out[-1]), flush=True)
        for rows_tiles, contract_tiles in runs:
            if not within_budget():
                return out
            out.append(pinned_case("small_sweep", config, proj, t, "pallas_chain", rows_tiles, contract_tiles,
                                   bw_gbs))
    return out


def deal_ab(t, config="small", alphas=(None, 10.0, 2.0, 0.5), rounds=2, deals=None, bands=(0,), nomask=False,
            zeros=False):
    """The flat d_rhs kernel with its tiles dealt to the CTAs each way of mgpu_kernels.CONTRACT_DEALS (or `deals`),
    each with its tiles in column bands of each of `bands` (pallas_gmm.CONTRACT_BAND; 0 none; variant
    "deal+bandB"), at `config`'s expert shapes (SHAPES) and T tokens per expert: equal groups (None) and
    Dirichlet(alpha) expert shares (smaller alpha, more skew). Rounds alternate the variants, in rotated order, with
    the batched einsum's bound on equal groups among them (per_einsum); the outputs must be bitwise equal (the same
    tiles, each accumulated in the same order). nomask: each deal also without the masking of the row blocks that
    groups share ("deal+nomask", mgpu_kernels.CONTRACT_MASK off): what the masking costs, from wrong gradients,
    so those variants stay out of the bitwise check. zeros: each deal also with the empty groups' tiles stored
    after the pipeline ("deal+zeros", mgpu_kernels.CONTRACT_ZERO_EMPTY on), and the others with it off."""
    out = []
    deals = deals or [d for d in mgpu_kernels.CONTRACT_DEALS if d != "auto"]  # auto is one of the others
    zero_default = False if zeros else mgpu_kernels.CONTRACT_ZERO_EMPTY
    variants = {(f"{d}+band{b}" if b else d): (d, b, True, zero_default) for b in bands for d in deals}
    if nomask:
        variants.update({f"{d}+nomask": (d, 0, False, zero_default) for d in deals})
    if zeros:
        variants.update({f"{d}+zeros": (d, 0, True, True) for d in deals})
    for proj in PROJS[config]:
        k, n, g = SHAPES[(config, proj)]
        m = g * t
        keys = jax.random.split(jax.random.key(t + k), 2)
        x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
        dy = jax.random.normal(keys[1], (m, n), jnp.bfloat16)
        for alpha in alphas:
            sizes_np = group_sizes(g, t, "balanced" if alpha is None else alpha)
            sizes = jnp.asarray(sizes_np, jnp.int32)
            fns, got = {}, {}
            switches = "CONTRACT_DEAL", "CONTRACT_BAND", "CONTRACT_MASK", "CONTRACT_ZERO_EMPTY"
            homes = mgpu_kernels, pallas_gmm, mgpu_kernels, mgpu_kernels
            default = [getattr(h, a) for h, a in zip(homes, switches)]
            try:
                for name, setting in variants.items():
                    for h, a, v in zip(homes, switches, setting):  # read when traced below
                        setattr(h, a, v)
                    fns[name] = jax.jit(lambda a, b, s: pallas_gmm.contract_matmul(a, b, s, out_dtype=jnp.float32,
                                                                                    chain=True))
                    got[name] = np.asarray(fns[name](x, dy, sizes))
            finally:
                for h, a, v in zip(homes, switches, default):
                    setattr(h, a, v)
            if alpha is None:   # the bound: a batched einsum of the same product on the equal groups
                fns["einsum"] = jax.jit(lambda a, b, s: jnp.einsum("gtk,gtn->gkn", a.reshape(g, t, k),
                                                                   b.reshape(g, t, n),
                                                                   preferred_element_type=jnp.float32))
            times = rotated_rounds(fns, (x, dy, sizes), rounds)
            first, *rest = [v for v, (_, _, mask, _) in variants.items() if mask]
            rec = dict(config=config, proj=proj, K=k, N=n, G=g, tokens_per_expert=t, alpha=alpha,
                       size_cv=float(sizes_np.std() / sizes_np.mean()), max_group=int(sizes_np.max()),
                       ms=times, bitwise_equal=all(np.array_equal(got[first], got[v]) for v in rest))
            if "einsum" in times:
                rec["per_einsum"] = {v: float(np.median(times["einsum"]) / np.median(times[v])) for v in variants}
                rec["rel_err_vs_einsum"] = rel_err(got[first], fns["einsum"](x, dy, sizes))
            print("deal_ab", json.dumps(rec), flush=True)
            out.append(rec)
    return out


def d_rhs_ab(proj, t, sweep_variants=False):
    """d_rhs alone at LongCat T=t (balanced): the contract kernel per tile vs one flat pipeline per CTA, against
    the batched einsum of the same product. Both variants must agree bit for bit (same tiles, same order)."""
    T = mgpu_kernels.Tiles
    k, n, g = SHAPES[("longcat", proj)]
    m = g * t
    keys = jax.random.split(jax.random.key(t + k), 3)
    x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    dy = jax.random.normal(keys[2], (m, n), jnp.bfloat16)
    sizes = jnp.full((g,), t, jnp.int32)
    flops = 2.0 * m * k * n
    variants = [("per_tile", False, None), ("flat", True, None)]
    if sweep_variants:  # one wgmma in flight per step; the per-tile kernel's ring (3 deep, 128-column stores)
        variants += [("flat_overlap_mma", True, T(128, 128, 64, 4, 64, chain=True, overlap_mma=True)),
                     ("flat_3st_epi128", True, T(128, 128, 64, 3, 128, chain=True))]
    rec = dict(proj=proj, tokens_per_expert=t, K=k, N=n, G=g)
    einsum = jax.jit(lambda a, b: jnp.einsum("gtk,gtn->gkn", a.reshape(g, t, k), b.reshape(g, t, n)))
    want = einsum(x, dy)
    rec["einsum_ms"] = time_ms(einsum, (x, dy))[0]
    outs = {}
    for name, chain, tiles in variants:
        try:
            pallas_gmm.CONTRACT_TILES = tiles
            f = jax.jit(lambda a, b, c=chain: pallas_gmm.contract_matmul(a, b, sizes, out_dtype=jnp.bfloat16,
                                                                         chain=c))
            outs[name] = got = f(x, dy)
            ms = time_ms(f, (x, dy))[0]
            rec[name] = dict(ms=ms, tflops=flops / ms / 1e9, per_einsum=rec["einsum_ms"] / ms,
                             rel_err_vs_einsum=rel_err(got, want), tiles=str(tiles))
        except Exception as e:  # noqa: BLE001
            rec[name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
        finally:
            pallas_gmm.CONTRACT_TILES = None
    if "per_tile" in outs and "flat" in outs:
        rec["flat_bit_identical"] = bool(jnp.array_equal(outs["per_tile"], outs["flat"]))
    print("d_rhs", json.dumps(rec), flush=True)
    return rec


ROWS_VARIANTS = {  # flat rows kernel variants timed by --rows-ab (all bit-identical: same tiles, same order)
    "flat": dict(stages=4),
    "overlap": dict(stages=4, overlap_mma=True),
    "3st_epi128": dict(stages=3, epi_n=128),
    # the tiles in column bands of 2, 4, 8 or 12 n tiles (Tiles.band; LongCat's 6144-column products have 24, the
    # others 8)
    "band2": dict(stages=4, band=2),
    "band4": dict(stages=4, band=4),
    "band8": dict(stages=4, band=8),
    "band12": dict(stages=4, band=12),
    # flat again, an A/A control: how far two runs of one kernel in one round differ (session 41's flat rounds
    # spread 10.5-13.6 ms at T = 4096 where each banded variant's spread under 1 ms)
    "flat_again": dict(stages=4),
}


def rows_ab(proj, t, variants, rounds=2):
    """The rows kernel alone at LongCat T=t (balanced), flat pipeline variants (ROWS_VARIANTS; the first is the
    baseline), for the forward (rhs [G, K, N]) and d_lhs (rhs read transposed), timed in rounds of rotated order
    (rotated) against the einsum of the same product. Every variant must agree bit for bit with the baseline."""
    T = mgpu_kernels.Tiles
    k, n, g = SHAPES[("longcat", proj)]
    m = g * t
    keys = jax.random.split(jax.random.key(t + n), 3)
    sizes = jnp.full((g,), t, jnp.int32)
    w = (jax.random.normal(keys[1], (g, k, n), jnp.float32) / np.sqrt(k)).astype(jnp.bfloat16)
    out = []
    for pass_name, transpose in (("fwd", False), ("d_lhs", True)):
        x = jax.random.normal(keys[0], (m, n if transpose else k), jnp.bfloat16)
        spec = "gtn,gkn->gtk" if transpose else "gtk,gkn->gtn"
        einsum = jax.jit(lambda a, b, s=spec: jnp.einsum(s, a.reshape(g, t, -1), b).reshape(m, -1))
        want = einsum(x, w)
        rec = dict(proj=proj, pass_=pass_name, tokens_per_expert=t, K=k, N=n, G=g)
        fns = {}
        for name in variants:
            pallas_gmm.ROWS_TILES = T(128, 128, 64, **{"epi_n": 64, **ROWS_VARIANTS[name]}, chain=True)
            f = jax.jit(lambda a, b, tr=transpose: pallas_gmm.rows_matmul(a, [b], sizes, transpose_rhs=tr,
                                                                         chain=True))
            try:
                got = f(x, w)   # traced and compiled here, with this variant's tiles
                rec[name] = dict(tiles=str(pallas_gmm.ROWS_TILES), rel_err_vs_einsum=rel_err(got, want))
                fns[name] = (f, got)
            except Exception as e:  # noqa: BLE001
                rec[name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
        pallas_gmm.ROWS_TILES = None
        base = variants[0]
        for name, (_, got) in fns.items():
            if base in fns:
                rec[name]["bit_identical_to_" + base] = bool(jnp.array_equal(got, fns[base][1]))
        ms = rotated_rounds({"einsum": einsum, **{name: f for name, (f, _) in fns.items()}}, (x, w), rounds)
        rec["einsum_ms"] = ms["einsum"]
        for name in fns:
            rec[name]["ms"] = ms[name]
            rec[name]["per_einsum"] = float(np.median(rec["einsum_ms"]) / np.median(rec[name]["ms"]))
        print("rows_ab", json.dumps(rec), flush=True)
        out.append(rec)
    return out


# Configs the peers are timed in before the cases (--pick-jax-mgpu, --pick-tokamax). JAX's example has no autotuner;
# tokamax's cache holds no entry for these shapes, so it would run its heuristics (None: 64 x 64 tiles, 2 stages).
# The tokamax ones are the persistent and plain configs its H100 cache picked for DeepSeek's expert shapes.
PEER_CONFIGS = {
    "jax_mgpu": [dict(block_m=bm, block_n=bn, block_k=64, max_concurrent_steps=steps, grid_block_n=gbn)
                 for bm, bn, steps, gbn in ((128, 128, 4, 1), (128, 128, 4, 8), (64, 128, 5, 1), (128, 64, 6, 4))],
    "tokamax": [None] + [dict(block_m=128, block_n=64, block_k=128, num_stages=stages, split_k=1, persistent=pers,
                              grid_minor_dim=minor, grid_tile_width=width)
                         for stages, pers, minor, width in ((4, True, 1, 8), (4, True, 1, 4), (2, False, 0, 1))],
}


def _peer_module(impl):
    from lcflash.kernels.gmm import jax_mgpu, tokamax_gmm

    return {"jax_mgpu": (jax_mgpu, "FWD_CONFIG"), "tokamax": (tokamax_gmm, "CONFIG")}[impl]


def pick_peer_config(impl):
    """Times the peer's PEER_CONFIGS (LongCat gate/up forward, T=512) and keeps the fastest for every case, so the
    peer is not judged on one arbitrary config."""
    module, attr = _peer_module(impl)
    k, n, g = SHAPES[("longcat", "gate_up")]
    m = g * 512
    x = jax.random.normal(jax.random.key(0), (m, k), jnp.bfloat16)
    w = (jax.random.normal(jax.random.key(1), (g, k, n), jnp.float32) / np.sqrt(k)).astype(jnp.bfloat16)
    sizes = jnp.full((g,), 512, jnp.int32)
    tried = []
    for cfg in PEER_CONFIGS[impl]:
        setattr(module, attr, cfg)
        try:
            ms = time_ms(jax.jit(lambda a, b: api.gmm(a, b, sizes, impl=impl)), (x, w), repeats=3)[0]
        except Exception as e:  # noqa: BLE001
            ms = float("inf")
            print(impl, "config", cfg, "failed:", str(e)[:200], flush=True)
        tried.append(dict(config=cfg, fwd_ms=ms))
        print(impl, "config", cfg, ms, flush=True)
    best = min(tried, key=lambda r: r["fwd_ms"])
    setattr(module, attr, best["config"])
    return dict(tried=tried, chosen=best["config"])


def swiglu_cases(ts, shapes=(("longcat", "gate_up"), ("small", "gate_up"))):
    """Gate + up + SwiGLU (T tokens per expert, equal groups), forward and forward+backward: `epilogue` one kernel
    on [gate | up] applying SwiGLU before its store (gmm_swiglu_halves, what moe.fuse_gate_up runs), `xla` one gmm
    on [gate | up] then SwiGLU by XLA (the previous path), `gmm_only` that gmm without SwiGLU, and `two_acc` the
    kernel with gate and up as two arrays (pallas_gmm.gmm_swiglu_fused). [gate | up] is concatenated before the
    timed calls (training concatenates it with the per-step cast to bf16)."""
    from lcflash.kernels.gmm.swiglu import swiglu_halves

    out = []
    for t in ts:
        for shape in shapes:
            k, n, g = SHAPES[shape]
            m = g * t
            sizes = jnp.full((g,), t, jnp.int32)
            x = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)
            wg, wu = ((jax.random.normal(jax.random.key(i), (g, k, n), jnp.float32) / np.sqrt(k)).astype(jnp.bfloat16)
                      for i in (2, 3))
            w_gu = jnp.concatenate([wg, wu], axis=-1)
            variants = {  # name: (function, weights)
                "epilogue": (lambda a, w: api.gmm_swiglu_halves(a, w, sizes, impl="pallas_chain"), (w_gu,)),
                "xla": (lambda a, w: swiglu_halves(api.gmm(a, w, sizes, impl="pallas_chain")), (w_gu,)),
                "gmm_only": (lambda a, w: api.gmm(a, w, sizes, impl="pallas_chain"), (w_gu,)),
                "two_acc": (lambda a, b, c: pallas_gmm.gmm_swiglu_fused(a, b, c, sizes), (wg, wu)),
            }
            rec = dict(shape="/".join(shape), tokens_per_expert=t, k=k, n=n, experts=g)
            base = None
            for name, (f, ws) in variants.items():
                try:
                    fwd = jax.jit(f)
                    ct = jax.random.normal(jax.random.key(4), (m, 2 * n if name == "gmm_only" else n), jnp.bfloat16)
                    both = jax.jit(lambda *a, f=f, ct=ct: jax.vjp(f, *a)[1](ct))
                    h = fwd(x, *ws)
                    if name != "gmm_only":
                        base = h if base is None else base
                        rec[name] = dict(rel_err_vs_epilogue=rel_err(h, base))
                    else:
                        rec[name] = {}
                    rec[name].update(fwd_ms=time_ms(fwd, (x, *ws))[0], fwd_bwd_ms=time_ms(both, (x, *ws))[0])
                    rec[name]["fwd_tflops"] = 2 * 2.0 * m * k * n / rec[name]["fwd_ms"] / 1e9
                except Exception as e:  # noqa: BLE001
                    rec[name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
            print("swiglu", json.dumps(rec), flush=True)
            out.append(rec)
    return out


def ffn_operands(seed, m, d, f, g):
    """The expert FFN's bf16 operands: x and dy [m, d], [gate | up] [g, d, 2f] and down [g, f, d] weights."""
    ks = jax.random.split(jax.random.key(seed), 4)
    x, dy = (jax.random.normal(k, (m, d), jnp.bfloat16) for k in ks[:2])
    w_gu = (jax.random.normal(ks[2], (g, d, 2 * f), jnp.float32) / np.sqrt(d)).astype(jnp.bfloat16)
    w_down = (jax.random.normal(ks[3], (g, f, d), jnp.float32) / np.sqrt(f)).astype(jnp.bfloat16)
    return x, dy, w_gu, w_down


def ffn_cases(ts, models=("small", "longcat")):
    """The whole expert FFN forward + backward (api.gmm_swiglu_ffn, T tokens per expert, equal groups, plus as
    many tail rows, as in training at ~6 FFN experts of 12): `grad_epilogue` with SwiGLU's backward in the down
    projection's d_lhs kernel (configs/small.py), `xla` with it between the kernels (SWIGLU_GRAD_EPILOGUE off)."""
    out = []
    for t in ts:
        for model in models:
            d, f, g = SHAPES[(model, "gate_up")]
            m = 2 * g * t
            sizes = jnp.full((g,), t, jnp.int32)
            x, dy, w_gu, w_down = ffn_operands(5, m, d, f, g)
            rec, grads = dict(model=model, tokens_per_expert=t, tail_rows=m // 2, d=d, f=f, experts=g), {}
            for name, on in (("grad_epilogue", True), ("xla", False)):
                api.SWIGLU_GRAD_EPILOGUE = on  # read at trace time: each variant traces its own jit
                try:
                    ffn = lambda a, b, c: api.gmm_swiglu_ffn(a, b, c, sizes, impl="pallas_chain",  # noqa: E731
                                                             zero_tail=False)
                    both = jax.jit(lambda *a, ffn=ffn: jax.vjp(ffn, *a)[1](dy))
                    grads[name] = both(x, w_gu, w_down)
                    rec[name] = dict(fwd_bwd_ms=time_ms(both, (x, w_gu, w_down))[0])
                except Exception as e:  # noqa: BLE001
                    rec[name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
            api.SWIGLU_GRAD_EPILOGUE = True
            if len(grads) == 2:  # weight gradients only: d_x's tail rows are undefined
                rec["rel_err_dw"] = [rel_err(a, b) for a, b in zip(grads["grad_epilogue"][1:], grads["xla"][1:])]
            print("ffn", json.dumps(rec), flush=True)
            out.append(rec)
    return out


def ffn_load_sizes(tokens, ffn_per_token, g, seed=0, alphas=(2.0, 0.5)):
    """Expert group sizes of a training step's FFN rows (tokens * ffn_per_token): equal and rounded up to the
    128-row tile ("aligned"), equal, Dirichlet(alpha) shares, and those rounded up to the tile."""
    rows = int(tokens * ffn_per_token)
    rng = np.random.default_rng(seed)
    loads = {"aligned": np.full(g, -(-rows // g // 128) * 128), "equal": np.full(g, rows // g)}
    for alpha in alphas:
        sizes = rng.multinomial(rows, rng.dirichlet(np.full(g, alpha)))
        loads[f"dirichlet{alpha:g}"] = sizes
        loads[f"dirichlet{alpha:g}_rounded"] = -(-sizes // 128) * 128
    return loads


FFN_KERNELS = ("gate_up_fwd_halves", "down_fwd", "down_dlhs_grad_halves", "down_dlhs_plain", "down_drhs",
               "gate_up_dlhs", "gate_up_drhs")


def ffn_kernels(tokens, ffn_per_token=5.75, top_k=12, rounds=2, seed=0, loads=("equal", "dirichlet0.5"),
                names=FFN_KERNELS, einsum=True, out=None, on_record=lambda: None):
    """Each kernel of configs/small.py's expert FFN as trained (pallas_chain, tails unwritten), timed alone in a
    training-sized row buffer, under equal and skewed loads, with diagnostic variants of the down projection's
    d_lhs: the plain product (no SwiGLU backward in its epilogue), what the epilogue costs; plus
    the batched einsum of each product on equal groups (the bound). TFLOP/s counts the groups' rows. Each record is
    appended to `out` and `on_record` called (the caller saves), so a run cut short keeps what it measured."""
    d, f, g = SHAPES[("small", "gate_up")]
    m = tokens * top_k
    all_loads = ffn_load_sizes(tokens, ffn_per_token, g, seed)
    x, dy, w_gu, w_down = ffn_operands(seed, m, d, f, g)
    gu = jax.random.normal(jax.random.key(seed + 7), (m, 2 * f), jnp.bfloat16)
    h = jax.random.normal(jax.random.key(seed + 8), (m, f), jnp.bfloat16)
    rm, cm = pallas_gmm.rows_matmul, pallas_gmm.contract_matmul
    bf = jnp.bfloat16
    kernels = {  # name: (fn(sizes), contraction, output columns)
        "gate_up_fwd_halves": (lambda s: rm(x, [w_gu], s, swiglu="halves", chain=True, zero_tail=(True, False)),
                               d, 2 * f),
        "down_fwd": (lambda s: rm(h, [w_down], s, chain=True, zero_tail=(False,)), f, d),
        "down_dlhs_grad_halves": (lambda s: rm(dy, [w_down], s, transpose_rhs=True, out_dtype=bf, swiglu="grad_halves",
                                               gu_mn2=gu, chain=True, zero_tail=(False,)), d, f),
        "down_dlhs_plain": (lambda s: rm(dy, [w_down], s, transpose_rhs=True, out_dtype=bf, chain=True,
                                         zero_tail=(False,)), d, f),
        "down_drhs": (lambda s: cm(h, dy, s, out_dtype=bf, chain=True), 1, f * d),
        "gate_up_dlhs": (lambda s: rm(gu, [w_gu], s, transpose_rhs=True, out_dtype=bf, chain=True,
                                      zero_tail=(False,)), 2 * f, d),
        "gate_up_drhs": (lambda s: cm(x, gu, s, out_dtype=bf, chain=True), 1, d * 2 * f),
    }
    assert tuple(kernels) == FFN_KERNELS
    kernels = {k: v for k, v in kernels.items() if k in names}
    # Each compiled once: the group sizes are an argument.
    compiled = {k: jax.jit(fn).lower(jnp.asarray(all_loads[loads[0]], jnp.int32)).compile()
                for k, (fn, _, _) in kernels.items()}
    out = [] if out is None else out

    def record(load, kernel, rows, ms, flops):
        out.append(dict(load=load, kernel=kernel, rows=rows, ms=ms, tflops=flops / ms / 1e9))
        print("ffn_kernels", json.dumps(out[-1]), flush=True)
        on_record()

    for name in loads:
        sizes = jnp.asarray(all_loads[name], jnp.int32)
        rows = int(all_loads[name].sum())
        for _ in range(rounds):
            for kname, (_, kdim, ndim) in kernels.items():
                record(name, kname, rows, time_ms(compiled[kname], (sizes,))[0], 2 * rows * kdim * ndim)
    per_group = -(-int(tokens * ffn_per_token) // g)
    bounds = {"einsum_1024x768": (d, 2 * f), "einsum_384x1024": (f, d), "einsum_1024x384": (d, f)} if einsum else {}
    for kname, (k, n) in bounds.items():
        a = jax.random.normal(jax.random.key(1), (g, per_group, k), bf)
        b = jax.random.normal(jax.random.key(2), (g, k, n), bf)
        ms = time_ms(jax.jit(lambda a, b: jnp.einsum("gmk,gkn->gmn", a, b)), (a, b))[0]
        record("equal_batched", kname, g * per_group, ms, 2 * g * per_group * k * n)
    return out


def ffn_loads(tokens, ffn_per_token=5.75, top_k=12, rounds=2, seed=0):
    """configs/small.py's expert FFN forward + backward as training runs it (api.gmm_swiglu_ffn, pallas_chain,
    tails unwritten) in a training-sized row buffer (tokens * top_k rows, tokens * ffn_per_token of them in the
    groups), under expert sizes of several shapes: equal and a multiple of the 128-row tile ("aligned"), equal,
    Dirichlet(alpha) shares, and those rounded up to the tile. Rounds alternate the loads; TFLOP/s counts the
    groups' rows only, so it compares the loads' cost per useful row."""
    d, f, g = SHAPES[("small", "gate_up")]
    m = tokens * top_k
    loads = ffn_load_sizes(tokens, ffn_per_token, g, seed)
    x, dy, w_gu, w_down = ffn_operands(seed, m, d, f, g)

    def ffn(a, b, c, s):
        return api.gmm_swiglu_ffn(a, b, c, s, impl="pallas_chain", zero_tail=False)

    fwd = jax.jit(ffn)
    both = jax.jit(lambda a, b, c, s: jax.vjp(lambda *w: ffn(*w, s), a, b, c)[1](dy))
    times = {name: {"fwd": [], "fwd_bwd": []} for name in loads}
    for _ in range(rounds):
        for name, sizes in loads.items():
            args = (x, w_gu, w_down, jnp.asarray(sizes, jnp.int32))
            times[name]["fwd"].append(time_ms(fwd, args)[0])
            times[name]["fwd_bwd"].append(time_ms(both, args)[0])
    out = []
    for name, sizes in loads.items():
        flops = 2 * int(sizes.sum()) * d * 3 * f  # [gate | up] (2F) and down (F) products
        rec = dict(load=name, tokens=tokens, rows=int(sizes.sum()), buffer_rows=m, size_cv=float(sizes.std() /
                   sizes.mean()), max_over_mean=float(sizes.max() / sizes.mean()), ms=times[name],
                   fwd_tflops=flops / min(times[name]["fwd"]) / 1e9,
                   fwd_bwd_tflops=3 * flops / min(times[name]["fwd_bwd"]) / 1e9)
        print("ffn_loads", json.dumps(rec), flush=True)
        out.append(rec)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="experiments/bench_moe_gemm.json")
    ap.add_argument("--quick", action="store_true", help="LongCat T=512 and T=8 balanced only")
    ap.add_argument("--sweep", action="store_true", help="also time tile variants of ours")
    ap.add_argument("--swiglu", action="store_true", help="also time the fused gate+up+SwiGLU kernels")
    ap.add_argument("--swiglu-only", action="store_true", help="time only the gate+up+SwiGLU variants (T=512)")
    ap.add_argument("--ffn-only", action="store_true", help="time only the whole expert FFN with and without "
                    "SwiGLU's backward in the down projection's d_lhs kernel (T=512)")
    ap.add_argument("--small-sweep", type=int, default=0, metavar="T", help="only configs/small.py's expert "
                    "products at T tokens per expert: pallas_chain tile variants against the einsum bound")
    ap.add_argument("--sweep-config", default="small", choices=("small", "longcat"), help="--small-sweep's expert "
                    "shapes")
    ap.add_argument("--deal-ab", type=int, default=0, metavar="T", help="only the flat d_rhs kernel at "
                    "configs/small.py's shapes, T tokens per expert: each way of dealing its tiles to the CTAs")
    ap.add_argument("--deal-config", default="small", choices=("small", "longcat"), help="--deal-ab's expert shapes")
    ap.add_argument("--deal-alphas", default="equal,10,2,0.5", help="--deal-ab's expert sizes: equal, skewed (the "
                    "table's skewed load: an eighth of the experts empty), or the Dirichlet alpha of the expert shares")
    ap.add_argument("--deals", default=None, help="--deal-ab's deals, comma-separated (default: every one)")
    ap.add_argument("--deal-bands", default="0", help="--deal-ab's column bands, comma-separated (0: none)")
    ap.add_argument("--deal-nomask", action="store_true", help="--deal-ab also times each deal without masking the "
                    "row blocks groups share (wrong gradients: what the masking costs)")
    ap.add_argument("--deal-zeros", action="store_true", help="--deal-ab also times each deal with the empty groups' "
                    "tiles stored as zeros after the pipeline (mgpu_kernels.CONTRACT_ZERO_EMPTY), the others without")
    ap.add_argument("--ffn-loads", type=int, default=0, metavar="TOKENS", help="only configs/small.py's expert FFN, "
                    "forward + backward as trained, in a TOKENS x 12-row buffer under equal, aligned and skewed loads")
    ap.add_argument("--ffn-kernels", type=int, default=0, metavar="TOKENS", help="only configs/small.py's expert "
                    "FFN kernels, each timed alone as trained in a TOKENS x 12-row buffer, equal and skewed loads")
    ap.add_argument("--ffn-kernel-names", default="", help="--ffn-kernels: only these kernels (comma-separated)")
    ap.add_argument("--ffn-einsum", action=argparse.BooleanOptionalAction, default=True,
                    help="--ffn-kernels: also time the batched einsum bounds")
    ap.add_argument("--impls", default="pallas,jax_mgpu,ragged_dot,einsum")
    ap.add_argument("--rounds", type=int, default=1, help="main table: time the implementations in this many "
                    "alternating rounds and report medians (and each round's ratio to the einsum)")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new cases after this many seconds")
    ap.add_argument("--skip", type=int, default=0, help="skip the first N cases of the priority list")
    ap.add_argument("--chain-ab", action="store_true",
                    help="LongCat T=512 only: pallas vs pallas_chain vs einsum (implies --impls pallas,pallas_chain,einsum)")
    ap.add_argument("--rows-ab", default=None, metavar="V1,V2,...",
                    help="only the rows kernel at LongCat's shapes: flat pipeline variants (ROWS_VARIANTS), the "
                         "first the baseline, e.g. flat,overlap")
    ap.add_argument("--rows-ab-tokens", type=int, default=512, metavar="T", help="--rows-ab's tokens per expert")
    ap.add_argument("--ab-rounds", type=int, default=2, help="--rows-ab's and --deal-ab's rounds (each in rotated "
                    "order)")
    ap.add_argument("--rows-band", type=int, default=None, metavar="B", help="the flat rows kernel's column bands "
                    "(pallas_gmm.ROWS_BAND; default: its value)")
    ap.add_argument("--contract-band", type=int, default=None, metavar="B", help="the flat d_rhs kernel's column "
                    "bands (pallas_gmm.CONTRACT_BAND; default: its value)")
    ap.add_argument("--device-time", action="store_true", help="main table: also time the cases of at most 64 "
                    "tokens per expert by the device's busy time per call (device_ms; wall time cannot resolve them)")
    ap.add_argument("--pick-jax-mgpu", action="store_true", help="time four configs of the example kernel first")
    ap.add_argument("--pick-tokamax", action="store_true", help="time tokamax's heuristics and three configs first")
    args = ap.parse_args()
    ffn_names = [n for n in args.ffn_kernel_names.split(",") if n] or list(FFN_KERNELS)
    if set(ffn_names) - set(FFN_KERNELS):
        ap.error(f"--ffn-kernel-names {sorted(set(ffn_names) - set(FFN_KERNELS))}: not among {list(FFN_KERNELS)}")
    deals = args.deals.split(",") if args.deals else None
    if set(deals or ()) - set(mgpu_kernels.CONTRACT_DEALS):
        ap.error(f"--deals {args.deals}: each must be one of {mgpu_kernels.CONTRACT_DEALS}")
    try:
        bands = [int(b) for b in args.deal_bands.split(",")]
    except ValueError:
        bands = None
    if bands is None or min(bands) < 0:
        ap.error(f"--deal-bands {args.deal_bands!r}: want comma-separated integers >= 0 (0: row-major), e.g. 0,8")
    try:
        pallas_gmm.set_bands(args.rows_band, args.contract_band)
    except ValueError as e:
        ap.error(f"--rows-band / --contract-band: {e}")
    rows_variants = args.rows_ab.split(",") if args.rows_ab else []
    if set(rows_variants) - set(ROWS_VARIANTS):
        ap.error(f"--rows-ab {sorted(set(rows_variants) - set(ROWS_VARIANTS))}: not among {list(ROWS_VARIANTS)}")
    if args.ab_rounds < 1:
        ap.error(f"--ab-rounds {args.ab_rounds}: must be at least 1")
    t_start = time.time()
    dev = jax.devices()[0]
    meta = dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__, **pallas_gmm.tiling_settings(),
                jaxlib=getattr(jax.lib, "__version__", None) or __import__("jaxlib").__version__,
                date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command="python " + " ".join(sys.argv))
    meta["copy_bandwidth_gbs"] = measure_bandwidth_gbs()
    meta["dense_matmul_8192_tflops"] = measure_matmul_tflops()
    print(json.dumps(meta), flush=True)
    results = []
    report = dict(meta=meta, results=results)

    def save():
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)

    if args.rows_ab:
        report["rows_ab"] = []
        for proj in ("gate_up", "down"):
            report["rows_ab"] += rows_ab(proj, args.rows_ab_tokens, rows_variants, args.ab_rounds)
            save()
        return
    impls = "pallas,pallas_chain,einsum".split(",") if args.chain_ab else args.impls.split(",")
    for peer, pick in (("jax_mgpu", args.pick_jax_mgpu), ("tokamax", args.pick_tokamax)):
        if peer in impls and pick:
            report[peer + "_config"] = pick_peer_config(peer)
            save()
    if "tokamax" in impls:
        report["meta"]["tokamax"] = __import__("tokamax").__version__
    report["swiglu"] = []
    if args.swiglu_only:
        report["swiglu"] = swiglu_cases([512])
        save()
        return
    if args.deal_ab:
        alphas = [a if a == "skewed" else None if a == "equal" else float(a) for a in args.deal_alphas.split(",")]
        report["deal_ab"] = deal_ab(args.deal_ab, args.deal_config, alphas, args.ab_rounds, deals=deals, bands=bands,
                                    nomask=args.deal_nomask, zeros=args.deal_zeros)
        save()
        return
    if args.ffn_kernels:
        ffn_kernels(args.ffn_kernels, names=ffn_names, einsum=args.ffn_einsum, out=report.setdefault("ffn_kernels", []),
                    on_record=save)
        return
    if args.ffn_loads:
        report["ffn_loads"] = ffn_loads(args.ffn_loads)
        save()
        return
    if args.small_sweep:
        report["small_sweep"] = small_sweep(meta["copy_bandwidth_gbs"], args.small_sweep,
                                            lambda: time.time() - t_start < args.budget_s, args.sweep_config)
        save()
        return
    if args.ffn_only:
        report["ffn"] = ffn_cases([512])
        save()
        return
    for cfg, proj, t, load in cases(args.quick, args.chain_ab)[args.skip:]:
        if time.time() - t_start > args.budget_s:
            report["stopped_early"] = f"budget {args.budget_s}s reached before {cfg}/{proj} T={t} {load}"
            print(report["stopped_early"], flush=True)
            break
        if cfg == "swiglu":
            if args.swiglu:
                report["swiglu"] += swiglu_cases([t])
            continue
        row = run_case(cfg, proj, t, load, impls, meta["copy_bandwidth_gbs"], results, rounds=args.rounds,
                       device_time=args.device_time and t <= 64)
        print(json.dumps(row), flush=True)
        save()
    if args.chain_ab:
        report["d_rhs"] = []
        for proj in ("gate_up", "down"):
            report["d_rhs"].append(d_rhs_ab(proj, 512, sweep_variants=args.sweep))
            save()
    if args.sweep:
        report["sweep"] = sweep(meta["copy_bandwidth_gbs"], lambda: time.time() - t_start < args.budget_s)
    save()
    print(format_table(results), flush=True)


if __name__ == "__main__":
    main()
