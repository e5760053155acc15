"""`python -m lcflash.eval --workdir=DIR [--step=N] [--batches=K]`: held-out loss and bits per byte.

Reads the workdir's config.json and the newest (or given) checkpoint's parameters and router biases, and
scores the validation split of the same corpus (packed windows in order). Prints one JSON line and writes
`DIR/eval.json`.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by `python -m lcflash.train`.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_BATCHES = flags.DEFINE_integer("batches", None, "Validation batches (default: the config's train.eval_batches; "
                                "0 = the whole validation split).")


def evaluate(workdir: str, step: int | None = None, batches: int | None = None) -> dict:
    import jax

    from lcflash.checkpoint import Checkpointer, checkpoint_dir
    from lcflash.config import model_config
    from lcflash.data import load_corpus
    from lcflash.train.step import abstract_state
    from lcflash.train.trainer import Evaluator, load_workdir_config

    cfg = load_workdir_config(workdir)
    model_cfg = model_config(cfg)
    a = abstract_state(cfg)
    ckpt = Checkpointer(checkpoint_dir(workdir), read_only=True)
    saved, meta = ckpt.restore_params({"params": a["params"], "bias": a["bias"]}, step)
    corpus = load_corpus(cfg.data, model_cfg)
    n = cfg.train.eval_batches if batches is None else batches
    ev = Evaluator(cfg, model_cfg, corpus, n)
    out = ev(saved["params"], saved["bias"])
    out.update(step=int(meta["step"]), batches=ev.batches, corpus=corpus.source, tokenizer=corpus.tokenizer.name,
               device=str(jax.devices()[0].device_kind))
    with open(os.path.join(workdir, "eval.json"), "w") as fh:
        json.dump(out, fh, indent=2)
    return out


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)  # Orbax warns that a read-only manager is read-only
    from lcflash.checkpoint import CheckpointError
    from lcflash.config import ConfigError
    from lcflash.data import DataError
    try:
        out = evaluate(os.path.abspath(_WORKDIR.value), _STEP.value, _BATCHES.value)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(out))


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
