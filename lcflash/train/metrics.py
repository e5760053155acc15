"""Metric sinks: `WORKDIR/metrics.jsonl` (one JSON object per logged step) and TensorBoard event files."""

from __future__ import annotations

import json
import math
import os

import numpy as np


def to_python(v):
    """Device/numpy values -> JSON-able python (NaN stays NaN; per-layer arrays become lists)."""
    a = np.asarray(v)
    if a.ndim == 0:
        x = a.item()
        return float(x) if isinstance(x, (float, np.floating)) else x
    return [to_python(x) for x in a]


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


class MetricsWriter:
    """Appends to metrics.jsonl. On resume from step s, drops lines past s (they belong to a lost future)."""

    def __init__(self, workdir: str, start_step: int, tensorboard: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= start_step]
        with open(self.path, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in kept)
        self.fh = open(self.path, "a")
        self.tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
                self.tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=start_step + 1)
            except ImportError:  # tensorboardX is optional at run time; metrics.jsonl always has everything
                self.tb = None

    def write(self, step: int, values: dict):
        rec = {"step": int(step), **{k: to_python(v) for k, v in values.items()}}
        self.fh.write(json.dumps(rec) + "\n")
        self.fh.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k == "step":
                    continue
                if isinstance(v, list):
                    for i, x in enumerate(v):
                        if isinstance(x, (int, float)) and math.isfinite(x):
                            self.tb.add_scalar(f"{k}/layer_{i}", x, step)
                elif isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
        return rec

    def close(self):
        self.fh.close()
        if self.tb is not None:
            self.tb.close()
