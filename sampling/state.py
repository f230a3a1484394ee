"""Per-sequence sampler state that lives on the device and is updated inside the step.

Penalties, DRY, no-repeat n-grams and mirostat all depend on what a sequence has seen, so
each slot keeps its token history (prompt then output), output token counts, prompt token
counts, its step index (which also feeds its PRNG key), mirostat's mu and the current p of
a decaying top-p (sampling/dynamic_top_p.py; -1 until the first token). Forking a
sequence for n > 1 is a row copy; nothing here is shared between rows.

The two [S, V] count arrays (and the rows' [S, V] bias) may have MORE rows than the batch
being sampled: an engine hands its whole [slots, V] arrays for a batch of its first S
slots, and a stage that reads them takes the first S rows where it runs (`batch_view`),
inside its skipped-when-unused branch. So a batch without penalties never copies them,
and `append` counts the S new tokens in place (a decode step over 16 of 32 slots used to
slice both arrays and write them back: ~16 MB moved per step at a 49152 vocabulary).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class SamplerState:
    history: jax.Array        # int32 [S, L]: prompt then output tokens
    length: jax.Array         # int32 [S]: tokens in history
    prompt_len: jax.Array     # int32 [S]
    step: jax.Array           # int32 [S]: tokens sampled so far
    out_counts: jax.Array     # int32 [S, V]: output token counts
    prompt_counts: jax.Array  # int32 [S, V]: prompt token counts
    mu: jax.Array             # float32 [S]: mirostat v2 state
    top_p: jax.Array          # float32 [S]: dynamic top-p's current p, -1 = the row's top_p
    ap_sum: jax.Array         # float32 [S]: adaptive-p's EMA weighted sum (sampling/adaptive_p.py)
    ap_weight: jax.Array      # float32 [S]: its total weight, 0 = not started


def init_state(slots: int, vocab_size: int, max_len: int) -> SamplerState:
    return SamplerState(
        history=jnp.zeros((slots, max_len), jnp.int32),
        length=jnp.zeros((slots,), jnp.int32),
        prompt_len=jnp.zeros((slots,), jnp.int32),
        step=jnp.zeros((slots,), jnp.int32),
        out_counts=jnp.zeros((slots, vocab_size), jnp.int32),
        prompt_counts=jnp.zeros((slots, vocab_size), jnp.int32),
        mu=jnp.zeros((slots,), jnp.float32),
        top_p=jnp.full((slots,), -1.0, jnp.float32),
        ap_sum=jnp.zeros((slots,), jnp.float32),
        ap_weight=jnp.zeros((slots,), jnp.float32),
    )


def batch_view(state: SamplerState, s: int) -> SamplerState:
    """`state` with its count arrays cut to the batch's first `s` rows (free when they
    already have s rows; call it where the counts are read, not before)."""
    if state.out_counts.shape[0] == s and state.prompt_counts.shape[0] == s:
        return state
    return state.replace(out_counts=state.out_counts[:s], prompt_counts=state.prompt_counts[:s])


def reset_row(state: SamplerState, slot, prompt_ids: jax.Array, prompt_len,
              rows_one) -> SamplerState:
    """Start a new sequence in `slot` with prompt_ids[:prompt_len] (prompt_ids padded to L)."""
    vocab = state.out_counts.shape[1]
    valid = jnp.arange(prompt_ids.shape[0]) < prompt_len
    counts = jnp.zeros((vocab,), jnp.int32).at[prompt_ids].add(valid.astype(jnp.int32))
    put = lambda full, row: jax.lax.dynamic_update_slice_in_dim(full, row[None], slot, axis=0)
    return SamplerState(
        history=put(state.history, jnp.where(valid, prompt_ids, 0).astype(jnp.int32)),
        length=state.length.at[slot].set(prompt_len),
        prompt_len=state.prompt_len.at[slot].set(prompt_len),
        step=state.step.at[slot].set(0),
        out_counts=put(state.out_counts, jnp.zeros((vocab,), jnp.int32)),
        prompt_counts=put(state.prompt_counts, counts),
        mu=state.mu.at[slot].set(2.0 * rows_one.mirostat_tau[0]),
        top_p=state.top_p.at[slot].set(-1.0),
        ap_sum=state.ap_sum.at[slot].set(0.0),
        ap_weight=state.ap_weight.at[slot].set(0.0),
    )


def append(state: SamplerState, tokens: jax.Array, mu: jax.Array,
           top_p: jax.Array | None = None,
           adaptive: tuple[jax.Array, jax.Array] | None = None) -> SamplerState:
    """Record one sampled token per row (every row; the engine ignores inactive ones).
    out_counts may be wider than the batch (module docstring): its first S rows count."""
    s, max_len = state.history.shape
    rows = jnp.arange(s)
    pos = jnp.minimum(state.length, max_len - 1)
    return state.replace(
        history=state.history.at[rows, pos].set(tokens),
        length=jnp.minimum(state.length + 1, max_len),
        step=state.step + 1,
        out_counts=state.out_counts.at[rows, tokens].add(1),
        mu=mu,
        top_p=state.top_p if top_p is None else top_p,
        ap_sum=state.ap_sum if adaptive is None else adaptive[0],
        ap_weight=state.ap_weight if adaptive is None else adaptive[1],
    )
