"""Orbax checkpoints: bitwise round trip of every state part, keep-last-N, and no half-written resume."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lcflash.checkpoint import Checkpointer, CheckpointError, resolve


def make_state(seed=0):
    k = jax.random.PRNGKey(seed)
    params = {"embed": jax.random.normal(k, (16, 8)), "layers": {"w": jax.random.normal(k, (2, 8, 8))}}
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(eps=1e-16))
    return {
        "params": params,
        "bias": {"layers": {"moe": {"bias": jnp.arange(12.0).reshape(2, 6) * 1e-3}}},
        "opt_state": opt.update(params, opt.init(params), params)[1],
        "controller": {"integral": jnp.ones((2, 6)), "prev_error": jnp.full((2, 6), 0.5),
                       "has_prev": jnp.ones((), jnp.bool_)},
        "step": jnp.array(7, jnp.int32),
        "rng": jax.random.PRNGKey(42),
    }


def assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_bitwise(tmp_path):
    state = make_state()
    ck = Checkpointer(str(tmp_path / "ck"), every_steps=1, keep=3)
    ck.save(7, state, {"data_position": 56})
    ck.close()
    ck2 = Checkpointer(str(tmp_path / "ck"))
    restored, meta = ck2.restore(jax.eval_shape(lambda: state))
    assert_same(restored, state)
    assert meta["data_position"] == 56 and meta["step"] == 7
    p, _ = ck2.restore_params()
    np.testing.assert_array_equal(p["bias"]["layers"]["moe"]["bias"], state["bias"]["layers"]["moe"]["bias"])
    assert resolve(str(tmp_path / "ck" / "7")) == (str(tmp_path / "ck"), 7)
    with pytest.raises(CheckpointError, match="no complete checkpoint for step 3"):
        ck2.restore(jax.eval_shape(lambda: state), step=3)


def test_keep_last_n(tmp_path):
    ck = Checkpointer(str(tmp_path), every_steps=1, keep=2)
    for s in range(1, 6):
        ck.save(s, make_state(s), {"data_position": s})
    ck.close()
    assert Checkpointer(str(tmp_path)).all_steps() == [4, 5]


def test_unfinished_save_is_ignored(tmp_path):
    state = make_state()
    ck = Checkpointer(str(tmp_path), every_steps=1)
    ck.save(3, state, {"data_position": 1})
    ck.close()
    # what a process killed mid-save leaves: Orbax's temporary directory, items partly written
    tmp = tmp_path / "9.orbax-checkpoint-tmp-1234567"
    os.makedirs(tmp / "params")
    (tmp / "params" / "junk").write_bytes(b"\0" * 10)
    ck2 = Checkpointer(str(tmp_path), read_only=True)
    assert ck2.latest_step() == 3
    restored, _ = ck2.restore(jax.eval_shape(lambda: state))
    assert_same(restored, state)


KILL_SCRIPT = textwrap.dedent("""
    import os, sys
    import jax.numpy as jnp
    from lcflash.checkpoint import Checkpointer
    ck = Checkpointer(sys.argv[1], every_steps=1, async_save=True)
    ck.save(1, {"params": {"w": jnp.full((1 << 22,), 1.0)}, "bias": {}, "step": jnp.array(1)}, {"data_position": 1})
    ck.wait()
    ck.save(2, {"params": {"w": jnp.full((1 << 22,), 2.0)}, "bias": {}, "step": jnp.array(2)}, {"data_position": 2})
    os._exit(0)   # killed while the asynchronous save of step 2 is in flight
""")


def test_kill_during_async_save_leaves_a_restorable_latest(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tmp_path)], check=True, env=env, timeout=120,
                   capture_output=True)
    ck = Checkpointer(str(tmp_path), read_only=True)
    latest = ck.latest_step()
    assert latest in (1, 2)
    if any(".orbax-checkpoint-tmp" in name for name in os.listdir(tmp_path)):   # the usual case: killed mid-save
        assert latest == 1
    abstract = {"params": {"w": jax.ShapeDtypeStruct((1 << 22,), jnp.float32)}, "bias": {},
                "step": jax.ShapeDtypeStruct((), jnp.int32)}
    restored, meta = ck.restore(abstract)
    assert int(restored["step"]) == latest == meta["data_position"]
    assert float(restored["params"]["w"].min()) == float(restored["params"]["w"].max()) == float(latest)
