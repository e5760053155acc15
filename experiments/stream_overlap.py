"""Does a second GPU stream hide memory-bound work under matmuls on one GPU?

The training step is ~40% memory-bound XLA work (AdamW, norms, SwiGLU, MoE row passes) run one kernel after
another between compute-bound matmuls (docs/training.md, "Where a step goes"). XLA runs a `call` annotated
`_xla_stream_annotation` (JAX: `compute_on("gpu_stream:N")`) asynchronously on stream N. This times, in one jit:
a chain of matmuls alone (cuBLAS, or our grouped-GEMM kernels), an AdamW-shaped fp32 update alone, both on one
stream, and both with the update on stream 1. The hidden fraction is (matmul + update - both) / min(the two).

    python experiments/stream_overlap.py --out experiments/stream_overlap.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
from jax.experimental.compute_on import compute_on

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.bench_decode import device_name, now_utc, versions  # noqa: E402 -- after the path


def matmul_chain(kind: str, reps: int, rows: int, d: int, f: int, groups: int):
    """(fn(x, w1, w2) -> x', args): `reps` times x <- (x @ w1) @ w2, cuBLAS or our grouped kernels."""
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(k[0], (rows, d), jnp.bfloat16)
    if kind == "cublas":
        w1 = (jax.random.normal(k[1], (d, f)) / d ** 0.5).astype(jnp.bfloat16)
        w2 = (jax.random.normal(k[2], (f, d)) / f ** 0.5).astype(jnp.bfloat16)

        def fn(x, w1, w2):
            for _ in range(reps):
                x = (x @ w1) @ w2
            return x
        return fn, (x, w1, w2)
    from lcflash.kernels.gmm import gmm
    w1 = (jax.random.normal(k[1], (groups, d, f)) / d ** 0.5).astype(jnp.bfloat16)
    w2 = (jax.random.normal(k[2], (groups, f, d)) / f ** 0.5).astype(jnp.bfloat16)
    sizes = jnp.full((groups,), rows // groups, jnp.int32)

    def fn(x, w1, w2):
        for _ in range(reps):
            x = gmm(gmm(x, w1, sizes, impl=kind), w2, sizes, impl=kind)
        return x
    return fn, (x, w1, w2)


def adamw_update(n: int):
    """(fn(p, m, v, g) -> (p, m, v), args): one AdamW step over n fp32 values (28 bytes each)."""
    k = jax.random.split(jax.random.PRNGKey(1), 4)
    args = tuple(jax.random.normal(kk, (n,), jnp.float32) for kk in k)

    def fn(p, m, v, g):
        m = 0.9 * m + 0.1 * g
        v = 0.95 * v + 0.05 * g * g
        return p - 1e-3 * (m / (jnp.sqrt(jnp.abs(v)) + 1e-16) + 0.1 * p), m, v
    return fn, args


def timed(fn, args, iters: int) -> float:
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


def run(kind: str, a) -> dict:
    mm, mm_args = matmul_chain(kind, a.reps, a.rows, a.d, a.f, a.groups)
    up, up_args = adamw_update(a.n)
    mm_j, up_j = jax.jit(mm), jax.jit(up)

    def both(stream: str | None):
        def fn(mm_args, up_args):
            y = mm_j(*mm_args)
            if stream is None:
                return y, up_j(*up_args)
            with compute_on(stream):
                return y, up_j(*up_args)
        return jax.jit(fn)

    row = {"matmuls": kind,
           "matmul_ms": timed(mm_j, mm_args, a.iters),
           "update_ms": timed(up_j, up_args, a.iters),
           "both_one_stream_ms": timed(both(None), (mm_args, up_args), a.iters),
           "both_two_streams_ms": timed(both("gpu_stream:1"), (mm_args, up_args), a.iters)}
    shorter = min(row["matmul_ms"], row["update_ms"])
    row["hidden_fraction"] = (row["matmul_ms"] + row["update_ms"] - row["both_two_streams_ms"]) / shorter
    hlo = both("gpu_stream:1").lower(mm_args, up_args).compile().as_text()
    row["async_in_hlo"] = "async-start" in hlo or "call-start" in hlo
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", default="cublas,pallas_chain", help="matmuls: cublas and/or a moe.gmm_impl")
    ap.add_argument("--reps", type=int, default=8, help="(x @ w1) @ w2 pairs in the chain")
    ap.add_argument("--rows", type=int, default=24576)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--f", type=int, default=4096)
    ap.add_argument("--groups", type=int, default=32, help="groups of the grouped kernels")
    ap.add_argument("--n", type=int, default=200_000_000, help="fp32 values the update reads and writes")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    rows = [run(k, a) for k in a.kinds.split(",")]
    print(f"{'matmuls':>14} {'matmul ms':>10} {'update ms':>10} {'one stream':>11} {'two streams':>12} "
          f"{'hidden':>7} async")
    for r in rows:
        print(f"{r['matmuls']:>14} {r['matmul_ms']:10.3f} {r['update_ms']:10.3f} {r['both_one_stream_ms']:11.3f} "
              f"{r['both_two_streams_ms']:12.3f} {r['hidden_fraction']:7.2f} {r['async_in_hlo']}")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"device": device_name(), "versions": versions(), "date_utc": now_utc(),
                       "command": " ".join(["python"] + sys.argv), "args": vars(a), "results": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
