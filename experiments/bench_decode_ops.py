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
FFN sublayer forms, h [M, 1024] -> h + FFN(rms_norm(h)), FFN 1024 -> 2048 -> 1024 (configs/small.py's dense FFN):
* xla:    the decode path's XLA form (the norm deferred past the gate|up matvec, decode.ffn_sublayer), silu(g) * u
          written once before the down matvec (decode.MATERIALIZE_SWIGLU).
* xla_fused: the same with silu(g) * u fused into the down matvec's reduction (XLA's choice).
* pallas: one Mosaic GPU kernel with a grid barrier (lcflash.kernels.decode_mlp), norm weight folded into the rows.
  Each form's error against an fp32 evaluation of the model's FFN is printed beside it.
Fixed costs, x [8, 1024] bf16 (launch): x + 1 as one XLA fusion; a copy of x as Mosaic GPU kernels of 4 and of 128 CTAs
(each copying its slice through shared memory by TMA), the 128 CTAs with 200 KiB of shared memory each, and with a grid
barrier (GMEM semaphore) between their load and store. Every timed call also runs two small XLA kernels of the
timing loop; compare rows with each other.
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
    ap.add_argument("--sections", default="matvec,moe,ffn,launch",
                    help="comma-separated: matvec, moe, ffn, launch")
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

    def row(kind, name, form, M, us, bytes_read, **extra):
        floor = 1e6 * bytes_read / bw
        rows.append(dict(kind=kind, shape=name, form=form, batch=M, us=us, floor_us=floor, of_floor=floor / us,
                         **extra))
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

    if "ffn" in sections:
        ffn_rows(jax, jnp, timed, row, [int(b) for b in args.batches.split(",")])
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

    from jax import lax

    forms = [("xla", lambda a: a + 1), ("mosaic_4", mosaic(4)), ("mosaic_128", mosaic(128)),
             ("mosaic_128_smem200k", mosaic(128, 200)), ("mosaic_128_barrier", mosaic(128, barrier=True)),
             ("mosaic_128_smem_barrier", mosaic(128, 200, barrier=True))]
    for form, fn in forms:
        try:
            row("launch", "8x1024 copy", form, 8, timed(fn, x), 2 * x.nbytes)
        except Exception as e:  # noqa: BLE001 - a form that fails must not hide the others
            print(f"launch {form} failed: {type(e).__name__}: {str(e)[:600]}", flush=True)


def ffn_rows(jax, jnp, timed, row, batches, D=1024, F=2048, eps=1e-6):
    from lcflash.infer import decode
    from lcflash.infer.decode import MLPWeights, ffn_kernel_runs, ffn_sublayer
    from lcflash.kernels.decode_mlp import fold_norm
    from lcflash.model.norm import rms_norm

    bf = jnp.bfloat16
    ks = jax.random.split(jax.random.key(3), 4)
    wgu = (jax.random.normal(ks[0], (2 * F, D), jnp.float32) * D ** -0.5).astype(bf)
    wd = (jax.random.normal(ks[1], (D, F), jnp.float32) * F ** -0.5).astype(bf)
    norm_w = (1.0 + 0.1 * jax.random.normal(ks[2], (D,), jnp.float32)).astype(bf)
    p = MLPWeights(wgu, wd)
    pk = p._replace(w_gate_up_normed=fold_norm(wgu, norm_w))

    class Cfg:   # the two fields ffn_sublayer reads
        rms_norm_eps, hidden_size, ffn_hidden_size = eps, D, F

    def model_f32(h):
        x = rms_norm(h.astype(jnp.float32), norm_w.astype(jnp.float32), eps)
        gu = x @ wgu.astype(jnp.float32).T
        return h.astype(jnp.float32) + (jax.nn.silu(gu[:, :F]) * gu[:, F:]) @ wd.astype(jnp.float32).T

    nbytes = wgu.nbytes + wd.nbytes
    for M in batches:
        h = jax.random.normal(jax.random.fold_in(ks[3], M), (M, D), jnp.float32).astype(bf)
        want = np.asarray(model_f32(h)) - np.asarray(h, np.float32)
        for form, weights in (("xla", p), ("xla_fused", p), ("pallas", pk)):
            if form == "pallas" and not ffn_kernel_runs(Cfg, bf, M):
                print(f"ffn pallas M={M}: the kernel does not run here", flush=True)
                continue
            decode.MATERIALIZE_SWIGLU = form != "xla_fused"   # read while tracing
            fn = jax.jit(lambda h, w: ffn_sublayer(Cfg, w, h[:, None, :], norm_w)[:, 0])
            try:
                got = np.asarray(fn(h, weights), np.float32) - np.asarray(h, np.float32)
                err = float(np.abs(got - want).max() / np.abs(want).max())
                row("ffn", f"{D}->{F}->{D}", form, M, timed(fn, h, weights), nbytes, max_rel_error=err)
                print(f"       max error / max |FFN| against fp32: {err:.2e}", flush=True)
            except Exception as e:  # noqa: BLE001 - a form that fails must not hide the others
                print(f"ffn {form} M={M} failed: {type(e).__name__}: {str(e)[:600]}", flush=True)


if __name__ == "__main__":
    main()
