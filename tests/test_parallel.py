"""Sharding over device meshes (issue 4).

The multi-device runs need a device count fixed when JAX starts, so each runs in its own process
(tests/parallel_worker.py, 8 fake CPU devices; the 2-process run uses 2 devices per process). They all start
together when the first test of this module asks for them, so they share the machine's cores; this process
keeps its single default device. The rest are in-process checks of the pieces (rules, mesh validation, plan,
HLO parsing).
"""

import json
import os
import socket
import subprocess
import sys

import pytest
from jax.sharding import PartitionSpec as P

from lcflash.config import ConfigError, load_config, model_config
from lcflash.parallel.ep_all_to_all import capacity
from lcflash.parallel.hlo_check import overlap_report
from lcflash.parallel.mesh import check_model_fits, mesh_shape
from lcflash.parallel.rules import DEFAULT_RULES, logical_to_spec, make_rules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "parallel_worker.py")
TOL = 1e-5
EP_CASES = ["expert8/all_to_all", "data2_expert4/all_to_all", "fsdp2_tensor2_expert2/all_to_all",
            "fsdp2_tensor2_expert2/ragged_all_to_all", "data4_tensor2/all_to_all"]
# The per-expert reference MoE is plain JAX that GSPMD partitions; one mesh with every axis split checks it.
REF_CASES = ["fsdp2_tensor2_expert2/reference"]


class Worker:
    def __init__(self, tmp, name, *argv):
        self.name, self.out, self.err = name, tmp / f"{name}.json", tmp / f"{name}.err"
        self._errf = open(self.err, "w")
        self.proc = subprocess.Popen([sys.executable, WORKER, *argv, f"--out={self.out}"], cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=self._errf)
        self._result = None

    def result(self, timeout=900):
        if self._result is None:
            try:
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                pytest.fail(f"worker {self.name} timed out after {timeout}s; stderr tail:\n{self._tail()}")
            if rc != 0 or not self.out.exists():
                pytest.fail(f"worker {self.name} exited with {rc}; stderr tail:\n{self._tail()}")
            self._result = json.loads(self.out.read_text())
        return self._result

    def _tail(self):
        self._errf.flush()
        lines = [ln for ln in self.err.read_text().splitlines() if "spmd_partitioner" not in ln]
        return "\n".join(lines[-40:])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._errf.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parallel")
    port = _free_port()
    ws = {
        "ep": Worker(tmp, "ep", "equivalence", "--part=ep"),
        "reference": Worker(tmp, "reference", "equivalence", "--part=reference"),
        "train": Worker(tmp, "train", "train_ckpt", f"--workdir={tmp}"),
        "mp0": Worker(tmp, "mp0", "mp", f"--port={port}", "--process_id=0"),
        "mp1": Worker(tmp, "mp1", "mp", f"--port={port}", "--process_id=1"),
    }
    yield ws
    for w in ws.values():
        w.stop()


# ----------------------------------------------------------------------------- sharded == single device
@pytest.mark.parametrize("case", EP_CASES + REF_CASES)
def test_sharded_loss_and_grads_equal_single_device(workers, case):
    r = workers["reference" if case.endswith("/reference") else "ep"].result()[case]
    assert r["dropped"] == 0, r
    assert r["loss_rel"] <= TOL, r
    assert r["grad_rel_max"] <= TOL, r


def test_checkpoints_loaded_onto_a_mesh_generate_the_single_device_tokens(workers):
    """lcflash.infer.load_model(mesh=...) on expert=4 x tensor=2: a HF directory generates the single-device greedy
    and sampled tokens for four prompts (MTP speculation too, and the Pallas attention's per-shard call), each of
    the 4 expert shards holding one row of the cache, and for three (every row on every shard); the experts are read
    onto their shards and kept so in the decode layout, and a trainer workdir loads the same values onto the same
    shards. No weight moves: the decode loop's collectives are all smaller than a quarter of one device's expert
    shard, and the prefill neither gathers nor permutes anything that large (with the dense FFNs' [gate | up] split
    over its rows, it permuted half of each between shards)."""
    res = workers["reference"].result()
    r = res["generate/hf"]
    assert r["equal"] and r["mtp_equal"] and r["sampled_equal"] and r["kernel_path_equal"], r
    assert r["split"] == [["expert"], ["tensor"]], r
    assert r["cache_spec"] == "P('expert',)" and r["cache_rows"] == [4, 1] and r["cache3_rows"] == [3, 3], r
    # Attention runs on each shard's rows, in the prefill too: only its output projection's tensor-parallel sum
    # crosses devices (a cache write partitioned by XLA would gather every row's new latents to every shard).
    assert {fn: set(kinds) for fn, kinds in r["attention_collectives"].items()} == {
        "prefill": {"all-reduce"}, "decode_loop": {"all-reduce"}}, r
    assert r["w_gate_spec"] == "P(None, 'expert', None, 'tensor')", r
    assert r["decode_w_gate_spec"] == "P('expert', 'tensor')", r
    assert r["decode_w_gate_up_spec"] == "P(None, 'tensor')", r
    small = r["w_gate_shard_bytes"] / 4
    loop = r["collective_bytes"]["decode_loop"]
    assert loop and max(b for sizes in loop.values() for b in sizes) < small, r
    prefill = r["collective_bytes"]["prefill"]
    assert prefill.get("all-reduce"), r   # tensor-parallel products reduce their activations
    assert max(prefill.get("all-gather", []) + prefill.get("collective-permute", [])) < small, r
    run = res["generate/run"]   # the trainer workdir: the HF directory's values on its shards
    assert run["values_equal"] and run["shardings_equal"] and run["sharded"], run
    assert "num_attention_heads = 4 is not divisible by the tensor-parallel size 8" in res["generate/tensor8_error"]


def test_mesh_spec_errors_name_the_part():
    from lcflash.infer.load import mesh_from_spec

    for spec, match in (("experts=2", "'experts=2' is not axis=size"), ("expert=two", "size of 'expert' must be"),
                        ("expert=3", "axes multiply to 3 but there are 1 devices")):
        with pytest.raises(ConfigError, match=match):
            mesh_from_spec(spec)


def test_experts_and_fsdp_tensor_axes_shard_the_expert_weights(workers):
    res = workers["ep"].result()
    assert res["expert8/all_to_all"]["w_gate_spec"] == "P(None, 'expert', None, None)"
    assert res["fsdp2_tensor2_expert2/all_to_all"]["w_gate_spec"] == "P(None, 'expert', 'fsdp', 'tensor')"


def test_ragged_transport_on_cpu_is_a_clear_error(workers):
    msg = workers["ep"].result()["ragged_on_cpu_error"]
    assert msg and "XLA:CPU cannot compile ragged_all_to_all" in msg and "all_to_all" in msg, msg


def test_capacity_overflow_is_dropped_and_counted(workers):
    r = workers["reference"].result()["capacity_drop"]
    assert r["dropped"] == r["expected"], r
    assert min(r["expected"]) > 0, r


# ----------------------------------------------------------------------------- training, checkpoint, processes
def _close(a, b):
    return abs(a - b) <= TOL * abs(b)


def test_sharded_training_losses_equal_single_device(workers):
    r = workers["train"].result()
    for s, a in zip(r["single"], r["mesh_a"]):
        for k in s:
            assert _close(a[k], s[k]), (k, a, s)
    assert r["init_spec"] == "P(None, 'expert', 'fsdp', 'tensor')"
    assert r["mu_spec"] == ["P(None, 'expert', 'fsdp', 'tensor')"], r["mu_spec"]


def test_checkpoint_from_one_mesh_continues_on_another(workers):
    r = workers["train"].result()
    k = r["save_at"]
    assert r["meta_step"] == k
    assert r["restored_spec"] == "P(None, 'expert', None, None)" != r["init_spec"]
    assert len(r["mesh_b"]) == len(r["mesh_a"]) - k
    for b, a, s in zip(r["mesh_b"], r["mesh_a"][k:], r["single"][k:]):
        for key in s:
            assert _close(b[key], a[key]) and _close(b[key], s[key]), (key, b, a, s)


def test_two_processes_train_like_one_device(workers):
    p0, p1 = workers["mp0"].result(), workers["mp1"].result()
    single = [s["loss"] for s in workers["train"].result()["single"]]
    assert (p0["process_count"], p0["global_devices"], p0["local_devices"]) == (2, 4, 2)
    assert {p0["process_index"], p1["process_index"]} == {0, 1}
    assert p0["losses"] == p1["losses"]
    for a, s in zip(p0["losses"], single):
        assert _close(a, s), (p0["losses"], single)


# ----------------------------------------------------------------------------- ScMoE overlap in the HLO
def test_moe_transfers_are_independent_of_the_dense_window(workers):
    r = workers["reference"].result()["overlap"]
    assert r["dispatch"] and r["combine"], r
    assert all(n > 0 for n in r["window"].values()), r
    assert r["dependent"] == [], r


def test_dispatch_start_and_done_enclose_dense_ffn_matmuls(workers):
    r = workers["reference"].result()["overlap"]
    if not r["asynchronous"]:
        pytest.skip(f"XLA:{r['backend'].upper()} runs all-to-all synchronously (no start/done pair to inspect); "
                    "check on GPUs with `python -m lcflash.parallel.hlo_check` (docs/distributed.md)")
    assert r["enclosed"]["mlp_0"] > 0, r


SYNC_HLO = """HloModule m, is_scheduled=true

%body (p: f32[4,4]) -> f32[4,4] {
  %p = f32[4,4]{1,0} parameter(0)
  %a2a.0 = f32[4,4]{1,0} all-to-all(%p), dimensions={0}, metadata={op_name="x/moe_dispatch/shard_map/all_to_all"}
  %d0 = f32[4,4]{1,0} dot(%p, %p), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="x/mlp_0/dot_general"}
  %d1 = f32[4,4]{1,0} dot(%DEP, %p), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="x/attn_1/dot_general"}
  %d2 = f32[4,4]{1,0} dot(%d1, %p), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="x/mlp_1/dot_general"}
  %a2a.1 = f32[4,4]{1,0} all-to-all(%a2a.0), dimensions={0}, metadata={op_name="x/moe_combine/shard_map/all_to_all"}
  ROOT %out = f32[4,4]{1,0} add(%d2, %a2a.1)
}
"""


def test_overlap_report_detects_a_dense_matmul_that_waits_for_the_dispatch():
    ok = overlap_report(SYNC_HLO.replace("%DEP", "%d0"))
    assert ok.dependent == [] and not ok.asynchronous
    assert {k: len(v) for k, v in ok.window_matmuls.items()} == {"mlp_0": 1, "attn_1": 1, "mlp_1": 1}
    bad = overlap_report(SYNC_HLO.replace("%DEP", "%a2a.0"))
    assert bad.dependent == ["%d1", "%d2"]


def test_overlap_report_counts_matmuls_between_async_start_and_done():
    text = SYNC_HLO.replace("%DEP", "%d0").replace(
        '  %a2a.0 = f32[4,4]{1,0} all-to-all(%p), dimensions={0}, metadata={op_name="x/moe_dispatch/shard_map/all_to_all"}\n',
        '  %s = ((f32[4,4]{1,0}), f32[4,4]{1,0}) all-to-all-start(%p), metadata={op_name="x/moe_dispatch/a"}\n')
    text = text.replace('  %d1 =', '  %a2a.0 = f32[4,4]{1,0} all-to-all-done(%s)\n  %d1 =')
    r = overlap_report(text)
    assert r.asynchronous and r.enclosed == {"mlp_0": 1, "attn_1": 0, "mlp_1": 0}, r


# ----------------------------------------------------------------------------- rules, mesh, plan (in-process)
def test_rules_skip_reused_axes_size_one_axes_and_non_dividing_axes():
    shape = {"data": 2, "fsdp": 2, "expert": 4, "tensor": 1}
    rules = DEFAULT_RULES
    # kv_a: ('embed', 'kv_lora') both want fsdp: only the first gets it; tensor (size 1) is dropped.
    assert logical_to_spec(("layers", "embed", "kv_lora"), rules, shape, (2, 64, 24)) == P(None, "fsdp", None)
    assert logical_to_spec(("batch", "seq", "act_embed"), rules, shape, (16, 8, 64)) == P(("data", "fsdp", "expert"),
                                                                                         None, None)
    # 8 rows cannot split 16 ways: trailing axes are dropped until they divide.
    assert logical_to_spec(("batch", "seq"), rules, shape, (8, 8)) == P(("data", "fsdp"), None)
    assert logical_to_spec(("embed",), rules, shape, (63,)) == P(None)
    with pytest.raises(ConfigError, match="no sharding rule"):
        logical_to_spec(("nope",), rules, shape)
    assert dict(make_rules({"embed": ("data", "fsdp")}))["embed"] == ("data", "fsdp")
    with pytest.raises(ConfigError, match="mesh.rules.embed"):
        make_rules({"embed": ("gpu",)})


def test_mesh_shape_resolves_minus_one_and_rejects_bad_products():
    assert mesh_shape({"data": -1, "fsdp": 1, "expert": 4, "tensor": 1}, 8) == dict(data=2, fsdp=1, expert=4, tensor=1)
    with pytest.raises(ConfigError, match="multiply to 16 but there are 8 devices"):
        mesh_shape({"data": 2, "fsdp": 1, "expert": 8, "tensor": 1}, 8)
    with pytest.raises(ConfigError, match="does not divide the 8 devices"):
        mesh_shape({"data": -1, "fsdp": 1, "expert": 3, "tensor": 1}, 8)
    with pytest.raises(ConfigError, match="both -1"):
        mesh_shape({"data": -1, "fsdp": -1, "expert": 1, "tensor": 1}, 8)


def test_model_fit_errors_name_the_fields():
    mcfg = model_config(load_config(os.path.join(ROOT, "configs/tiny.py")))   # 8 experts, 4 heads
    shape = dict(data=1, fsdp=1, expert=3, tensor=1)
    with pytest.raises(ConfigError, match="n_routed_experts = 8 is not divisible by the expert-parallel size 3"):
        check_model_fits(mcfg, shape, DEFAULT_RULES)
    with pytest.raises(ConfigError, match="num_attention_heads = 4 is not divisible"):
        check_model_fits(mcfg, dict(data=1, fsdp=1, expert=1, tensor=8), DEFAULT_RULES)
    with pytest.raises(ConfigError, match="batch size 6 is not divisible by the 4 batch shards"):
        check_model_fits(mcfg, dict(data=2, fsdp=1, expert=2, tensor=1), DEFAULT_RULES, batch=6)
    with pytest.raises(ConfigError, match="must also split the batch"):
        check_model_fits(mcfg, dict(data=1, fsdp=1, expert=2, tensor=1), make_rules({"batch": ("data",)}))


def test_capacity_is_capped_at_the_local_tokens():
    assert capacity(16, 4, 8, 1.0) == 8
    assert capacity(16, 4, 8, 2.0) == 16
    assert capacity(16, 4, 8, 100.0) == 16
    assert capacity(3, 1, 512, 0.1) == 1


def _plan(path, **over):
    from lcflash.plan import plan

    cfg = load_config(os.path.join(ROOT, path))
    for k, v in over.items():
        if k.startswith("mesh_"):
            cfg.mesh[k[5:]] = v
    kw = {k: v for k, v in over.items() if not k.startswith("mesh_")}
    return plan(cfg, **kw)


def test_plan_splits_state_by_the_rules():
    one = _plan("configs/tiny.py", mesh_data=1, batch=8, seq=16)
    ep = _plan("configs/tiny.py", mesh_data=1, mesh_expert=8, batch=8, seq=16)
    fsdp = _plan("configs/tiny.py", mesh_data=1, mesh_fsdp=8, batch=8, seq=16)
    p1, pe, pf = (x["per_device_bytes"]["params"] for x in (one, ep, fsdp))
    assert p1 == one["global_bytes"]["params"]
    mcfg = model_config(load_config(os.path.join(ROOT, "configs/tiny.py")))
    expert_bytes = 3 * mcfg.num_layers * mcfg.n_routed_experts * mcfg.hidden_size * mcfg.expert_ffn_hidden_size * 4
    assert p1 - pe == expert_bytes * 7 // 8          # experts split 8 ways, everything else replicated
    assert pf < pe                                    # FSDP splits the model width of every matrix
    assert ep["per_device_bytes"]["optimizer state"] < one["per_device_bytes"]["optimizer state"]
    assert one["per_device_bytes"]["KV cache (inference)"] == 8 * ep["per_device_bytes"]["KV cache (inference)"]


def test_plan_counts_one_microbatch_of_activations_and_two_gradient_sums():
    from lcflash.plan import format_plan, plan

    cfg = load_config(os.path.join(ROOT, "configs/tiny.py"), {"train.grad_accum_steps": 2, "mesh.data": 1})
    accum, whole = plan(cfg, batch=16, seq=16), _plan("configs/tiny.py", mesh_data=1, batch=8, seq=16)
    a, w = accum["per_device_bytes"], whole["per_device_bytes"]
    assert a["activations (estimate)"] == w["activations (estimate)"]   # 16 rows in two passes of 8
    assert a["accumulated gradients"] == 2 * a["gradients"] > 0 == w["accumulated gradients"]   # sum in and out
    assert accum["train_total_bytes"] == whole["train_total_bytes"] + 2 * a["gradients"]
    assert "in 2 microbatches" in format_plan(accum)
    with pytest.raises(ConfigError, match="train.grad_accum_steps = 2 is invalid"):
        plan(cfg, batch=15, seq=16)


def test_plan_rejects_meshes_that_cannot_work():
    with pytest.raises(ConfigError, match="not divisible by the expert-parallel size 96"):
        _plan("configs/longcat_flash.py", mesh_data=1, mesh_expert=96, batch=96, seq=1024)
    with pytest.raises(ConfigError, match="pass --devices"):
        _plan("configs/longcat_flash.py", mesh_expert=128, batch=128, seq=1024)
    with pytest.raises(ConfigError, match=r"needs [\d.]+ GiB per device, more than --memory_gb=80"):
        _plan("configs/longcat_flash.py", mesh_expert=128, devices=128, batch=128, seq=8192, memory_gb=80)


def test_plan_suggests_remat_only_where_it_is_off():
    from lcflash.plan import plan

    for remat, hint in ((False, "or set model.remat=True"), (True, "(per microbatch: train.grad_accum_steps)")):
        cfg = load_config(os.path.join(ROOT, "configs/tiny.py"), {"model.remat": remat, "mesh.data": 1})
        with pytest.raises(ConfigError) as e:
            plan(cfg, batch=8, seq=16, memory_gb=1e-4)
        assert str(e.value).endswith(hint) and ("model.remat=True" in str(e.value)) != remat
