"""Next-token choice: greedy argmax, or temperature + nucleus (top-p) sampling."""

import jax
import jax.numpy as jnp


def sample(logits_bv, key, temperature, top_p, greedy: bool):
    """Token ids [B]. Greedy is static (temperature 0); temperature and top_p are traced, so changing them does
    not recompile. Top-p keeps the smallest set of most likely tokens whose probability reaches top_p."""
    if greedy:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    scaled = logits_bv.astype(jnp.float32) / temperature
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs            # mass of strictly more likely tokens
    keep = (before < top_p) | (top_p >= 1.0)
    threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    filtered = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    keys = jax.random.split(key, logits_bv.shape[0])
    return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
