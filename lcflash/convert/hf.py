"""Load and save HF LongCat-Flash checkpoints, streaming tensor by tensor.

Every lcflash variable has a `Spec`: the HF key it comes from (with `{l}` layer and `{e}` expert fields for
stacked variables) and the layout change. Loading builds each variable with `jax.make_array_from_callback`,
so each device shard reads only the HF tensors it needs: host memory peaks near one copy of the model (or of
one shard), never two, and the same code loads the 560B checkpoint onto a mesh.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from lcflash.config import ConfigError, ModelConfig
from lcflash.convert import fp8
from lcflash.convert.hf_config import load_hf_config, read_config_json, to_hf_dict
from lcflash.convert.safetensors_io import SafetensorsError, SafetensorsFile, write_safetensors
from lcflash.model import LongcatFlash

INDEX = "model.safetensors.index.json"
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged or does not match the config; the message names the file and key."""


@dataclasses.dataclass(frozen=True)
class Spec:
    key: str                                  # HF key template, may use {l} (layer) and {e} (expert)
    stack: tuple = ()                         # our leading axes that enumerate HF tensors: ("l",), ("l", "e")
    to_ours: Callable = lambda w: w           # HF tensor -> our per-item layout
    to_hf: Callable = lambda w: w             # inverse
    hf_shape: Callable = lambda s: s          # our per-item shape -> HF shape


def _t():
    return dict(to_ours=lambda w: w.T, to_hf=lambda w: w.T, hf_shape=lambda s: s[::-1])


def _heads_out():
    """[out=H*k, in] <-> [in, H, k] (q_b_proj, kv_b_proj)."""
    return dict(to_ours=None, to_hf=lambda w: w.reshape(w.shape[0], -1).T,
                hf_shape=lambda s: (s[1] * s[2], s[0]))


def _heads_in():
    """o_proj [D, H*dv] <-> [H, dv, D]."""
    return dict(to_ours=None, to_hf=lambda w: w.reshape(-1, w.shape[-1]).T,
                hf_shape=lambda s: (s[2], s[0] * s[1]))


def _attn_specs(ours: tuple, hf: str, stack: tuple, cfg: ModelConfig) -> dict:
    H = cfg.num_attention_heads
    q_b = _heads_out()
    q_b["to_ours"] = lambda w: w.T.reshape(w.shape[1], H, -1)
    kv_b = _heads_out()
    kv_b["to_ours"] = lambda w: w.T.reshape(w.shape[1], H, -1)
    o = _heads_in()
    o["to_ours"] = lambda w: w.T.reshape(H, -1, w.shape[0])
    return {
        ours + ("w_q_a",): Spec(hf + "q_a_proj.weight", stack, **_t()),
        ours + ("q_a_norm", "weight"): Spec(hf + "q_a_layernorm.weight", stack),
        ours + ("w_q_b",): Spec(hf + "q_b_proj.weight", stack, **q_b),
        ours + ("w_kv_a",): Spec(hf + "kv_a_proj_with_mqa.weight", stack, **_t()),
        ours + ("kv_a_norm", "weight"): Spec(hf + "kv_a_layernorm.weight", stack),
        ours + ("w_kv_b",): Spec(hf + "kv_b_proj.weight", stack, **kv_b),
        ours + ("w_o",): Spec(hf + "o_proj.weight", stack, **o),
    }


def _mlp_specs(ours: tuple, hf: str, stack: tuple) -> dict:
    return {ours + (f"w_{n}",): Spec(hf + f"{n}_proj.weight", stack, **_t()) for n in ("gate", "up", "down")}


def hf_specs(cfg: ModelConfig) -> dict:
    """lcflash variable path -> Spec, in HF checkpoint order."""
    L = "model.layers.{l}."
    s = {("embed",): Spec("model.embed_tokens.weight")}
    for i in (0, 1):
        s[("layers", f"input_norm_{i}", "weight")] = Spec(L + f"input_layernorm.{i}.weight", ("l",))
        s.update(_attn_specs(("layers", f"attn_{i}"), L + f"self_attn.{i}.", ("l",), cfg))
        s[("layers", f"post_attn_norm_{i}", "weight")] = Spec(L + f"post_attention_layernorm.{i}.weight", ("l",))
        s.update(_mlp_specs(("layers", f"mlp_{i}"), L + f"mlps.{i}.", ("l",)))
    s[("layers", "moe", "w_router")] = Spec(L + "mlp.router.classifier.weight", ("l",), **_t())
    s[("layers", "moe", "bias")] = Spec(L + "mlp.router.e_score_correction_bias", ("l",))
    s.update(_mlp_specs(("layers", "moe"), L + "mlp.experts.{e}.", ("l", "e")))
    s[("norm", "weight")] = Spec("model.norm.weight")
    s[("lm_head",)] = Spec("lm_head.weight", **_t())
    if cfg.num_mtp_layers:
        M = "model.mtp.layers.0."
        s[("mtp", "embed")] = Spec("model.mtp.embed_tokens.weight")
        s[("mtp", "enorm", "weight")] = Spec(M + "enorm.m.weight")
        s[("mtp", "hnorm", "weight")] = Spec(M + "hnorm.m.weight")
        s[("mtp", "w_eh")] = Spec(M + "eh_proj.weight", **_t())
        s[("mtp", "input_norm", "weight")] = Spec(M + "input_layernorm.weight")
        s.update(_attn_specs(("mtp", "attn"), M + "self_attn.", (), cfg))
        s[("mtp", "post_attn_norm", "weight")] = Spec(M + "post_attention_layernorm.weight")
        s.update(_mlp_specs(("mtp", "mlp"), M + "transformer_layer.mlp.", ()))
        s[("mtp", "norm", "weight")] = Spec("model.mtp.norm.weight")
    return s


# ----------------------------------------------------------------------------------------------- reading
class CheckpointReader:
    """Resolves HF keys to tensors across one or several safetensors files (index or glob). quant: the
    checkpoint's FP8 block scaling (lcflash/convert/fp8.py); a key with a `_scale_inv` sibling reads dequantized."""

    FUSED = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", None)}

    def __init__(self, directory: str, quant: fp8.BlockFP8 | None = None):
        self.directory, self.quant = directory, quant
        index = os.path.join(directory, INDEX)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "*.safetensors")))
            if not files:
                raise CheckpointError(f"{directory}: no *.safetensors files and no {INDEX}")
        self.files = {}
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                raise CheckpointError(f"{index}: lists {name}, which does not exist in {directory}")
            try:
                self.files[name] = SafetensorsFile(path)
            except SafetensorsError as e:
                raise CheckpointError(str(e)) from None
        self.where = {}
        for name, f in self.files.items():
            for k in f.keys():
                self.where[k] = name

    def has(self, key):
        return key in self.where or self._fused(key) is not None

    def _fused(self, key):
        """transformers' fused expert tensors: `experts.gate_up_proj` [N+Z, 2I, D], `experts.down_proj` [N, D, I]."""
        parts = key.split(".")
        if len(parts) < 3 or parts[-1] != "weight" or parts[-2] not in self.FUSED or "experts" not in parts:
            return None
        i = parts.index("experts")
        name, half = self.FUSED[parts[-2]]
        fused = ".".join(parts[:i + 1] + [name])
        return (fused, int(parts[i + 1]), half) if fused in self.where else None

    def shape(self, key):
        if key in self.where:
            return self.files[self.where[key]].shape(key)
        fused, _, half = self._fused(key)
        s = self.files[self.where[fused]].shape(fused)
        return (s[1] // 2, s[2]) if half is not None else tuple(s[1:])

    def dtype(self, key) -> np.dtype:
        k = key if key in self.where else self._fused(key)[0]
        return self.files[self.where[k]].dtype(k)

    def get(self, key) -> np.ndarray:
        if key in self.where:
            w = self.files[self.where[key]].get(key)
            scale = key + fp8.SCALE_SUFFIX
            return self.quant.dequantize(w, self.get(scale)) if scale in self.where else w
        fused, e, half = self._fused(key)
        w = self.files[self.where[fused]].get(fused)[e]
        if half is None:
            return w
        n = w.shape[0] // 2
        return w[half * n:(half + 1) * n]


def _expand(spec: Spec, shape: tuple, cfg: ModelConfig):
    """(hf_key, index into our stacked axes) for every HF tensor this variable needs."""
    counts = {"l": cfg.num_layers, "e": cfg.n_routed_experts}
    idxs = [()]
    for ax in spec.stack:
        idxs = [i + (j,) for i in idxs for j in range(counts[ax])]
    return [(spec.key.format(**dict(zip(spec.stack, i))), i) for i in idxs]


def _check_scales(reader: CheckpointReader, key: str, shape: tuple) -> str | None:
    """What is wrong with `key`'s FP8 scaling, if anything."""
    scale = key + fp8.SCALE_SUFFIX
    if scale not in reader.where:
        if reader.dtype(key) in fp8.FP8_DTYPES:
            return (f"{key} is {reader.dtype(key)} without {scale}" if key in reader.where else
                    f"{key} comes from a fused FP8 expert tensor; only per-expert FP8 keys are supported")
        return None
    if reader.quant is None:
        return f"{key} has {scale}, but config.json has no quantization_config"
    got, want = tuple(reader.shape(scale)), reader.quant.grid(shape)
    if got != want and not (reader.quant.block is None and int(np.prod(got)) == 1):
        block = reader.quant.block
        return f"{scale}: shape {got}, expected {want} (the weight's {shape} in blocks of {block})"
    return None


def _check(reader: CheckpointReader, specs: dict, abstract: dict, cfg: ModelConfig):
    """Validates every key and shape before any tensor is read or any array allocated."""
    missing, wrong, used = [], [], set()
    for path, spec in specs.items():
        shape = abstract[path].shape
        item_shape = tuple(shape[len(spec.stack):])
        want = tuple(spec.hf_shape(item_shape))
        for key, _ in _expand(spec, shape, cfg):
            if not reader.has(key):
                missing.append(key)
                continue
            used.add(key)
            got = tuple(reader.shape(key))
            problem = f"{key}: shape {got}, expected {want}" if got != want else _check_scales(reader, key, got)
            if problem:
                wrong.append(problem)
    if missing:
        raise CheckpointError(f"{reader.directory}: {len(missing)} missing key(s), e.g. {missing[:5]}")
    if wrong:
        raise CheckpointError(f"{reader.directory}: {len(wrong)} tensor(s) with the wrong shape or scaling: "
                              f"{wrong[:5]}")
    N = cfg.n_routed_experts

    def expected(key):
        if key in used or key.endswith(IGNORED_SUFFIXES):
            return True
        if key.endswith(fp8.SCALE_SUFFIX):  # the scales of a weight that is read or skipped
            base = key[:-len(fp8.SCALE_SUFFIX)]
            return base in reader.where and expected(base)
        parts = key.split(".")
        if "experts" in parts:
            i = parts.index("experts")
            nxt = parts[i + 1]
            if nxt.isdigit() and int(nxt) >= N and parts[-2] in ("gate_proj", "up_proj"):
                return True  # zero-expert rows that transformers' save_pretrained writes; never read
            if nxt in ("gate_up_proj", "down_proj"):
                return True  # fused form, read through the per-expert keys
        return False

    unexpected = [key for key in reader.where if not expected(key)]
    if unexpected:
        raise CheckpointError(f"{reader.directory}: {len(unexpected)} unexpected key(s), e.g. {unexpected[:5]}")


def _loader(reader, spec: Spec, shape: tuple, dtype, cfg):
    n_stack = len(spec.stack)
    entries = dict((i, k) for k, i in _expand(spec, shape, cfg))

    def fill(index):
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        lead = [range(*sl.indices(shape[d])) for d, sl in enumerate(index[:n_stack])]
        rest = index[n_stack:]
        items = [()]
        for r in lead:
            items = [i + (j,) for i in items for j in r]
        out = None
        for pos, item in enumerate(items):
            w = np.asarray(spec.to_ours(reader.get(entries[item])))[rest].astype(dtype)
            if out is None:
                out = np.empty((len(items),) + w.shape, dtype)
            out[pos] = w
        return out.reshape(tuple(len(r) for r in lead) + out.shape[1:])

    return fill


def _np_dtype(dtype):
    return np.dtype(ml_dtypes.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(jnp.dtype(dtype).name)


def from_pretrained(path: str, dtype=None, *, sharding_fn=None, mesh=None, **config_overrides) -> LongcatFlash:
    """Loads a LongCat-Flash HF directory (config.json + safetensors) into an lcflash model.

    dtype: parameter and compute dtype ("float32", "bfloat16"); default: the checkpoint's dtype. The router
    stays float32. sharding_fn(path, shape) -> jax.sharding.Sharding places each variable (default: one device);
    mesh: a jax.sharding.Mesh with lcflash's axes instead, each variable read onto its shards by the logical-axis
    rules (lcflash.parallel.sharding.variable_sharding_fn).
    config_overrides: any ModelConfig field (e.g. gmm_impl="pallas").
    """
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory (expected a checkpoint with config.json and safetensors)")
    raw = read_config_json(os.path.join(path, "config.json"))
    reader = CheckpointReader(path, fp8.from_config(raw, os.path.join(path, "config.json")))
    if dtype is None:
        dtype = raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"
    dtype = jnp.dtype(dtype).name
    has_mtp = any(k.startswith("model.mtp.") for k in reader.where)
    overrides = dict(param_dtype=dtype, dtype=dtype, num_mtp_layers=int(has_mtp))
    overrides.update(config_overrides)
    cfg = load_hf_config(path, **overrides)
    abstract_model = nnx.eval_shape(lambda: LongcatFlash(cfg, nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract_model)
    flat = nnx.to_flat_state(abstract_state)
    abstract = {p: v.get_value() for p, v in flat}
    specs = hf_specs(cfg)
    if set(specs) != set(abstract):
        raise AssertionError(f"spec table out of sync with the model: {set(specs) ^ set(abstract)}")
    _check(reader, specs, abstract, cfg)
    if mesh is not None:
        if sharding_fn is not None:
            raise ValueError("from_pretrained: give sharding_fn or mesh, not both")
        from lcflash.parallel.sharding import variable_sharding_fn

        sharding_fn = variable_sharding_fn(cfg, mesh)
    device = jax.devices()[0]
    leaves = []
    for p, v in flat:
        a = abstract[p]
        sharding = sharding_fn(p, a.shape) if sharding_fn else jax.sharding.SingleDeviceSharding(device)
        arr = jax.make_array_from_callback(a.shape, sharding, _loader(reader, specs[p], a.shape, _np_dtype(a.dtype), cfg))
        leaves.append((p, v.replace(arr)))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


# ----------------------------------------------------------------------------------------------- writing
def save_pretrained(model: LongcatFlash, path: str, *, max_shard_bytes: int = 5 << 30,
                    transformers_compat: bool = False, router_dtype=None) -> None:
    """Writes the released HF layout (per-expert keys, no zero-expert weights, MTP under model.mtp.*).

    transformers_compat=True also writes zero-filled `experts.{e}.gate_proj/up_proj` for the zero experts, which
    recent transformers needs to load the fused expert tensor. The directory is written beside `path` and moved
    into place only when complete, so a failure never leaves a half-written checkpoint at `path`.
    The router (kept in float32 in memory) is written in `router_dtype`, by default the parameter dtype like
    every other tensor, so a bf16 checkpoint round-trips bit for bit.
    """
    cfg = model.cfg
    flat = dict((p, v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model)))
    tensors = []
    for p, spec in hf_specs(cfg).items():
        arr = flat[p]
        item_shape = tuple(arr.shape[len(spec.stack):])
        np_dtype = _np_dtype(arr.dtype)
        if p[-1] in ("w_router", "bias"):
            np_dtype = _np_dtype(router_dtype or cfg.jnp_param_dtype)
        for key, item in _expand(spec, arr.shape, cfg):
            def produce(arr=arr, item=item, spec=spec):
                return spec.to_hf(np.asarray(jax.device_get(arr[item] if item else arr)))
            tensors.append((key, tuple(spec.hf_shape(item_shape)), np_dtype, produce))
        if transformers_compat and spec.stack == ("l", "e") and not spec.key.endswith("down_proj.weight"):
            for l in range(cfg.num_layers):
                for e in range(cfg.n_routed_experts, cfg.num_experts_total):
                    shape = tuple(spec.hf_shape(item_shape))
                    tensors.append((spec.key.format(l=l, e=e), shape, np_dtype,
                                    lambda shape=shape, d=np_dtype: np.zeros(shape, d)))
    shards, cur, size = [], [], 0
    for t in tensors:
        nbytes = int(np.prod(t[1], dtype=np.int64)) * np.dtype(t[2]).itemsize
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += nbytes
    shards.append(cur)
    path = os.path.abspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        meta = {"format": "pt", "lcflash_alpha_folded": "false"}
        if len(shards) == 1:
            write_safetensors(os.path.join(tmp, "model.safetensors"), shards[0], meta)
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(os.path.join(tmp, name), shard, meta)
                for key, shape, dt, _ in shard:
                    weight_map[key] = name
                    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
            with open(os.path.join(tmp, INDEX), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        dtype_name = jnp.dtype(cfg.jnp_param_dtype).name
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(to_hf_dict(cfg, dtype_name), f, indent=2)
        old = f"{path}.old-{os.getpid()}"
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["from_pretrained", "save_pretrained", "CheckpointError", "ConfigError", "hf_specs"]
