"""Log-likelihood of given tokens under the model (scoring, prompt logprobs, evaluation).

One forward over prompt + continuation; the log-softmax at each position gives the
logprob of the next token. Used for "log-likelihood under the model" in the sampling
analysis and for prompt logprobs.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig
from model.decoder import forward, init_cache


@partial(jax.jit, static_argnums=(0,))
def _token_logprobs(config: ModelConfig, params, tokens, length):
    n = tokens.shape[1]
    cache = init_cache(config, 1, n)
    positions = jnp.where(jnp.arange(n) < length, jnp.arange(n), n)[None]
    logits, _ = forward(config, params, cache, tokens, positions)
    logp = jax.nn.log_softmax(logits[0, :-1], axis=-1)
    return jnp.take_along_axis(logp, tokens[0, 1:, None], axis=-1)[:, 0]


def token_logprobs(config: ModelConfig, params, token_ids) -> np.ndarray:
    """logprob of token_ids[i] given token_ids[:i], for i >= 1 ([len - 1] float32)."""
    n = len(token_ids)
    if n < 2:
        return np.zeros((0,), np.float32)
    bucket = max(16, 1 << (n - 1).bit_length())  # pad to a power of two: few compilations
    padded = np.zeros((1, bucket), np.int32)
    padded[0, :n] = token_ids
    return np.asarray(_token_logprobs(config, params, padded, n))[:n - 1]


def continuation_logprob(config: ModelConfig, params, prompt_ids, continuation_ids) -> float:
    """Total log-likelihood of continuation_ids after prompt_ids."""
    if not continuation_ids:
        return 0.0
    lps = token_logprobs(config, params, list(prompt_ids) + list(continuation_ids))
    return float(np.sum(lps[len(prompt_ids) - 1:]))


@partial(jax.jit, static_argnums=(0, 4))
def _prompt_logprobs(config: ModelConfig, params, tokens, length, k: int):
    n = tokens.shape[1]
    cache = init_cache(config, 1, n)
    positions = jnp.where(jnp.arange(n) < length, jnp.arange(n), n)[None]
    logits, _ = forward(config, params, cache, tokens, positions)
    logp = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[0, 1:, None], axis=-1)[:, 0]
    rank = 1 + jnp.sum(logp > chosen[:, None], axis=-1)
    top_lp, top_ids = jax.lax.top_k(logp, k)
    return chosen, rank, top_ids, top_lp


def prompt_logprobs(config: ModelConfig, params, token_ids, k: int = 0):
    """Per prompt token after the first: (logprob, rank, top-k ids, top-k logprobs).

    The scoring path of legacy completions' `echo` + `logprobs` and of `prompt_logprobs`:
    arrays of [len - 1], [len - 1], [len - 1, k], [len - 1, k]."""
    n = len(token_ids)
    if n < 2:
        return (np.zeros((0,), np.float32), np.zeros((0,), np.int32),
                np.zeros((0, k), np.int32), np.zeros((0, k), np.float32))
    bucket = max(16, 1 << (n - 1).bit_length())
    padded = np.zeros((1, bucket), np.int32)
    padded[0, :n] = token_ids
    out = _prompt_logprobs(config, params, padded, n, max(k, 1))
    lp, rank, ids, tops = (np.asarray(x)[:n - 1] for x in out)
    return lp, rank, ids[:, :k], tops[:, :k]
