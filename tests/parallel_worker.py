"""Sharded runs on fake CPU devices, each in its own process (the device count is fixed at JAX start-up).

    python tests/parallel_worker.py equivalence --out=R.json      # 8 devices: sharded == single device
    python tests/parallel_worker.py train_ckpt --out=R.json --workdir=D
    python tests/parallel_worker.py mp --out=R.json --port=P --process_id=I   # one of 2 processes, 2 devices each

tests/test_parallel.py runs these and checks the JSON they write.
"""

import argparse
import json
import os
import re
import sys
import time

from xla_flags import add_fast_compile_flags  # tests/, this script's directory

ap = argparse.ArgumentParser()
ap.add_argument("mode", choices=["equivalence", "train_ckpt", "mp"])
ap.add_argument("--part", choices=["ep", "reference"], default="ep",
                help="equivalence: 'ep' = transports on every mesh, 'reference' = the reference MoE path + HLO "
                     "+ generation from checkpoints loaded onto a mesh")
ap.add_argument("--out", required=True)
ap.add_argument("--workdir")
ap.add_argument("--port", type=int)
ap.add_argument("--process_id", type=int)
args = ap.parse_args()

N_DEV = 2 if args.mode == "mp" else 8
# Fast XLA:CPU compiles: these runs check numerics and structure, not speed.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={N_DEV}"
                           " --xla_llvm_disable_expensive_passes=true")
add_fast_compile_flags()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
if args.mode == "mp":
    from lcflash.parallel.distributed import initialize  # noqa: E402

    initialize(f"localhost:{args.port}", 2, args.process_id, initialization_timeout=120)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from lcflash.config import load_config, model_config  # noqa: E402
from lcflash.model import LongcatFlash  # noqa: E402
from lcflash.parallel import expert_parallel  # noqa: E402
from lcflash.parallel.ep_ragged_all_to_all import emulated_ragged_all_to_all  # noqa: E402
from lcflash.parallel.mesh import make_mesh, parallel_context  # noqa: E402
from lcflash.parallel.sharding import shard_batch, sharded, tree_shardings  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, T = 8, 16
MESHES = {"expert8": dict(expert=8), "data2_expert4": dict(data=2, expert=4),
          "fsdp2_tensor2_expert2": dict(fsdp=2, tensor=2, expert=2)}
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, file=sys.stderr, flush=True)


def tiny_cfg(mesh=None, **moe):
    cfg = load_config(os.path.join(ROOT, "configs/tiny.py"))
    for k in ("data", "fsdp", "expert", "tensor"):
        cfg.mesh[k] = 1
    for k, v in (mesh or {}).items():
        cfg.mesh[k] = v
    for k, v in moe.items():
        cfg.moe[k] = v
    return cfg


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def tree_rel(a, b) -> dict:
    fa = jax.tree_util.tree_flatten_with_path(a)[0]
    return {jax.tree_util.keystr(p): rel(x, y) for (p, x), y in zip(fa, jax.tree.leaves(b))}


# ------------------------------------------------------------------------------------------ equivalence
def equivalence():
    cfg = tiny_cfg()
    mcfg = model_config(cfg).replace(num_mtp_layers=0)
    tokens = np.random.RandomState(0).randint(0, mcfg.vocab_size, (B, T + 1)).astype(np.int32)
    graphdef, params, rest = nnx.split(LongcatFlash(mcfg, nnx.Rngs(0)), nnx.Param, ...)

    def loss(p, r, tok, reference):
        out = nnx.merge(graphdef, p, r).forward(tok[:, :-1], reference_moe=reference)
        lp = jax.nn.log_softmax(out.logits, -1)
        nll = -jnp.mean(jnp.take_along_axis(lp, tok[:, 1:, None], -1))
        return nll, out.moe_stats["dropped_slots"].sum()

    grad_fn = jax.value_and_grad(loss, has_aux=True)
    reference = args.part == "reference"
    (l0, _), g0 = jax.jit(grad_fn, static_argnums=3)(params, rest, tokens, reference)
    l0 = float(l0)
    log("single device", args.part, l0)
    results = {}
    meshes = dict(MESHES, data4_tensor2=dict(data=4, tensor=2))
    if reference:
        cases = [("fsdp2_tensor2_expert2", "all_to_all")]
    else:   # the ragged offsets run through a dense emulation (XLA:CPU cannot compile the primitive)
        cases = [(m, "all_to_all") for m in MESHES] + [("fsdp2_tensor2_expert2", "ragged_all_to_all"),
                                                       ("data4_tensor2", "all_to_all")]
    for mesh_name, transport in cases:
        cfg = tiny_cfg(meshes[mesh_name], transport=transport, capacity_factor=2.0)
        ctx = parallel_context(cfg, make_mesh(cfg), mcfg, B)
        p = jax.device_put(params, tree_shardings(params, ctx))
        r = jax.device_put(rest, tree_shardings(rest, ctx))
        if transport == "ragged_all_to_all":
            expert_parallel.RAGGED_ALL_TO_ALL = emulated_ragged_all_to_all
        with jax.set_mesh(ctx.mesh):
            (l, dropped), g = jax.jit(sharded(grad_fn, ctx), static_argnums=3)(p, r, shard_batch(tokens, ctx),
                                                                                reference)
        expert_parallel.RAGGED_ALL_TO_ALL = None
        errs = tree_rel(g, g0)
        worst = max(errs, key=errs.get)
        key = f"{mesh_name}/{'reference' if reference else transport}"
        results[key] = {"loss": float(l), "loss_ref": l0, "loss_rel": abs(float(l) - l0) / abs(l0),
                        "grad_rel_max": errs[worst], "grad_rel_worst": worst, "dropped": float(dropped),
                        "w_gate_spec": str(p["layers"]["moe"]["w_gate"].get_value().sharding.spec)}
        log(key, results[key])
    if reference:
        return results | hlo_and_capacity(mcfg, graphdef, params, rest, tokens) | generation()
    # Without the emulation, the ragged transport refuses CPU devices before tracing anything heavy.
    from lcflash.config import ConfigError

    cfg = tiny_cfg(MESHES["expert8"], transport="ragged_all_to_all")
    ctx = parallel_context(cfg, make_mesh(cfg), mcfg, B)
    try:
        jax.eval_shape(sharded(lambda p, r, t: loss(p, r, t, False), ctx), params, rest, tokens)
        results["ragged_on_cpu_error"] = None
    except ConfigError as e:
        results["ragged_on_cpu_error"] = str(e)
    return results


def hlo_and_capacity(mcfg, graphdef, params, rest, tokens):
    results = {}
    # Small capacity: the dropped count equals what the routing implies per (device, expert).
    cfg = tiny_cfg(MESHES["data2_expert4"], capacity_factor=0.5)
    ctx = parallel_context(cfg, make_mesh(cfg), mcfg, B)
    fwd = jax.jit(sharded(lambda p, r, t: nnx.merge(graphdef, p, r).forward(t).moe_stats, ctx))
    stats = fwd(jax.device_put(params, tree_shardings(params, ctx)), rest, shard_batch(tokens[:, :-1], ctx))
    experts = np.asarray(stats["experts_btk"])            # [L, B, T, K]
    t_local = B // 8 * T
    cap = max(1, min(t_local, int(np.ceil(0.5 * t_local * mcfg.moe_topk / mcfg.n_routed_experts))))
    expected = []
    for layer in experts:
        per_shard = layer.reshape(8, -1)                  # batch shards in mesh order (data, fsdp, expert)
        n = 0
        for shard in per_shard:
            counts = np.bincount(shard[shard < mcfg.n_routed_experts], minlength=mcfg.n_routed_experts)
            n += int(np.maximum(counts - cap, 0).sum())
        expected.append(n)
    results["capacity_drop"] = {"dropped": np.asarray(stats["dropped_slots"]).tolist(), "expected": expected,
                                "cap": cap}
    log("capacity_drop", results["capacity_drop"])

    # ScMoE overlap: compiled forward on expert=8.
    from lcflash.parallel.hlo_check import compile_sharded_forward, overlap_report

    cfg = tiny_cfg(MESHES["expert8"])
    cfg.model.num_mtp_layers = 0
    rep = overlap_report(compile_sharded_forward(cfg, B, T).as_text())
    results["overlap"] = {"dependent": rep.dependent, "asynchronous": rep.asynchronous, "enclosed": rep.enclosed,
                          "window": {k: len(v) for k, v in rep.window_matmuls.items()},
                          "dispatch": rep.dispatch, "combine": rep.combine, "backend": jax.default_backend()}
    log("overlap", results["overlap"])
    return results


# ------------------------------------------------------------------------------------------ generation
COLLECTIVE = re.compile(r"= (\(?[^=]*?\)?) (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"
                        r"(?:-start)?\(")


def attention_collectives(hlo: str) -> list[str]:
    """The kinds of the collectives that compiled HLO text attributes to an attention sublayer (its named scope)."""
    return [kind for line in hlo.splitlines() if re.search(r'op_name="[^"]*/attn_\d/', line)
            for _, kind in COLLECTIVE.findall(line)]


def collective_bytes(hlo: str) -> dict[str, list[int]]:
    """Result bytes of every collective in compiled HLO text, by kind."""
    from experiment_scripts import load   # tests/, this script's directory

    shape_bytes = load("decode_profile").shape_bytes
    out = {}
    for shapes, kind in COLLECTIVE.findall(hlo):
        out.setdefault(kind, []).append(shape_bytes(shapes))
    return out


SAMPLED = dict(temperature=0.8, top_p=0.9, seed=5)


def generation():
    """A HF directory loaded onto an expert=4 x tensor=2 mesh: its greedy and sampled tokens for four ragged prompts
    (split over the 4 row shards; MTP speculation too, and the Pallas attention's per-shard call with a pure-JAX
    body) and for three (which the shards do not divide), its weights', decode layout's and caches' shardings, and
    the collectives of its compiled prefill and decode loop by kind and size; a trainer workdir loaded onto the same
    mesh, compared with it variable by variable."""
    import tempfile

    cfg = tiny_cfg()
    cfg.model.num_layers = 1   # the decode programs unroll the layers: one compiles in half the time
    # Weights wider than the activations, so that the collectives' sizes tell a weight from an activation.
    cfg.model.expert_ffn_hidden_size = cfg.model.ffn_hidden_size = 512
    model = LongcatFlash(model_config(cfg), nnx.Rngs(1))
    rng = np.random.RandomState(3)
    prompts = [rng.randint(3, model.cfg.vocab_size, n).tolist() for n in (5, 9, 3, 6)]
    want = model.generate(prompts, 8), model.generate(prompts, 8, **SAMPLED)
    with tempfile.TemporaryDirectory(prefix="lcflash_gen_") as tmp:
        return _generation(model, cfg, prompts, want, tmp)


def _generation(model, cfg, prompts, want, tmp):
    import lcflash
    from lcflash.checkpoint import Checkpointer, checkpoint_dir
    from lcflash.config import ConfigError
    from lcflash.infer.generation import generator_for
    from lcflash.infer.load import load_model, mesh_from_spec
    from lcflash.model.common import RouterBias
    from lcflash.parallel.sharding import variable_sharding_fn

    lcflash.save_pretrained(model, os.path.join(tmp, "hf"))
    workdir = os.path.join(tmp, "run")
    os.makedirs(workdir)
    with open(os.path.join(workdir, "config.json"), "w") as fh:
        fh.write(cfg.to_json_best_effort())
    _, params, bias = nnx.split(model, nnx.Param, RouterBias)
    ck = Checkpointer(checkpoint_dir(workdir), async_save=False)
    ck.save(1, {"params": nnx.to_pure_dict(params), "bias": nnx.to_pure_dict(bias), "step": 1}, {}, force=True)
    ck.close()
    mesh = mesh_from_spec("expert=4,tensor=2")
    m, _ = load_model(os.path.join(tmp, "hf"), mesh=mesh)
    gen, hlo, caches = generator_for(m), {}, []
    for fn in ("prefill", "decode_loop"):   # each compiled once, its HLO kept
        def spy(*a, jitted=getattr(gen, fn), fn=fn, **k):
            exe = jitted.lower(*a, **k).compile()
            hlo.setdefault(fn, exe.as_text())
            out = exe(*a)
            caches.append(out[-1])   # the decode loop's cache (prefill: the draft tokens, unused)
            return out
        setattr(gen, fn, spy)
    got, spec, sampled = (m.generate(prompts, 8), m.generate(prompts, 8, speculative="mtp"),
                          m.generate(prompts, 8, **SAMPLED))
    c = caches[-1].layers[0].c_bsr
    got3, c3 = m.generate(prompts[:3], 8), caches[-1].layers[0].c_bsr
    os.environ["LCFLASH_MLA_DECODE_IMPL"] = "split_reference"   # the kernel's pure-JAX twin inside shard_map
    try:
        kernel_path = generator_for(m, attn_impl="pallas").generate(prompts, 8)
    finally:
        del os.environ["LCFLASH_MLA_DECODE_IMPL"]
    same = lambda xs, ys: all(np.array_equal(a, b) for a, b in zip(xs, ys, strict=True))  # noqa: E731
    results = {"generate/hf": {
        "equal": same(got, want[0]) and same(got3, want[0][:3]), "mtp_equal": same(spec, want[0]),
        "sampled_equal": same(sampled, want[1]),
        "kernel_path_equal": same(kernel_path, want[0]), "split": [gen.split.rows_axes, gen.split.heads_axes],
        "cache_spec": str(c.sharding.spec), "cache_rows": [c.shape[0], c.addressable_shards[0].data.shape[0]],
        "cache3_rows": [c3.shape[0], c3.addressable_shards[0].data.shape[0]],
        "w_gate_spec": str(m.layers.moe.w_gate.get_value().sharding.spec),
        "decode_w_gate_spec": str(gen.dm.weights.layers[0].moe.w_gate.sharding.spec),
        "decode_w_gate_up_spec": str(gen.dm.weights.layers[0].mlp_0.w_gate_up.sharding.spec),
        "collective_bytes": {fn: collective_bytes(text) for fn, text in hlo.items()},
        "attention_collectives": {fn: attention_collectives(text) for fn, text in hlo.items()},
        "w_gate_shard_bytes": int(m.layers.moe.w_gate.get_value().addressable_shards[0].data.nbytes)}}
    log("generate hf", results["generate/hf"])
    # The workdir's loader: the same values on the same shards, variable by variable (so the same generation).
    run, _ = load_model(workdir, mesh=mesh)
    pairs = list(zip(jax.tree.leaves(nnx.state(run)), jax.tree.leaves(nnx.state(m)), strict=True))
    results["generate/run"] = {
        "values_equal": all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs),
        "shardings_equal": all(a.sharding == b.sharding for a, b in pairs),
        "sharded": sum(not a.sharding.is_fully_replicated for a, _ in pairs), "variables": len(pairs)}
    log("generate run", results["generate/run"])
    try:   # 4 heads over 8 tensor shards: refused before anything is read
        variable_sharding_fn(model.cfg, mesh_from_spec("tensor=8"))
        results["generate/tensor8_error"] = None
    except ConfigError as e:
        results["generate/tensor8_error"] = str(e)
    return results


# ------------------------------------------------------------------------------------------ training
def train_cfg(mesh=None):
    cfg = tiny_cfg(mesh, capacity_factor=2.0)
    cfg.train.grad_ratio_every = 0
    cfg.train.steps = 100
    return cfg


def batches(vocab, n):
    out = []
    for i in range(n):
        toks = np.random.RandomState(100 + i).randint(0, vocab, (B, T + 1)).astype(np.int32)
        seg = np.ones((B, T), np.int32)
        seg[:, T // 2:] += np.arange(B)[:, None] % 2       # half the rows pack two documents
        pos = np.where(seg == 1, np.arange(T), np.arange(T) - T // 2).astype(np.int32)
        mask = np.ones((B, T), np.float32)
        mask[:, T // 2 - 1] = np.where(np.arange(B) % 2, 0.0, 1.0)
        out.append({"inputs": toks[:, :-1], "targets": toks[:, 1:], "positions": pos, "segment_ids": seg,
                    "loss_mask": mask})
    return out


def train_ckpt():
    from lcflash.checkpoint import Checkpointer
    from lcflash.parallel.step import abstract_state_sharded, init_state_sharded, make_sharded_train_step
    from lcflash.train.step import init_state, make_train_step

    n_steps, save_at = 4, 2
    cfg = train_cfg()
    data = batches(model_config(cfg).vocab_size, n_steps)
    key = jax.random.PRNGKey(0)
    state = init_state(cfg, key)
    step = jax.jit(make_train_step(cfg))
    single = []
    for b in data:
        state, m = step(state, b)
        single.append({k: float(m[k]) for k in ("loss", "ce", "mtp_loss", "lb_loss", "z_loss", "grad_norm")})
    single_params = jax.device_get(state["params"])
    log("single", [s["loss"] for s in single])

    # Mesh A trains from the start and saves after `save_at` steps.
    cfg_a = train_cfg(MESHES["fsdp2_tensor2_expert2"])
    ctx_a = parallel_context(cfg_a, make_mesh(cfg_a), model_config(cfg_a), B)
    state = init_state_sharded(cfg_a, key, ctx_a)
    init_spec = str(state["params"]["layers"]["moe"]["w_gate"].sharding.spec)
    step_a = make_sharded_train_step(cfg_a, ctx_a)
    ckpt = Checkpointer(os.path.join(args.workdir, "ckpt"), async_save=False)
    mesh_a = []
    for i, b in enumerate(data):
        state, m = step_a(state, shard_batch(b, ctx_a))
        mesh_a.append({k: float(m[k]) for k in ("loss", "ce", "mtp_loss", "lb_loss", "z_loss", "grad_norm")})
        if i + 1 == save_at:
            ckpt.save(save_at, state, {"data_position": save_at}, force=True)
            ckpt.wait()
    mu_spec = [str(x.sharding.spec) for path, x in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]
               if "mu" in jax.tree_util.keystr(path) and "['moe']['w_gate']" in jax.tree_util.keystr(path)]
    log("mesh A", [s["loss"] for s in mesh_a])

    # Mesh B restores that checkpoint and trains the remaining steps.
    cfg_b = train_cfg(MESHES["data2_expert4"])
    ctx_b = parallel_context(cfg_b, make_mesh(cfg_b), model_config(cfg_b), B)
    state, meta = ckpt.restore(abstract_state_sharded(cfg_b, ctx_b), save_at)
    restored_spec = str(state["params"]["layers"]["moe"]["w_gate"].sharding.spec)
    step_b = make_sharded_train_step(cfg_b, ctx_b)
    mesh_b = []
    for b in data[save_at:]:
        state, m = step_b(state, shard_batch(b, ctx_b))
        mesh_b.append({k: float(m[k]) for k in ("loss", "ce", "mtp_loss", "lb_loss", "z_loss", "grad_norm")})
    log("mesh B", [s["loss"] for s in mesh_b])
    param_rel = tree_rel(jax.device_get(state["params"]), single_params)
    ckpt.close()
    log("final params vs single device", max(param_rel.values()))
    return {"single": single, "mesh_a": mesh_a, "mesh_b": mesh_b, "save_at": save_at,
            "meta_step": meta.get("step"), "init_spec": init_spec, "restored_spec": restored_spec,
            "mu_spec": mu_spec, "final_param_rel_max": max(param_rel.values())}


# ------------------------------------------------------------------------------------------ multi-process
def multiprocess():
    from lcflash.parallel.step import init_state_sharded, make_sharded_train_step

    cfg = train_cfg(dict(data=2, expert=2))
    ctx = parallel_context(cfg, make_mesh(cfg), model_config(cfg), B)
    state = init_state_sharded(cfg, jax.random.PRNGKey(0), ctx)
    step = make_sharded_train_step(cfg, ctx)
    losses = []
    for b in batches(model_config(cfg).vocab_size, 3):
        state, m = step(state, shard_batch(b, ctx))
        losses.append(float(m["loss"]))
    log("process", jax.process_index(), losses)
    return {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "global_devices": jax.device_count(), "local_devices": jax.local_device_count(), "losses": losses}


if __name__ == "__main__":
    result = {"equivalence": equivalence, "train_ckpt": train_ckpt, "mp": multiprocess}[args.mode]()
    result["seconds"] = time.time() - T0
    with open(args.out, "w") as fh:
        json.dump(result, fh)
    log("done")
