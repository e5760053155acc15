"""Router logits (x @ W, [16384, 1024] x [1024, 192], configs/small.py at 16 x 1024 tokens): time forward +
backward per dot algorithm, and the error against an fp64 product on the host. x holds bf16 values, as the model's
(its RMSNorm output in the bf16 compute dtype); the `router ...` rows are lcflash.model.router.router_logits as the
model calls it (bf16 x), forward precision / backward precision.

    python experiments/bench_router_dot.py --out OUT/bench_router_dot.json
"""

import argparse
import datetime
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from experiments.bench_moe_gemm import time_ms  # noqa: E402
from lcflash.model.router import router_logits  # noqa: E402

ALGOS = {"highest": jax.lax.Precision.HIGHEST, "bf16_x6": jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X6,
         "bf16_x3": jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3, "tf32_x3": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--e", type=int, default=192)
    ap.add_argument("--algos", default="", help="comma-separated rows to run (default: all)")
    ap.add_argument("--out", default="experiments/bench_router_dot.json")
    a = ap.parse_args()
    x_bf16 = jax.random.normal(jax.random.key(0), (a.tokens, a.d), jnp.bfloat16)
    x = x_bf16.astype(jnp.float32)
    w = jax.random.normal(jax.random.key(1), (a.d, a.e), jnp.float32) * 0.02
    g = jax.random.normal(jax.random.key(2), (a.tokens, a.e), jnp.float32)
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    fns = {name: (lambda x, w, prec=prec: jnp.einsum("td,de->te", x, w, precision=prec), x)
           for name, prec in ALGOS.items()}
    for fwd, bwd in (("highest", "bf16_3x"), ("bf16_split", "bf16_3x"), ("bf16_split", "bf16_split")):
        fns[f"router {fwd}/{bwd}"] = (lambda x, w, fwd=fwd, bwd=bwd: router_logits(x, w, bwd, fwd), x_bf16)
    if a.algos:
        fns = {k: v for k, v in fns.items() if k in a.algos.split(",")}
    rows = []
    for name, (fn, xin) in fns.items():
        f = jax.jit(fn)
        fb = jax.jit(lambda x, w, fn=fn: jax.vjp(fn, x, w)[1](g))
        row = dict(algo=name)
        try:
            y = np.asarray(f(xin, w), np.float64)
            row["max_rel_err_vs_fp64"] = float(np.max(np.abs(y - exact)) / np.max(np.abs(exact)))
            row["fwd_ms"], row["fwd_bwd_ms"] = time_ms(f, (xin, w))[0], time_ms(fb, (xin, w))[0]
        except Exception as e:  # noqa: BLE001 -- an algorithm this backend lacks is reported
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = dict(device=str(jax.devices()[0].device_kind), versions=dict(jax=jax.__version__),
                date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command="python " + " ".join(sys.argv), shape=[a.tokens, a.d, a.e])
    print(f"{'algo':<30}{'fwd ms':>9}{'fwd+bwd ms':>12}{'rel err':>11}")
    for r in rows:
        if "error" not in r:
            print(f"{r['algo']:<30}{r['fwd_ms']:9.3f}{r['fwd_bwd_ms']:12.3f}{r['max_rel_err_vs_fp64']:11.2e}")
    with open(a.out, "w") as fh:
        json.dump(dict(meta, results=rows), fh, indent=1)


if __name__ == "__main__":
    main()
