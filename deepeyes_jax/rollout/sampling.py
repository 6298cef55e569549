"""Next-token sampling with temperature, top-k and top-p, one key per row."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_tokens(logits: jax.Array, key: jax.Array, *, temperature: float, top_k: int, top_p: float):
    """logits float32[B, V] -> (tokens int32[B], log-probs float32[B] under the tempered distribution).

    The recorded log-prob is that of the full tempered softmax (as verl recomputes it for the
    PPO ratio), even when top-k/top-p truncate what is sampled. temperature 0 is greedy.
    """
    if temperature == 0.0:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logp = jax.nn.log_softmax(logits, axis=-1)
    else:
        scaled = logits / temperature
        logp = jax.nn.log_softmax(scaled, axis=-1)
        filtered = scaled
        if top_k > 0:
            kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
            filtered = jnp.where(scaled < kth, -jnp.inf, filtered)
        if top_p < 1.0:
            order = jnp.argsort(-filtered, axis=-1)
            sorted_logits = jnp.take_along_axis(filtered, order, axis=-1)
            probs = jax.nn.softmax(sorted_logits, axis=-1)
            # Keep a token if the mass strictly before it is below top_p (the first always stays).
            keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p
            keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
            filtered = jnp.where(keep, filtered, -jnp.inf)
        keys = jax.random.split(key, logits.shape[0])
        tokens = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
