"""Why `bench_decode_ops.phase_chain` hung on an H200 (session 35): one variant per process, each under its own time
limit, from the launch rows' barrier kernel (which ran) down to the phase chain's parts. GPU only.

    for v in control sem1 sem_static sem_only min_nopf min_pf few_ctas; do timeout 25 python \
        experiments/debug_phase_chain.py $v; echo "$v rc=$?"; done

control: the launch rows' barrier kernel; sem1 / sem_static: 1 / 8 barriers unrolled (targets as Python ints);
sem_only: 8 barriers in a fori_loop (traced targets); min_nopf / min_pf: phase_chain with 2 phases, loads after /
before the barrier; few_ctas: 8 phases on 4 CTAs.
"""

import os
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_decode_ops as ops  # noqa: E402

v = sys.argv[1]
ncta, phases, rows, pf = 128, 8, 1, True
if v == "min_nopf":
    phases, pf = 2, False
elif v == "min_pf":
    phases = 2
elif v == "p8_nopf":
    pf = False
elif v == "few_ctas":
    ncta = 4
if v == "control":   # the launch rows' barrier kernel, which ran in call 3
    k = ops.mosaic_step(jax, jnp, 128, barrier=True)
    x = jnp.ones((8, 1024), jnp.bfloat16)
    t = time.perf_counter(); jax.block_until_ready(jax.jit(k)(x)); print(v, "ran", time.perf_counter() - t, flush=True)
    sys.exit(0)
if v == "sem1":
    phases = 1
    v = "sem_static"
if v == "sem_only":   # phases of nothing but the barrier
    def body(x_ref, out_ref):
        sem = pl.get_global(plgpu.SemaphoreType.REGULAR)
        def ph(p, c):
            plgpu.semaphore_signal(sem, 1, memory_scope="gpu")
            plgpu.semaphore_wait(sem, (p + 1) * ncta, decrement=False, memory_scope="gpu")
            return c
        lax.fori_loop(0, phases, ph, 0)
        out_ref[lax.axis_index("cta"), :] = x_ref[lax.axis_index("cta"), :]
    k = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((ncta, 128), jnp.float32), grid=(ncta,), grid_names=("cta",))
    x = jnp.ones((ncta, 128), jnp.float32)
    t = time.perf_counter(); jax.block_until_ready(jax.jit(k)(x)); print(v, "ran", time.perf_counter() - t, flush=True)
    sys.exit(0)
if v == "sem_static":   # the same with Python-int targets (unrolled)
    def body(x_ref, out_ref):
        sem = pl.get_global(plgpu.SemaphoreType.REGULAR)
        for p in range(phases):
            plgpu.semaphore_signal(sem, 1, memory_scope="gpu")
            plgpu.semaphore_wait(sem, (p + 1) * ncta, decrement=False, memory_scope="gpu")
        out_ref[lax.axis_index("cta"), :] = x_ref[lax.axis_index("cta"), :]
    k = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((ncta, 128), jnp.float32), grid=(ncta,), grid_names=("cta",))
    x = jnp.ones((ncta, 128), jnp.float32)
    t = time.perf_counter(); jax.block_until_ready(jax.jit(k)(x)); print(v, "ran", time.perf_counter() - t, flush=True)
    sys.exit(0)
w = (jnp.arange(1, phases + 1, dtype=jnp.float32)[:, None, None, None] * jnp.ones((phases, ncta, rows, 256))).astype(jnp.bfloat16)
t = time.perf_counter()
out = jax.block_until_ready(jax.jit(ops.phase_chain(jax, jnp, ncta, phases, rows, pf))(w))
print(v, "ran", time.perf_counter() - t, "ok", bool(jnp.all(out[-1] == phases * (phases + 1) / 2)), flush=True)
