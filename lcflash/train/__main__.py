"""`python -m lcflash.train --config=configs/tiny.py --workdir=DIR [--config.train.steps=N ...]`

Re-running on a workdir that holds checkpoints resumes from the newest one. Overrides of fields that do not
exist are errors (the config is locked).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file (get_config()).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and TensorBoard events.")
flags.mark_flags_as_required(["config", "workdir"])


_STARTED = False


def main(argv):
    global _STARTED
    _STARTED = True
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; settings go through --config.<section>.<field>=...")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    cfg = _CONFIG.value
    from lcflash.parallel.distributed import initialize
    initialize()   # multi-process runs (SLURM, LCFLASH_COORDINATOR=...); a no-op for one process
    if cfg.train.deterministic:  # before anything starts the JAX backend
        from lcflash.train.trainer import set_deterministic
        set_deterministic()
    from lcflash.checkpoint import CheckpointError
    from lcflash.config import ConfigError
    from lcflash.data import DataError
    from lcflash.train.trainer import TrainingDiverged, train
    try:
        train(cfg, os.path.abspath(_WORKDIR.value))
    except (ConfigError, DataError, CheckpointError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    try:
        app.run(main)
    except (KeyError, AttributeError, ValueError, TypeError) as e:
        if _STARTED:
            raise
        # ml_collections rejects an override of a field that does not exist (the config is locked) or of the
        # wrong type while absl parses the flags, before main() runs.
        from lcflash.config import bad_override_message

        print(f"error: {bad_override_message(sys.argv[1:], e)}", file=sys.stderr)
        sys.exit(2)
