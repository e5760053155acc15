"""Training: `python -m lcflash.train --config=configs/tiny.py --workdir=DIR`.

The pieces a caller (or the sharding layer) composes: `init_state(cfg, key)` creates every array,
`abstract_state(cfg)` gives its shapes, `make_train_step(cfg)` returns the pure
`(state, batch) -> (state, metrics)` to jit, `train(cfg, workdir)` is the whole loop.
"""

from lcflash.train.step import (abstract_state, init_state, make_eval_step, make_train_step,  # noqa: F401
                                param_logical_axes)
