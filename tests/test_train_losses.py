"""LongCat losses, the bias controller, the optimizer schedules and hyperparameter transfer (a model only where a
loss is taken inside it)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from lcflash.train import bias_controller, hparam_transfer, losses
from lcflash.train.optimizer import make_optimizer, make_schedule


def test_cross_entropy_masked_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    tgt = rng.integers(0, 7, size=(2, 5))
    mask = np.array([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]], np.float32)
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(lp, tgt[..., None], -1)[..., 0]
    want = (nll * mask).sum() / mask.sum()
    np.testing.assert_allclose(losses.cross_entropy(logits, tgt, mask), want, rtol=1e-6)


def test_mtp_targets_shift_and_mask():
    tgt = jnp.array([[11, 12, 13, 14]])
    mask = jnp.array([[1.0, 1.0, 0.0, 1.0]])
    t2, m2 = losses.mtp_targets(tgt, mask)
    assert t2.tolist() == [[12, 13, 14, 0]]
    # position t needs targets t and t+1 in its document; the last position has no t+2
    assert m2.tolist() == [[1.0, 0.0, 0.0, 0.0]]


def lb(counts, probs, **kw):
    return float(losses.load_balance_loss(jnp.asarray(counts)[None, None], jnp.asarray(probs)[None, None], **kw))


def test_load_balance_is_one_at_target_split():
    # N=4 FFN experts in D=2 groups, Z=2 zero experts, K=3, K_e=2, T=10 tokens
    kw = dict(n_ffn=4, top_k=3, target_ffn=2.0, groups=2)
    counts = np.array([5, 5, 5, 5, 5, 5], np.float32)       # 20 FFN slots = K_e*T, 10 zero slots = (K-K_e)*T
    probs = np.full(6, 10 / 6, np.float32)                 # sums over T tokens of probabilities (each row sums to 1)
    assert lb(counts, probs, **kw) == pytest.approx(1.0, rel=1e-6)
    # overloading one group raises the loss when that group also holds more probability
    counts2 = np.array([10, 5, 0, 5, 5, 5], np.float32)
    probs2 = np.array([3, 2, 1, 1, 1.5, 1.5], np.float32) * 10 / 10
    assert lb(counts2, probs2, **kw) > lb(counts, probs2, **kw)


def test_load_balance_formula_by_hand():
    kw = dict(n_ffn=4, top_k=3, target_ffn=2.0, groups=2)
    T = 10.0
    counts = np.array([8, 4, 3, 5, 7, 3], np.float32)
    probs = np.array([2.0, 1.0, 2.0, 1.5, 2.5, 1.0], np.float32)
    f = [2 / (2 * T) * 12, 2 / (2 * T) * 8, 1 / (1 * T) * 10]
    p = [3.0 / T, 3.5 / T, 3.5 / T]
    assert lb(counts, probs, **kw) == pytest.approx(sum(a * b for a, b in zip(f, p)), rel=1e-6)
    # gradient flows through probabilities only, towards under-used groups
    g = jax.grad(lambda pr: losses.load_balance_loss(jnp.asarray(counts)[None, None], pr[None, None], **kw))(
        jnp.asarray(probs))
    assert g[0] > g[2] > 0                                  # group 1 (f=1.2) is pushed harder than group 2 (f=0.8)
    with pytest.raises(ValueError, match="lb_groups"):
        lb(counts, probs, n_ffn=4, top_k=3, target_ffn=2.0, groups=3)


def test_hidden_z_loss_value():
    h = np.array([[[[0.0, 1.0, -2.0]]]], np.float32)
    want = np.log(np.exp([0.0, 1.0, 2.0]).sum()) ** 2
    np.testing.assert_allclose(losses.hidden_z_loss(h), want, rtol=1e-6)


@pytest.mark.parametrize("remat", [False, True])
def test_hidden_z_loss_taken_inside_the_layer_scan_equals_the_stacked_form(remat, monkeypatch):
    """The train step's z-loss (abs_logsumexp per layer as model.forward's layer_fn, taken from the next layer's
    input or inside the layer) has the value and the gradient of hidden_z_loss over the stacked outputs of every
    layer (which tests/test_hf_parity.py checks against transformers)."""
    from flax import nnx

    from lcflash.config import load_config, model_config
    from lcflash.model import LongcatFlash, transformer

    mc = model_config(load_config("configs/tiny.py")).replace(remat=remat)
    graphdef, params = nnx.split(LongcatFlash(mc, nnx.Rngs(4)))
    tokens = jax.random.randint(jax.random.key(5), (2, 16), 0, mc.vocab_size)

    def stacked(p):
        return losses.hidden_z_loss(nnx.merge(graphdef, p).forward(tokens, return_layer_hidden=True).layer_hidden)

    def in_scan(p):
        lse_lbt = nnx.merge(graphdef, p).forward(tokens, layer_fn=losses.abs_logsumexp).layer_hidden
        assert lse_lbt.shape == (mc.num_layers, 2, 16)
        return losses.hidden_z_loss_from_lse(lse_lbt)

    want, g_want = jax.jit(jax.value_and_grad(stacked))(params)
    for on_input in (True, False):
        monkeypatch.setattr(transformer, "LAYER_FN_ON_INPUT", on_input)   # read while tracing
        got, g_got = jax.jit(jax.value_and_grad(in_scan))(params)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(b))))


def ctrl_cfg(**kw):
    d = dict(enabled=True, rate=0.1, kp=1.0, ki=0.0, kd=0.0, decay="none", decay_steps=10, min_rate=0.0,
             integral_clip=10.0)
    d.update(kw)
    return ml_collections.ConfigDict(d)


def test_controller_signs_and_frozen_zero_experts():
    # N=4, Z=2, K=2, K_e=1; 10 tokens: expert 0 takes 8 slots, expert 1 takes 4, zero experts 8
    counts = jnp.array([[8.0, 4.0, 0.0, 0.0, 4.0, 4.0]])
    bias = jnp.zeros((1, 6))
    st = bias_controller.init_state(1, 6)
    nb, st, delta = bias_controller.update(bias, st, counts, 0, ctrl_cfg(), n_ffn=4, top_k=2, target_ffn=1.0)
    # target share per FFN expert = 1/(2*4) = 0.125; shares 0.4, 0.2, 0, 0
    np.testing.assert_allclose(delta[0, :4], 0.1 * (0.125 - np.array([0.4, 0.2, 0.0, 0.0])), rtol=1e-6)
    assert (delta[0, 4:] == 0).all()
    off, _, d_off = bias_controller.update(bias, st, counts, 0, ctrl_cfg(enabled=False), n_ffn=4, top_k=2,
                                           target_ffn=1.0)
    assert (d_off == 0).all()


def test_controller_rate_decay():
    assert float(bias_controller.rate(10, ctrl_cfg(decay="exponential"))) == pytest.approx(0.05)
    assert float(bias_controller.rate(10, ctrl_cfg(decay="inverse"))) == pytest.approx(0.05)
    assert float(bias_controller.rate(1000, ctrl_cfg(decay="inverse", min_rate=0.01))) == pytest.approx(0.01)


def simulate(enabled, steps=300, ki=0.0, seed=0):
    """Closed loop on a synthetic router whose logits favour FFN experts: top-k of (probs + bias)."""
    rng = np.random.default_rng(seed)
    N, Z, K, Ke, T = 8, 4, 4, 3.0, 512
    cfg = ctrl_cfg(rate=0.02, ki=ki)
    bias = jnp.zeros((1, N + Z))
    st = bias_controller.init_state(1, N + Z)
    skew = np.concatenate([np.linspace(0.8, 0.0, N), np.full(Z, -1.0)])      # FFN experts preferred, unevenly
    hist = []
    for s in range(steps):
        probs = jax.nn.softmax(jnp.asarray(skew + rng.normal(size=(T, N + Z)), jnp.float32), -1)
        _, top = jax.lax.top_k(probs + bias[0], K)
        counts = jnp.zeros((N + Z,)).at[top.reshape(-1)].add(1.0)[None]
        hist.append(float(bias_controller.routing_metrics(counts, n_ffn=N, top_k=K)["ffn_experts_per_token"][0]))
        bias, st, _ = bias_controller.update(bias, st, counts, s, cfg, n_ffn=N, top_k=K, target_ffn=Ke,) \
            if enabled else (bias, st, None)
    return np.array(hist)


def test_controller_closed_loop_reaches_target():
    on = simulate(True)
    off = simulate(False)
    assert abs(on[-50:].mean() - 3.0) < 0.05 * 3.0
    assert abs(off[-50:].mean() - 3.0) > 0.05 * 3.0


def test_controller_integral_and_derivative_act_on_the_budget_error():
    counts = jnp.array([[2.0, 0.0, 1.0, 1.0]])              # N=2, Z=2, K=2, K_e=1, 2 tokens
    cfg = ctrl_cfg(rate=1.0, kp=0.0, ki=1.0, kd=1.0, integral_clip=0.08)
    st = bias_controller.init_state(1, 4)
    e = np.array([0.25 - 0.5, 0.25 - 0.0])                  # per-expert errors
    budget = e.mean()                                       # 0: the budget is met, only the balance is off
    _, st, d1 = bias_controller.update(jnp.zeros((1, 4)), st, counts, 0, cfg, n_ffn=2, top_k=2, target_ffn=1.0)
    np.testing.assert_allclose(d1[0], [budget, budget, 0, 0], atol=1e-7)
    over = jnp.array([[2.0, 2.0, 0.0, 0.0]])                # 2 FFN experts per token, target 1
    _, st, d2 = bias_controller.update(jnp.zeros((1, 4)), st, over, 1, cfg, n_ffn=2, top_k=2, target_ffn=1.0)
    b2 = 0.25 - 0.5                                         # budget error -0.25 on each FFN expert
    np.testing.assert_allclose(d2[0], [-0.08 + (b2 - budget)] * 2 + [0, 0], rtol=1e-6)   # clipped I + D
    _, st, d3 = bias_controller.update(jnp.zeros((1, 4)), st, over, 2, cfg, n_ffn=2, top_k=2, target_ffn=1.0)
    np.testing.assert_allclose(d3[0], [-0.08, -0.08, 0, 0], rtol=1e-6)                  # same error: D = 0


def test_routing_metrics():
    counts = jnp.array([[6.0, 2.0, 0.0, 0.0, 4.0, 4.0]])    # 8 tokens, K=2
    m = bias_controller.routing_metrics(counts, n_ffn=4, top_k=2)
    assert float(m["ffn_experts_per_token"][0]) == 1.0
    assert float(m["expert_load_max"][0]) == 3.0 and float(m["expert_load_min"][0]) == 0.0


def optim_cfg(**kw):
    d = dict(lr=1.0, b1=0.9, b2=0.95, eps=1e-16, weight_decay=0.0, clip_norm=0.0, schedule="wsd", warmup_steps=10,
             decay_fraction=0.2, min_lr_ratio=0.1)
    d.update(kw)
    return ml_collections.ConfigDict(d)


def test_schedules():
    wsd = make_schedule(optim_cfg(), 100)
    assert [float(wsd(s)) for s in (0, 5, 10, 50, 80)] == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0])
    assert float(wsd(90)) == pytest.approx(0.55) and float(wsd(100)) == pytest.approx(0.1)
    cos = make_schedule(optim_cfg(schedule="cosine"), 110)
    assert float(cos(10)) == pytest.approx(1.0) and float(cos(60)) == pytest.approx(0.55)
    assert float(cos(110)) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="optim.schedule"):
        make_schedule(optim_cfg(schedule="linear"), 10)


def test_adam_eps_and_clipping():
    p = {"w": jnp.ones((2, 2))}
    opt, _ = make_optimizer(optim_cfg(schedule="constant", warmup_steps=0, clip_norm=1.0), 10, p)
    g = {"w": jnp.full((2, 2), 1e-12)}                       # tiny gradients still give a unit Adam step
    u, _ = opt.update(g, opt.init(p), p)
    np.testing.assert_allclose(u["w"], -1.0, rtol=1e-3)
    assert optax.tree.norm(optax.clip_by_global_norm(1.0).update({"w": jnp.full((2, 2), 10.0)}, None)[0]) == \
        pytest.approx(1.0)


@pytest.mark.parametrize("by_layer", [True, False])
def test_global_norm_by_layer_slices_equals_optax(monkeypatch, by_layer):
    """The global norm with the stacked leaves summed per layer slice (optimizer.NORM_BY_LAYER) equals optax's one
    sum per leaf, and clips the same, on fresh random gradients; only slices of at least NORM_SLICE_MIN elements
    are split."""
    from lcflash.train import optimizer

    monkeypatch.setattr(optimizer, "NORM_SLICE_MIN", 12)
    monkeypatch.setattr(optimizer, "NORM_BY_LAYER", by_layer)
    ks = jax.random.split(jax.random.key(int(np.random.default_rng().integers(1 << 30))), 4)
    grads = {"embed": jax.random.normal(ks[0], (8, 4)),
             "layers": {"mlp": {"w": jax.random.normal(ks[1], (3, 4, 5))}, "norm": jax.random.normal(ks[2], (3, 4))}}
    norm = optimizer.global_norm(grads)
    np.testing.assert_allclose(norm, optax.tree.norm(grads), rtol=1e-6)
    sums = str(jax.make_jaxpr(lambda g: optimizer.global_norm(g))(grads)).count("reduce_sum[")  # a fresh trace
    # embed, w's three [4, 5] layers (by_layer), norm's [4] layers whole (under NORM_SLICE_MIN)
    assert sums == (1 + 3 + 1 if by_layer else 3)
    for max_norm in (0.5 * float(norm), 2.0 * float(norm)):
        ours = optimizer.clip_by_global_norm(max_norm).update(grads, None)[0]
        ref = optax.clip_by_global_norm(max_norm).update(grads, None)[0]
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6)


def test_mu_dtype_sets_the_first_moment_dtype_only():
    p = {"w": jnp.ones((2, 2))}
    g = {"w": jnp.full((2, 2), 0.5)}
    updates = {}
    for mu_dtype in ("float32", "bfloat16"):
        opt, _ = make_optimizer(optim_cfg(schedule="constant", warmup_steps=0, mu_dtype=mu_dtype), 10, p)
        u, state = opt.update(g, opt.init(p), p)
        adam = next(s for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu"))
        assert adam.mu["w"].dtype == jnp.dtype(mu_dtype) and adam.nu["w"].dtype == jnp.float32
        updates[mu_dtype] = u["w"]
    np.testing.assert_allclose(updates["bfloat16"], updates["float32"], rtol=1e-2)
    with pytest.raises(ValueError, match="optim.mu_dtype"):
        make_optimizer(optim_cfg(mu_dtype="float16"), 10, p)


def test_hparam_transfer_rules_and_optimizer():
    params = {"embed": jnp.ones((8, 4)), "lm_head": jnp.ones((4, 8)),
              "layers": {"mlp": {"w": jnp.ones((2, 4, 4))}, "norm": {"weight": jnp.ones((2, 4))}}}
    groups = hparam_transfer.param_groups(params)
    assert groups == {"embed": "embed", "lm_head": "head", "layers": {"mlp": {"w": "hidden"},
                                                                     "norm": {"weight": "vector"}}}
    t = hparam_transfer.transfer(256, 1024, init_std=0.02, lr=1e-3)
    assert t["hidden"]["init_std"] == pytest.approx(0.01) and t["hidden"]["lr"] == pytest.approx(2.5e-4)
    assert t["embed"] == {"init_std": 0.02, "lr": 1e-3}
    scaled = hparam_transfer.scale_init(params, 256, 1024)
    assert float(scaled["layers"]["mlp"]["w"][0, 0, 0]) == pytest.approx(0.5)
    assert float(scaled["embed"][0, 0]) == 1.0 and float(scaled["layers"]["norm"]["weight"][0, 0]) == 1.0
    mult = hparam_transfer.lr_multipliers(params, 256, 1024)
    opt, _ = make_optimizer(optim_cfg(schedule="constant", warmup_steps=0), 10, params, mult)
    g = jax.tree.map(jnp.ones_like, params)
    u, _ = opt.update(g, opt.init(params), params)
    assert float(u["layers"]["mlp"]["w"][0, 0, 0]) == pytest.approx(-0.25, rel=1e-4)
    assert float(u["embed"][0, 0]) == pytest.approx(-1.0, rel=1e-4)


def test_stack_layers_order():
    from lcflash.train.growth import grow
    params = {"embed": np.ones((3, 2)), "layers": {"w": np.arange(6.0).reshape(3, 2)}}
    bias = {"layers": {"moe": {"bias": np.arange(3.0)[:, None] * np.ones((3, 4))}}}
    p2, b2 = grow(params, bias)
    assert p2["layers"]["w"][:, 0].tolist() == [0, 2, 4, 0, 2, 4]
    assert b2["layers"]["moe"]["bias"][:, 0].tolist() == [0, 1, 2, 0, 1, 2]
    assert p2["embed"] is params["embed"]


def test_grad_accum_steps_make_the_same_update_as_the_whole_batch():
    """train.grad_accum_steps = 2 (microbatches in a scan, gradients summed): the loss terms, metrics, expert counts
    and the parameter update equal one pass over the whole batch, with unequal loss masks across the rows (the CE
    and MTP means divide by the whole batch's targets) and the LB and z-losses on. Adam's eps is 1 here, so the
    update is ~lr * gradient, not its sign, and the comparison sees the gradients' values. The update may differ by
    fp32 summation order only (a sum over tokens taken in two halves): the largest difference, 3.9e-5 of the leaf's
    largest update, is one element of a norm weight's gradient, a sum with cancellation (the matmul weights differ by
    <1e-6); dividing each microbatch's CE by its own targets instead errs by ~1."""
    import os

    from lcflash.config import ConfigError, load_config
    from lcflash.train.step import init_state, make_train_step, micro_batch_size

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    over = {"data.seq_len": 16, "train.batch_size": 4, "optim.eps": 1.0, "optim.lr": 1.0, "optim.warmup_steps": 0,
            "optim.clip_norm": 1e9, "train.grad_ratio_every": 1, "loss.z_coef": 1e-2, "model.num_layers": 1}
    cfg1 = load_config(os.path.join(root, "configs", "tiny.py"), over)
    cfg2 = load_config(os.path.join(root, "configs", "tiny.py"), {**over, "train.grad_accum_steps": 2})
    B, T = 4, 16
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, 512, size=(B, T + 1))
    mask = (rng.random((B, T)) < np.array([[0.9], [0.4], [0.7], [1.0]])).astype(np.float32)
    seg = np.repeat(np.arange(2), T // 2)[None].repeat(B, 0).astype(np.int32)
    batch = {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
             "loss_mask": mask, "segment_ids": seg,
             "positions": np.tile(np.arange(T // 2), 2)[None].repeat(B, 0).astype(np.int32)}
    state = init_state(cfg1, jax.random.key(0))
    p0 = jax.tree.map(np.asarray, state["params"])
    whole, accum = jax.jit(make_train_step(cfg1)), jax.jit(make_train_step(cfg2))
    out = {}
    for name, step in (("whole", whole), ("accum", accum)):
        new, m = step(jax.tree.map(jnp.copy, state), batch)
        out[name] = (jax.tree.map(lambda a, z: np.asarray(a) - z, new["params"], p0), np.asarray(new["bias"][
            "layers"]["moe"]["bias"]), jax.tree.map(np.asarray, m))
    (d1, b1, m1), (d2, b2, m2) = out["whole"], out["accum"]
    for k in ("loss", "ce", "mtp_loss", "lb_loss", "z_loss", "grad_norm"):
        np.testing.assert_allclose(m2[k], m1[k], rtol=2e-5, err_msg=k)
    assert np.isfinite(m2["router_grad_ratio"]) and m2["router_grad_ratio"] > 0
    for k in ("ffn_experts_per_token", "expert_load_min", "expert_load_max"):   # from the summed expert counts
        np.testing.assert_array_equal(m2[k], m1[k], err_msg=k)
    np.testing.assert_allclose(b2, b1, atol=1e-7)

    # each leaf's largest difference, relative to that leaf's largest update
    errs = {jax.tree_util.keystr(p): float(np.abs(a - b).max() / np.abs(a).max())
            for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(d1)[0], jax.tree.leaves(d2))}
    assert max(np.abs(a).max() for a in jax.tree.leaves(d1)) > 1e-3   # the update is not ~0
    assert max(errs.values()) < 2e-4, errs
    assert max(e for k, e in errs.items() if "norm" not in k) < 2e-6, errs
    with pytest.raises(ConfigError, match="train.grad_accum_steps = 3 is invalid"):
        micro_batch_size(load_config(os.path.join(root, "configs", "tiny.py"), {**over, "train.grad_accum_steps": 3}))
