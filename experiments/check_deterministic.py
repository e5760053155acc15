"""Two identical short runs of configs/tiny.py with `train.deterministic=True` must log bitwise-equal losses.

On GPU this sets XLA's `--xla_gpu_deterministic_ops=true` before JAX starts (an unknown flag would abort XLA, so
a clean run also shows the flag exists in this jaxlib). Prints one JSON line.

    python experiments/check_deterministic.py [--steps 5] [--config configs/tiny.py]
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny.py"))
    args = ap.parse_args()
    from absl import logging
    logging.set_verbosity(logging.WARNING)
    from lcflash import load_config
    from lcflash.train.metrics import read_metrics
    from lcflash.train.trainer import train
    keys = ("loss", "ce", "mtp_loss", "lb_loss", "z_loss", "grad_norm")
    runs = []
    for _ in range(2):
        wd = tempfile.mkdtemp()
        cfg = load_config(args.config, {"train.deterministic": True, "train.steps": args.steps, "train.log_every": 1,
                                        "train.progress": False})
        train(cfg, wd, log=lambda *a: None)
        runs.append([[r[k] for k in keys] for r in read_metrics(os.path.join(wd, "metrics.jsonl"))])
        shutil.rmtree(wd)
    import jax
    print(json.dumps({"device": jax.devices()[0].device_kind, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                      "steps": args.steps, "bitwise_equal": runs[0] == runs[1],
                      "losses_run1": [r[0] for r in runs[0]], "losses_run2": [r[0] for r in runs[1]]}))


if __name__ == "__main__":
    main()
