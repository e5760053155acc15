"""`moe.overlap=False` (the no-overlap baseline) gives the same values and makes the dense path wait for the MoE."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jcore

from lcflash.config import ConfigError, load_config, model_config
from jaxprs import sub_jaxprs
from numerics import random_model
from xla_flags import default_codegen

WINDOW = ("mlp_0", "attn_1", "mlp_1")


TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 512, (2, 16)), jnp.int32)


def _split(overlap: bool):
    """(graphdef, params, other state) of a one-layer tiny model; the same random values for either setting."""
    mc = model_config(load_config("configs/tiny.py", {"moe.overlap": overlap, "model.num_layers": 1,
                                                       "model.num_mtp_layers": 0}))
    assert mc.moe_overlap is overlap
    return random_model(mc)


def _logits(graphdef, rest):
    return lambda params, tokens: nnx.merge(graphdef, params, rest).forward(tokens).logits


def test_moe_overlap_maps_to_the_model_and_is_validated():
    cfg = load_config("configs/tiny.py")
    assert cfg.moe.overlap is True and model_config(cfg).moe_overlap is True
    bad = ml_collections.ConfigDict({"model": cfg.model.to_dict(), "moe": {"overlap": "false"}})
    with pytest.raises(ConfigError, match="moe.overlap = 'false'.*bool"):
        model_config(bad)


def test_same_logits_and_gradients():
    """Logits are bit-identical. Gradients are identical from the join of the branches on; before it, n0's two
    cotangents (MoE + dense path) are summed in another order, so they agree to fp32 rounding."""
    w = jax.random.normal(jax.random.key(1), (2, 16, 512))

    def run(overlap):
        gd, params, rest = _split(overlap)
        loss = lambda p: (jnp.sum(w * (y := _logits(gd, rest)(p, TOKENS))), y)  # noqa: E731
        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True), compiler_options=default_codegen())(
            params)
        return params, logits, grads

    p_on, logits_on, g_on = run(True)
    p_off, logits_off, g_off = run(False)
    jax.tree.map(np.testing.assert_array_equal, p_on, p_off)
    assert np.abs(np.asarray(logits_on)).max() > 0.1
    np.testing.assert_array_equal(logits_on, logits_off)
    exact = ("attn_1", "mlp_0", "mlp_1", "moe", "lm_head", "norm")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_on), jax.tree.leaves(g_off)):
        name = jax.tree_util.keystr(path)
        if any(f"['{k}']" in name for k in exact):
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(np.asarray(a)).max()), err_msg=name)


def _layer_body(jaxpr):
    """The (sub-)jaxpr that holds the dense window's matmuls: the scanned layer body."""
    if any(str(e.source_info.name_stack).startswith("mlp_0") for e in jaxpr.eqns):
        return jaxpr
    for e in jaxpr.eqns:
        for sub in sub_jaxprs(e):
            if (found := _layer_body(sub)) is not None:
                return found
    return None


def _window_after_moe(overlap: bool):
    """Window matmuls that read (transitively) an output of the MoE combine, and all window matmuls."""
    gd, params, rest = _split(overlap)
    body = _layer_body(jax.make_jaxpr(_logits(gd, rest))(params, TOKENS).jaxpr)
    scope = lambda e: str(e.source_info.name_stack).split("/")[0]  # noqa: E731
    after = set()       # variables computed from the MoE output
    window, waiting = [], []
    for e in body.eqns:
        reads_moe = any(isinstance(v, jcore.Var) and v in after for v in e.invars)
        if scope(e) == "moe_combine" or reads_moe:
            after.update(e.outvars)
        if e.primitive.name == "dot_general" and scope(e) in WINDOW:
            window.append(scope(e))
            if reads_moe:
                waiting.append(scope(e))
    barriers = sum(e.primitive.name == "optimization_barrier" for e in body.eqns)
    return waiting, window, barriers


def test_without_overlap_every_dense_window_matmul_waits_for_the_moe():
    waiting, window, barriers = _window_after_moe(False)
    assert set(window) == set(WINDOW) and barriers == 1
    assert waiting == window


def test_with_overlap_no_dense_window_matmul_waits_for_the_moe():
    waiting, window, barriers = _window_after_moe(True)
    assert set(window) == set(WINDOW) and barriers == 0
    assert waiting == []


def test_backward_keeps_the_barrier():
    """The barrier's transpose ties the cotangents too, so the MoE backward waits for the dense backward."""
    gd, params, rest = _split(False)
    text = jax.jit(jax.grad(lambda p: jnp.sum(_logits(gd, rest)(p, TOKENS)))).lower(params).as_text()
    assert text.count("stablehlo.optimization_barrier") >= 2
