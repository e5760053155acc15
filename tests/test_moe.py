"""The dropless routed-expert path equals the per-expert loop for any routing, empty experts included."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcflash.kernels.gmm.swiglu import swiglu_halves
from lcflash.model.moe import moe_reference, routed_experts, sort_slots
from lcflash.model.router import Routing, route, zero_expert_output
from numerics import rel
from xla_flags import user_env


def _weights(key, N, D, I):
    k1, k2, k3 = jax.random.split(key, 3)
    return (jax.random.normal(k1, (N, D, I)) / D ** 0.5, jax.random.normal(k2, (N, D, I)) / D ** 0.5,
            jax.random.normal(k3, (N, I, D)) / I ** 0.5)


def _value_and_vjp(f, args, ct):
    """f(*args) and its cotangents for ct, as one jitted program (op-by-op dispatch compiles every small op
    separately: most of these tests' time on CPU)."""
    def run(*args):
        out, vjp = jax.vjp(f, *args)
        return out, vjp(ct)
    return jax.jit(run)(*args)


@pytest.mark.parametrize("T,N,Z,K", [(37, 8, 4, 4), (5, 16, 8, 6), (64, 4, 0, 2), (9, 3, 20, 7)])
@pytest.mark.parametrize("impl", ["ragged_dot", "reference"])
def test_dropless_equals_per_expert_loop(T, N, Z, K, impl):
    key = jax.random.key(T * 1000 + N * 10 + K)
    kx, kr, kb, kw = jax.random.split(key, 4)
    D, I = 24, 16
    x = jax.random.normal(kx, (T, D))
    routing = route(x, 2.0 * jax.random.normal(kr, (D, N + Z)), 0.1 * jax.random.normal(kb, (N + Z,)), K, 6.0)
    w = _weights(kw, N, D, I)
    got = jax.jit(lambda x, r, w: zero_expert_output(x, r, N) + routed_experts(x, r, *w, impl))(x, routing, w)
    ref = jax.jit(lambda x, r, w: moe_reference(x, r, *w))(x, routing, w)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_empty_experts_and_all_zero_expert_tokens():
    """Every token picks expert 2 or a zero expert: experts 0, 1 and 3 get no rows."""
    T, N, Z, K, D, I = 11, 4, 3, 3, 8, 6
    x = jax.random.normal(jax.random.key(0), (T, D))
    experts = np.tile(np.array([[2, 4, 5]]), (T, 1))
    experts[::3] = [4, 5, 6]  # some tokens choose only zero experts
    weights = jax.random.uniform(jax.random.key(1), (T, K))
    routing = Routing(jnp.zeros((T, N + Z)), jnp.asarray(experts), weights)
    w = _weights(jax.random.key(2), N, D, I)
    sizes = sort_slots(routing.experts_tk, N).group_sizes_g
    np.testing.assert_array_equal(np.asarray(sizes), [0, 0, T - len(range(0, T, 3)), 0])
    got = zero_expert_output(x, routing, N) + routed_experts(x, routing, *w, "ragged_dot")
    np.testing.assert_allclose(np.asarray(got), np.asarray(moe_reference(x, routing, *w)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fuse_gate_up", [False, True])
def test_gradients_match_the_reference(fuse_gate_up):
    T, N, Z, K, D, I = 13, 6, 3, 4, 8, 6
    x = jax.random.normal(jax.random.key(3), (T, D))
    wr = jax.random.normal(jax.random.key(4), (D, N + Z))
    w = _weights(jax.random.key(5), N, D, I)

    def loss(fn, x, wr, w):
        routing = route(x, wr, jnp.zeros(N + Z), K, 6.0)
        return jnp.sum(jnp.sin(fn(x, routing, w)))

    def dropless(x, r, w):
        return zero_expert_output(x, r, N) + routed_experts(x, r, *w, "ragged_dot", fuse_gate_up)

    def reference(x, r, w):
        return moe_reference(x, r, *w)

    g1, g2 = (jax.jit(jax.grad(lambda *a, fn=fn: loss(fn, *a), argnums=(0, 1, 2)))(x, wr, w)
              for fn in (dropless, reference))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["ragged_dot", "reference"])
def test_fused_gate_up_gives_the_same_values_and_gradients(impl):
    """moe.fuse_gate_up: one grouped matmul against [gate | up] instead of two, the same outputs and gradients.
    In float64: in fp32 the two differ by rounding (one 2I-wide contraction against two I-wide ones plus their
    sum; both ~1e-5 from the float64 result at these shapes)."""
    T, N, Z, K, D, I = 29, 8, 4, 6, 16, 12
    with jax.enable_x64(True):
        f64 = lambda a: jnp.asarray(a, jnp.float64)  # noqa: E731
        x = f64(jax.random.normal(jax.random.key(11), (T, D)))
        routing = route(x, f64(jax.random.normal(jax.random.key(12), (D, N + Z))), jnp.zeros(N + Z), K, 6.0)
        w = jax.tree.map(f64, _weights(jax.random.key(13), N, D, I))
        g = f64(jax.random.normal(jax.random.key(14), (T, D)))
        out = {}
        for fuse in (False, True):
            f = lambda x, w, fuse=fuse: routed_experts(x, routing, *w, impl, fuse)  # noqa: E731
            y, ct = _value_and_vjp(f, (x, w), g)
            out[fuse] = [y, *jax.tree.leaves(ct)]
        for a, b in zip(out[True], out[False], strict=True):
            assert a.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_swiglu_halves_matches_slicing_and_writes_one_gradient(dtype):
    """swiglu_halves([g | u]) has the values and gradient of silu(g) * u on the sliced halves, bit for bit, and its
    backward builds the gradient by one concatenate (slicing pads each half's gradient and adds them)."""
    gu = jax.random.normal(jax.random.key(21), (37, 2 * 24), dtype)
    dh = jax.random.normal(jax.random.key(22), (37, 24), dtype)
    sliced = lambda gu: jax.nn.silu(gu[:, :24]) * gu[:, 24:]  # noqa: E731
    got, want = ((y, vjp(dh)[0]) for y, vjp in (jax.vjp(f, gu) for f in (swiglu_halves, sliced)))
    for a, b in zip(got, want, strict=True):
        assert a.dtype == dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    prims = str(jax.make_jaxpr(lambda gu: jax.vjp(swiglu_halves, gu)[1](dh))(gu))
    assert "concatenate" in prims and " pad" not in prims


def _random_slots(key, T, N, Z, K):
    experts = jax.vmap(lambda k: jax.random.choice(k, N + Z, (K,), replace=False))(jax.random.split(key, T))
    return experts, sort_slots(experts, N)


@pytest.mark.parametrize("T,N,Z,K", [(7, 4, 3, 3), (16, 8, 0, 2), (5, 2, 9, 6)])
def test_sort_slots_orders_ffn_slots_by_expert(T, N, Z, K):
    experts, s = _random_slots(jax.random.key(T + 10 * Z), T, N, Z, K)
    e_m = np.minimum(np.asarray(experts).reshape(-1), N)
    order = np.asarray(s.order_m)
    np.testing.assert_array_equal(order, np.argsort(e_m, kind="stable"))
    np.testing.assert_array_equal(np.asarray(s.group_sizes_g), np.bincount(e_m, minlength=N + 1)[:N])
    n_valid = int(np.sum(e_m < N))
    np.testing.assert_array_equal(np.asarray(s.valid_m), np.arange(T * K) < n_valid)
    row = np.argsort(order)  # the inverse permutation
    ffn = e_m < N
    np.testing.assert_array_equal(np.asarray(s.row_tk).reshape(-1), np.where(ffn, row, 0))
    np.testing.assert_array_equal(np.asarray(s.tok_m), np.where(np.arange(T * K) < n_valid, order // K, 0))


@pytest.mark.parametrize("T,N,Z,K", [(7, 4, 3, 3), (16, 8, 0, 2), (5, 2, 9, 6)])
def test_dispatch_and_combine_rows_equal_plain_gathers(T, N, Z, K):
    """dispatch_rows / combine_rows (gathers both ways, zero-expert slots skipped) against their plain-JAX
    definitions, whose gradients are scatter-adds: values and gradients, the zero-expert rows included."""
    from lcflash.model.slots import combine_rows, dispatch_rows

    D = 5
    kx, ky, kw, kg, kh, ks = jax.random.split(jax.random.key(T * 7 + K), 6)
    experts, s = _random_slots(ks, T, N, Z, K)
    ffn_tk = experts < N
    order = s.order_m
    row_tk = jnp.argsort(order).reshape(T, K)
    valid = (jnp.arange(T * K) < jnp.sum(ffn_tk))[:, None]

    def dispatch_ref(x):  # row m is token order[m] // K; rows past the FFN slots are not read downstream
        return jnp.where(valid, x[order // K], 0.0)

    def combine_ref(y, w):
        return jnp.sum(jnp.where(ffn_tk[..., None], y[row_tk] * w[..., None], 0.0), axis=1)

    x = jax.random.normal(kx, (T, D))
    ct_md = jax.random.normal(kg, (T * K, D))
    got, (d_x,) = _value_and_vjp(lambda x: jnp.where(valid, dispatch_rows(x, s), 0.0), (x,), ct_md)
    want, (d_x_ref,) = _value_and_vjp(dispatch_ref, (x,), ct_md)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(d_x, d_x_ref, rtol=1e-6, atol=1e-6)

    y = jax.random.normal(ky, (T * K, D))
    w = jnp.where(ffn_tk, jax.random.uniform(kw, (T, K)), 0.0)
    ct_td = jax.random.normal(kh, (T, D))
    got, (d_y, d_w) = _value_and_vjp(lambda y, w: combine_rows(y, w, s), (y, w), ct_td)
    want, (d_y_ref, d_w_ref) = _value_and_vjp(combine_ref, (y, w), ct_td)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(d_y, d_y_ref, rtol=1e-6, atol=1e-6)  # zero on the rows past the FFN slots
    np.testing.assert_allclose(d_w, jnp.where(ffn_tk, d_w_ref, 0.0), rtol=1e-6, atol=1e-6)
    # Rows past the FFN slots may hold anything (the expert kernels leave them unstored): no trace in either result.
    y_nan = jnp.where(valid, y, jnp.nan)
    got_nan, (d_y_nan, d_w_nan) = _value_and_vjp(lambda y, w: combine_rows(y, w, s), (y_nan, w), ct_td)
    np.testing.assert_array_equal(got_nan, got)
    np.testing.assert_array_equal(d_y_nan, d_y)
    np.testing.assert_array_equal(d_w_nan, d_w)


def test_router_bias_selects_but_does_not_weigh():
    T, E, K = 6, 10, 3
    x = jax.random.normal(jax.random.key(6), (T, 4))
    wr = jax.random.normal(jax.random.key(7), (4, E))
    bias = jnp.zeros(E).at[9].set(10.0)  # forces expert 9 into every token's top-k
    r = route(x, wr, bias, K, 6.0)
    assert bool(jnp.all(jnp.any(r.experts_tk == 9, axis=-1)))
    probs = jax.nn.softmax(x @ wr, axis=-1)
    np.testing.assert_allclose(np.asarray(r.weights_tk), 6.0 * np.take_along_axis(np.asarray(probs),
                                                                                 np.asarray(r.experts_tk), -1),
                               rtol=1e-6)
    # no gradient flows into the bias
    g = jax.grad(lambda b: jnp.sum(route(x, wr, b, K, 6.0).weights_tk))(bias)
    assert not np.any(np.asarray(g))


@pytest.mark.parametrize("T,E,k", [(1, 192, 12), (5, 24, 4), (3, 768, 12), (64, 192, 12)])
def test_top_k_select_equals_lax_top_k(T, E, k):
    """The rank-counting top-k (few tokens), lax.top_k (many) and k argmax passes pick the same experts in the same
    order, equal scores included (lower index first), and gather the same values."""
    from lcflash.model import router
    from lcflash.model.router import RANK_TOP_K_MAX_ELEMENTS, top_k_select

    x = jax.random.normal(jax.random.key(T * E), (T, E))
    values = jax.random.uniform(jax.random.key(T * E + 1), (T, E))
    for scores in (x, jnp.round(x * 2) / 2):   # the second has many ties
        idx, got = top_k_select(scores, k, values)
        want = jax.lax.top_k(scores, k)[1]
        np.testing.assert_array_equal(idx, want)
        if T * E * E <= RANK_TOP_K_MAX_ELEMENTS:   # a GPU's path (CPUs sort: lcflash/model/router.py)
            rank_idx, rank_got = router.top_k_by_rank(scores, k, values)
            np.testing.assert_array_equal(rank_idx, want)
            np.testing.assert_array_equal(rank_got, got)
        for name, impl in router.LARGE_TOP_K_IMPLS.items():   # model.router.LARGE_TOP_K's choices
            np.testing.assert_array_equal(impl(scores, k), want, err_msg=name)
        np.testing.assert_array_equal(got, jnp.take_along_axis(values, want, axis=-1))
    assert (T * E * E <= RANK_TOP_K_MAX_ELEMENTS) == (T < 64)   # both branches are covered
    # the chosen values' gradient (an elementwise sum over the k choices) equals take_along_axis' scatter-add
    g = jax.random.normal(jax.random.key(T * E + 2), (T, k))
    want_grad = jax.vjp(lambda v: jnp.take_along_axis(v, jax.lax.top_k(x, k)[1], axis=-1), values)[1](g)[0]
    got_grad = jax.vjp(lambda v: top_k_select(x, k, v)[1], values)[1](g)[0]
    np.testing.assert_array_equal(got_grad, want_grad)


# Routing inside a scan over stacked layers, as the model's layer scan runs it; prints JSON.
LAYER_SCAN_TOP_K = """
import json, jax, jax.numpy as jnp, numpy as np
from lcflash.model.router import top_k_by_rank, top_k_select
rng = np.random.default_rng(0)
L, T, D, E, K = 2, 34, 48, 12, 4
x, w = rng.normal(size=(L, T, D)).astype(np.float32), (0.6 * rng.normal(size=(L, D, E))).astype(np.float32)
b = (0.05 * rng.normal(size=(L, E))).astype(np.float32)
def body(c, xs):
    x, w, b = xs
    p = jax.nn.softmax(x @ w, axis=-1) + b
    return c, (top_k_select(p, K, p)[0], top_k_by_rank(p, K, p)[0], jax.lax.top_k(p, K)[1])
model, rank, ref = jax.jit(lambda *a: jax.lax.scan(body, 0, a)[1])(x, w, b)
print(json.dumps({"platform": jax.default_backend(), "model_unlike_top_k": int((model != ref).any(-1).sum()),
                  "rank_unlike_top_k": int((rank != ref).any(-1).sum())}))
"""


def test_routing_in_a_layer_scan_with_xla_default_flags():
    """The router's top-k inside a layer scan against lax.top_k of the same scores, in a fresh process with XLA's
    default flags on the default platform (the suite's fast-compile flags hid this). On XLA:CPU (jaxlib 0.10.2 and
    0.11.2) the rank count of softmax + bias (router.top_k_by_rank) there gives two experts one rank in 11 of these
    68 tokens, so CPUs take lax.top_k; elsewhere (a GPU) the model counts ranks, so that must be right there."""
    env = user_env()
    out = subprocess.run([sys.executable, "-c", LAYER_SCAN_TOP_K], env=env, capture_output=True, text=True,
                         timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["model_unlike_top_k"] == 0, got
    if got["platform"] != "cpu":
        assert got["rank_unlike_top_k"] == 0, got


@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16])
def test_router_grad_precision_changes_only_the_backward(x_dtype):
    """model.router_grad_precision="bf16_3x": the same fp32 logits (so the same experts), and gradients equal to
    autodiff of the fp32 product within the 3-pass algorithm's error (4e-6 of fp64 on an H200)."""
    from lcflash import config
    from lcflash.model import router
    from lcflash.model.router import router_logits

    # the config's names are the router's
    assert set(router.ROUTER_GRAD_PRECISIONS) == set(config.ROUTER_GRAD_PRECISIONS)
    assert set(router.ROUTER_PRECISIONS) == set(config.ROUTER_PRECISIONS)

    x = jax.random.normal(jax.random.key(8), (96, 64), x_dtype)
    w = jax.random.normal(jax.random.key(9), (64, 40)) * 0.1
    g = jax.random.normal(jax.random.key(10), (96, 40))
    want, vjp_want = jax.vjp(lambda x, w: router_logits(x, w, "highest"), x, w)
    got, vjp_got = jax.vjp(lambda x, w: router_logits(x, w, "bf16_3x"), x, w)
    np.testing.assert_array_equal(got, want)
    for a, b in zip(vjp_got(g), vjp_want(g), strict=True):
        assert a.dtype == b.dtype
        assert rel(a, b) < (1e-5 if a.dtype == jnp.float32 else 4e-3), rel(a, b)   # bf16 dx: one rounding


def test_router_bf16_split_is_as_exact_as_fp32():
    """model.router_precision="bf16_split": bf16 activations against the fp32 weights split in three bf16 parts err
    against fp64 about as little as the fp32 product does (on CPU 6.7e-7 against 9.1e-7; two parts err 2.2e-6, so
    the bound tells them apart), and the gradients are those of the fp32 product. Compiled, as the model runs it."""
    from lcflash.model.router import router_logits, split_bf16

    x = jax.random.normal(jax.random.key(11), (128, 1024), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(12), (1024, 96)) * 0.02
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    err = lambda y: float(np.max(np.abs(np.asarray(y, np.float64) - exact)) / np.max(np.abs(exact)))  # noqa: E731
    parts = jax.jit(split_bf16)(w)
    np.testing.assert_array_equal(sum(p.astype(jnp.float32) for p in parts[::-1]), w)
    # No bf16 -> f32 convert inside the split: XLA on a GPU removes f32 -> bf16 -> f32 pairs, and a split built on
    # them lost its remainders there (forward error 1.7e-3 on an H200, session 17).
    ups = [e for e in jax.make_jaxpr(split_bf16)(w).eqns if e.primitive.name == "convert_element_type"
           and e.invars[0].aval.dtype == jnp.bfloat16]
    assert not ups, ups
    two_parts = sum(jnp.einsum("td,de->te", x, p, preferred_element_type=jnp.float32) for p in parts[:2])
    got = jax.jit(lambda x, w: router_logits(x, w, precision="bf16_split"))(x, w)
    assert got.dtype == jnp.float32
    fp32 = jax.jit(router_logits)(x, w)
    assert err(got) <= 2 * err(fp32) and 2 * err(got) < err(two_parts), (err(got), err(fp32), err(two_parts))
    g = jax.random.normal(jax.random.key(13), (128, 96))
    dx_want, dw_want = jax.vjp(router_logits, x, w)[1](g)
    dw64 = np.asarray(x, np.float64).T @ np.asarray(g, np.float64)
    dw_err = lambda dw: float(np.max(np.abs(np.asarray(dw, np.float64) - dw64)) / np.max(np.abs(dw64)))  # noqa
    for grad_precision in ("highest", "bf16_3x", "bf16_split"):
        dx, dw = jax.jit(lambda x, w, g: jax.vjp(lambda x, w: router_logits(x, w, grad_precision, "bf16_split"),
                                                 x, w)[1](g))(x, w, g)
        assert (dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.float32)
        assert rel(dx, dx_want) < 4e-3, (grad_precision, rel(dx, dx_want))     # bf16 dx: one rounding
        assert rel(dw, dw_want) < 1e-5, (grad_precision, rel(dw, dw_want))
        if grad_precision == "bf16_split":      # three parts of g against the bf16 x: as exact as fp32
            assert dw_err(dw) <= 2 * dw_err(dw_want), (dw_err(dw), dw_err(dw_want))
    with pytest.raises(ValueError, match="router_precision='bf16_split'.*bfloat16.*float32"):
        router_logits(x.astype(jnp.float32), w, precision="bf16_split")
    with pytest.raises(ValueError, match="router_grad_precision='bf16_split'.*bfloat16.*float32"):
        jax.grad(lambda x: router_logits(x, w, "bf16_split").sum())(x.astype(jnp.float32))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the Mosaic GPU grouped matmul kernels")
def test_fused_gate_up_on_the_pallas_kernels():
    """On a GPU, in bf16 with the kernels: fused gate|up errs against the fp32 per-expert loop no more than the two
    separate products do (its d_x sums both halves in fp32 before rounding, so it may err less)."""
    T, N, Z, K, D, I = 512, 8, 4, 6, 256, 128
    x = jax.random.normal(jax.random.key(21), (T, D))
    routing = route(x, jax.random.normal(jax.random.key(22), (D, N + Z)), jnp.zeros(N + Z), K, 6.0)
    w = _weights(jax.random.key(23), N, D, I)
    # bf16 values, as MoE.combine's cast makes the combine's gradient: its backward then runs the gather kernel
    g = jax.random.normal(jax.random.key(24), (T, D)).astype(jnp.bfloat16).astype(jnp.float32)
    y32, vjp32 = jax.vjp(lambda x, w: routed_experts(x, routing, *w, "reference"), x, w)
    want = [y32, *jax.tree.leaves(vjp32(g))]
    errs = {}
    for fuse in (False, True):
        f = lambda x, w, fuse=fuse: routed_experts(x.astype(jnp.bfloat16), routing, *w, "pallas_chain", fuse,  # noqa
                                                   out_dtype=jnp.bfloat16)
        y, vjp = jax.vjp(f, x, w)
        errs[fuse] = [rel(a, b) for a, b in zip([y, *jax.tree.leaves(vjp(g))], want, strict=True)]
    assert max(errs[False]) < 2e-2, errs
    for k in range(len(want)):
        assert errs[True][k] <= 1.1 * errs[False][k], errs



@pytest.mark.skipif(jax.default_backend() == "gpu", reason="interpreter test; on a GPU the test above runs the kernels")
# Unfused with XLA's gathers, fused with the gather kernels: each path of (True, False) runs in one of the two.
@pytest.mark.parametrize("fuse_gate_up,gather_kernels", [(False, False), (True, True)])
def test_pallas_kernels_leave_the_tail_unwritten_and_nothing_reads_it(fuse_gate_up, gather_kernels,
                                                                       monkeypatch):
    """routed_experts on our kernels in Pallas' GPU interpreter, which NaN-fills what a kernel does not write: the
    row buffers' tails (zero-expert slots) are left unwritten (expert_ffn(zero_tail=False); with gather_kernels also
    the dispatched rows' and the combine's d_y past the next whole tile, as on a Hopper GPU), and the output and
    every gradient are still finite and match the fp32 per-expert loop, so no consumer reads an unwritten row."""
    from lcflash.model import slots as slots_mod
    from lcflash.model.moe import expert_ffn

    T, N, Z, K, D, I = 40, 4, 3, 4, 256 if gather_kernels else 128, 128
    if gather_kernels:
        monkeypatch.setattr(slots_mod, "on_hopper", lambda: True)
    x = jax.random.normal(jax.random.key(31), (T, D))
    routing = route(x, jax.random.normal(jax.random.key(32), (D, N + Z)), jnp.zeros(N + Z), K, 6.0)
    w = _weights(jax.random.key(33), N, D, I)
    # bf16 values, as MoE.combine's cast makes the combine's gradient (routed_experts' out_dtype below)
    g = jax.random.normal(jax.random.key(34), (T, D)).astype(jnp.bfloat16).astype(jnp.float32)
    slots = sort_slots(routing.experts_tk, N)
    assert -(-int(slots.group_sizes_g.sum()) // 128) * 128 < T * K  # a tail exists, past a whole tile too
    tail = expert_ffn(jnp.zeros((T * K, D), jnp.bfloat16), slots.group_sizes_g, *w, "pallas_chain", fuse_gate_up,
                      zero_tail=False)[int(slots.group_sizes_g.sum()):]
    assert np.isnan(np.asarray(tail, np.float32)).all()  # unwritten (the interpreter's fill)
    want = [*_value_and_vjp(lambda x, w: routed_experts(x, routing, *w, "reference"), (x, w), g)]
    got = [*_value_and_vjp(lambda x, w: routed_experts(x.astype(jnp.bfloat16), routing, *w, "pallas_chain",
                                                       fuse_gate_up, out_dtype=jnp.bfloat16), (x, w), g)]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert np.isfinite(np.asarray(a, np.float32)).all()
        assert rel(a, b) < 2e-2, rel(a, b)
