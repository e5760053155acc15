"""Per-device memory plan for a mesh and batch, from abstract shapes: no devices, no weights, no compile.

    python -m lcflash.plan --config=configs/longcat_flash.py --config.mesh.expert=128 --devices=128 \\
        --batch=128 --seq=8192 --memory_gb=80

Parameters, gradients and optimizer state are exact: every leaf of the trainer's abstract state
(`lcflash.train.step.abstract_state`) is split by the sharding rules (`lcflash.parallel.rules`), the same
code the sharded train step uses. Activations are an analytic estimate of what the backward pass keeps
(listed per term in `activation_terms`); XLA's real peak can differ. The KV cache is the inference latent
cache for `batch` sequences of `kv_len` tokens.

Mesh settings that cannot work raise ConfigError before anything is built: axis product different from the
device count, experts not divisible by the expert axis, heads not divisible by the tensor axis, a batch not
divisible by its shards, or a per-device total above `--memory_gb`.
"""

from __future__ import annotations

import json
import math
import sys

import jax
import numpy as np

from lcflash.config import ConfigError, ModelConfig, bad_override_message, model_config, remat_keep_names
from lcflash.parallel.mesh import check_model_fits, mesh_shape
from lcflash.parallel.rules import mesh_axes_for, rules_from_config

GiB = 1 << 30


def _local_bytes(shape, dtype, spec, shape_of_mesh) -> int:
    local = list(shape)
    for i, entry in enumerate(tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))):
        if entry is None:
            continue
        axes = (entry,) if isinstance(entry, str) else entry
        local[i] = math.ceil(local[i] / math.prod(shape_of_mesh[a] for a in axes))
    return math.prod(local) * np.dtype(dtype).itemsize


def _group_size(rules, shape, logical) -> int:
    return math.prod(shape.get(a, 1) for a in mesh_axes_for(rules, logical))


def activation_terms(cfg: ModelConfig, batch_local: int, seq: int, tp: int, ep: int,
                     capacity_factor: float, transport: str) -> dict[str, int]:
    """Bytes one device keeps for the backward pass of one step (estimate), by term.

    Without remat, per layer and token: norm inputs and the residual (6 x D); for each of the 2 MLA sublayers
    the latents, per-head q/k/v, fp32 logits and probabilities over `seq` keys, and the head outputs; for each
    of the 2 dense FFNs gate/up/product; for the MoE the fp32 router probabilities and the dispatch buffers
    (send, receive, 3 expert intermediates, output) of every slot. With `model.remat`, only each layer's input
    is kept, plus one layer's terms during its recomputation; `remat_policy="kernels"` also keeps every layer's
    expert gate/up/down products and attention outputs (+ fp32 softmax statistics), and "dots" every projection's
    output too; `remat_keep` adds the activations it names. Plus fp32 logits, their softmax and gradient.
    """
    a = np.dtype(cfg.jnp_dtype).itemsize
    D, H, L, K = cfg.hidden_size, cfg.num_attention_heads, cfg.num_layers, cfg.moe_topk
    n = batch_local * seq
    h_tp = H / tp
    attn = (cfg.q_lora_rank * 2 + cfg.kv_lora_rank * 2 + cfg.qk_rope_head_dim
            + h_tp * (cfg.qk_head_dim + cfg.qk_nope_head_dim + 2 * cfg.v_head_dim)) * a + 2 * h_tp * seq * 4
    ffn = 3 * (cfg.ffn_hidden_size / tp) * a
    if ep == 1:
        slots = float(K)                                   # dropless local grouped matmul: every slot
    elif transport == "all_to_all":
        slots = min(K * capacity_factor, K * cfg.n_routed_experts)  # capacity rows per token (send side)
    else:
        slots = ep * min(K, cfg.n_routed_experts // ep)    # worst-case ragged receive buffer
    moe = 2 * cfg.num_experts_total * 4 + slots * (3 * D * a + 3 * (cfg.expert_ffn_hidden_size / tp) * a)
    per_layer_token = 6 * D * a + 2 * attn + 2 * ffn + moe
    terms = {}
    if cfg.remat:
        terms["layer inputs (remat)"] = int(L * n * D * a)
        terms["one layer recomputed"] = int(n * per_layer_token)
        if cfg.remat_policy in ("kernels", "dots"):
            kept = slots * (2 * cfg.expert_ffn_hidden_size / tp + D) * a + 2 * h_tp * (cfg.v_head_dim * a + 4)
            terms[f"kernel outputs (remat_policy={cfg.remat_policy})"] = int(L * n * kept)
        if cfg.remat_policy == "dots":
            proj = (cfg.q_lora_rank + h_tp * cfg.qk_head_dim + cfg.kv_lora_rank + cfg.qk_rope_head_dim
                    + h_tp * (cfg.qk_nope_head_dim + cfg.v_head_dim) + D) * a
            if cfg.train_attn_impl == "xla":  # materialised scores are dot outputs too
                proj += 2 * h_tp * seq * 4
            dots = 2 * proj + 2 * (2 * cfg.ffn_hidden_size / tp + D) * a + cfg.num_experts_total * 4
            terms["matmul outputs (remat_policy=dots)"] = int(L * n * dots)
        keep = remat_keep_names(cfg.remat_keep)
        if "swiglu" in keep:  # the dense FFNs' h and the experts' (already kept as a kernel output under those)
            expert_h = 0 if cfg.remat_policy in ("kernels", "dots") else slots * cfg.expert_ffn_hidden_size / tp
            terms["SwiGLU outputs (remat_keep)"] = int(L * n * (2 * cfg.ffn_hidden_size / tp + expert_h) * a)
        if "dispatch" in keep:
            terms["dispatched expert rows (remat_keep)"] = int(L * n * slots * D * a)
        if "routing" in keep:  # chosen experts [T, K]; Slots: three int32/bool rows of T*K sorted, two of [T, K]
            terms["MoE routing choices (remat_keep)"] = int(L * n * cfg.moe_topk * (4 + 4 + 4 + 1 + 4 + 1))
        if "norms" in keep:  # four per layer on the residual stream, two on MLA's latents per attention
            terms["RMSNorm outputs (remat_keep)"] = int(L * n * (4 * D + 2 * (cfg.q_lora_rank + cfg.kv_lora_rank))
                                                       * a)
    else:
        terms["layers"] = int(L * n * per_layer_token)
    heads = 1 + (1 if cfg.num_mtp_layers else 0)
    terms["logits (fp32, x3)"] = int(heads * 3 * n * (cfg.vocab_size / tp) * 4)
    if cfg.num_mtp_layers:
        terms["MTP block"] = int(n * (6 * D * a + attn + ffn))
    return terms


def plan(cfg, devices: int | None = None, batch: int | None = None, seq: int | None = None,
         kv_len: int | None = None, memory_gb: float | None = None, check: str = "train") -> dict:
    """The per-device plan as a dict; raises ConfigError for settings that cannot work."""
    from lcflash.parallel.step import state_specs
    from lcflash.train.step import abstract_state, grad_accum_steps

    model_cfg = model_config(cfg)
    rules = rules_from_config(cfg)
    mcfg = cfg.mesh
    if devices is None:
        sizes = [mcfg[a] for a in ("data", "fsdp", "expert", "tensor")]
        if -1 in sizes:
            raise ConfigError("a mesh axis is -1 (the remaining devices): pass --devices=N to say how many there are")
        devices = math.prod(sizes)
    shape = mesh_shape(cfg, devices)
    train_cfg = cfg.get("train") or {}
    batch = batch or train_cfg.get("batch_size", None)
    seq = seq or (cfg.get("data") or {}).get("seq_len", None)
    if not batch or not seq:
        raise ConfigError("pass --batch and --seq (the config has no train.batch_size / data.seq_len)")
    kv_len = kv_len or seq
    # train.grad_accum_steps: each forward pass sees one microbatch; the summed gradient is two more copies, the
    # loop's sum going in and coming out beside the microbatch's own gradient. One copy undercounts on the GPU: on
    # an H100, 3 x 16 x 1024 of configs/small.py compiled to 52.7 GiB of temporaries against 43.6 for 20 x 1024 in
    # one pass (session 42): 9.1 GiB more, where 4 fewer rows and one copy account for about 1 (another copy is
    # 7.6); the step that one copy put at 70.4 GiB ran out of the 75.2 GiB its 0.95 memory fraction left.
    accum = grad_accum_steps(cfg, batch) if cfg.get("train") else 1
    micro = batch // accum
    check_model_fits(model_cfg, shape, rules, micro)
    bshards = _group_size(rules, shape, "batch")
    tp, ep = _group_size(rules, shape, "heads"), _group_size(rules, shape, "expert")
    moe = cfg.get("moe") or {}
    transport, cf = moe.get("transport", "all_to_all"), float(moe.get("capacity_factor", 2.0))

    abstract = abstract_state(cfg)
    specs = state_specs(cfg, rules, shape, abstract)
    sizes: dict[str, int] = {}
    totals: dict[str, int] = {}
    for (path, leaf), spec in zip(jax.tree_util.tree_flatten_with_path(abstract)[0], jax.tree.leaves(
            specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))):
        part = path[0].key
        sizes[part] = sizes.get(part, 0) + _local_bytes(leaf.shape, leaf.dtype, spec, shape)
        totals[part] = totals.get(part, 0) + math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    # Gradients have the parameters' shapes, dtypes and shardings.
    grads = sizes.get("params", 0)
    act = activation_terms(model_cfg, micro // bshards, seq, tp, ep, cf, transport)
    kv_bytes = (2 * model_cfg.num_layers * math.ceil(batch / bshards) * kv_len
                * (model_cfg.kv_lora_rank + model_cfg.qk_rope_head_dim) * np.dtype(model_cfg.jnp_dtype).itemsize)
    per_device = {
        "params": sizes.get("params", 0),
        "router bias": sizes.get("bias", 0),
        "gradients": grads,
        "accumulated gradients": 2 * grads if accum > 1 else 0,
        "optimizer state": sizes.get("opt_state", 0),
        "controller/step/rng": sizes.get("controller", 0) + sizes.get("step", 0) + sizes.get("rng", 0),
        # The forward casts every fp32 master weight to the compute dtype once per step (the stacked experts
        # outside the layer scan): a second copy of the weights in that dtype.
        "compute-dtype weights": (sizes.get("params", 0) * np.dtype(model_cfg.jnp_dtype).itemsize
                                  // np.dtype(model_cfg.jnp_param_dtype).itemsize
                                  if model_cfg.jnp_dtype != model_cfg.jnp_param_dtype else 0),
        "activations (estimate)": sum(act.values()),
        "KV cache (inference)": kv_bytes,
    }
    train_total = sum(v for k, v in per_device.items() if k != "KV cache (inference)")
    infer_total = per_device["params"] + per_device["router bias"] + kv_bytes
    out = {"mesh": shape, "devices": devices, "batch": batch, "seq": seq, "kv_len": kv_len,
           "grad_accum_steps": accum, "batch_per_shard": micro // bshards, "per_device_bytes": per_device,
           "activation_terms": act,
           "train_total_bytes": train_total, "infer_total_bytes": infer_total,
           "global_bytes": {"params": totals.get("params", 0), "optimizer state": totals.get("opt_state", 0)},
           "memory_bytes": None if memory_gb is None else int(memory_gb * GiB)}
    if memory_gb is not None and check != "none":
        total = train_total if check == "train" else infer_total
        if total > memory_gb * GiB:
            rows = ", ".join(f"{k} {v / GiB:.2f}" for k, v in per_device.items())
            hint = "" if check != "train" else (" (per microbatch: train.grad_accum_steps)" if model_cfg.remat
                                                else ", or set model.remat=True")
            raise ConfigError(f"mesh {shape}: the {check} step needs {total / GiB:.2f} GiB per device, more than "
                              f"--memory_gb={memory_gb:g} (GiB: {rows}); raise mesh.expert / mesh.fsdp / "
                              f"mesh.tensor, lower the batch{hint}")
    return out


def format_plan(p: dict) -> str:
    mesh = ", ".join(f"{a}={v}" for a, v in p["mesh"].items())
    accum = f" in {p['grad_accum_steps']} microbatches" if p.get("grad_accum_steps", 1) > 1 else ""
    lines = [f"mesh {mesh} ({p['devices']} devices); batch {p['batch']} x {p['seq']} tokens{accum} "
             f"({p['batch_per_shard']} sequences per batch shard and pass); KV cache {p['kv_len']} tokens",
             f"{'per device':<28s}{'GiB':>12s}"]
    for k, v in p["per_device_bytes"].items():
        lines.append(f"  {k:<26s}{v / GiB:>12.3f}")
    lines.append(f"  {'train step total':<26s}{p['train_total_bytes'] / GiB:>12.3f}")
    lines.append(f"  {'inference total':<26s}{p['infer_total_bytes'] / GiB:>12.3f}")
    if p["memory_bytes"]:
        lines.append(f"  {'device memory':<26s}{p['memory_bytes'] / GiB:>12.3f}")
    lines.append("activation estimate terms (GiB): " + ", ".join(
        f"{k} {v / GiB:.3f}" for k, v in p["activation_terms"].items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    from absl import flags
    from ml_collections import config_flags

    fl = flags.FlagValues()
    config = config_flags.DEFINE_config_file("config", None, "ml_collections config file", flag_values=fl,
                                             lock_config=True)
    devices = flags.DEFINE_integer("devices", None, "device count (default: the product of the mesh axes)",
                                   flag_values=fl)
    batch = flags.DEFINE_integer("batch", None, "global batch (default train.batch_size)", flag_values=fl)
    seq = flags.DEFINE_integer("seq", None, "sequence length (default data.seq_len)", flag_values=fl)
    kv_len = flags.DEFINE_integer("kv_len", None, "KV cache length per sequence (default --seq)", flag_values=fl)
    memory = flags.DEFINE_float("memory_gb", None, "device memory in GiB; a larger total is an error", flag_values=fl)
    check = flags.DEFINE_enum("check", "train", ["train", "infer", "none"], "which total --memory_gb bounds",
                              flag_values=fl)
    as_json = flags.DEFINE_bool("json", False, "print one JSON object", flag_values=fl)
    if argv is not None:     # config_flags registers --config.* overrides from sys.argv
        sys.argv = [sys.argv[0]] + list(argv)
    if any(a in ("-h", "--help", "--helpfull") for a in sys.argv[1:]):
        print("usage: python -m lcflash.plan --config=FILE [--config.FIELD=VALUE ...] [flags]\n"
              "Per-device memory plan (parameters, optimizer state, activations, KV cache) of a config on a mesh.\n")
        print(fl.get_help())
        return 0
    try:
        fl(sys.argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (KeyError, AttributeError, ValueError, TypeError) as e:  # ml_collections on a --config.* override
        print(f"error: {bad_override_message(sys.argv[1:], e)}", file=sys.stderr)
        return 2
    if config.value is None:
        print("error: --config is required", file=sys.stderr)
        return 2
    try:
        with jax.default_device(jax.devices("cpu")[0]):
            p = plan(config.value, devices.value, batch.value, seq.value, kv_len.value, memory.value, check.value)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(p) if as_json.value else format_plan(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
