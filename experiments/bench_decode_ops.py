"""Decode-step building blocks of configs/small.py in bf16 (batch 1 and 8), each form against the weight-bytes /
bandwidth floor: which form of a matrix-vector product and of the decode MoE XLA runs well on the GPU.

    python experiments/bench_decode_ops.py [--json=OUT.json] [--reps=200]

Matrix-vector forms (x [M, K] @ W [K, N], M = batch):
* vec:  x @ W as written. At M = 1 XLA's GPU simplifier rewrites a dot with a vector operand into
        multiply + reduce over K, a strided (column) reduction, often with the product materialised.
* wt:   W stored transposed [N, K] (done once, when the decode weights are split); the product reduces over
        the contiguous axis (row reduction, fused).
* pad2: x padded to 2 rows so the dot stays a GEMM (cuBLAS / Triton); row 0 is kept.

MoE forms, T tokens, top-12 of 128 FFN + 64 zero experts (random router), expert 1024 -> 384 -> 1024:
* gather:   each (token, slot) reads its expert's weights, multiply-reduce over D (current decode path).
* gather_t: the same with expert weights stored [E, I, D] / [E, D, I] so both reductions are row reductions.
* sorted:   the model's dropless path (sort slots by expert, grouped matmuls with `--gmm_impl`).
Fixed costs of Mosaic GPU kernels (launch): a copy of x [8, 1024] bf16 by 4 and by 128 CTAs (each copying its slice
through shared memory by TMA), the 128 CTAs with 200 KiB of shared memory each, and with a grid barrier (a GMEM
semaphore, zeroed by XLA before each call) between their load and store. Every timed call also runs the timing
loop's two small XLA kernels; compare the rows with each other.
Each row: microseconds per call (best of 3 runs of --reps dependent calls inside one jit'ed fori_loop), and the
floor.
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

from bench_decode import measure_bandwidth  # noqa: E402  (experiments/ is on sys.path when run as a script)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--gmm_impl", default="pallas")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--sections", default="matvec,moe,launch", help="comma-separated: matvec, moe, launch")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

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
        best = []
        for _ in range(3):
            t = time.perf_counter()
            jax.block_until_ready(loop(operands))
            best.append(time.perf_counter() - t)
        return 1e6 * min(best) / args.reps

    rows = []

    def pad2(a):
        return jnp.concatenate([a, a[:1]], 0) if a.shape[0] == 1 else a

    def row(kind, name, form, M, us, bytes_read):
        floor = 1e6 * bytes_read / bw
        rows.append(dict(kind=kind, shape=name, form=form, batch=M, us=us, floor_us=floor, of_floor=floor / us))
        print(f"{kind:6s} {name:18s} {form:9s} M={M:2d} {us:8.2f} us  floor {floor:6.2f} us  "
              f"{100 * floor / us:5.1f}%", flush=True)

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
        launch_rows(jax, jnp, timed, row)

    out = {"device": f"{dev.platform}: {dev.device_kind}", "bandwidth_Bps": bw,
           "versions": {"python": platform.python_version(), "jax": jax.__version__},
           "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]), "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


def launch_rows(jax, jnp, timed, row):
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    x = jnp.zeros((8, 1024), jnp.bfloat16)

    def mosaic(ncta, smem_kib=0, barrier=False):
        cols = 1024 // ncta

        def body(x_ref, y_ref):
            def scoped(buf, bar, *pad):
                i = lax.axis_index("cta")
                plgpu.copy_gmem_to_smem(x_ref.at[:, pl.ds(i * cols, cols)], buf, bar.at[0])
                plgpu.barrier_wait(bar.at[0])
                if barrier:
                    sem = pl.get_global(plgpu.SemaphoreType.REGULAR)
                    plgpu.semaphore_signal(sem, 1, memory_scope="gpu")
                    plgpu.semaphore_wait(sem, ncta, decrement=False, memory_scope="gpu")
                plgpu.copy_smem_to_gmem(buf, y_ref.at[:, pl.ds(i * cols, cols)])
                plgpu.wait_smem_to_gmem(0)

            pads = (plgpu.SMEM((smem_kib * 512,), jnp.bfloat16),) if smem_kib else ()
            pl.run_scoped(scoped, plgpu.SMEM((8, cols), jnp.bfloat16), plgpu.Barrier(num_barriers=1), *pads)

        return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(ncta,), grid_names=("cta",))

    forms = [("mosaic_4", mosaic(4)), ("mosaic_128", mosaic(128)),
             ("mosaic_128_smem200k", mosaic(128, 200)), ("mosaic_128_barrier", mosaic(128, barrier=True)),
             ("mosaic_128_smem_barrier", mosaic(128, 200, barrier=True))]
    for form, fn in forms:
        try:
            row("launch", "8x1024 copy", form, 8, timed(fn, x), 2 * x.nbytes)
        except Exception as e:  # noqa: BLE001 - a form that fails must not hide the others
            print(f"launch {form} failed: {type(e).__name__}: {str(e)[:600]}", flush=True)


if __name__ == "__main__":
    main()
