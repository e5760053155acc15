"""How a CTA's two compute warpgroups should split its output tile, measured on JAX's dense Mosaic GPU matmul.

Our expert kernels (lcflash/kernels/gmm/mgpu_kernels.py) give each warpgroup a column half of a 128 x 256 tile, so
each issues 128 x 128 wgmma (as two m64n128 instructions, each reading the whole B slice); the SwiGLU kernels, with
two accumulators, 128 x 64. Splitting by rows instead gives each warpgroup 64 x 256 (m64n256: B read once per k16
step, 17% fewer shared-memory operand bytes) at the same registers. JAX's example kernel
(`jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu`) has both splits (`wg_dimension`), so it answers whether the
row split pays. Dense products at the expert kernels' contraction and output widths. (At LongCat's shapes it did
not, session 45; our kernels' own row split lost there too and was removed in session 53.)

    python experiments/bench_wg_split.py --out OUT/bench_wg_split.json
"""

import argparse
import dataclasses
import datetime
import inspect
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bench_moe_gemm import time_ms  # noqa: E402

# (name, M, K, N): LongCat's products (K = contraction), configs/small.py's [gate | up] and down.
SHAPES = [
    ("longcat_2048_to_6144", 8192, 2048, 6144),   # down fwd, gate/up d_lhs: 32 steps per tile
    ("longcat_6144_to_2048", 8192, 6144, 2048),   # gate/up fwd, down d_lhs: 96 steps
    ("small_1024_to_768", 16384, 1024, 768),      # [gate | up] fwd (16 steps)
    ("small_384_to_1024", 16384, 384, 1024),      # down fwd (6 steps)
]
# (name, per-warpgroup tile_m, tile_n, wg_dimension); every CTA tile is 128 x 256 or 128 x 128.
VARIANTS = [
    ("wgN_128x128", 128, 128, "N"),   # ours: column halves of 128 x 256
    ("wgM_64x256", 64, 256, "M"),     # row halves of 128 x 256
    ("wgN_128x64", 128, 64, "N"),     # ours with two accumulators (SwiGLU): column halves of 128 x 128
    ("wgM_64x128", 64, 128, "M"),     # row halves of 128 x 128
    ("wgM_128x128", 128, 128, "M"),   # row halves of 256 x 128
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="experiments/bench_wg_split.json")
    ap.add_argument("--stages", default="4,3")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm

    fields = {f.name for f in dataclasses.fields(hm.TuningConfig)}
    c_arg = {"c": None} if "c" in inspect.signature(hm.matmul).parameters else {}
    rows = []
    for name, m, k, n in SHAPES:
        ka, kb = jax.random.split(jax.random.key(m + k + n))
        a = jax.random.normal(ka, (m, k), jnp.bfloat16)
        b = (jax.random.normal(kb, (k, n), jnp.float32) / np.sqrt(k)).astype(jnp.bfloat16)
        dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
        want = dot(a, b)
        fns = {"xla_dot": dot}
        rec = dict(shape=name, M=m, K=k, N=n, variants={})
        for vname, tm, tn, dim in VARIANTS:
            for st in (int(s) for s in args.stages.split(",")):
                kw = dict(tile_m=tm, tile_n=tn, tile_k=64, max_concurrent_steps=st, epi_tile_n=64, epi_tile_m=64,
                          grid_minor_dim=hm.MatmulDimension.N, grid_tile_width=8,
                          wg_dimension=hm.MatmulDimension[dim])
                cfg = hm.TuningConfig(**{key: v for key, v in kw.items() if key in fields})
                key = f"{vname}_{st}st"
                f = jax.jit(lambda x, y, cfg=cfg: hm.matmul(x, y, config=cfg, **c_arg))
                try:
                    got = f(a, b)
                    err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
                    rec["variants"][key] = dict(max_abs_err_vs_xla=err, ms=[])
                    fns[key] = f
                except Exception as e:  # noqa: BLE001
                    rec["variants"][key] = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
        rec["variants"]["xla_dot"] = dict(ms=[])
        for _ in range(args.rounds):
            for key, f in fns.items():
                rec["variants"][key]["ms"].append(time_ms(f, (a, b))[0])
        flops = 2 * m * k * n
        for key, v in rec["variants"].items():
            if v.get("ms"):
                v["tflops"] = flops / (np.median(v["ms"]) * 1e-3) / 1e12
        rows.append(rec)
        print(f"\n{name}: M={m} K={k} N={n}")
        for key, v in sorted(rec["variants"].items(), key=lambda kv: -kv[1].get("tflops", 0)):
            line = (f"{np.median(v['ms']):.4f} ms {v['tflops']:6.1f} TFLOP/s  err {v.get('max_abs_err_vs_xla', 0):.3g}"
                    if "tflops" in v else v.get("error", ""))
            print(f"  {key:22s} {line}", flush=True)
    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command="python " + " ".join(sys.argv))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(dict(meta=meta, results=rows), fh, indent=1)


if __name__ == "__main__":
    main()
