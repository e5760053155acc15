"""Whether our GPU kernels give bitwise the same outputs and gradients when called again on the same inputs.

Each case is one jitted forward + backward at configs/small.py's shapes (skewed expert loads, packed documents),
run `--repeats` times; a case reports how many runs differ from the first and by how much. A race in a kernel
(a staging buffer reused before its store has read it, a ring slot refilled early) shows here as a rare
mismatch; XLA's own nondeterministic ops (scatter-adds) are not in these programs. Prints a table, writes JSON.

    python experiments/check_kernel_determinism.py [--repeats 50] [--tokens 4096] [--cases down,attention] \
        [--out OUT.json]
"""

import argparse
import datetime
import json
import os
import platform
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def skewed_group_sizes(key, rows: int, groups: int, ffn_fraction: float = 2 / 3):
    """Group sizes summing to about ffn_fraction of rows (the rest is the zero-expert tail), Zipf-like skew."""
    import jax
    import jax.numpy as jnp

    w = jax.random.uniform(key, (groups,)) ** 3
    sizes = jnp.floor(w / w.sum() * rows * ffn_fraction).astype(jnp.int32)
    return sizes.at[0].set(0)  # one empty group


def cases(tokens: int, impl: str):
    """name -> (jitted fn of no arguments' inputs, inputs): each returns a tuple of outputs and gradients."""
    import jax
    import jax.numpy as jnp

    from lcflash.kernels.doc_attention.pallas_mgpu import doc_attention, mla_doc_attention
    from lcflash.kernels.gmm import api

    D, F, G, K = 1024, 384, 128, 12
    M = tokens * K
    ks = jax.random.split(jax.random.PRNGKey(0), 12)
    bf = jnp.bfloat16
    gs = skewed_group_sizes(ks[0], M, G)
    x = jax.random.normal(ks[1], (M, D), bf)
    w_gu = (jax.random.normal(ks[2], (G, D, 2 * F)) * D ** -0.5).astype(bf)
    w_dn = (jax.random.normal(ks[3], (G, F, D)) * F ** -0.5).astype(bf)
    r_h = jax.random.normal(ks[4], (M, F), bf)
    r_y = jax.random.normal(ks[5], (M, D), bf)
    live = (jnp.arange(M) < gs.sum())[:, None]  # rows past the groups are undefined where tails are skipped

    def halves(x, w_gu):
        h, vjp = jax.vjp(lambda x, w: api.gmm_swiglu_halves(x, w, gs, impl=impl), x, w_gu)
        return (h,) + vjp(r_h)

    def down(h, w_dn):
        y, vjp = jax.vjp(lambda h, w: api.gmm(h, w, gs, impl=impl), h, w_dn)
        return (y,) + vjp(r_y)

    def ffn(x, w_gu, w_dn):  # SwiGLU's backward in the down projection's d_lhs kernel
        y, vjp = jax.vjp(lambda x, a, b: api.gmm_swiglu_ffn(x, a, b, gs, impl=impl, zero_tail=False), x, w_gu, w_dn)
        return (y,) + vjp(r_y)

    def gather(x_td, idx):  # the dispatch gather kernel: rows up to sum(group_sizes), rounded up to 128
        from lcflash.kernels.row_gather import take_rows
        return (take_rows(x_td, idx, gs.sum()),)

    B, T, H = tokens // 1024, 1024, 8
    q = jax.random.normal(ks[6], (B, T, H, 192), bf)
    kk = jax.random.normal(ks[7], (B, T, H, 192), bf)
    v = jax.random.normal(ks[8], (B, T, H, 128), bf)
    do = jax.random.normal(ks[9], (B, T, H, 128), bf)
    doc_start = jax.random.bernoulli(ks[10], 1 / 400, (B, T)).at[:, 0].set(True)
    first = jax.lax.cummax(jnp.where(doc_start, jnp.arange(T), 0), axis=1)

    def attention(q, k, v):
        o, vjp = jax.vjp(lambda q, k, v: doc_attention(q, k, v, first, scale=192 ** -0.5), q, k, v)
        return (o,) + vjp(do)

    def mla_attention(q, kv, kpe):  # the model's form: kv = [k_nope | v], one rope key for all heads
        o, vjp = jax.vjp(lambda q, kv, kpe: mla_doc_attention(q, kv, kpe, first, scale=192 ** -0.5, nope_dim=128),
                         q, kv, kpe)
        return (o,) + vjp(do)

    mask = lambda outs: tuple(jnp.where(live, o, 0) if o.shape[0] == M else o for o in outs)
    h0 = jax.nn.silu(x[:, :F]) * x[:, F:2 * F]
    return {
        f"gmm_swiglu_halves ({impl})": (jax.jit(lambda x, w: mask(halves(x, w))), (x, w_gu)),
        f"gmm down ({impl})": (jax.jit(lambda h, w: mask(down(h, w))), (jnp.where(live, h0, 0), w_dn)),
        f"gmm_swiglu_ffn ({impl})": (jax.jit(lambda x, a, b: mask(ffn(x, a, b))), (x, w_gu, w_dn)),
        "row_gather": (jax.jit(lambda x, i: mask(gather(x, i))),
                       (x[:tokens], jax.random.randint(ks[11], (M,), 0, tokens))),
        "doc_attention": (jax.jit(attention), (q, kk, v)),
        "mla_doc_attention": (jax.jit(mla_attention),
                              (q, jnp.concatenate([kk[..., :128], v], -1), kk[:, :, 0, 128:])),
    }


def check(fn, args, repeats: int) -> dict:
    """Compared on the device: only a flag and a difference per output come back to the host."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def compare(a, b):
        same = jnp.array_equal(a, b, equal_nan=True)
        diff = jnp.nanmax(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
        return same, diff

    first = fn(*args)
    bad, worst = [], 0.0
    for i in range(1, repeats):
        res = jax.device_get([compare(a, b) for a, b in zip(first, fn(*args))])
        differing = [j for j, (same, _) in enumerate(res) if not same]
        if differing:
            diff = max(float(res[j][1]) for j in differing)
            bad.append({"run": i, "outputs_differing": differing, "max_abs_diff": diff})
            worst = max(worst, diff)
    return {"repeats": repeats, "runs_differing": len(bad), "max_abs_diff": worst, "first_differences": bad[:5]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens (x 12 expert rows); a multiple of 1024")
    ap.add_argument("--impl", default="pallas_chain")
    ap.add_argument("--cases", default="", help="comma-separated substrings of the case names to run (default all)")
    ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "kernel_determinism.json"))
    args = ap.parse_args()
    import jax

    rows = []
    for name, (fn, inputs) in cases(args.tokens, args.impl).items():
        if args.cases and not any(c in name for c in args.cases.split(",")):
            continue
        try:
            r = {"case": name, **check(fn, inputs, args.repeats)}
        except Exception as e:  # report and go on to the next case
            rows.append({"case": name, "error": f"{type(e).__name__}: {str(e)[:400]}"})
            print(rows[-1], flush=True)
            continue
        rows.append(r)
        print(f"{name:32s} {r['runs_differing']:3d} of {r['repeats'] - 1} reruns differ  "
              f"(max abs diff {r['max_abs_diff']:.3g})", flush=True)
    dev = jax.devices()[0]
    out = {"device": f"{dev.platform}: {dev.device_kind}", "tokens": args.tokens,
           "versions": {"python": platform.python_version(), "jax": jax.__version__},
           "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]), "results": rows}
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
