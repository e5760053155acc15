"""Training MFU of configs/small.py on one H200, change by change: a bar per measured `bench_train.py` run (the JSON
beside each bar's label), against the 40% target of issue #8.

    python experiments/plot_train_progress.py [--out experiments/train_progress.png]
"""

import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))

# (label, JSON written by experiments/bench_train.py), in the order the changes landed.
RUNS = [
    ("pallas gmm, 4x1024", "bench_train_profile_h200.json"),
    ("+ cuDNN attention", "bench_train_cudnn.json"),
    ("+ layer scan unrolled", "bench_train_unroll12_h200.json"),
    ("16x1024, remat", "bench_train_b16_remat_unroll12_h200.json"),
    ("+ dispatch/combine by gathers", "bench_train_b16_take_rows_h200.json"),
    ("+ cuDNN told causal", "bench_train_b16_causal_h200.json"),
    ("+ cuDNN MLA form (v 128)", "bench_train_b16_cudnn_mla_docmask_true_h200.json"),
    ("+ remat keeps matmul outputs", "bench_train_b16_remat_dots_h200.json"),
    ("+ gmm outputs kept, router bwd bf16x3", "bench_train_b16_dots_h200.json"),
    ("same, 32x1024", "bench_train_b32_dots_router_bf16_3x_h200.json"),
    ("+ slot gathers, gate|up fused, bf16 experts kept", "bench_train_b32_small_h200.json"),
    ("same, 16x1024", "bench_train_b16_small_h200.json"),
    ("+ swiglu_halves (b32; within noise)", "bench_train_b32_swiglu_halves_h200.json"),
    ("+ our doc-masked flash attention", "bench_train_b32_pallas_attn_h200.json"),
    ("same, 16x1024", "bench_train_b16_pallas_attn_h200.json"),
    ("+ attention outputs staged, 2 CTAs/SM", "bench_train_b32_depths_combine_profile_h200.json"),
    ("A/B 1: SwiGLU by XLA", "bench_train_b32_epilogue_off_h200.json"),
    ("A/B 1: + SwiGLU in the gate|up kernel", "bench_train_b32_epilogue_h200.json"),
    ("A/B 2: SwiGLU by XLA", "bench_train_b32_epilogue_off_run2_h200.json"),
    ("A/B 2: + SwiGLU in the gate|up kernel", "bench_train_b32_epilogue_run2_h200.json"),
    ("A/B 1: tails stored", "bench_train_b32_tails_zt_h200.json"),
    ("A/B 1: + tails left unwritten", "bench_train_b32_tails_skip_h200.json"),
    ("A/B 2: tails stored", "bench_train_b32_tails_zt_run2_h200.json"),
    ("A/B 2: + tails left unwritten", "bench_train_b32_tails_skip_run2_h200.json"),
    # Session 14, machine 1 (its tree already had the SwiGLU-backward epilogue of machine 2's A/B).
    ("m1: attention on assembled heads", "bench_train_b32_s14_assembled_h200.json"),
    ("m1: + attention in MLA's form", "bench_train_b32_s14_mla_h200.json"),
    ("m1: + remat keeps swiglu, queries", "bench_train_b32_s14_keep_sq_h200.json"),
    ("m1: + remat keeps dispatched rows", "bench_train_b32_s14_keep_sqd_h200.json"),
    ("m2: SwiGLU backward by XLA", "bench_train_b32_s14_no_grad_epi_h200.json"),
    ("m2: + SwiGLU bwd in the down d_lhs kernel", "bench_train_b32_s14_grad_epi_h200.json"),
    ("m2: same, second run", "bench_train_b32_s14_grad_epi_run2_h200.json"),
    ("m3: configs/small.py of session 14", "bench_train_b32_s14_base_h200.json"),
    ("s15: session 14's tree", "bench_train_b32_s15_c3_old_h200.json"),
    ("s15: + gather kernel, compare_all bounds", "bench_train_b32_s15_c3_new_h200.json"),
    ("s15: same, second run", "bench_train_b32_s15_c3_new2_h200.json"),
    # Session 16: the same tree (dS beside dV's product in the dk/dv kernel) on three machines, no A/B in one call.
    ("s16 m1: configs/small.py", "bench_train_b32_s16_default_h200.json"),
    ("s16 m2: configs/small.py", "bench_train_b32_s16_profile_h200.json"),
    ("s16 m3: configs/small.py", "bench_train_b32_s16_default2_h200.json"),
    # Session 17, one machine (call A): z-loss in the layer scan, then + the routing choices kept.
    ("s17 A: z-loss in the layer scan", "bench_train_b32_s17_default_h200.json"),
    ("s17 A: + routing kept (configs/small.py)", "bench_train_b32_s17_routing_h200.json"),
    # Session 18: call 1 (machine 1), the router products split in bf16 parts; call 2 (machine 2), top-k by argmax.
    ("s18 m1: session 17's configs/small.py", "bench_train_b32_s18_default_h200.json"),
    ("s18 m1: + router products split in bf16", "bench_train_b32_s18_split_h200.json"),
    ("s18 m2: the split (top-k by sort)", "bench_train_b32_s18_sort_h200.json"),
    ("s18 m2: + top-k by argmax passes", "bench_train_b32_s18_topk_argmax_h200.json"),
    ("s18 m3: configs/small.py (split + argmax)", "bench_train_b32_s18_argmax_default_h200.json"),
    ("s19: configs/small.py (same code as s18 m3)", "bench_train_b32_s19_wg1_h200.json"),
    ("s19: two warpgroups per dk/dv CTA (rejected)", "bench_train_b32_s19_wg2_h200.json"),
    # Session 20, call 1 with XLA_PYTHON_CLIENT_MEM_FRACTION=0.95; call 4, the d_rhs deal A/B at the default share.
    ("s20 c1: configs/small.py, 95% of memory", "bench_train_b32_s20_mf95_h200.json"),
    ("s20 c1: batch 48", "bench_train_b48_s20_mf95_h200.json"),
    ("s20 c4: d_rhs tiles round robin", "bench_train_b32_s20_rr_h200.json"),
    ("s20 c4: + dealt by cost (snake)", "bench_train_b32_s20_dealt_h200.json"),
    # Session 21, call 1: the counting-rank deal against round robin, in one call.
    ("s21 c1: d_rhs tiles round robin", "bench_train_b32_s21_rr_h200.json"),
    ("s21 c1: + snake, counting rank (configs/small.py)", "bench_train_b32_s21_profile_h200.json"),
    # Sessions 24-32: configs/small.py as each session found it, and each kept change beside its A/B baseline.
    ("s24: configs/small.py", "bench_train_b32_s24_base_h200.json"),
    ("s26: combine's d_y by XLA", "bench_train_b32_s26_xla2_h200.json"),
    ("s26: + combine's d_y by the gather kernel", "bench_train_b32_s26_cgk3_h200.json"),
    ("s27: attention dq recomputes dS", "bench_train_b32_s27_dqre2_h200.json"),
    ("s27: + dq reads the dk/dv kernel's dS", "bench_train_b32_s27_dqds2_h200.json"),
    ("s28: global norm per leaf", "bench_train_b32_s28_normwhole3_h200.json"),
    ("s28: + global norm by layer slices", "bench_train_b32_s28_normlayer3_h200.json"),
    ("s28: batch 48, 95% of memory", "bench_train_b48_s28_final_h200.json"),
    ("s31: q joined [nope | rope]", "bench_train_b32_s31_base2_h200.json"),
    ("s31: + q as two products (configs/small.py)", "bench_train_b32_s31_qparts4_h200.json"),
    ("s31: batch 48, 95% of memory", "bench_train_b48_s31_qparts_h200.json"),
    ("s32: attention masks every visited block", "bench_train_b32_s32_base2_h200.json"),
    ("s32: + unmasked runs (configs/small.py)", "bench_train_b32_s32_unmasked_h200.json"),
]
TARGET = 0.40


def load(path):
    with open(os.path.join(HERE, path)) as fh:
        d = json.load(fh)
    row = next(r for r in d["results"] if "mfu" in r)
    return row["mfu"], row["tokens_per_s"], d["batch"], d.get("date_utc", "")[:10]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(HERE, "train_progress.png"))
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(label, *load(path)) for label, path in RUNS]
    fig, ax = plt.subplots(figsize=(11, 2 + 0.2 * len(rows)))
    ys = [100 * r[1] for r in rows]
    bars = ax.barh(range(len(rows)), ys, color=["#4c72b0" if r[3] == 4 else "#dd8452" if r[3] == 16 else "#55a868"
                                                for r in rows])
    for b, r in zip(bars, rows):
        ax.text(b.get_width() + 0.3, b.get_y() + b.get_height() / 2, f"{100 * r[1]:.1f}%  {r[2]:,.0f} tok/s",
                va="center", fontsize=8)
    ax.axvline(100 * TARGET, color="red", ls="--", lw=1)
    ax.text(100 * TARGET, len(rows) - 0.5, " 40% target", color="red", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [f"{r[0]} (b{r[3]})" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("MFU (model FLOPs / 989 TFLOP/s bf16 dense)")
    ax.set_xlim(0, 45)
    ax.set_title("configs/small.py training on one H200 (experiments/bench_train.py), change by change")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    for r in rows:
        print(f"{r[0]:<40} b{r[3]:<3} {100 * r[1]:5.1f}% {r[2]:>9,.0f} tok/s  {r[4]}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
