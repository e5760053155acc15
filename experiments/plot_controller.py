"""Expert-bias controller on configs/tiny.py: FFN experts per token per layer, controller on vs off.

Trains the tiny config three times (same seed and data): controller on; controller off; controller off and no
load-balance loss (whose zero-expert group also pulls towards K_e), logging every step, and plots each layer's
mean FFN experts per token against the target band K_e +- 5%. Writes the PNG and a JSON
summary (last-100-step means, fraction of steps in band, first step after which the 20-step moving average
stays in band).

    python experiments/plot_controller.py [--steps 300] [--out experiments/controller_tiny.png] [--reuse]
"""

import argparse
import datetime
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


RUNS = (("on", {"controller.enabled": True}, "tab:blue", "-"),
        ("off", {"controller.enabled": False}, "tab:red", "-"),
        ("off_no_lb", {"controller.enabled": False, "loss.lb_coef": 0.0}, "tab:orange", "--"))


def run(overrides: dict, steps: int, workdir: str, reuse: bool):
    from lcflash import load_config
    from lcflash.train.metrics import read_metrics
    from lcflash.train.trainer import train
    path = os.path.join(workdir, "metrics.jsonl")
    if not (reuse and os.path.exists(path)):
        import shutil
        shutil.rmtree(workdir, ignore_errors=True)
        cfg = load_config(os.path.join(ROOT, "configs", "tiny.py"),
                          {**overrides, "train.steps": steps, "train.log_every": 1,
                           "train.progress": False, "checkpoint.every_steps": steps})
        train(cfg, workdir, log=lambda *a: None)
    recs = read_metrics(path)
    return np.array([r["step"] for r in recs]), np.array([r["ffn_experts_per_token"] for r in recs]), recs


def moving_average(x, w):
    c = np.cumsum(np.insert(x, 0, 0.0))
    out = np.full_like(x, np.nan, dtype=float)
    out[w - 1:] = (c[w:] - c[:-w]) / w
    return out


def summarize(steps, ffn, target, band=0.05, window=20):
    lo, hi = target * (1 - band), target * (1 + band)
    out = []
    for layer in range(ffn.shape[1]):
        x = ffn[:, layer]
        ma = moving_average(x, window)
        inside = (ma >= lo) & (ma <= hi)
        settled = None
        for i in range(len(x)):
            if inside[i:].all() and not np.isnan(ma[i]):
                settled = int(steps[i])
                break
        out.append({"layer": layer, "last100_mean": float(x[-100:].mean()),
                    "last100_frac_steps_in_band": float(((x[-100:] >= lo) & (x[-100:] <= hi)).mean()),
                    "ma20_settled_from_step": settled})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "controller_tiny.png"))
    ap.add_argument("--workdir", default="/tmp/lcflash_controller")
    ap.add_argument("--reuse", action="store_true", help="plot existing runs in --workdir without training")
    args = ap.parse_args()
    from absl import logging
    logging.set_verbosity(logging.WARNING)
    from lcflash import load_config, model_config
    target = model_config(load_config(os.path.join(ROOT, "configs", "tiny.py"))).target_ffn_experts

    runs = {name: run(ov, args.steps, os.path.join(args.workdir, name), args.reuse) for name, ov, _, _ in RUNS}

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n_layers = runs["on"][1].shape[1]
    fig, axes = plt.subplots(1, n_layers, figsize=(6 * n_layers, 4), sharey=True)
    for layer, ax in enumerate(np.atleast_1d(axes)):
        ax.axhspan(target * 0.95, target * 1.05, color="tab:green", alpha=0.15, label="target ±5%")
        ax.axhline(target, color="tab:green", lw=1)
        for name, ov, color, ls in RUNS:
            s, f, _ = runs[name]
            ax.plot(s, f[:, layer], color=color, alpha=0.2, lw=0.8, ls=ls)
            label = {"on": "controller on", "off": "controller off",
                     "off_no_lb": "controller off, lb_coef = 0"}[name]
            ax.plot(s, moving_average(f[:, layer], 20), color=color, lw=1.8, ls=ls, label=f"{label} (20-step mean)")
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("mean FFN experts per token")
    np.atleast_1d(axes)[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"configs/tiny.py: expert-bias controller, target K_e = {target} of top-"
                 f"{model_config(load_config(os.path.join(ROOT, 'configs', 'tiny.py'))).moe_topk}")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)

    summary = {"target": target, "band": 0.05, "steps": args.steps,
               "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
               **{name: summarize(*runs[name][:2], target) for name in runs},
               "final_ce": {k: runs[k][2][-1]["ce"] for k in runs}}
    with open(os.path.splitext(args.out)[0] + ".json", "w") as fh:
        json.dump(summary, fh, indent=2)
    print(f"{'run':9} {'layer':5} {'last-100 mean':>13} {'in band':>8} {'MA20 settled from':>18}")
    for name in runs:
        for r in summary[name]:
            print(f"{name:9} {r['layer']:5d} {r['last100_mean']:13.3f} {r['last100_frac_steps_in_band']:8.2f} "
                  f"{str(r['ma20_settled_from_step']):>18}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
