"""Decode time per token of configs/small.py on one H200, variant by variant: bars of TPOT (median over a run's
rounds) for batch 1 and 8 at 1k context, from `bench_decode.py --part=jax` JSON files, with each run's
bandwidth floor and the 70% of it that issue #5 asks for at batch 1.

    python experiments/plot_decode_progress.py [--out experiments/decode_progress.png]
"""

import argparse
import collections
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

# (JSON written by bench_decode.py, {impl: label}), in the order the changes landed. Bars compare within a file.
RUNS = [
    ("bench_decode_routing_h200.json", {"pallas": "session 6: fewer kernels (B=1 only)"}),
    ("bench_decode_cc_s22_h200.json", {"pallas": "s22 call 1: as the session began",
                                       "pallas+cc": "+ concurrent graph nodes"}),
    ("bench_decode_ab_s22_h200.json", {"pallas+unmerged+eager_norms+merge3": "s22 call 3: concurrent nodes",
                                       "pallas+merge3": "+ absorbed products, norms after matvecs"}),
]


def medians(path, context=1024):
    """{(impl, batch): (median TPOT ms, floor ms)} of a run's decode points."""
    rows = collections.defaultdict(list)
    for p in json.load(open(path))["points"]:
        if p["context"] == context:
            rows[(p["impl"], p["batch"])].append((p["tpot_ms"], p["floor_ms"]))
    return {k: tuple(np.median(np.array(v), axis=0)) for k, v in rows.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(HERE, "decode_progress.png"))
    args = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), sharey=False)
    for ax, batch in zip(axes, (1, 8)):
        labels, tpots, floors = [], [], []
        for name, impls in RUNS:
            found = medians(os.path.join(HERE, name))
            for impl, label in impls.items():
                if (impl, batch) in found:
                    t, f = found[(impl, batch)]
                    labels.append(label)
                    tpots.append(t)
                    floors.append(f)
        y = np.arange(len(labels))
        ax.barh(y, tpots, color="tab:blue")
        for i, (t, f) in enumerate(zip(tpots, floors)):
            ax.text(t, i, f" {t:.3f} ms ({100 * f / t:.0f}% of floor)", va="center", fontsize=8)
        floor = float(np.median(floors))
        ax.axvline(floor, color="k", ls="--", lw=1, label=f"bandwidth floor ~{floor:.2f} ms")
        if batch == 1:
            ax.axvline(floor / 0.7, color="tab:red", ls=":", lw=1, label="issue #5 target (70% of floor)")
        ax.set_yticks(y, labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, max(tpots) * 1.9)
        ax.set_xlabel("ms per token (TPOT), 1k context")
        ax.set_title(f"batch {batch}")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    fig.suptitle("configs/small.py bf16 decode on one H200 (experiments/HISTORY.md)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
