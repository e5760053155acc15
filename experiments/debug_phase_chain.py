"""Why `bench_decode_ops.phase_chain` hung on an H200 (session 35): one variant per process, each under its own time
limit, from the launch rows' barrier kernel (which ran) down to the phase chain's parts. GPU only.

    for v in control sem1 sem_static sem_only min_nopf min_pf few_ctas; do timeout 25 python \
        experiments/debug_phase_chain.py $v; echo "$v rc=$?"; done

control: the launch rows' barrier kernel; sem1 / sem_static: 1 / 8 barriers unrolled (targets as Python ints);
sem_only: 8 barriers in a fori_loop (traced targets); min_nopf / min_pf: phase_chain with 2 phases, loads after /
before the barrier; few_ctas: 8 phases on 4 CTAs; pN_nopf / pN_pf: N phases. Each phase_chain variant runs its
phases in a fori_loop, as the hung kernel did; with `_unrolled` appended, as straight-line code.

Session 36 (H200, JAX 0.11.2): every variant ran but few_ctas, p3_*, p4_* and p8_nopf, which hung after compiling;
p3_nopf_unrolled and p8_nopf_unrolled ran and were right. So the loop form hangs once the fori_loop runs two or
more phases, whatever the CTA count or slot reuse, and phase_chain now unrolls by default.
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


def barriers(ncta: int, phases: int, unrolled: bool):
    """Nothing but `phases` grid barriers on one GMEM counter, then a copy: targets as Python ints (unrolled) or
    traced (a fori_loop), as phase_chain has them."""
    def body(x_ref, out_ref):
        sem = pl.get_global(plgpu.SemaphoreType.REGULAR)

        def barrier(p, carry):
            plgpu.semaphore_signal(sem, 1, memory_scope="gpu")
            plgpu.semaphore_wait(sem, (p + 1) * ncta, decrement=False, memory_scope="gpu")
            return carry

        if unrolled:
            for p in range(phases):
                barrier(p, 0)
        else:
            lax.fori_loop(0, phases, barrier, 0)
        out_ref[lax.axis_index("cta"), :] = x_ref[lax.axis_index("cta"), :]

    return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((ncta, 128), jnp.float32), grid=(ncta,),
                        grid_names=("cta",))


def run(name, kernel, x):
    """Compiles, then runs: which of the two hangs shows in the last line printed."""
    t = time.perf_counter()
    compiled = jax.jit(kernel).lower(x).compile()
    print(name, "compiled", time.perf_counter() - t, flush=True)
    t = time.perf_counter()
    out = jax.block_until_ready(compiled(x))
    print(name, "ran", time.perf_counter() - t, flush=True)
    return out


v = sys.argv[1]
ncta, phases, rows, pf = 128, 8, 1, True
if v == "control":   # the launch rows' barrier kernel, which ran in call 3
    run(v, ops.mosaic_step(jax, jnp, 128, barrier=True), jnp.ones((8, 1024), jnp.bfloat16))
elif v in ("sem1", "sem_static", "sem_only"):
    run(v, barriers(ncta, 1 if v == "sem1" else phases, unrolled=v != "sem_only"), jnp.ones((ncta, 128), jnp.float32))
else:
    unroll = v.endswith("_unrolled")
    phases, pf, ncta = {"min_nopf": (2, False, ncta), "min_pf": (2, True, ncta), "p8_nopf": (phases, False, ncta),
                        "few_ctas": (phases, True, 4), "p3_pf": (3, True, ncta), "p4_pf": (4, True, ncta),
                        "p4_nopf": (4, False, ncta), "p3_nopf": (3, False, ncta)}[v.removesuffix("_unrolled")]
    w = (jnp.arange(1, phases + 1, dtype=jnp.float32)[:, None, None, None]
         * jnp.ones((phases, ncta, rows, 256))).astype(jnp.bfloat16)
    out = run(v, ops.phase_chain(jax, jnp, ncta, phases, rows, pf, unroll=unroll), w)
    print(v, "ok", bool(jnp.all(out[-1] == phases * (phases + 1) / 2)), flush=True)
