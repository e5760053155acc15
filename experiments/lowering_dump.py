"""Write the expert kernels' default programs as lowered for CUDA, without source locations, one file each.

For refactors that should not change a kernel: run it before and after, then `diff -r`. Lowering needs no GPU
(132 SMs are assumed, as in tests' mosaic_gpu_trace). Source locations are left out, since Mosaic GPU modules embed
file:line and would differ wherever a line moved. On JAX 0.10.2 the same code gives the same bytes; JAX 0.11
serializes a kernel differently on every lowering (experiments/HISTORY.md, session 53), so compare on 0.10.

    python experiments/lowering_dump.py /tmp/before   # ... edit ...
    python experiments/lowering_dump.py /tmp/after && diff -r /tmp/before /tmp/after
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (K, N, G, M): LongCat down at T = 512 and [gate | up] at T = 4096, configs/small.py's [gate | up], decode-sized
GMM_SHAPES = ((2048, 6144, 64, 32768), (6144, 2048, 64, 262144), (1024, 768, 128, 65536), (256, 512, 8, 96))
FFN_SHAPES = ((6144, 2048, 64, 32768), (1024, 384, 128, 65536))  # (D, F, G, M): LongCat, configs/small.py


def _without_locations():
    from jax._src import source_info_util
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir

    mlir.source_info_to_location = lambda *a, **k: ir.Location.unknown()
    source_info_util.user_frame = lambda *a, **k: None


def programs():
    """name -> (function, argument shapes)."""
    from lcflash.kernels.gmm import api, pallas_gmm

    sd = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)  # noqa: E731

    def fwd_bwd(impl):
        def f(lhs, rhs, dout, sizes):
            out, vjp = jax.vjp(lambda a, b: api.gmm(a, b, sizes, impl=impl), lhs, rhs)
            return (out, *vjp(dout))
        return f

    def ffn(x, w_gu, w_down, dy, sizes):
        y, vjp = jax.vjp(lambda *a: pallas_gmm.gmm_swiglu_ffn(*a, sizes, zero_tail=False), x, w_gu, w_down)
        return (y, *vjp(dy))

    out = {}
    for k, n, g, m in GMM_SHAPES:
        for impl in ("pallas_chain", "pallas"):
            out[f"gmm_{impl}_k{k}_n{n}_g{g}_m{m}"] = (fwd_bwd(impl), (sd(m, k), sd(g, k, n), sd(m, n),
                                                                       sd(g, dt=jnp.int32)))
    for d, f, g, m in FFN_SHAPES:
        out[f"ffn_d{d}_f{f}_g{g}_m{m}"] = (ffn, (sd(m, d), sd(g, d, 2 * f), sd(g, f, d), sd(m, d),
                                                 sd(g, dt=jnp.int32)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    args = ap.parse_args()
    from lcflash.kernels.gmm import mgpu_kernels, pallas_gmm

    _without_locations()
    pallas_gmm._interpret = lambda: False
    mgpu_kernels._num_sms = lambda interpret: 132
    os.makedirs(args.out_dir, exist_ok=True)
    for name, (fn, shapes) in programs().items():
        text = jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
        with open(os.path.join(args.out_dir, f"{name}.txt"), "w") as f:
            f.write(text)
        print(f"{name}: {len(text):,} characters", flush=True)


if __name__ == "__main__":
    main()
