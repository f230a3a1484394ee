"""Exact speculative decoding: the acceptance rule, the residual and prompt lookup.

A proposer guesses K tokens d_1..d_K; the target model scores all of them in one forward
pass, giving its distributions p_0..p_K (p_i is the target's next-token distribution after
d_1..d_i). The rule of Leviathan et al. (2023) and Chen et al. (2023) then keeps d_i with
probability min(1, p_i(d_i) / q_i(d_i)), q_i being the distribution d_i was drawn from, and
at the first rejection draws a replacement from the residual normalize(max(p_i - q_i, 0));
if all K survive, a bonus token comes from p_K. Every emitted token is then distributed
exactly as plain sampling from the target would have it, whatever the proposer.

- A draft model gives q_i explicitly.
- Prompt lookup (an n-gram copied from the prompt or the output so far) is a point mass:
  q_i = one_hot(d_i), so d_i is kept with probability p_i(d_i) and the residual is p_i
  with d_i removed.
- Greedy rows keep d_i while it is the target's argmax and emit the argmax at the first
  mismatch: the output is the plain greedy output token for token.

Pure functions: jnp for the acceptance (run inside the jitted verify step), numpy for the
n-gram proposer (run on the host). Nothing here knows about models or serving.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sampling.sampler import first_max


def residual(p: jax.Array, q: jax.Array) -> jax.Array:
    """normalize(max(p - q, 0)) over the last axis; p itself where that is empty (p <= q
    everywhere means p == q, and then a rejection has probability 0)."""
    r = jnp.maximum(p - q, 0.0)
    total = jnp.sum(r, axis=-1, keepdims=True)
    return jnp.where(total > 0, r / jnp.where(total > 0, total, 1.0), p)


def _accepted_count(ok: jax.Array) -> jax.Array:
    """How many leading entries of the bool vector `ok` are True."""
    return jnp.sum(jnp.cumprod(ok.astype(jnp.int32))).astype(jnp.int32)


def emitted(drafts: jax.Array, n: jax.Array, next_token: jax.Array) -> jax.Array:
    """The K+1 token row the verify step returns: d_1..d_n, then `next_token`, then -1."""
    k = drafts.shape[0]
    padded = jnp.concatenate([drafts.astype(jnp.int32), jnp.zeros((1,), jnp.int32)])
    idx = jnp.arange(k + 1)
    return jnp.where(idx < n, padded, jnp.where(idx == n, next_token, -1)).astype(jnp.int32)


def accept_sampled(p: jax.Array, drafts: jax.Array, key: jax.Array,
                   q: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Rejection sampling of K drafts against the target.

    p [K+1, V]: target probabilities at each draft position and the bonus one;
    drafts [K] int; q [K, V]: the draft distributions (None: point masses on the drafts,
    i.e. prompt lookup). Returns (n accepted in [0, K], the token after them)."""
    k, v = drafts.shape[0], p.shape[-1]
    q_full = jax.nn.one_hot(drafts, v, dtype=p.dtype) if q is None else q.astype(p.dtype)
    idx = jnp.arange(k)
    p_d = p[idx, drafts]
    q_d = q_full[idx, drafts]
    key_accept, key_residual = jax.random.split(key)
    u = jax.random.uniform(key_accept, (k,))
    n = _accepted_count(u * q_d < p_d)        # u < p/q without dividing by q
    # the bonus position has no draft: its "residual" is p_K itself
    q_pad = jnp.concatenate([q_full, jnp.zeros((1, v), p.dtype)])
    res = residual(p[n], q_pad[n])
    token = jax.random.categorical(key_residual, jnp.log(res)).astype(jnp.int32)
    return n, token


def accept_greedy(logits: jax.Array, drafts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Greedy verification: logits [K+1, V] (after masks), drafts [K].
    Returns (n accepted, the target's argmax after them)."""
    target = first_max(logits)
    n = _accepted_count(target[:drafts.shape[0]] == drafts)
    return n, target[n]


def propose_ngram(tokens, k: int, max_n: int = 3, min_n: int = 1) -> np.ndarray:
    """Prompt lookup: find the latest earlier occurrence of the longest suffix n-gram of
    `tokens` (n from max_n down to min_n) and propose the up-to-k tokens that followed it.
    Returns an int32 array of 0..k tokens (empty: no match)."""
    tokens = np.asarray(tokens, np.int32)
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = tokens[length - n:]
        # windows start at 0..length-1-n: each has a continuation, the suffix is excluded
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:length - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start:start + k].copy()
    return tokens[:0].copy()
