"""Matrix-vector products for decode (a few token rows) as a Pallas Mosaic GPU kernel, with fused epilogues.

`y[M, N] = x[M, K] @ w[N, K]^T` for M <= 64 rows (the decode layout keeps the contraction axis last). Each CTA owns
`tn` output columns, so that N / tn CTAs stream the weights. Per K stage it loads the rows of x (TMA; the stage
buffer has the 64 rows a wgmma needs, rows past M are zero-filled by TMA or left unused) and a [tn, kc] weight
tile, read transposed as the wgmma B operand; `depth` stages are in flight. Epilogues, applied to the fp32
accumulator before the only store:

* "swiglu": w is [2F, K] (gate rows, then up rows, as `decode.MLPWeights.w_gate_up`); the CTA accumulates the
  gate and the up columns of the same features and stores silu(g) * u, rounded as the XLA path rounds it (g and u,
  then each op of XLA's logistic expansion 1 / (1 + exp(-g)), silu and the product, in the input dtype).
* "residual": stores residual + y (y rounded to the input dtype first, as `h + einsum(...)` does).

Untimed (written on 2026-12-02 without a GPU): `DecodeModel(..., matvec_impl="pallas")` opts in; the XLA matvecs
stay the default until a benchmark says otherwise.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

ROWS = 64                  # wgmma M
MAX_DEPTH = 4
SMEM_BYTES = 200 * 1024    # of the 227 KB a Hopper CTA may use


def smem_bytes(tn: int, kc: int, depth: int, n_weights: int, itemsize: int = 2) -> int:
    """Stage buffers (64 token rows + n_weights [tn, kc] weight tiles per stage) and the output / residual tiles."""
    return itemsize * (depth * kc * (ROWS + n_weights * tn) + 2 * ROWS * tn)


def tiles(n_cols: int, k: int, n_weights: int = 1) -> tuple[int, int, int]:
    """(tn, kc, depth): the widest tile of 8-64 columns that still gives >= 128 CTAs (else 8), K stages of 256, 128
    or 64 and up to MAX_DEPTH of them in flight, shrunk (kc, then depth) to fit SMEM_BYTES."""
    tn = 8
    for t in (16, 32, 64):
        if n_cols % t == 0 and n_cols // t >= 128:
            tn = t
    kcs = [c for c in (256, 128, 64) if k % c == 0]
    for depth in range(MAX_DEPTH, 0, -1):
        for kc in kcs:
            if smem_bytes(tn, kc, min(depth, k // kc), n_weights) <= SMEM_BYTES:
                return tn, kc, min(depth, k // kc)
    return tn, kcs[-1], 1


def supported(m: int, k: int, n: int, dtype, epilogue: str | None) -> str | None:
    """None if the kernel takes these shapes, else why not."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {jnp.dtype(dtype).name}: the kernel needs bfloat16 or float16 (wgmma operands)"
    if not 1 <= m <= ROWS:
        return f"{m} rows: the kernel takes 1 to {ROWS}"
    if k % 64:
        return f"K = {k} must be a multiple of 64"
    if epilogue == "swiglu" and n % 2:
        return f"swiglu needs [2F, K] weights, got N = {n}"
    if (n // 2 if epilogue == "swiglu" else n) % 8:
        return f"{'F' if epilogue == 'swiglu' else 'N'} must be a multiple of 8"
    return None


def _kernel(x_ref, w_ref, res_ref, out_ref, scoped, *, m8, tn, kc, n_k, depth, f_off, epilogue, interpret):
    (a_smem, b_smems, o_smem, r_smem), (a_bar, b_bars, r_bar) = scoped
    dtype = a_smem.dtype
    col = lax.axis_index("n") * tn
    rows = pl.ds(0, m8)
    col_offsets = (0, f_off) if epilogue == "swiglu" else (0,)

    def fetch(i, slot):
        ks = pl.ds(i * kc, kc)
        plgpu.copy_gmem_to_smem(x_ref.at[rows, ks], a_smem.at[slot, rows], a_bar.at[slot])
        for off, b_smem, b_bar in zip(col_offsets, b_smems, b_bars):
            plgpu.copy_gmem_to_smem(w_ref.at[pl.ds(off + col, tn), ks], b_smem.at[slot], b_bar.at[slot])

    for i in range(min(depth, n_k)):
        fetch(i, i)
    if epilogue == "residual":
        plgpu.copy_gmem_to_smem(res_ref.at[rows, pl.ds(col, tn)], r_smem.at[rows], r_bar.at[0])

    if interpret:   # GPU interpret mode has no register layouts and no transposed wgmma operands
        zeros = jnp.zeros((ROWS, tn), jnp.float32)
    else:
        zeros = plgpu.layout_cast(jnp.full((ROWS, tn), 0.0, jnp.float32), plgpu.Layout.WGMMA)
    accs = tuple(zeros for _ in col_offsets)

    def body(i, accs):
        slot = lax.rem(i, jnp.int32(depth))
        plgpu.barrier_wait(a_bar.at[slot])
        for b_bar in b_bars:
            plgpu.barrier_wait(b_bar.at[slot])
        if interpret:
            accs = tuple(acc + jnp.dot(a_smem[slot], b_smem[slot].T, preferred_element_type=jnp.float32)
                         for acc, b_smem in zip(accs, b_smems))
        else:
            def mma(acc_refs):
                for acc_ref, b_smem in zip(acc_refs, b_smems):
                    plgpu.wgmma(acc_ref, a_smem.at[slot], plgpu.transpose_ref(b_smem.at[slot], (1, 0)))

            accs = pl.run_state(mma)(tuple(plgpu.ACC.init(acc) for acc in accs))   # waits for the wgmma

        @pl.when(i + depth < n_k)
        def _():
            fetch(i + depth, slot)

        return accs

    accs = lax.fori_loop(0, n_k, body, accs)
    f32 = lambda v: v.astype(dtype).astype(jnp.float32)   # noqa: E731  (round to the input dtype, as XLA stores)
    if epilogue == "swiglu":
        g, u = f32(accs[0]), f32(accs[1])
        sig = f32(1.0 / f32(1.0 + f32(jnp.exp(-g))))   # XLA's logistic expansion, rounded op by op
        y = (f32(g * sig) * u).astype(dtype)
    elif epilogue == "residual":
        plgpu.barrier_wait(r_bar.at[0])
        r = r_smem[...] if interpret else plgpu.load(r_smem, (), layout=plgpu.Layout.WGMMA, optimized=False)
        y = (f32(accs[0]) + r.astype(jnp.float32)).astype(dtype)
    else:
        y = accs[0].astype(dtype)
    o_smem[...] = y
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem.at[rows], out_ref.at[rows, pl.ds(col, tn)])
    plgpu.wait_smem_to_gmem(0)


def _interpret_params():
    """Pallas' GPU interpreter (CPU), reading the rows past M as uninitialised where a GPU's TMA zero-fills them."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams(out_of_bounds_reads="uninitialized")


@functools.partial(jax.jit, static_argnames=("epilogue", "tn", "kc", "depth", "interpret"))
def matvec(x_mk, w_nk, residual_mn=None, *, epilogue: str | None = None, tn: int | None = None,
           kc: int | None = None, depth: int | None = None, interpret: bool = False):
    """x @ w^T with `epilogue` None, "swiglu" (w = [gate; up], returns [M, F]) or "residual" (returns
    residual + x @ w^T). Output in x's dtype. interpret: run in Pallas' GPU interpreter (CPU tests)."""
    if epilogue not in (None, "swiglu", "residual"):
        raise ValueError(f"epilogue {epilogue!r} is not one of None, 'swiglu', 'residual'")
    if (epilogue == "residual") != (residual_mn is not None):
        raise ValueError("pass residual_mn exactly when epilogue='residual'")
    M, K = x_mk.shape
    N = w_nk.shape[0]
    if w_nk.shape[1] != K:
        raise ValueError(f"x is [M, {K}] but w is {tuple(w_nk.shape)}: w must be [N, K] (contraction last)")
    why = supported(M, K, N, x_mk.dtype, epilogue)
    if why:
        raise NotImplementedError(f"matvec pallas kernel: {why}")
    dtype = x_mk.dtype
    n_out = N // 2 if epilogue == "swiglu" else N
    n_b = 2 if epilogue == "swiglu" else 1
    auto_tn, auto_kc, auto_depth = tiles(n_out, K, n_b)
    tn, kc, depth = tn or auto_tn, kc or auto_kc, depth or auto_depth
    if n_out % tn or K % kc or tn % 8 or kc % 64:
        raise ValueError(f"tiles tn={tn}, kc={kc} must divide the {n_out} output columns and K = {K} "
                         "(tn a multiple of 8, kc of 64)")
    n_k = K // kc
    depth = max(1, min(depth, n_k))
    m8 = -(-M // 8) * 8
    tiled = () if interpret else (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    kernel = functools.partial(_kernel, m8=m8, tn=tn, kc=kc, n_k=n_k, depth=depth, f_off=n_out, epilogue=epilogue,
                               interpret=interpret)
    res = residual_mn.astype(dtype) if epilogue == "residual" else jnp.zeros((8, 8), dtype)

    def entry(x_ref, w_ref, res_ref, out_ref):
        pl.run_scoped(
            lambda a, bs, o, r, ab, bbs, rb: kernel(x_ref, w_ref, res_ref, out_ref, ((a, bs, o, r), (ab, bbs, rb))),
            plgpu.SMEM((depth, ROWS, kc), dtype, transforms=tiled),
            tuple(plgpu.SMEM((depth, tn, kc), dtype, transforms=tiled) for _ in range(n_b)),
            plgpu.SMEM((ROWS, tn), dtype),
            plgpu.SMEM((ROWS, tn), dtype),
            plgpu.Barrier(num_barriers=depth),
            tuple(plgpu.Barrier(num_barriers=depth) for _ in range(n_b)),
            plgpu.Barrier(num_barriers=1),
        )

    # TMA clips a store past the last row on the GPU; the interpreter does not, so it gets whole 8-row tiles.
    out_rows = m8 if interpret else M
    y = plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct((out_rows, n_out), dtype),
        grid=(n_out // tn,),
        grid_names=("n",),
        compiler_params=plgpu.CompilerParams(approx_math=False),
        **({"interpret": _interpret_params()} if interpret else {}),
    )(x_mk, w_nk.astype(dtype), res)
    return y[:M]


def matvec_reference(x_mk, w_nk, residual_mn=None, *, epilogue: str | None = None):
    """The XLA decode path's arithmetic (lcflash/infer/decode.py): what the kernel must reproduce."""
    dtype = x_mk.dtype
    y = jnp.einsum("md,nd->mn", x_mk, w_nk.astype(dtype))
    if epilogue == "swiglu":
        F = w_nk.shape[0] // 2
        return jax.nn.silu(y[:, :F]) * y[:, F:]
    if epilogue == "residual":
        return residual_mn + y
    return y
