"""The training state and the pure train step, ready for `jax.jit` (and for in/out shardings).

State is a plain pytree:
    params      pure dict of every `nnx.Param` (fp32 master weights)
    bias        pure dict of the `RouterBias` variables (the controller's, never the optimizer's)
    opt_state   optax state over `params`
    controller  bias-controller state (lcflash/train/bias_controller.py)
    step        int32 scalar
    rng         uint32[2] key, split once per step
`init_state(cfg, key)` is the only place arrays are created; `abstract_state(cfg)` gives its shapes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lcflash.config import ConfigError, ModelConfig, model_config
from lcflash.model import LongcatFlash
from lcflash.model.common import RouterBias
from lcflash.train import bias_controller, hparam_transfer, losses
from lcflash.train.optimizer import global_norm, make_optimizer

LOSS_TERMS = ("lm", "lb", "z")   # the three gradient sources; lm = ce + mtp_weight * mtp


@functools.lru_cache(maxsize=8)
def model_def(model_cfg: ModelConfig):
    """(graphdef, abstract params pure dict, abstract bias pure dict) without allocating."""
    abstract = nnx.eval_shape(lambda: LongcatFlash(model_cfg, nnx.Rngs(0)))
    # Fails if the model ever holds a variable that is neither: the state below would silently drop it.
    graphdef, params, bias = nnx.split(abstract, nnx.Param, RouterBias)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(bias)


def param_logical_axes(model_cfg: ModelConfig) -> dict:
    """Pure dict like state['params'] whose leaves are each parameter's logical axes (for sharding rules)."""
    abstract = nnx.eval_shape(lambda: LongcatFlash(model_cfg, nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    axes = jax.tree.map(lambda v: v.get_metadata().get("logical_axes"), params,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(axes)


def lr_multipliers(cfg, model_cfg, params):
    if cfg.init.proxy_width > 0:
        return hparam_transfer.lr_multipliers(params, cfg.init.proxy_width, model_cfg.hidden_size)
    return None


def optimizer(cfg, model_cfg):
    params = model_def(model_cfg)[1]
    return make_optimizer(cfg.optim, cfg.train.steps, params, lr_multipliers(cfg, model_cfg, params))


def _init_arrays(cfg, model_cfg: ModelConfig, key):
    k_params, k_rng = jax.random.split(key)
    # Parameters are drawn with XLA's RngBitGenerator: threefry for ~50 tensors takes XLA:CPU tens of seconds
    # to compile, RBG a few. `rng` (the state's key) stays a raw threefry key.
    k_params = jax.random.wrap_key_data(jax.random.key_data(jax.random.split(k_params)).reshape(4),
                                        impl="unsafe_rbg")
    model = LongcatFlash(model_cfg, nnx.Rngs(params=k_params))
    _, params, bias = nnx.split(model, nnx.Param, RouterBias)
    params, bias = nnx.to_pure_dict(params), nnx.to_pure_dict(bias)
    if cfg.init.proxy_width > 0:
        params = hparam_transfer.scale_init(params, cfg.init.proxy_width, model_cfg.hidden_size)
    return _assemble(cfg, model_cfg, params, bias, k_rng)


def _assemble(cfg, model_cfg, params, bias, rng):
    opt, _ = optimizer(cfg, model_cfg)
    return {
        "params": params,
        "bias": bias,
        "opt_state": opt.init(params),
        "controller": bias_controller.init_state(model_cfg.num_layers, model_cfg.num_experts_total),
        "step": jnp.zeros((), jnp.int32),
        "rng": rng,
    }


def init_state(cfg, key, jit=jax.jit) -> dict:
    """Fresh training state (jitted). With `init.grow_from`, params and biases come from a half-depth checkpoint."""
    model_cfg = model_config(cfg)
    state = jit(functools.partial(_init_arrays, cfg, model_cfg))(key)
    if cfg.init.grow_from:
        from lcflash.train.growth import grown_from_checkpoint
        params, bias = grown_from_checkpoint(cfg.init.grow_from, state["params"], state["bias"])
        state = jax.jit(functools.partial(_assemble, cfg, model_cfg))(params, bias, state["rng"])
    return state


def abstract_state(cfg) -> dict:
    model_cfg = model_config(cfg)
    return jax.eval_shape(functools.partial(_init_arrays, cfg, model_cfg), jax.random.PRNGKey(0))


def packing(cfg, batch):
    """(positions, segment ids) the model sees. `data.document_mask=False` is the plain packed-stream recipe:
    attention runs causally across the window's documents, with the window's positions (None, None)."""
    return (batch["positions"], batch["segment_ids"]) if cfg.data.document_mask else (None, None)


# The hidden z-loss from each layer's log-sum-exp taken inside the layer scan (losses.abs_logsumexp as the model's
# layer_fn); False stacks every layer's [B, T, D] output first, the same values (the A/B baseline of
# experiments/bench_train.py --z_loss_stacked).
Z_LOSS_IN_SCAN = True


def forward_losses(cfg, model_cfg: ModelConfig, graphdef, params, bias, batch, counts=None):
    """(loss terms [lm, lb, z] already weighted, aux) for one batch. `bias` is a constant here. `counts`: the
    whole batch's CE and MTP targets (`target_counts`) when this is one of its microbatches, so that the
    microbatches' lm terms sum to the whole batch's."""
    lc = cfg.loss
    model = nnx.merge(graphdef, params, bias)
    use_z = lc.z_coef > 0
    pos, seg = packing(cfg, batch)
    in_scan = use_z and Z_LOSS_IN_SCAN
    out = model.forward(batch["inputs"], positions_bt=pos, segment_ids_bt=seg,
                        return_layer_hidden=use_z and not in_scan,
                        layer_fn=losses.abs_logsumexp if in_scan else None)
    mask = batch["loss_mask"]
    n_ce, n_mtp = (None, None) if counts is None else counts
    ce = losses.cross_entropy(out.logits, batch["targets"], mask, n_ce)
    mtp = jnp.zeros((), jnp.float32)
    if lc.mtp_weight > 0 and model.mtp is not None:
        tgt, mtp_mask = losses.mtp_targets(batch["targets"], mask)
        mtp_logits = model.mtp_logits(out.hidden, batch["targets"], pos, seg)
        mtp = losses.cross_entropy(mtp_logits, tgt, mtp_mask, n_mtp)
    stats = out.moe_stats
    lb = losses.load_balance_loss(stats["counts_be"], stats["prob_sum_be"], n_ffn=model_cfg.n_routed_experts,
                                  top_k=model_cfg.moe_topk, target_ffn=model_cfg.target_ffn_experts,
                                  groups=lc.lb_groups)
    z = jnp.zeros((), jnp.float32)
    if use_z:
        z = (losses.hidden_z_loss_from_lse if in_scan else losses.hidden_z_loss)(out.layer_hidden)
    terms = jnp.stack([ce + lc.mtp_weight * mtp, lc.lb_coef * lb, lc.z_coef * z])
    aux = {"ce": ce, "mtp_loss": mtp, "lb_loss": lb, "z_loss": z,
           "counts_le": jax.lax.stop_gradient(jnp.sum(stats["counts_be"], axis=1)),
           # Expert slots past capacity (moe.transport = all_to_all on a mesh), summed over layers; 0 when dropless.
           "moe_dropped_slots": jnp.sum(stats["dropped_slots"])}
    return terms, aux


def target_counts(batch):
    """(CE targets, MTP targets) of a batch: the denominators of its two means."""
    mask = batch["loss_mask"]
    return jnp.sum(mask), jnp.sum(losses.mtp_targets(batch["targets"], mask)[1])


def grad_accum_steps(cfg, batch: int | None = None) -> int:
    """train.grad_accum_steps, checked to divide `batch` (default train.batch_size) into equal microbatches."""
    n, B = cfg.train.get("grad_accum_steps", 1), cfg.train.batch_size if batch is None else batch
    if not isinstance(n, int) or isinstance(n, bool) or n < 1 or B % n:
        raise ConfigError(f"train.grad_accum_steps = {n!r} is invalid: must be a positive integer dividing "
                          f"the batch size {B}")
    return n


def micro_batch_size(cfg) -> int:
    """Rows per forward pass: train.batch_size split into train.grad_accum_steps microbatches."""
    return cfg.train.batch_size // grad_accum_steps(cfg)


def microbatches(batch, n: int):
    """[B, ...] -> [n, B / n, ...], microbatch i holding rows i, i + n, ...: a device's contiguous rows of a
    batch-sharded array stay on it (when its share divides by n), so the split moves no data."""
    def split(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


# Per-microbatch aux values that add up to the whole batch's (the rest are means over equal microbatches).
_SUMMED_AUX = ("ce", "mtp_loss", "counts_le", "moe_dropped_slots")


def make_train_step(cfg, model_cfg: ModelConfig | None = None):
    """Returns the pure `train_step(state, batch) -> (state, metrics)`; jit it (with shardings) outside.

    With train.grad_accum_steps = n > 1, the batch runs as n microbatches in a scan whose carry sums their
    gradients, then one optimizer update: the same update as the whole batch in one pass (the CE and MTP means
    divide by the whole batch's targets, the load-balance loss is a mean over sequences and the z-loss over
    tokens), in the activation memory of one microbatch plus the fp32 gradient sum (two buffers on the GPU,
    lcflash/plan.py). The router bias and its controller see the whole batch's expert counts. The LB/LM router
    gradient ratio is the first microbatch's."""
    model_cfg = model_cfg or model_config(cfg)
    graphdef = model_def(model_cfg)[0]
    opt, schedule = optimizer(cfg, model_cfg)
    ratio_every = cfg.train.log_every if cfg.train.grad_ratio_every < 0 else cfg.train.grad_ratio_every
    ccfg = cfg.controller
    nk = dict(n_ffn=model_cfg.n_routed_experts, top_k=model_cfg.moe_topk)
    n_micro = grad_accum_steps(cfg)

    def grads_of(params, bias, batch, do_ratio, counts=None, weights=(1.0, 1.0, 1.0)):
        """(terms, aux, grads, router LB/LM gradient ratio or nan) of one pass; `weights` scale the terms'
        gradients (1/n for the mean terms of one of n microbatches)."""
        f = lambda p: forward_losses(cfg, model_cfg, graphdef, p, bias, batch, counts)  # noqa: E731
        terms, vjp_fn, aux = jax.vjp(f, params, has_aux=True)
        (grads,) = vjp_fn(jnp.asarray(weights, terms.dtype))

        def ratio():
            # One more backward pass, for the LB term alone; the rest of the router gradient is the LM side
            # (CE + MTP, plus the z-loss's share, which at its small coefficient is negligible).
            g_lb = vjp_fn(jnp.array([0.0, weights[1], 0.0], terms.dtype))[0]
            n_lb = losses.router_grad_norm(g_lb)
            n_lm = losses.router_grad_norm(jax.tree.map(jnp.subtract, grads, g_lb))
            return n_lb / jnp.maximum(n_lm, 1e-30)
        nan = lambda: jnp.full((), jnp.nan, jnp.float32)  # noqa: E731
        grad_ratio = jax.lax.cond(do_ratio, ratio, nan) if ratio_every > 0 else nan()
        return terms, aux, grads, grad_ratio

    def accumulated(params, bias, batch, do_ratio):
        counts, w = target_counts(batch), 1.0 / n_micro

        def body(g_acc, xs):
            i, mb = xs
            terms, aux, grads, grad_ratio = grads_of(params, bias, mb, do_ratio & (i == 0), counts, (1.0, w, w))
            return jax.tree.map(jnp.add, g_acc, grads), (terms, aux, grad_ratio)

        g0 = jax.tree.map(jnp.zeros_like, params)
        grads, (terms_n, aux_n, ratio_n) = jax.lax.scan(
            body, g0, (jnp.arange(n_micro), microbatches(batch, n_micro)))
        terms = jnp.stack([jnp.sum(terms_n[:, 0]), jnp.mean(terms_n[:, 1]), jnp.mean(terms_n[:, 2])])
        aux = {k: (jnp.sum if k in _SUMMED_AUX else jnp.mean)(v, axis=0) for k, v in aux_n.items()}
        return terms, aux, grads, ratio_n[0]

    def train_step(state, batch):
        params, step = state["params"], state["step"]
        do_ratio = (step + 1) % ratio_every == 0 if ratio_every > 0 else jnp.zeros((), bool)
        if n_micro == 1:
            terms, aux, grads, grad_ratio = grads_of(params, state["bias"], batch, do_ratio)
        else:
            terms, aux, grads, grad_ratio = accumulated(params, state["bias"], batch, do_ratio)
        grad_norm = global_norm(grads)  # the clip's, computed once
        updates, opt_state = opt.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)

        counts = aux.pop("counts_le")
        bias_leaf = state["bias"]["layers"]["moe"]["bias"]
        new_bias_leaf, ctrl, delta = bias_controller.update(
            bias_leaf, state["controller"], counts, step, ccfg, target_ffn=model_cfg.target_ffn_experts, **nk)
        new_bias = {"layers": {"moe": {"bias": new_bias_leaf}}}
        rng, _ = jax.random.split(state["rng"])
        new_state = {"params": new_params, "bias": new_bias, "opt_state": opt_state, "controller": ctrl,
                     "step": step + 1, "rng": rng}
        metrics = dict(aux, loss=jnp.sum(terms), lr=schedule(step), grad_norm=grad_norm,
                       router_grad_ratio=grad_ratio, controller_rate=bias_controller.rate(step, ccfg),
                       bias_delta_abs_max=jnp.max(jnp.abs(delta)),
                       **bias_controller.routing_metrics(counts, **nk))
        return new_state, metrics

    return train_step


def make_eval_step(cfg, model_cfg: ModelConfig | None = None):
    """Pure `eval_step(params, bias, batch, token_bytes_v) -> sums` for held-out loss and bits per byte."""
    model_cfg = model_cfg or model_config(cfg)
    graphdef = model_def(model_cfg)[0]

    def eval_step(params, bias, batch, token_bytes_v):
        model = nnx.merge(graphdef, params, bias)
        pos, seg = packing(cfg, batch)
        out = model.forward(batch["inputs"], positions_bt=pos, segment_ids_bt=seg)
        nll = losses.token_nll(out.logits, batch["targets"])
        mask = batch["loss_mask"]
        return {"nll_sum": jnp.sum(nll * mask), "tokens": jnp.sum(mask),
                "bytes": jnp.sum(token_bytes_v[batch["targets"]] * mask)}

    return eval_step
