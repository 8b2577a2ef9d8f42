"""Sampling on device, inside the jitted step: only [B] tokens and logprobs reach the host."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingInputs:
    temperature: jax.Array  # [B] float32, 0 = greedy
    top_k: jax.Array  # [B] int32, 0 = off
    top_p: jax.Array  # [B] float32, 1 = off
    seeds: jax.Array  # [B] uint32
    counters: jax.Array  # [B] int32, index of the token being drawn in the output


def _filter(logits, top_k, top_p):
    """Mask logits [B, V] outside top-k and the top-p nucleus with -inf."""
    V = logits.shape[-1]
    srt = -jnp.sort(-logits, axis=-1)  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    kth = jnp.take_along_axis(srt, (k - 1)[:, None], axis=-1)
    probs = jax.nn.softmax(srt, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted entry
    keep_sorted = before < top_p[:, None]
    # smallest logit still in the nucleus; the top token is always kept.
    pth = jnp.min(jnp.where(keep_sorted, srt, jnp.inf), axis=-1, keepdims=True)
    thresh = jnp.maximum(kth, pth)
    return jnp.where(logits >= thresh, logits, -jnp.inf)


def sample(logits, s: SamplingInputs, *, do_sample: bool):
    """logits [B, V] float32 -> (tokens [B] int32, logprobs [B] float32 of the raw distribution)."""
    logprobs_all = jax.nn.log_softmax(logits, axis=-1)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not do_sample:
        tok = greedy
    else:
        t = jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
        filtered = _filter(logits / t, s.top_k, s.top_p)
        keys = jax.vmap(lambda seed, c: jax.random.fold_in(jax.random.key(seed), c))(s.seeds, s.counters)
        drawn = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
        tok = jnp.where(s.temperature > 0, drawn, greedy)
    lp = jnp.take_along_axis(logprobs_all, tok[:, None], axis=-1)[:, 0]
    return tok, lp
