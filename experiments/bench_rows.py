"""The MoE's row-buffer passes (lcflash/model/slots.py) at configs/small.py's training shape: 32 x 1024 tokens,
D 1024, top-12 of 128 FFN + 64 zero experts (8 FFN slots per token on average), and the router's top-k before them
(lcflash.model.router.LARGE_TOP_K_IMPLS: lax.top_k, a sort on a GPU, against k argmax passes and lax.top_k over
scores padded to 1024 columns, where XLA uses its own TopK kernel instead of a sort; rank counts at small sizes only;
the JSON records which agree with lax.top_k). Times each pass against the bytes it must move at the measured copy
bandwidth; --cases picks some.

    python experiments/bench_rows.py --out OUT/bench_rows.json
"""

import argparse
import datetime
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from experiments.bench_moe_gemm import measure_bandwidth_gbs, time_ms  # noqa: E402
from lcflash.kernels import on_hopper  # noqa: E402
from lcflash.model import router  # noqa: E402
from lcflash.model import slots as slots_mod  # noqa: E402


def routing(T, K, n_ffn, n_zero, key):
    """Top-K of uniform scores over every expert: K * n_ffn / (n_ffn + n_zero) FFN slots per token on average."""
    k1, k2 = jax.random.split(key)
    experts_tk = jax.lax.top_k(jax.random.uniform(k1, (T, n_ffn + n_zero)), K)[1].astype(jnp.int32)
    return experts_tk, jax.random.uniform(k2, (T, K), jnp.float32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--topk", type=int, default=12)
    ap.add_argument("--ffn", type=int, default=128)
    ap.add_argument("--zero", type=int, default=64)
    ap.add_argument("--cases", default="", help="run only the cases whose names contain one of these "
                    "comma-separated words (default: all)")
    ap.add_argument("--out", default="experiments/bench_rows.json")
    a = ap.parse_args()
    T, D, K, N = a.tokens, a.d, a.topk, a.ffn
    experts_tk, w_tk = routing(T, K, N, a.zero, jax.random.key(0))
    s = jax.jit(slots_mod.sort_slots, static_argnums=1)(experts_tk, N)
    n = int(s.group_sizes_g.sum())
    x_td = jax.random.normal(jax.random.key(1), (T, D), jnp.bfloat16)
    y_md = jax.random.normal(jax.random.key(2), (T * K, D), jnp.bfloat16)
    g_td = jax.random.normal(jax.random.key(3), (T, D), jnp.float32).astype(jnp.bfloat16).astype(jnp.float32)
    w_tk = jnp.where(s.ffn_tk, w_tk, 0.0)
    sorted_e = jnp.sort(jnp.minimum(experts_tk, N).reshape(-1))
    bw = measure_bandwidth_gbs()
    b2, f4 = 2 * D, 4 * D   # bytes of one bf16 / fp32 row

    def searchsorted(method):
        return lambda e: jnp.searchsorted(e, jnp.arange(N + 1, dtype=jnp.int32), method=method)

    def switched(switches, on, fn):
        """fn traced with slots_mod.<each switch> set to `on` (the switches are read while the pass is traced)."""
        def f(*args):
            for switch in switches:
                setattr(slots_mod, switch, on)
            return fn(*args)
        return f

    # As routed_experts calls them on our grouped matmuls: rows past the FFN slots may stay unwritten, and the
    # combine's sum is cast to bf16 after (so its gradient holds bf16 values; g_td above does).
    combine = lambda y, w: slots_mod.combine_rows(y, w, s, jnp.bfloat16, tail_unread=True)  # noqa: E731
    dispatch = functools.partial(switched, ("GATHER_KERNEL",),
                                 fn=lambda x: slots_mod.dispatch_rows(x, s, tail_unread=True))
    combine_bwd = functools.partial(switched, ("GATHER_KERNEL", "COMBINE_GRAD_KERNEL"),
                                    fn=lambda y, w, g: jax.vjp(combine, y, w)[1](g))

    scores_te = jax.random.uniform(jax.random.key(4), (T, N + a.zero), jnp.float32)
    top_k = {name: jax.jit(functools.partial(f, k=K)) for name, f in router.LARGE_TOP_K_IMPLS.items()}
    if T * (N + a.zero) ** 2 <= router.RANK_TOP_K_MAX_ELEMENTS:   # larger, its [T, E, E] compares compile for minutes
        top_k["rank"] = jax.jit(lambda x: router.top_k_by_rank(x, K, x)[0])
    want_idx = top_k["sort"](scores_te)
    same_top_k = {name: bool(jnp.array_equal(want_idx, f(scores_te))) for name, f in top_k.items()}
    e4 = 4 * T * (N + a.zero) + 4 * T * K   # the scores read, the indices written

    cases = [  # name, function, args, bytes it must move (reads + writes of the FFN rows)
        *((f"router top-k, {name}", f, (scores_te,), e4) for name, f in top_k.items()),
        ("group bounds, searchsorted scan", searchsorted("scan"), (sorted_e,), 4 * T * K),
        ("group bounds, searchsorted compare_all", searchsorted("compare_all"), (sorted_e,), 4 * T * K),
        ("sort_slots (compare_all bounds)", lambda e: slots_mod.sort_slots(e, N), (experts_tk,), 16 * T * K),
        ("dispatch gather, XLA", dispatch(False), (x_td,), T * b2 + n * b2),
        ("dispatch backward (slot sum)", lambda g: jax.vjp(dispatch(False), x_td)[1](g)[0], (y_md,),
         n * b2 + T * b2),
        ("combine forward", combine, (y_md, w_tk), n * b2 + T * f4),
        ("combine backward, XLA", combine_bwd(False), (y_md, w_tk, g_td), 2 * n * b2 + T * f4),
    ]
    if on_hopper():
        at = [c[0] for c in cases].index("dispatch gather, XLA")
        cases.insert(at, ("dispatch gather, kernel", dispatch(True), (x_td,), T * b2 + n * b2))
        cases.append(("combine backward, d_y by the kernel", combine_bwd(True), (y_md, w_tk, g_td),
                      2 * n * b2 + T * f4))
    words = [w for w in a.cases.split(",") if w]
    cases = [c for c in cases if not words or any(w in c[0] for w in words)]
    rows, switches = [], (slots_mod.GATHER_KERNEL, slots_mod.COMBINE_GRAD_KERNEL)
    for name, f, args, nbytes in cases:
        ms = time_ms(jax.jit(f), args)[0]
        rows.append(dict(case=name, ms=ms, gb=nbytes / 1e9, floor_ms=nbytes / (bw * 1e9) * 1e3))
        print(json.dumps(rows[-1]), flush=True)
    slots_mod.GATHER_KERNEL, slots_mod.COMBINE_GRAD_KERNEL = switches
    meta = dict(device=str(jax.devices()[0].device_kind), versions=dict(jax=jax.__version__),
                date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command="python " + " ".join(sys.argv), tokens=T, d=D, topk=K, ffn_slots=n, copy_gbs=bw,
                top_k_equals_lax_top_k=same_top_k)
    print(f"{n} FFN slots of {T * K}; copy bandwidth {bw:.0f} GB/s; equal to lax.top_k: {same_top_k}")
    print(f"{'case':<42}{'ms':>9}{'floor ms':>10}{'x floor':>9}")
    for r in rows:
        print(f"{r['case']:<42}{r['ms']:9.3f}{r['floor_ms']:10.3f}{r['ms'] / r['floor_ms']:9.2f}")
    with open(a.out, "w") as fh:
        json.dump(dict(meta, results=rows), fh, indent=1)


if __name__ == "__main__":
    main()
