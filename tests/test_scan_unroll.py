"""model.scan_unroll changes how the layer scan is compiled, never what it computes."""

import jax
import jax.numpy as jnp
from flax import nnx

from lcflash.config import load_config, model_config
from lcflash.model import LongcatFlash
from numerics import rel


def test_unrolled_layer_scan_equals_the_loop():
    cfg = model_config(load_config("configs/tiny.py")).replace(num_layers=3)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)

    def loss_and_grads(unroll):
        graphdef, state = nnx.split(LongcatFlash(cfg.replace(scan_unroll=unroll), nnx.Rngs(2)))

        def loss(st):
            logits = nnx.merge(graphdef, st).forward(tokens).logits
            return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])

        return jax.jit(jax.value_and_grad(loss))(state)

    (l1, g1), (l3, g3) = loss_and_grads(1), loss_and_grads(3)
    assert rel(l3, l1) < 1e-6
    for a, b in zip(jax.tree.leaves(g3), jax.tree.leaves(g1), strict=True):
        assert rel(a, b) < 1e-5
