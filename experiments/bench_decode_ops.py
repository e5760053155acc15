"""Decode-step building blocks of configs/small.py in bf16 (batch 1 and 8), each form against the weight-bytes /
bandwidth floor: which form of a matrix-vector product and of the decode MoE XLA runs well on the GPU.

    python experiments/bench_decode_ops.py [--json=OUT.json] [--reps=200]

Matrix-vector forms (x [M, K] @ W [K, N], M = batch):
* vec:  x @ W as written. At M = 1 XLA's GPU simplifier rewrites a dot with a vector operand into
        multiply + reduce over K, a strided (column) reduction, often with the product materialised.
* wt:   W stored transposed [N, K] (done once, when the decode weights are split); the product reduces over
        the contiguous axis (row reduction, fused).
* pad2: x padded to 2 rows so the dot stays a GEMM (cuBLAS / Triton); row 0 is kept.
* mosaic (GPU): W as wt, read by a Mosaic GPU kernel of plain global loads (`mosaic_matvec`), the building block a
        fused decode kernel would stream weights with if TMA's fixed cost is what makes our kernels slow.

MoE forms, T tokens, top-12 of 128 FFN + 64 zero experts (random router), expert 1024 -> 384 -> 1024:
* gather:   each (token, slot) reads its expert's weights, multiply-reduce over D (current decode path).
* gather_t: the same with expert weights stored [E, I, D] / [E, D, I] so both reductions are row reductions.
* sorted:   the model's dropless path (sort slots by expert, grouped matmuls with `--gmm_impl`).
Fixed costs per kernel (launch): one small step on x [8, 1024] bf16, chained n times in one compiled program (one
CUDA graph, as a decode step runs), timed at n = 64 and 256; the row is the slope per call, with the kernels per
call counted in the optimised HLO. Steps: XLA's (a reduction and an add), the same in a one-iteration while loop,
and Mosaic GPU kernels: x + 1 by plain global loads and stores (4 and 64 CTAs), a copy through shared memory by
TMA (4 and 128 CTAs), the latter with 200 KiB of shared memory allocated and with a grid barrier (a GMEM
semaphore zeroed by XLA before each call) between load and store.
Phases (GPU): `phase_chain`, dependent phases inside one kernel with a grid barrier between them, each reading its
share of 64 KiB to 8 MiB of weights, loaded before the last barrier or after it, or with only the neighbour's flag
between them (the least a dependent step costs): the slope per phase over 8 and 40 phases, against the phase's
bytes over the bandwidth.
matvec and moe rows: microseconds per call (best of 3 runs of --reps dependent calls inside one jit'ed fori_loop),
and the floor.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--gmm_impl", default="pallas")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--sections", default="matvec,moe,launch",
                    help="comma-separated: matvec, moe, launch, phases (GPU only; it hung on an H200 in session 35, "
                         "so it runs only when named, last)")
    ap.add_argument("--phase_rows", default=",".join(map(str, PHASE_ROWS)),
                    help="phases: [rows, 256] bf16 weights per CTA and phase, comma-separated")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    from bench_decode import measure_bandwidth  # experiments/ is on sys.path when run as a script

    from lcflash.model.moe import routed_experts
    from lcflash.model.router import route

    bf = jnp.bfloat16
    dev = jax.devices()[0]
    bw = measure_bandwidth(jax, jnp, nbytes=1 << 30, reps=10)

    def timed(fn, *operands):
        """Microseconds per call: `reps` dependent calls in one jit (the output feeds a scalar into the next)."""
        def body(i, carry):
            acc, ops = carry
            out = fn(*ops)
            s = jnp.sum(out.astype(jnp.float32)) * 0.0
            first = ops[0] + s.astype(ops[0].dtype)
            return acc + s, (first,) + tuple(ops[1:])

        loop = jax.jit(lambda ops: jax.lax.fori_loop(0, args.reps, body, (jnp.float32(0), ops)))
        jax.block_until_ready(loop(operands))
        return 1e6 * best_seconds(jax, loop, operands, 3) / args.reps

    rows = []

    def pad2(a):
        return jnp.concatenate([a, a[:1]], 0) if a.shape[0] == 1 else a

    def save():  # after every row: a section that hangs (and is killed) loses no row measured before it
        if args.json:
            out = {"device": f"{dev.platform}: {dev.device_kind}", "bandwidth_Bps": bw,
                   "versions": {"python": platform.python_version(), "jax": jax.__version__},
                   "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
                   "rows": rows}
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)

    def row(kind, name, form, M, us, bytes_read, **extra):
        floor = 1e6 * bytes_read / bw
        rows.append(dict(kind=kind, shape=name, form=form, batch=M, us=us, floor_us=floor, of_floor=floor / us,
                         **extra))
        save()
        print(f"{kind:6s} {name:18s} {form:9s} M={M:2d} {us:8.2f} us  floor {floor:6.2f} us  "
              f"{100 * floor / us:5.1f}%" + "".join(f"  {k} {v:g}" for k, v in extra.items()), flush=True)

    key = jax.random.key(1)
    shapes = {"mlp_gate_up": (1024, 4096), "mlp_down": (2048, 1024), "q_a": (1024, 256), "kv_a": (1024, 192),
              "q_b": (256, 1536), "o_proj": (1024, 1024), "qa+kva": (1024, 448)}
    sections = args.sections.split(",")
    for M in [int(b) for b in args.batches.split(",")] if "matvec" in sections else []:
        for name, (K, N) in shapes.items():
            k1, k2, key = jax.random.split(key, 3)
            xv = jax.random.normal(k1, (M, K), bf)
            w = (jax.random.normal(k2, (K, N), jnp.float32) * 0.02).astype(bf)
            wt = w.T.copy()
            nbytes = w.nbytes
            row("matvec", name, "vec", M, timed(lambda a, b: a @ b, xv, w), nbytes)
            row("matvec", name, "wt", M, timed(lambda a, b: jnp.einsum("mk,nk->mn", a, b), xv, wt), nbytes)
            row("matvec", name, "pad2", M, timed(lambda a, b: (pad2(a) @ b)[: a.shape[0]], xv, w), nbytes)
            if dev.platform == "gpu":
                mv = mosaic_matvec(jax, jnp, M, K, N)
                row("matvec", name, "mosaic", M, timed(mv, xv, wt), nbytes)

    # MoE
    D, I, E, Z, K = 1024, 384, 128, 64, 12
    ks = jax.random.split(jax.random.key(2), 5)
    w_r = jax.random.normal(ks[0], (D, E + Z), jnp.float32) * 0.02
    bias = jnp.zeros((E + Z,), jnp.float32)
    wg = (jax.random.normal(ks[1], (E, D, I), jnp.float32) * 0.02).astype(bf)
    wu = (jax.random.normal(ks[2], (E, D, I), jnp.float32) * 0.02).astype(bf)
    wd = (jax.random.normal(ks[3], (E, I, D), jnp.float32) * 0.02).astype(bf)
    wg_t, wu_t, wd_t = (jnp.swapaxes(w, 1, 2).copy() for w in (wg, wu, wd))
    per_expert = wg[0].nbytes * 3

    def gather(x, wg, wu, wd):
        r = route(x, w_r, bias, K, 6.0)
        idx = jnp.where(r.experts_tk < E, r.experts_tk, 0)
        xf = x.astype(jnp.float32)
        g = jnp.sum(xf[:, None, :, None] * wg[idx].astype(jnp.float32), axis=2)
        u = jnp.sum(xf[:, None, :, None] * wu[idx].astype(jnp.float32), axis=2)
        h = (jax.nn.silu(g) * u).astype(bf).astype(jnp.float32)
        y = jnp.sum(h[..., None] * wd[idx].astype(jnp.float32), axis=2)
        return jnp.sum(y * jnp.where(r.experts_tk < E, r.weights_tk, 0.0)[..., None], axis=1)

    def gather_t(x, wg_t, wu_t, wd_t):
        r = route(x, w_r, bias, K, 6.0)
        idx = jnp.where(r.experts_tk < E, r.experts_tk, 0)
        g = jnp.einsum("td,tkid->tki", x, wg_t[idx], preferred_element_type=jnp.float32)
        u = jnp.einsum("td,tkid->tki", x, wu_t[idx], preferred_element_type=jnp.float32)
        h = (jax.nn.silu(g) * u).astype(bf)
        y = jnp.einsum("tki,tkdi->tkd", h, wd_t[idx], preferred_element_type=jnp.float32)
        return jnp.sum(y * jnp.where(r.experts_tk < E, r.weights_tk, 0.0)[..., None], axis=1)

    def sorted_(x, wg, wu, wd):
        return routed_experts(x, route(x, w_r, bias, K, 6.0), wg, wu, wd, args.gmm_impl)

    for T in [int(b) for b in args.batches.split(",")] if "moe" in sections else []:
        xm = jax.random.normal(ks[4], (T, D), bf)
        r = route(xm, w_r, bias, K, 6.0)
        distinct = int(np.unique(np.asarray(r.experts_tk)[np.asarray(r.experts_tk) < E]).size)
        nbytes = distinct * per_expert + w_r.nbytes
        for form, fn, ws in (("gather", gather, (wg, wu, wd)), ("gather_t", gather_t, (wg_t, wu_t, wd_t)),
                             ("sorted", sorted_, (wg, wu, wd))):
            try:
                row("moe", f"{distinct} experts", form, T, timed(fn, xm, *ws), nbytes)
            except Exception as e:  # noqa: BLE001 - a form that fails to compile must not hide the others
                print(f"moe {form} T={T} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)

    if "launch" in sections:
        launch_rows(jax, jnp, row)
    if "phases" in sections and dev.platform == "gpu":
        phase_rows(jax, jnp, row, rows_list=tuple(int(r) for r in args.phase_rows.split(",")))
    save()


def mosaic_matvec(jax, jnp, m: int, k: int, n: int, tn: int = 64, kc: int = 128, ctas: int = 132,
                  interpret: bool = False):
    """y [m, n] = x [m, k] @ w [n, k]^T in x's dtype, by a Mosaic GPU kernel of plain global loads: no TMA, no shared
    memory, no tensor cores, as XLA's matvec fusions read the weights. CTA (i, s) loads rows i*tn.. of w over the
    s-th of S slices of K, in [tn, kc] chunks into registers, multiplies each by the rows of x broadcast along it
    and reduces along K in fp32; S (a divisor of k / kc) brings the CTAs to about `ctas`, and XLA sums the S
    partial products."""
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from lcflash.kernels import interpret_params, load_in_layout

    if n % tn or k % kc:
        raise ValueError(f"mosaic_matvec needs n % {tn} == 0 and k % {kc} == 0, got n={n}, k={k}")
    chunks = k // kc
    splits = max(d for d in range(1, chunks + 1) if chunks % d == 0 and d <= max(1, -(-ctas // (n // tn))))
    per_split = chunks // splits
    wgmma = plgpu.Layout.WGMMA

    def load(ref, layout):  # Pallas' GPU interpreter takes plain loads; layouts are the GPU's business
        return ref[...] if interpret else load_in_layout(ref, layout, optimized=False)

    def body(x_ref, w_ref, y_ref):
        rows, s = pl.ds(lax.axis_index("n") * tn, tn), lax.axis_index("k")
        accs = [None] * m
        for c in range(per_split):
            ks = pl.ds((s * per_split + c) * kc, kc)
            w = load(w_ref.at[rows, ks], wgmma).astype(jnp.float32)
            for r in range(m):
                xv = load(x_ref.at[r, ks], wgmma.reduce(0)).astype(jnp.float32)
                part = jnp.sum(w * lax.broadcast_in_dim(xv, (tn, kc), (1,)), axis=1)
                accs[r] = part if accs[r] is None else accs[r] + part
        for r in range(m):
            y_ref[s, r, rows] = accs[r]

    kernel = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((splits, m, n), jnp.float32),
                          grid=(n // tn, splits), grid_names=("n", "k"), interpret=interpret_params(interpret))
    return lambda x, w: jnp.sum(kernel(x, w), axis=0).astype(x.dtype)


def phase_chain(jax, jnp, ncta: int, phases: int, rows: int, prefetch: bool = True, unroll: bool = True,
                sync: str = "grid"):
    """A fused decode kernel's skeleton: `phases` dependent phases in one kernel of ncta CTAs (all resident), a grid
    barrier between phases (one GMEM counter, never reset within the call). In phase p each CTA takes its [rows, 256]
    bf16 slice of w[p] (TMA into one of three shared-memory slots, loaded two phases ahead with `prefetch` into the
    slot read in phase p - 1, before the last barrier; else at the phase's start), adds row 0 of it to what its
    neighbour wrote in phase p - 1 and writes that. out[p, i] is then the sum over phases 0..p of the slices' first
    rows, exactly, if every phase saw the last one's writes. sync="neighbour" replaces the grid barrier by the one
    dependency the data has: CTA i waits for CTA i + 1's flag of phase p - 1 (a GMEM semaphore per CTA), so a phase
    costs one producer-to-consumer hop through L2, the least any fused kernel's dependent step can cost."""
    if sync not in ("grid", "neighbour"):
        raise ValueError(f"sync={sync!r}; valid: 'grid', 'neighbour'")
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def body(w_ref, out_ref):
        i = lax.axis_index("cta")
        sem = pl.get_global(plgpu.SemaphoreType.REGULAR((ncta,)) if sync == "neighbour"
                            else plgpu.SemaphoreType.REGULAR)

        def scoped(buf, bar):
            def load(p, slot):
                plgpu.copy_gmem_to_smem(w_ref.at[p, i], buf.at[slot], bar.at[slot])

            def phase(p, carry, first=False):
                slot = lax.rem(p, 3)
                if not prefetch:
                    load(p, slot)
                plgpu.barrier_wait(bar.at[slot])
                v = buf[slot, 0, pl.ds(0, 128)].astype(jnp.float32)
                if not first:
                    v = v + out_ref[p - 1, lax.rem(i + 1, ncta), :]
                out_ref[p, i, :] = v
                if prefetch:
                    pl.when(p + 2 < phases)(lambda: load(p + 2, lax.rem(p + 2, 3)))
                if sync == "grid":
                    plgpu.semaphore_signal(sem, 1, memory_scope="gpu")
                    plgpu.semaphore_wait(sem, (p + 1) * ncta, decrement=False, memory_scope="gpu")
                else:  # this CTA's flag counts its finished phases; the next phase reads the neighbour's output
                    plgpu.semaphore_signal(sem.at[i], 1, memory_scope="gpu")
                    plgpu.semaphore_wait(sem.at[lax.rem(i + 1, ncta)], p + 1, decrement=False, memory_scope="gpu")
                return carry

            if prefetch:
                for p in range(min(2, phases)):
                    load(p, p)
            phase(jnp.int32(0), 0, first=True)
            if unroll:   # straight-line code: as a fori_loop the kernel hangs on an H200 from 3 phases on (session 36)
                for p in range(1, phases):
                    phase(jnp.int32(p), 0)
            else:
                lax.fori_loop(1, phases, phase, 0)

        pl.run_scoped(scoped, plgpu.SMEM((3, rows, 256), jnp.bfloat16), plgpu.Barrier(num_barriers=3))

    return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((phases, ncta, 128), jnp.float32), grid=(ncta,),
                        grid_names=("cta",))


PHASES = (8, 40)      # phases per kernel; the cost per phase is the slope between the two
PHASE_ROWS = (1, 4, 16, 64, 128)   # [rows, 256] bf16 per CTA and phase: 64 KB to 8 MB per phase on 128 CTAs


def phase_rows(jax, jnp, row, reps: int = 20, ncta: int = 128, rows_list=PHASE_ROWS):
    """Per dependent phase of `phase_chain`: its time (the slope over PHASES), against its bytes over the measured
    bandwidth; `ok` says every phase saw the last one's writes. The perf model's bound for issue 5 (HISTORY.md,
    session 35): 70% of configs/small.py's batch-1 floor needs under ~0.6 us per phase beyond its bytes. Forms:
    the grid barrier with the next weights prefetched or loaded after it, and the neighbour's flag (prefetched)."""
    ncta = min(ncta, jax.devices()[0].core_count)
    forms = (("prefetch", True, "grid"), ("load_after_barrier", False, "grid"), ("neighbour", True, "neighbour"))
    for rows in rows_list:
        for form, prefetch, sync in forms:
            try:
                best, ok = [], True
                for phases in PHASES:
                    print(f"phases: rows={rows} {form} P={phases}", flush=True)
                    w = (jnp.arange(1, phases + 1, dtype=jnp.float32)[:, None, None, None]
                         * jnp.ones((phases, ncta, rows, 256), jnp.float32)).astype(jnp.bfloat16)
                    prog = jax.jit(phase_chain(jax, jnp, ncta, phases, rows, prefetch, sync=sync))
                    out = jax.block_until_ready(prog(w))
                    ok = ok and bool(jnp.all(out[-1] == phases * (phases + 1) / 2))
                    best.append(best_seconds(jax, prog, w, reps))
                us = 1e6 * (best[1] - best[0]) / (PHASES[1] - PHASES[0])
            except Exception as e:  # noqa: BLE001 - a form that fails must not hide the others
                print(f"phases rows={rows} {form} failed: {type(e).__name__}: {str(e)[:600]}", flush=True)
                continue
            nbytes = ncta * rows * 256 * 2
            row("phases", f"{nbytes / 2**20:g} MiB/phase", form, ncta, us, nbytes, ok=int(ok))


CALLS = (64, 256)  # dependent calls per compiled program; the cost per call is the slope between the two


def launch_forms(jax, jnp, gpu: bool):
    """(name, step) pairs: each step is one small kernel (or loop) on x [8, 1024] bf16, returning x's shape."""
    from jax import lax

    def xla_step(v):  # a reduction and an add: XLA cannot fuse consecutive calls into one kernel
        return v + jnp.max(v)

    def while_step(v):  # the same in a while loop of one iteration: what the loop itself costs per iteration (the
        trips = (v[0, 0] * 0).astype(jnp.int32) + 1  # trip count is traced, so XLA cannot remove the loop)
        return lax.fori_loop(0, trips, lambda _, a: xla_step(a), v)

    forms = [("xla", xla_step), ("xla_in_while", while_step)]
    if gpu:
        forms += [("mosaic_direct_4", mosaic_step(jax, jnp, 4, tma=False)),
                  ("mosaic_direct_64", mosaic_step(jax, jnp, 64, tma=False)),
                  ("mosaic_tma_4", mosaic_step(jax, jnp, 4)), ("mosaic_tma_128", mosaic_step(jax, jnp, 128)),
                  ("mosaic_tma_128_smem200k", mosaic_step(jax, jnp, 128, smem_kib=200)),
                  ("mosaic_tma_128_barrier", mosaic_step(jax, jnp, 128, barrier=True))]
    return forms


def mosaic_step(jax, jnp, ncta: int, tma: bool = True, smem_kib: int = 0, barrier: bool = False,
                interpret: bool = False):
    """A Mosaic GPU kernel over x [8, 1024] bf16, each of ncta CTAs on its slice of columns: x + 1 by plain global
    loads and stores (tma=False: no TMA descriptor, no shared memory; a slice needs 128 elements, one per thread
    of the warpgroup, so at most 64 CTAs), or a copy through shared memory by TMA, optionally with smem_kib more
    shared memory allocated and a grid barrier (a GMEM semaphore, which XLA zeroes before each call) between the
    load and the store. interpret: in Pallas' GPU interpreter (which runs no semaphore)."""
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from lcflash.kernels import interpret_params

    cols = 1024 // ncta

    def body(x_ref, y_ref):
        part = pl.ds(lax.axis_index("cta") * cols, cols)
        if not tma:
            y_ref[:, part] = x_ref[:, part] + 1
            return

        def scoped(buf, bar, *pad):
            plgpu.copy_gmem_to_smem(x_ref.at[:, part], buf, bar.at[0])
            plgpu.barrier_wait(bar.at[0])
            if barrier:
                sem = pl.get_global(plgpu.SemaphoreType.REGULAR)
                plgpu.semaphore_signal(sem, 1, memory_scope="gpu")
                plgpu.semaphore_wait(sem, ncta, decrement=False, memory_scope="gpu")
            plgpu.copy_smem_to_gmem(buf, y_ref.at[:, part])
            plgpu.wait_smem_to_gmem(0)

        pads = (plgpu.SMEM((smem_kib * 512,), jnp.bfloat16),) if smem_kib else ()
        pl.run_scoped(scoped, plgpu.SMEM((8, cols), jnp.bfloat16), plgpu.Barrier(num_barriers=1), *pads)

    return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((8, 1024), jnp.bfloat16), grid=(ncta,),
                        grid_names=("cta",), interpret=interpret_params(interpret))


def launch_rows(jax, jnp, row, reps: int = 20, calls=CALLS):
    """Fixed cost of one kernel inside a compiled program, as a decode step runs its ~500 (one CUDA graph). A program
    of n dependent calls of a form is timed at two n; the cost per call is the slope, so the program's dispatch and
    graph launch cancel. (Until session 35 each call ran inside a fori_loop beside the loop's own kernels.)"""
    x = jnp.zeros((8, 1024), jnp.bfloat16)
    for form, step in launch_forms(jax, jnp, jax.default_backend() == "gpu"):
        try:
            us, kernels = per_call(jax, step, x, calls, reps)
        except Exception as e:  # noqa: BLE001 - a form that fails must not hide the others
            print(f"launch {form} failed: {type(e).__name__}: {str(e)[:600]}", flush=True)
            continue
        row("launch", "8x1024 step", form, 8, us, 2 * x.nbytes, kernels_per_call=kernels)


def per_call(jax, step, x, calls, reps):
    """(microseconds, kernels) per call of step: over n, the slopes of the best time of a program of n dependent
    calls and of the kernels (fusions and custom calls) in its optimised HLO."""
    import re

    best, kernels = [], []
    for n in calls:
        prog = jax.jit(lambda v, n=n: chain(step, v, n)).lower(x).compile()
        kernels.append(len(re.findall(r"\b(?:fusion|custom-call)\(", prog.as_text())))
        jax.block_until_ready(prog(x))
        best.append(best_seconds(jax, prog, x, reps))
    span = calls[1] - calls[0]
    return 1e6 * (best[1] - best[0]) / span, (kernels[1] - kernels[0]) / span


def best_seconds(jax, prog, arg, reps: int) -> float:
    """The fastest of `reps` runs of prog(arg), each waited for (prog already compiled and run once)."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(prog(arg))
        times.append(time.perf_counter() - t)
    return min(times)


def chain(step, v, n: int):
    for _ in range(n):
        v = step(v)
    return v


if __name__ == "__main__":
    main()
