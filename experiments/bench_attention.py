"""Benchmark training attention at configs/small.py's shape: how the packed-document mask reaches cuDNN.

MLA's heads have qk 192 (nope 128 + rope 64) and v 128. The variants, all bf16 forward and forward+backward:
  dpa_mask     : the model's path until session 7: `jax.nn.dot_product_attention`, v zero-padded to 192, the
                 segment mask as a dense mask (cuDNN turns it into a bias), is_causal=True
  cudnn_docs   : the model's path in sessions 7-9, `lcflash.model.mla.fused_attention(..., "cudnn", "causal_docs")`
                 (called "model" in the JSON of those sessions)
  pallas       : our Mosaic GPU kernels (`train_attn_impl="pallas"`, lcflash/kernels/doc_attention), causal_docs;
                 the model's path on a Hopper GPU since session 10 ("auto"); since session 13 in MLA's form
                 (`mla_doc_attention`: q, kv = [k_nope | v] and the shared rope key read where they are); since
                 session 31 q as q_nope and the roped q_pe, two arrays (`mla.Q_PARTS`)
  pallas_masked: `pallas` with every visited block masked, also the whole ones next to the diagonal
                 (`pallas_mgpu.UNMASKED_RUNS` off: before session 32; "pallas_runs" was the unmasked form)
  pallas_dq_recompute: `pallas` with the dq kernel recomputing dS (`pallas_mgpu.DQ_FROM_DS` off: before session 27)
  pallas_joined: `pallas` with q joined as [nope | rope] first (`mla.Q_PARTS` off: before session 31)
  pallas_dqdsN : `pallas` with the dq kernel loading N blocks of dS and K ahead (`pallas_mgpu.DQ_DS_DEPTH`)
  pallas_heads : the same kernels on per-head keys [k_nope | rope key] and v (the form of sessions 10-12)
  pallas_causal: the same told the mask is plainly causal (not the model's semantics; against cudnn_causal)
  pallas_dABC  : `pallas` with the forward, dq and dk/dv kernels loading A, B and C blocks ahead (named on demand;
                 in MLA's form since session 15, per-head keys before)
  dpa_causal   : `jax.nn.dot_product_attention` without the segment mask (not the model's semantics)
  cudnn_causal : cuDNN's MLA form (v kept at 128) through `jax._src.cudnn`, causal, no segments
  jax_mgpu_causal: JAX's example Mosaic GPU flash attention (`jax.experimental.pallas.ops.gpu.attention_mgpu`: two
                 compute warpgroups in ping-pong, FA3's schedule), causal, v padded to 192, in float16 (its
                 buffers' type); the peer of pallas_causal (not the model's semantics)
  tokamax_docs : tokamax's Mosaic GPU flash attention (FA3's schedule; run only when named: tokamax needs Python
                 >= 3.12), the model's `train_attn_impl="tokamax"` path (lcflash/kernels/doc_attention/
                 tokamax_attention.py): per-head keys [k_nope | rope key] and v of 128, the documents as each row's
                 first visible key (its `Mask(k_start=...)`: the blocks before it skipped); tokamax_causal: causal
  cudnn_mask   : the same with the segment mask (as a bias)
  cudnn_packed : the same with the documents as packed segments (q/kv offsets and lengths per row);
                 _padv with v zero-padded to 192 as well; _mM with M segment slots per row
Variants that keep the model's semantics are checked against `dpa_mask` (outputs and gradients).
`--isolate` runs each variant in its own process: a cuDNN illegal address breaks the CUDA context, and every
variant after it in the same process then fails too (`bench_attention_h200.json`).

    python experiments/bench_attention.py --out OUT/bench_attention.json [--batch 16] [--seq 1024] [--isolate]
"""

import argparse
import datetime
import functools
import json
import os
import subprocess
import sys
import tempfile
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from experiments.bench_moe_gemm import time_ms  # noqa: E402
from lcflash.kernels.doc_attention import pallas_mgpu  # noqa: E402
from lcflash.model import mla  # noqa: E402
from lcflash.model.transformer import causal_mask  # noqa: E402


def segment_ids(batch, seq, mean_doc, seed):
    """Document ids like the loader's (a new id at each bos), documents of geometric length."""
    rng = np.random.default_rng(seed)
    starts = rng.random((batch, seq)) < 1.0 / mean_doc
    starts[:, 0] = True
    return jnp.asarray(np.cumsum(starts, axis=1, dtype=np.int32))


def segment_runs(segment_ids_bt, max_segments: int):
    """Packed documents as cuDNN's ragged layout: per row the start and length of each run of equal segment ids,
    `max_segments` slots filled with -1 ([B, M] lengths, [B, M + 1] starts). Rows with more runs are cut."""
    B, T = segment_ids_bt.shape
    new_bt = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]], axis=1)
    starts_bm = jax.vmap(lambda f: jnp.nonzero(f, size=max_segments + 1, fill_value=-1)[0])(new_bt)
    starts_bm = starts_bm.astype(jnp.int32)
    first, nxt = starts_bm[:, :-1], starts_bm[:, 1:]
    lens_bm = jnp.where(first < 0, -1, jnp.where(nxt < 0, T, nxt) - first).astype(jnp.int32)
    return lens_bm, starts_bm


def variants(seg_bt, max_segments):
    B, T = seg_bt.shape
    mask_bts = causal_mask(B, T, T, None, seg_bt)

    def dpa(q_nope, q_pe, k_nope, kpe, v, with_mask=True):
        q, k = mla.fused_heads(q_nope, q_pe, k_nope, kpe)
        return jax.nn.dot_product_attention(q, k, mla.pad_head(v, q.shape[-1]),
                                            mask=mask_bts[:, None] if with_mask else None, scale=SCALE,
                                            is_causal=True, implementation="cudnn")[..., :v.shape[-1]]

    def cudnn_docs(q_nope, q_pe, k_nope, kpe, v):
        kv = jnp.concatenate([k_nope, v], axis=-1)
        return mla.fused_attention(q_nope, q_pe, kv, kpe, mask_bts, SCALE, "cudnn", "causal_docs")

    def cudnn(q_nope, q_pe, k_nope, kpe, v, packed=False, pad_v=False, bias=False):
        from jax._src.cudnn import fused_attention_stablehlo as fa
        q, k = mla.fused_heads(q_nope, q_pe, k_nope, kpe)
        dv = v.shape[-1]
        if pad_v:
            v = mla.pad_head(v, q.shape[-1])
        kw = dict(mask=mask_bts[:, None]) if bias else {}
        if packed:
            lens_bm, offs_bm = segment_runs(seg_bt, max_segments)
            kw = dict(q_seqlen=lens_bm, kv_seqlen=lens_bm, q_offsets=offs_bm, kv_offsets=offs_bm)
        return fa.dot_product_attention(q, k, v, scale=SCALE, mask_type=fa.MaskType.CAUSAL, **kw)[..., :dv]

    def pallas(q_nope, q_pe, k_nope, kpe, v, kind="causal_docs", impl="pallas"):
        # kv = [k_nope | v] as the model's up projection gives it (the concatenate is timed too, here only)
        kv = jnp.concatenate([k_nope, v], axis=-1)
        return mla.fused_attention(q_nope, q_pe, kv, kpe, mask_bts, SCALE, impl, kind)

    def pallas_with(*args, module=pallas_mgpu, **switches):
        """pallas with module switches (of pallas_mgpu by default) set, read while the forward is traced."""
        with mock.patch.multiple(module, **switches):
            return pallas(*args)

    def pallas_depths(q_nope, q_pe, k_nope, kpe, v, depths, heads=False):
        from lcflash.kernels.doc_attention.pallas_mgpu import doc_attention, mla_doc_attention
        from lcflash.kernels.doc_attention.reference import first_visible
        if heads:
            q, k = mla.fused_heads(q_nope, q_pe, k_nope, kpe)
            return doc_attention(q, k, v, first_visible(mask_bts), scale=SCALE, depths=depths)
        q, kv = jnp.concatenate([q_nope, q_pe], axis=-1), jnp.concatenate([k_nope, v], axis=-1)
        return mla_doc_attention(q, kv, kpe, first_visible(mask_bts), scale=SCALE, nope_dim=q_nope.shape[-1],
                                 depths=depths)

    def jax_mgpu(q_nope, q_pe, k_nope, kpe, v, block=64):
        from jax.experimental.pallas.ops.gpu import attention_mgpu as am
        q, k = mla.fused_heads(q_nope, q_pe, k_nope, kpe)
        cfg = am.TuningConfig(block_q=block, block_kv=block, max_concurrent_steps=2, causal=True,
                              block_q_dkv=block, block_kv_dkv=block, block_q_dq=block, block_kv_dq=block)
        f16 = lambda a: a.astype(jnp.float16)  # noqa: E731 -- its shared-memory buffers are float16
        o = am.attention(f16(q * SCALE), f16(k), f16(mla.pad_head(v, q.shape[-1])), cfg)  # it does not scale
        return o[..., :v.shape[-1]].astype(q.dtype)

    return {
        "tokamax_docs": functools.partial(pallas, impl="tokamax"),
        "tokamax_causal": functools.partial(pallas, kind="causal", impl="tokamax"),
        "jax_mgpu_causal": jax_mgpu,
        "jax_mgpu_causal_b128": functools.partial(jax_mgpu, block=128),
        **{f"pallas_d{a}{b}{c}": functools.partial(pallas_depths, depths=(a, b, c))
           for a in (1, 2, 3) for b in (1, 2, 3) for c in (1, 2, 3)},
        "dpa_mask": dpa,
        "cudnn_docs": cudnn_docs,
        "pallas": pallas,
        "pallas_causal": functools.partial(pallas, kind="causal"),
        "pallas_masked": functools.partial(pallas_with, UNMASKED_RUNS=False),
        "pallas_dq_recompute": functools.partial(pallas_with, DQ_FROM_DS=False),
        "pallas_joined": functools.partial(pallas_with, module=mla, Q_PARTS=False),
        **{f"pallas_dqds{d}": functools.partial(pallas_with, DQ_DS_DEPTH=d) for d in (1, 2, 3, 4, 6)},
        "pallas_heads": functools.partial(pallas_depths, depths=pallas_mgpu.DEPTHS, heads=True),
        "dpa_causal": functools.partial(dpa, with_mask=False),
        "cudnn_causal": cudnn,
        "cudnn_mask": functools.partial(cudnn, bias=True),
        "cudnn_packed": functools.partial(cudnn, packed=True),
        "cudnn_packed_padv": functools.partial(cudnn, packed=True, pad_v=True),
    }


SCALE = 192 ** -0.5
# and every cudnn_packed_*, pallas_d*
SAME_SEMANTICS = ("cudnn_docs", "dpa_mask", "cudnn_mask", "pallas", "pallas_masked", "pallas_dq_recompute",
                  "pallas_joined", "pallas_heads", "tokamax_docs")


def measure(todo, seg_bt, x, do, flops):
    """todo: (row name, variant name, max_segments). The segment ids are an argument of the timed functions, as
    in the model: as a closure constant XLA folds the masks' block plans at compile time (and its constant folder
    once crashed on one of them)."""
    rows, ref = [], None
    for name, variant, m in todo:
        def f(seg, *a, variant=variant, m=m):
            return variants(seg, m)[variant](*a)

        fwd = jax.jit(f)
        fb = jax.jit(lambda seg, *a, f=f: jax.vjp(functools.partial(f, seg), *a)[1](do))
        args = (seg_bt, *x)
        row = dict(variant=name, max_segments=m)
        try:
            out = (fwd(*args), fb(*args))
            row["fwd_ms"] = time_ms(fwd, args)[0]
            row["fwd_bwd_ms"] = time_ms(fb, args)[0]
            row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
            row["fwd_bwd_tflops"] = 3.5 * flops / row["fwd_bwd_ms"] / 1e9
            if name == "dpa_mask":
                ref = out
            elif (name in SAME_SEMANTICS or name.startswith(("cudnn_packed", "pallas_d"))) and ref is not None:
                errs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b))
                                                       / jnp.max(jnp.abs(b.astype(jnp.float32)))), out, ref)
                row["max_rel_err_vs_dpa_mask"] = max(jax.tree.leaves(errs))
        except Exception as e:  # noqa: BLE001 -- a variant cuDNN rejects is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def isolated(args, names):
    """Each variant (with dpa_mask, its reference) in a child process of this script; a child that dies is a row
    with its exit code and stderr tail. Returns (rows, the first child's metadata)."""
    rows, meta = [], {}
    passthrough = [f"--batch={args.batch}", f"--seq={args.seq}", f"--heads={args.heads}",
                   f"--mean_doc={args.mean_doc}", f"--max_segments={args.max_segments}"]
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names):
            if name == "dpa_mask" and len(names) > 1:
                continue  # every child runs it; its row is kept from the first
            out = os.path.join(tmp, f"{i}.json")
            p = subprocess.run([sys.executable, os.path.abspath(__file__), *passthrough, f"--variants={name}",
                                f"--out={out}"], capture_output=True, text=True)
            if p.returncode != 0 or not os.path.exists(out):
                rows.append(dict(variant=name, error=f"process exited {p.returncode}: {p.stderr[-300:]}"))
            else:
                with open(out) as fh:
                    got = json.load(fh)
                have_ref = any(r["variant"] == "dpa_mask" for r in rows)
                rows += [r for r in got.pop("results") if r["variant"] != "dpa_mask" or not have_ref]
                meta = meta or got
            print(json.dumps(rows[-1]), flush=True)
    return rows, meta


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--mean_doc", type=float, default=400.0, help="mean document length in tokens")
    ap.add_argument("--max_segments", default="16,1024", help="static segment slots per row (packed variant)")
    ap.add_argument("--variants", default="", help="comma-separated names to run (default: all)")
    ap.add_argument("--out", default="experiments/bench_attention.json")
    ap.add_argument("--isolate", action="store_true", help="each variant in its own process")
    args = ap.parse_args()
    if args.isolate:  # the children hold the GPU; this process only lists the variants and merges their rows
        jax.config.update("jax_platforms", "cpu")
    B, T, H = args.batch, args.seq, args.heads
    ks = jax.random.split(jax.random.key(0), 6)
    bf = jnp.bfloat16
    x = (jax.random.normal(ks[0], (B, T, H, 128), bf), jax.random.normal(ks[1], (B, T, H, 64), bf),
         jax.random.normal(ks[2], (B, T, H, 128), bf), jax.random.normal(ks[3], (B, T, 64), bf),
         jax.random.normal(ks[4], (B, T, H, 128), bf))
    do = jax.random.normal(ks[5], (B, T, H, 128), bf)
    seg_bt = segment_ids(B, T, args.mean_doc, 1)
    n_seg = int(jnp.max(seg_bt))
    flops = 2 * B * H * (T * (T + 1) // 2) * (192 + 128)  # causal: QK^T and PV over the lower triangle
    meta = dict(device=str(jax.devices()[0].device_kind), versions=dict(jax=jax.__version__),
                date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command="python " + " ".join(sys.argv), batch=B, seq=T, heads=H, max_segments_in_a_row=n_seg,
                flops_note="causal fwd FLOPs 2*B*H*T(T+1)/2*(192+128); bwd counted as 2.5x fwd")
    print(json.dumps(meta), flush=True)
    todo = [(name, name, None) for name in variants(seg_bt, 0) if not name.startswith("cudnn_packed")]
    keep = set(filter(None, args.variants.split(",")))
    todo = [v for v in todo if not v[0].startswith(("pallas_d", "tokamax")) or v[0] in keep]   # only those asked for
    if any(v[0].startswith("tokamax") for v in todo):
        meta["versions"]["tokamax"] = __import__("tokamax").__version__
    for m in [int(s) for s in args.max_segments.split(",")]:
        if m >= n_seg:
            todo += [(f"{name}_m{m}", name, m) for name in variants(seg_bt, m) if name.startswith("cudnn_packed")]
    todo = [v for v in todo if not keep or v[0] in keep or v[0] == "dpa_mask"]
    if args.isolate:
        rows, child_meta = isolated(args, [v[0] for v in todo])
        meta.update({k: child_meta[k] for k in ("device", "versions") if k in child_meta})
    else:
        rows = measure(todo, seg_bt, x, do, flops)
    print(f"\n{'variant':<22}{'fwd ms':>9}{'TFLOP/s':>9}{'fwd+bwd ms':>12}{'TFLOP/s':>9}{'rel err':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<22} {r['error'][:90]}")
            continue
        err = r.get("max_rel_err_vs_dpa_mask")
        print(f"{r['variant']:<22}{r['fwd_ms']:9.3f}{r['fwd_tflops']:9.1f}{r['fwd_bwd_ms']:12.3f}"
              f"{r['fwd_bwd_tflops']:9.1f}{'' if err is None else f'{err:10.2e}'}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(dict(meta, results=rows), fh, indent=1)


if __name__ == "__main__":
    main()
