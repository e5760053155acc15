"""The dense SwiGLU FFN of a decode step as one Mosaic GPU kernel with a grid barrier (Hopper: TMA + wgmma).

At batch 1 a decode step is a chain of ~500 small kernels, and XLA runs an FFN sublayer as three of them: the
norm's reduction, the gate|up matrix-vector product and the down product (which recomputes SwiGLU in its
prologue). Here one kernel of NCTA CTAs does all of it:

1. every CTA loads the (row-padded) hidden rows x and its slice of the gate and up rows, computes the rows'
   1/rms itself (the diagonal of x x^T, one wgmma), and writes its slice of h = silu(g) * u to a scratch output;
   the FFN's norm weight is folded into the gate and up rows (`fold_norm`), so x is the raw residual stream;
2. all CTAs meet at a grid barrier (a GMEM semaphore that XLA zeroes before each call), then each reads all of h
   and writes its slice of the down product. Its down rows were loaded at the start, under phase 1.

The barrier needs all CTAs resident at once (NCTA <= the SM count, one CTA per SM by its shared memory) and no
other grid-barrier kernel running beside it: decode steps run their FFNs one after another.

x enters with its rows padded to a multiple of 8 (whole shared-memory tiles); wgmma's other rows up to 64 hold
whatever shared memory held and touch only those rows' own outputs, which are never read.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

ROWS = 64              # wgmma M: token rows per product (real rows first)
NCTA = 128             # CTAs; <= the SMs of an H100 / H200 (132), one CTA per SM
SMEM_BYTES = 227 * 1024


def choose_ncta(d: int, f: int) -> int:
    """The most CTAs, up to NCTA, that give every CTA a whole number of 8-row tiles of both products."""
    n = min(NCTA, math.gcd(d, f) // 8)
    while n > 1 and (f % (8 * n) or d % (8 * n)):
        n -= 1
    return max(n, 1)


def smem_bytes(d: int, f: int, ncta: int) -> int:
    """Peak shared memory per CTA (bf16): two x / h buffers and all but one chunk of the down rows throughout;
    the gate and up rows and the h tile in phase 1, the last down chunk in their place in phase 2."""
    kc = d // 2
    fc, dc = f // ncta, d // ncta
    return 2 * (2 * ROWS * kc + (f // kc - 1) * dc * kc + max(2 * fc * d + ROWS * fc, dc * kc))


def supported(m: int, d: int, f: int, dtype, ncta: int | None = None) -> str | None:
    """None if the kernel handles these shapes (m token rows, hidden d, FFN width f), else the reason."""
    ncta = ncta or choose_ncta(d, f)
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {jnp.dtype(dtype).name}: the kernel needs bfloat16 or float16 (wgmma operands)"
    if m > ROWS:
        return f"{m} token rows > {ROWS}"
    if d % 128 or f % (d // 2) or f < d:
        return f"hidden size {d} must be a multiple of 128 and the FFN width {f} >= it and a multiple of {d // 2}"
    if f % (8 * ncta) or d % (8 * ncta):
        return f"FFN width {f} and hidden size {d} must be multiples of 8 x {ncta} CTAs"
    if smem_bytes(d, f, ncta) > SMEM_BYTES - 1024:
        return f"{smem_bytes(d, f, ncta)} bytes of shared memory per CTA > {SMEM_BYTES - 1024}"
    return None


def _kernel(x_ref, wgu_ref, wd_ref, y_ref, hm_ref, *, m, d, f, fc, dc, eps, dtype, ncta, tiled):
    kc = d // 2
    nk1, nk2 = d // kc, f // kc
    nbuf = 2
    real = pl.ds(0, m)
    i = lax.axis_index("cta")
    iota = lambda shape, dim: plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)  # noqa

    def fetch_down(w2, bar, k, slot):
        plgpu.copy_gmem_to_smem(wd_ref.at[pl.ds(i * dc, dc), pl.ds(k * kc, kc)], w2.at[slot], bar.at[slot])

    def phase1(xbuf, w2a, w2a_bar, wg, wu, h_smem, x_bar, w_bar):
        for k in range(nk1):
            cols = pl.ds(k * kc, kc)
            plgpu.copy_gmem_to_smem(x_ref.at[:, cols], xbuf.at[k, real], x_bar.at[k])
            plgpu.copy_gmem_to_smem(wgu_ref.at[pl.ds(i * fc, fc), cols], wg.at[k], w_bar.at[2 * k])
            plgpu.copy_gmem_to_smem(wgu_ref.at[pl.ds(f + i * fc, fc), cols], wu.at[k], w_bar.at[2 * k + 1])
        for k in range(nk2 - 1):   # all but the last chunk of the down rows load under phase 1
            fetch_down(w2a, w2a_bar, k, k)
        for k in range(nk1):
            plgpu.barrier_wait(x_bar.at[k])

        def squares(acc_ref):
            for k in range(nk1):
                plgpu.wgmma(acc_ref, xbuf.at[k], xbuf.at[k].transpose((1, 0)))
            return acc_ref[...]

        xx = pl.run_scoped(squares, plgpu.ACC((ROWS, ROWS), jnp.float32))
        ss = jnp.where(iota((ROWS, ROWS), 0) == iota((ROWS, ROWS), 1), xx, 0.0).sum(axis=1)
        r = lax.rsqrt(ss * (1.0 / d) + eps)
        for k in range(2 * nk1):
            plgpu.barrier_wait(w_bar.at[k])

        def product(w):
            def body(acc_ref):
                for k in range(nk1):
                    plgpu.wgmma(acc_ref, xbuf.at[k], w.at[k].transpose((1, 0)))
                return acc_ref[...]
            acc = pl.run_scoped(body, plgpu.ACC((ROWS, fc), jnp.float32))
            # The model's rounding: the normed product in the compute dtype.
            return (acc * lax.broadcast_in_dim(r, acc.shape, [0])).astype(dtype).astype(jnp.float32)

        g, u = product(wg), product(wu)
        # jax.nn.silu(g) * u as XLA evaluates it in bf16: each op rounded to the compute dtype.
        rnd = lambda v: v.astype(dtype).astype(jnp.float32)   # noqa: E731
        sig = rnd(1.0 / (1.0 + jnp.exp(-g)))
        h_smem[...] = (rnd(g * sig) * u).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(h_smem.at[real], hm_ref.at[:, pl.ds(i * fc, fc)])
        plgpu.wait_smem_to_gmem(0)

    def phase2(xbuf, w2a, w2a_bar, w2b, w2b_bar, hm_bar):
        fetch_down(w2b, w2b_bar, nk2 - 1, 0)   # into the memory phase 1's weights held
        # Grid barrier: every CTA's slice of h is in GMEM before any CTA reads h.
        sem = pl.get_global(plgpu.SemaphoreType.REGULAR)
        plgpu.semaphore_signal(sem, 1, memory_scope="gpu")
        plgpu.semaphore_wait(sem, ncta, decrement=False, memory_scope="gpu")

        def fetch(k):
            plgpu.copy_gmem_to_smem(hm_ref.at[:, pl.ds(k * kc, kc)], xbuf.at[k % nbuf, real], hm_bar.at[k])

        for k in range(min(nbuf, nk2)):
            fetch(k)

        def down(acc_ref):
            for k in range(nk2):
                w = w2a.at[k] if k < nk2 - 1 else w2b.at[0]
                plgpu.barrier_wait(w2a_bar.at[k] if k < nk2 - 1 else w2b_bar.at[0])
                plgpu.barrier_wait(hm_bar.at[k])
                plgpu.wgmma(acc_ref, xbuf.at[k % nbuf], w.transpose((1, 0)))
                if k + nbuf < nk2:
                    plgpu.wgmma_wait(0)   # the buffer's product is done before the next chunk overwrites it
                    fetch(k + nbuf)
            return acc_ref[...]

        y = pl.run_scoped(down, plgpu.ACC((ROWS, dc), jnp.float32))
        y_ref[:, pl.ds(i * dc, dc)] = y.astype(dtype)

    def outer(xbuf, w2a, w2a_bar, hm_bar):
        pl.run_scoped(lambda *s: phase1(xbuf, w2a, w2a_bar, *s),
                      plgpu.SMEM((nk1, fc, kc), dtype, transforms=tiled),
                      plgpu.SMEM((nk1, fc, kc), dtype, transforms=tiled),
                      plgpu.SMEM((ROWS, fc), dtype),
                      plgpu.Barrier(num_barriers=nk1), plgpu.Barrier(num_barriers=2 * nk1))
        pl.run_scoped(lambda *s: phase2(xbuf, w2a, w2a_bar, *s[:2], hm_bar),
                      plgpu.SMEM((1, dc, kc), dtype, transforms=tiled), plgpu.Barrier(num_barriers=1))

    pl.run_scoped(outer, plgpu.SMEM((nbuf, ROWS, kc), dtype, transforms=tiled),
                  plgpu.SMEM((nk2 - 1, dc, kc), dtype, transforms=tiled),
                  plgpu.Barrier(num_barriers=nk2 - 1), plgpu.Barrier(num_barriers=nk2))


def decode_mlp_pallas(x_md, w_gate_up_folded, w_down, *, eps: float, ncta: int | None = None):
    """w_down . (silu(g) * u) with [g | u] = (w_gate_up_folded . x) / rms(x), for x [M, D] (M <= 64 token rows).
    Returns [M, D] in x's dtype."""
    M, D = x_md.shape
    F = w_down.shape[1]
    ncta = ncta or choose_ncta(D, F)
    why = supported(M, D, F, x_md.dtype, ncta)
    if why:
        raise NotImplementedError(f"decode_mlp pallas kernel: {why}; use impl='xla'")
    if w_gate_up_folded.shape != (2 * F, D) or w_down.shape != (D, F):
        raise ValueError(f"decode_mlp: w_gate_up {w_gate_up_folded.shape} and w_down {w_down.shape} must be "
                         f"[2F, D] and [D, F] for x [M, D] = {x_md.shape}")
    return _decode_mlp_pallas(x_md, w_gate_up_folded, w_down, eps=eps, ncta=ncta)


@functools.partial(jax.jit, static_argnames=("eps", "ncta"))
def _decode_mlp_pallas(x_md, w_gate_up, w_down, *, eps, ncta):
    M, D = x_md.shape
    F = w_down.shape[1]
    dtype = x_md.dtype
    m = -(-M // 8) * 8
    x = x_md if m == M else jnp.pad(x_md, ((0, m - M), (0, 0)))
    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    entry = functools.partial(_kernel, m=m, d=D, f=F, fc=F // ncta, dc=D // ncta, eps=eps, dtype=dtype, ncta=ncta,
                              tiled=tiled)
    y, _ = plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct((ROWS, D), dtype), jax.ShapeDtypeStruct((m, F), dtype)),
        grid=(ncta,),
        grid_names=("cta",),
    )(x, w_gate_up.astype(dtype), w_down.astype(dtype))
    return y[:M]


__all__ = ["choose_ncta", "decode_mlp_pallas", "supported"]
