"""experiments/bench_decode_ops.py's fixed-cost rows: the slope harness on the CPU, the Mosaic GPU steps lowered."""

import jax
import jax.numpy as jnp
import pytest

from experiment_scripts import load

ops = load("bench_decode_ops")


def test_per_call_counts_the_kernels_one_step_adds():
    x = jnp.zeros((8, 1024), jnp.bfloat16)
    forms = dict(ops.launch_forms(jax, jnp, gpu=False))
    assert list(forms) == ["xla", "xla_in_while"]
    us, kernels = ops.per_call(jax, forms["xla"], x, (4, 12), reps=3)
    # XLA cannot fuse a step's reduction into the previous step's: at least one kernel per step.
    assert kernels >= 1 and us > 0
    _, loop_kernels = ops.per_call(jax, forms["xla_in_while"], x, (4, 12), reps=3)
    assert loop_kernels >= kernels  # the loop's own condition and counter come on top
    assert float(ops.chain(forms["xla"], x + 1, 3)[0, 0]) == 8.0  # 1 -> 2 -> 4 -> 8: the steps are chained


@pytest.mark.parametrize("tma,smem_kib", [(False, 0), (True, 0), (True, 200)])
def test_mosaic_steps_compute_what_they_say(tma, smem_kib):
    """In Pallas' GPU interpreter: x + 1 by plain loads, a copy by TMA (the timed steps do the work they name)."""
    x = jax.random.normal(jax.random.key(3), (8, 1024), jnp.float32).astype(jnp.bfloat16)
    y = ops.mosaic_step(jax, jnp, 4, tma=tma, smem_kib=smem_kib, interpret=True)(x)
    assert jnp.array_equal(y, x + 1 if not tma else x)


@pytest.mark.parametrize("form", ["mosaic_direct_4", "mosaic_direct_64", "mosaic_tma_4", "mosaic_tma_128",
                                  "mosaic_tma_128_smem200k", "mosaic_tma_128_barrier"])
def test_mosaic_steps_lower_for_cuda(form):
    step = dict(ops.launch_forms(jax, jnp, gpu=True))[form]
    x = jax.ShapeDtypeStruct((8, 1024), jnp.bfloat16)
    text = jax.jit(lambda v: ops.chain(step, v, 2)).trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 2


@pytest.mark.parametrize("m,k,n,ctas", [(1, 256, 128, 4), (3, 512, 192, 2)])
def test_mosaic_matvec_matches_the_fp32_product(m, k, n, ctas):
    """In Pallas' GPU interpreter, on fresh random inputs: K split over CTAs (S = 2 and 1), several rows."""
    kx, kw = jax.random.split(jax.random.key(m * 1000 + k + n))
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = jax.random.normal(kw, (n, k), jnp.bfloat16)
    got = ops.mosaic_matvec(jax, jnp, m, k, n, ctas=ctas, interpret=True)(x, w)
    want = jnp.einsum("mk,nk->mn", x.astype(jnp.float32), w.astype(jnp.float32))
    assert got.dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(got.astype(jnp.float32) - want))) <= 0.01 * float(jnp.max(jnp.abs(want)))


def test_mosaic_matvec_lowers_for_cuda_at_the_decode_shapes():
    for m, k, n in [(1, 1024, 4096), (8, 2048, 1024), (1, 1024, 448)]:
        mv = ops.mosaic_matvec(jax, jnp, m, k, n)
        args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((n, k), jnp.bfloat16))
        assert "mosaic_gpu" in jax.jit(mv).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("prefetch,sync", [(True, "grid"), (False, "grid"), (True, "neighbour")])
def test_phase_chain_lowers_for_cuda(prefetch, sync):
    """Its grid barrier and flags are GMEM semaphores, which Pallas' GPU interpreter cannot run: lowered only (the
    largest slices: three slots of 64 KB of shared memory)."""
    rows = max(ops.PHASE_ROWS)
    kernel = ops.phase_chain(jax, jnp, 128, ops.PHASES[0], rows, prefetch, sync=sync)
    w = jax.ShapeDtypeStruct((ops.PHASES[0], 128, rows, 256), jnp.bfloat16)
    assert "mosaic_gpu" in jax.jit(kernel).trace(w).lower(lowering_platforms=("cuda",)).as_text()


def test_phase_chain_refuses_an_unknown_sync():
    with pytest.raises(ValueError, match="sync='tree'; valid: 'grid', 'neighbour'"):
        ops.phase_chain(jax, jnp, 128, 8, 1, sync="tree")
