"""Our expert products against the batched einsum, board by board: bars of (einsum time / our time) for LongCat's
balanced cases at >= 512 tokens per expert, forward and backward, from `bench_moe_gemm.py` JSON files, with the
0.90 that issue #8 asks for. Where a run timed several rounds, the whiskers span each round's own ratio.

    python experiments/plot_moe_gemm.py [--out experiments/moe_gemm_boards.png]
"""

import argparse
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

# (JSON written by bench_moe_gemm.py, label); each ratio is against the einsum of the same run.
RUNS = [
    ("bench_moe_gemm_s28_h200.json", "H200, session 28"),
    ("bench_moe_gemm_rounds_s40_h100.json", "H100, session 40 (3 rounds)"),
    ("bench_moe_gemm_table_bands_s42_h100.json", "H100, session 42, rows bands of 4 (2 rounds)"),
    ("bench_moe_gemm_table_s45_h100.json", "H100, session 45, d_rhs bands of 4 too (2 rounds)"),
]
TARGET = 0.90


def ratios(path, impl="pallas_chain"):
    """{(proj, T, pass): (median ratio, lowest round, highest round)} of a run's balanced LongCat cases, T >= 512."""
    out = {}
    for r in json.load(open(path))["results"]:
        if r["config"] != "longcat" or r["load"] != "balanced" or r["tokens_per_expert"] < 512:
            continue
        ours, ein = r["impls"].get(impl), r["impls"].get("einsum")
        if not ours or not ein or "fwd_ms" not in ours:
            continue
        for p in ("fwd", "bwd"):
            ratio = ein[f"{p}_ms"] / ours[f"{p}_ms"]
            rounds = ours.get(f"{p}_vs_einsum_rounds", [ratio])
            out[(r["proj"], r["tokens_per_expert"], p)] = (ratio, min(rounds), max(rounds))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(HERE, "moe_gemm_boards.png"))
    args = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(label, ratios(os.path.join(HERE, name))) for name, label in RUNS]
    cases = sorted({k for _, found in runs for k in found}, key=lambda k: (k[2] == "bwd", k[0], k[1]))
    x = np.arange(len(cases))
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(15, 5))
    for i, (label, found) in enumerate(runs):
        have = [c for c in cases if c in found]
        xs = x[[cases.index(c) for c in have]] + (i - (len(runs) - 1) / 2) * width
        med = np.array([found[c][0] for c in have])
        err = np.array([[max(m - found[c][1], 0), max(found[c][2] - m, 0)] for c, m in zip(have, med)]).T
        ax.bar(xs, med, width, label=label, yerr=err, capsize=3)
        for xi, m in zip(xs, med):
            ax.text(xi, m + 0.02, f"{m:.2f}", ha="center", fontsize=7)
    ax.axhline(TARGET, color="k", ls="--", lw=1, label=f"issue #8 target ({TARGET:.2f})")
    ax.set_xticks(x, [f"{proj} T={t}\n{p}" for proj, t, p in cases], fontsize=8)
    ax.set_ylabel("einsum time / our time")
    ax.set_ylim(0, 1.25)
    ax.set_title("LongCat expert products (64 experts, balanced) against the batched einsum of the same run")
    ax.legend(fontsize=8, loc="upper center", ncol=4)   # above the bars: none reaches 1.1
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
