"""Adaptive-p (llama.cpp's `adaptive_p` sampler, ggml-org/llama.cpp PR #17927, 2026).

It prefers tokens whose probability is near a target rather than the most likely ones,
and steers the running average of the chosen tokens' probabilities toward that target.
The rule, as in llama.cpp's `llama_sampler_adaptive_p_apply` / `_accept`
(src/llama-sampler.cpp), per row:

    p          = softmax(logits)          (the distribution after every earlier stage)
    adapted    = clamp(2 * target - weighted_sum / total_weight, 0, 1)
    dist       = |p - adapted| / 0.3                       (DISTRIBUTION_WIDTH)
    logit'     = 5 - 10 * dist^2 / (1 + dist)              (PEAK 5, SHARPNESS 10)
                 for the finite logits; removed tokens (-inf) stay removed
    draw from softmax(logit'); then, with p_sel the ORIGINAL p of the drawn token,
    weighted_sum = p_sel + decay * weighted_sum,   total_weight = 1 + decay * total_weight

The EMA starts primed as if the target had been met: weighted_sum = target / (1 - decay),
total_weight = 1 / (1 - decay) (so the first step's adapted target is the target). It is
the last stage, after every truncation (llama.cpp forces it to the end of its chain), and
a negative target turns it off. `SamplerState.ap_sum` / `ap_weight` carry the EMA, one
pair per slot, ap_weight == 0 meaning "not started" (so a state reset needs no parameters).
llama.cpp clamps decay to [0, 0.99]; here a decay outside that range is a 400 instead.
The transform covers every finite token: without a truncation before it (min_p, top_k)
the many near-zero tokens share a large part of the mass, as in llama.cpp.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sampling.rows import SamplingRows
from sampling.state import SamplerState

DISTRIBUTION_WIDTH = 0.3
PEAK_LOGIT_VALUE = 5.0
SHARPNESS = 10.0


def enabled(rows: SamplingRows) -> jax.Array:
    """bool [S]: the rows using adaptive-p (greedy rows never do)."""
    return (rows.adaptive_p_target >= 0.0) & ~rows.greedy


def ema(rows: SamplingRows, state: SamplerState) -> tuple[jax.Array, jax.Array]:
    """(weighted_sum, total_weight) [S] of this step, primed before the first token."""
    started = state.ap_weight > 0.0
    one_minus = 1.0 - rows.adaptive_p_decay
    return (jnp.where(started, state.ap_sum, rows.adaptive_p_target / one_minus),
            jnp.where(started, state.ap_weight, 1.0 / one_minus))


def transform(x: jax.Array, rows: SamplingRows, state: SamplerState) -> jax.Array:
    """The adaptive-p logits of every row of x [S, V] (callers select the enabled rows)."""
    weighted_sum, total_weight = ema(rows, state)
    target = jnp.clip(rows.adaptive_p_target, 0.0, 1.0)
    adapted = jnp.clip(2.0 * target - weighted_sum / total_weight, 0.0, 1.0)
    p = jnp.exp(x - jax.nn.logsumexp(x, axis=-1, keepdims=True))
    dist = jnp.abs((p - adapted[:, None]) * (1.0 / DISTRIBUTION_WIDTH))
    out = PEAK_LOGIT_VALUE - SHARPNESS * dist * dist / (1.0 + dist)
    return jnp.where(jnp.isfinite(x), out, -jnp.inf)


def apply(x: jax.Array, rows: SamplingRows, state: SamplerState) -> jax.Array:
    """x with the enabled rows transformed; no pass at all when no row is enabled."""
    on = enabled(rows)
    return jax.lax.cond(jnp.any(on),
                        lambda y: jnp.where(on[:, None], transform(y, rows, state), y),
                        lambda y: y, x)


def advance(rows: SamplingRows, state: SamplerState, original_p: jax.Array,
            error: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The EMA after drawing a token whose pre-transform probability is original_p [S]."""
    weighted_sum, total_weight = ema(rows, state)
    on = enabled(rows) & ~error
    decay = rows.adaptive_p_decay
    return (jnp.where(on, original_p + decay * weighted_sum, state.ap_sum),
            jnp.where(on, 1.0 + decay * total_weight, state.ap_weight))
