"""End-to-end trainer on configs/tiny.py (small batch and sequence): loss falls, bitwise resume, bad inputs.

One module-scoped run provides a workdir with checkpoints; the trainer reuses its compiled step across runs of
the same config, so the resume runs cost no extra compilation.
"""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from lcflash import load_config
from lcflash.checkpoint import Checkpointer, checkpoint_dir
from lcflash.config import model_config
from lcflash.data import DataError, PackedLoader
from lcflash.eval import evaluate
from lcflash.params import train_flops_per_token
from lcflash.perfmodel.hardware import peak_bf16_flops
from lcflash.train.metrics import read_metrics
from lcflash.train.trainer import TrainingDiverged, set_deterministic, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
STEPS = 8
BASE = {"data.seq_len": 32, "train.batch_size": 2, "train.steps": STEPS, "train.log_every": 1,
        "train.eval_batches": 2, "train.progress": False, "checkpoint.every_steps": 4, "optim.warmup_steps": 2,
        "optim.lr": 1e-2, "train.grad_ratio_every": 4}


def cfg(**kw):
    return load_config(TINY, {**BASE, **{k.replace("__", "."): v for k, v in kw.items()}})


def quiet(*a):
    pass


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("full"))
    train(cfg(), wd, log=quiet)
    return wd


def losses_of(wd):
    return [(r["step"], r["loss"], r["ce"], r["lb_loss"], r["mtp_loss"], r["z_loss"], r["grad_norm"])
            for r in read_metrics(os.path.join(wd, "metrics.jsonl"))]


def test_loss_falls_and_metrics_are_logged(full_run):
    recs = read_metrics(os.path.join(full_run, "metrics.jsonl"))
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    need = {"step", "loss", "ce", "lb_loss", "z_loss", "mtp_loss", "lr", "grad_norm", "tokens_per_s",
            "ffn_experts_per_token", "expert_load_min", "expert_load_max", "router_grad_ratio"}
    assert need <= set(recs[0])
    assert len(recs[0]["ffn_experts_per_token"]) == 2                    # one value per layer
    assert recs[-1]["ce"] < recs[0]["ce"] - 0.5, [r["ce"] for r in recs]
    assert recs[0]["ce"] == pytest.approx(np.log(512), abs=0.1)          # untrained: uniform over the vocabulary
    assert np.isfinite(recs[3]["router_grad_ratio"]) and recs[3]["router_grad_ratio"] > 0
    assert "val_loss" in recs[-1] and recs[-1]["val_loss"] < recs[0]["ce"]
    assert os.listdir(os.path.join(full_run, "tb"))
    assert Checkpointer(checkpoint_dir(full_run)).all_steps() == [4, 8]
    # Model FLOP rate from step 2 on (step 1's interval is the compile), each interval one step here; MFU only
    # where the device's peak is known (not on a CPU).
    mc, peak = model_config(cfg()), peak_bf16_flops(jax.devices()[0].device_kind)
    assert "tflops_per_s_per_device" not in recs[0] and "mfu" not in recs[0]
    for r in recs[1:]:
        assert r["ffn_experts_per_token_interval"] == pytest.approx(r["ffn_experts_per_token_mean"])  # one step
        fpt, _ = train_flops_per_token(mc, 32, r["ffn_experts_per_token_interval"], with_mtp=True)
        assert r["tflops_per_s_per_device"] == pytest.approx(fpt * r["tokens_per_s"] / 1e12, rel=1e-6), r
        assert r.get("mfu") == (pytest.approx(fpt * r["tokens_per_s"] / peak, rel=1e-6) if peak else None), r


def test_resume_is_bitwise(full_run, tmp_path):
    wd = str(tmp_path)
    train(cfg(train__stop_at=STEPS // 2), wd, log=quiet)                  # "preempted" after half the steps
    assert Checkpointer(checkpoint_dir(wd)).latest_step() == STEPS // 2
    train(cfg(), wd, log=quiet)                                          # same command: resumes
    assert losses_of(wd) == losses_of(full_run)
    a = Checkpointer(checkpoint_dir(wd)).restore_params()[0]
    b = Checkpointer(checkpoint_dir(full_run)).restore_params()[0]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_eval_reports_loss_and_bits_per_byte(full_run):
    out = evaluate(full_run, batches=2)
    assert out["step"] == STEPS
    # bytes: every scored target is one byte except eos (0 bytes), so bits/byte is a little above nats/ln 2
    assert out["val_loss"] / np.log(2) <= out["val_bpb"] <= 1.02 * out["val_loss"] / np.log(2)
    last = read_metrics(os.path.join(full_run, "metrics.jsonl"))[-1]
    assert out["val_loss"] == pytest.approx(last["val_loss"], rel=1e-6)


def copy_workdir(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_bad_corpus_path_keeps_checkpoints(full_run, tmp_path):
    wd = copy_workdir(full_run, tmp_path / "wd")
    with pytest.raises(DataError, match="does not exist"):
        train(cfg(data__path=str(tmp_path / "missing"), train__steps=12), wd, log=quiet)
    assert Checkpointer(checkpoint_dir(wd)).all_steps() == [4, 8]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(full_run, tmp_path, monkeypatch):
    wd = copy_workdir(full_run, tmp_path / "wd")
    shutil.rmtree(os.path.join(checkpoint_dir(wd), str(STEPS)))           # resume from step 4
    clean_next = PackedLoader.next

    def poisoned_next(self):       # the 7th batch makes the loss NaN (same program: no recompilation)
        b = clean_next(self)
        if self.position == 7 * self.batch_size:
            b["loss_mask"] = b["loss_mask"] * np.float32("nan")
        return b
    monkeypatch.setattr(PackedLoader, "next", poisoned_next)
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at step 7 .*last good checkpoint is step 6"):
        train(cfg(checkpoint__every_steps=1), wd, log=quiet)
    ck = Checkpointer(checkpoint_dir(wd))
    assert ck.all_steps() == [4, 5, 6]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(ck.restore_params()[0]))


def test_bad_override_is_an_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lcflash.train", f"--config={TINY}", f"--workdir={tmp_path}",
                        "--config.trian.steps=3"], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode != 0
    assert "trian" in r.stderr
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def test_bad_value_names_the_field(tmp_path):
    from lcflash.config import ConfigError
    with pytest.raises(ConfigError, match="optim.schedule"):
        train(cfg(optim__schedule="linear"), str(tmp_path), log=quiet)
    with pytest.raises(ConfigError, match="loss.lb_groups"):
        train(cfg(loss__lb_groups=3), str(tmp_path), log=quiet)
    with pytest.raises(ConfigError, match="optim.mu_dtype"):
        train(cfg(optim__mu_dtype="float8"), str(tmp_path), log=quiet)


def test_deterministic_sets_the_xla_flag(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1")
    set_deterministic()                 # on CPU the running backend is fine; the flag is for GPU runs
    assert os.environ["XLA_FLAGS"] == "--xla_foo=1 --xla_gpu_deterministic_ops=true"


def test_growth_stacks_checkpoint_layers(full_run):
    from lcflash.train.step import init_state
    saved = Checkpointer(checkpoint_dir(full_run)).restore_params()[0]
    grown = init_state(cfg(model__num_layers=4, init__grow_from=full_run), jax.random.PRNGKey(1))
    for part in ("params", "bias"):
        for (path, g), s in zip(jax.tree_util.tree_flatten_with_path(grown[part]["layers"])[0],
                                jax.tree.leaves(saved[part]["layers"])):
            assert g.shape[0] == 4, path
            np.testing.assert_array_equal(g[:2], s)            # order [1..n, 1..n]
            np.testing.assert_array_equal(g[2:], s)
    np.testing.assert_array_equal(grown["params"]["embed"], saved["params"]["embed"])
    np.testing.assert_array_equal(grown["params"]["mtp"]["w_eh"], saved["params"]["mtp"]["w_eh"])
    assert int(grown["step"]) == 0
    with pytest.raises(ValueError, match="model.num_layers = 2 x"):
        init_state(cfg(model__num_layers=3, init__grow_from=full_run), jax.random.PRNGKey(1))
