"""Dynamic top-p (TensorRT-LLM's `top_p_decay`, `top_p_min`, `top_p_reset_ids`).

The first token of a sample uses the row's `top_p`. After each sampled token the p of the
next step is
    top_p            if the token is one of top_p_reset_ids
    max(p * top_p_decay, top_p_min)   otherwise
(TensorRT-LLM's computeToppDecay, from "Factuality Enhanced Language Models", Lee et al.
2022: decay p along a sentence, reset it at a sentence boundary). The current p lives in
`SamplerState.top_p`, one float per slot, -1 until the row's first token (so a state reset
for a new request needs no parameters); rows with top_p_decay == 1 ignore it and always
use their top_p. Everything is per row, so batch invariance holds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sampling.rows import SamplingRows
from sampling.state import SamplerState


def dynamic(rows: SamplingRows) -> jax.Array:
    """bool [S]: the rows whose top_p decays."""
    return rows.top_p_decay < 1.0


def current(rows: SamplingRows, state: SamplerState) -> jax.Array:
    """float32 [S]: the top_p each row uses at this step."""
    started = state.top_p >= 0.0
    return jnp.where(dynamic(rows) & started, state.top_p, rows.top_p)


def advance(rows: SamplingRows, p: jax.Array, tokens: jax.Array) -> jax.Array:
    """float32 [S]: the p of the next step, given this step's p and sampled tokens."""
    reset = jnp.any(rows.top_p_reset_ids == tokens[:, None], axis=-1)
    decayed = jnp.maximum(p * rows.top_p_decay, rows.top_p_min)
    return jnp.where(dynamic(rows), jnp.where(reset, rows.top_p, decayed), -1.0)


def replay(rows_one: SamplingRows, tokens: jax.Array, start, end) -> jax.Array:
    """The state's p after tokens[start:end] were drawn (-1 when none was), by the same
    rule, one token at a time: a sample resumed after preemption continues its schedule."""
    def body(i, p):
        reset = jnp.any(rows_one.top_p_reset_ids[0] == tokens[i])
        return jnp.where(reset, rows_one.top_p[0],
                         jnp.maximum(p * rows_one.top_p_decay[0], rows_one.top_p_min[0]))
    p = jax.lax.fori_loop(start, end, body, rows_one.top_p[0])
    return jnp.where(dynamic(rows_one)[0] & (end > start), p, -1.0)


def resume(state: SamplerState, rows_one: SamplingRows, slot, tokens: jax.Array, start,
           end) -> SamplerState:
    """`state` with slot's p replayed over its output so far, tokens[start:end]."""
    return state.replace(top_p=state.top_p.at[slot].set(replay(rows_one, tokens, start, end)))
