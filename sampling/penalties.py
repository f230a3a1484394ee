"""History-dependent stages: hard masks, repetition / frequency / presence, DRY, n-grams.

Each function maps [S, V] float32 logits to new logits for every row; the sampler keeps a
row's original logits where the stage is off for it. -inf means "never sample" and stays
-inf through every stage: penalties only scale or subtract finite values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sampling.params import MAX_NGRAM
from sampling.rows import SamplingRows
from sampling.state import SamplerState

NEG_INF = -jnp.inf
# Longest repeat DRY measures; base**(32 - allowed) is already an effective ban.
DRY_MAX_MATCH = 32


def apply_bias(logits, rows: SamplingRows, state: SamplerState):
    """logit_bias plus allowed_token_ids and single-token bad words (as -inf)."""
    return logits + rows.bias


def _tail(state: SamplerState, n: int) -> jax.Array:
    """The last n tokens of each row's history [S, n] (position 0 = oldest); -1 before start."""
    idx = state.length[:, None] - n + jnp.arange(n)[None, :]
    vals = jnp.take_along_axis(state.history, jnp.maximum(idx, 0), axis=1)
    return jnp.where(idx >= 0, vals, -1)


def ban_bad_word_sequences(logits, rows: SamplingRows, state: SamplerState):
    """Ban the last token of a multi-token bad word when the history ends with its prefix."""
    words = rows.bad_words                      # [S, W, L] right-aligned, -1 padded
    length = words.shape[-1]
    tail = _tail(state, length - 1)             # [S, L-1]
    prefix = words[:, :, :-1]
    match = jnp.all((prefix == -1) | (prefix == tail[:, None, :]), axis=-1)
    present = words[:, :, -1] >= 0
    banned = match & present & (words[:, :, -2] >= 0)  # multi-token words only
    rows_idx = jnp.arange(logits.shape[0])[:, None]
    hits = jnp.zeros(logits.shape, bool).at[rows_idx, jnp.maximum(words[:, :, -1], 0)].max(banned)
    return jnp.where(hits, NEG_INF, logits)


def _suffix_match(state: SamplerState, max_match: int, start, breakers=None):
    """For every history position j: how many tokens before j equal the tokens before the end.

    m[s, j] = max m <= max_match with history[j-k] == history[n-k] for k = 1..m, all
    positions >= start, and (if given) none of the matched tokens a sequence breaker."""
    hist = state.history
    s, length = hist.shape
    n = state.length[:, None]
    j = jnp.arange(length)[None, :]
    alive = jnp.ones((s, length), bool)
    count = jnp.zeros((s, length), jnp.int32)
    for k in range(1, max_match + 1):
        src = j - k
        end_tok = jnp.take_along_axis(hist, jnp.maximum(n - k, 0), axis=1)  # [S, 1]
        prev = jnp.take_along_axis(hist, jnp.maximum(src, 0), axis=1)
        ok = (src >= start) & (n - k >= start) & (n - k >= 0) & (prev == end_tok)
        if breakers is not None:
            ok &= ~jnp.any(end_tok[..., None] == breakers[:, None, :], axis=-1)
        alive &= ok
        count += alive.astype(jnp.int32)
    return count


def ban_repeated_ngrams(logits, rows: SamplingRows, state: SamplerState):
    """HF NoRepeatNGram: ban tokens that would complete an n-gram already in the sequence."""
    size = rows.no_repeat_ngram[:, None]
    match = _suffix_match(state, MAX_NGRAM - 1, 0)
    j = jnp.arange(state.history.shape[1])[None, :]
    n = state.length[:, None]
    # n-gram (history[j-size+1..j]) repeats the last size-1 tokens; it needs a full window.
    banned = (match >= size - 1) & (j < n) & (j >= size - 1) & (n >= size - 1)
    rows_idx = jnp.arange(logits.shape[0])[:, None]
    hits = jnp.zeros(logits.shape, bool).at[rows_idx, state.history].max(banned)
    return jnp.where(hits, NEG_INF, logits)


def mask_stops_before_min_tokens(logits, rows: SamplingRows, state: SamplerState):
    """EOS and stop token ids cannot be sampled before min_tokens tokens."""
    active = (state.step < rows.min_tokens)[:, None]
    rows_idx = jnp.arange(logits.shape[0])[:, None]
    stop = rows.min_stop_ids
    hits = jnp.zeros(logits.shape, bool).at[rows_idx, jnp.maximum(stop, 0)].max(
        (stop >= 0) & active)
    return jnp.where(hits, NEG_INF, logits)


def _windowed_counts(state: SamplerState, window, include_prompt):
    """Token counts over the last `window` tokens of the scope (prompt+output or output)."""
    s, length = state.history.shape
    j = jnp.arange(length)[None, :]
    n = state.length[:, None]
    lo = jnp.where(include_prompt[:, None], 0, state.prompt_len[:, None])
    lo = jnp.where(window[:, None] > 0, jnp.maximum(lo, n - window[:, None]), lo)
    valid = (j >= lo) & (j < n)
    rows_idx = jnp.arange(s)[:, None]
    return jnp.zeros(state.out_counts.shape, jnp.int32).at[rows_idx, state.history].add(
        valid.astype(jnp.int32))


def scoped_counts(rows: SamplingRows, state: SamplerState, include_prompt):
    full = state.out_counts + jnp.where(include_prompt[:, None], state.prompt_counts, 0)
    return jax.lax.cond(
        jnp.any(rows.penalty_window > 0),
        lambda: jnp.where(rows.penalty_window[:, None] > 0,
                          _windowed_counts(state, rows.penalty_window, include_prompt), full),
        lambda: full)


def apply_penalties(logits, rows: SamplingRows, state: SamplerState):
    """Repetition (sign-aware, once per distinct token), then frequency, then presence."""
    rep_counts = scoped_counts(rows, state, rows.repetition_prompt)
    r = rows.repetition_penalty[:, None]
    penalized = jnp.where(logits > 0, logits / r, logits * r)
    logits = jnp.where(rep_counts > 0, penalized, logits)
    pf_counts = scoped_counts(rows, state, rows.pf_prompt)
    logits = logits - rows.frequency_penalty[:, None] * pf_counts
    logits = logits - rows.presence_penalty[:, None] * (pf_counts > 0)
    return logits


def apply_dry(logits, rows: SamplingRows, state: SamplerState):
    """llama.cpp DRY: penalise tokens that would extend a repeat of the sequence's end.

    For each earlier position j, m = length of the match between the tokens before j and
    the tokens before the end (not crossing a sequence breaker, within the last
    dry_penalty_last_n tokens); the token at j gets multiplier * base**(m - allowed) when
    m >= allowed_length (the largest m over its occurrences)."""
    n = state.length[:, None]
    last_n = rows.dry_last_n[:, None]
    start = jnp.where(last_n > 0, jnp.maximum(n - last_n, 0), 0)
    match = _suffix_match(state, DRY_MAX_MATCH, start, rows.dry_breakers)
    j = jnp.arange(state.history.shape[1])[None, :]
    allowed = rows.dry_allowed_length[:, None]
    is_breaker = jnp.any(state.history[..., None] == rows.dry_breakers[:, None, :], axis=-1)
    valid = (j >= start) & (j < n) & (match >= allowed) & ~is_breaker
    rows_idx = jnp.arange(logits.shape[0])[:, None]
    longest = jnp.zeros(logits.shape, jnp.int32).at[rows_idx, state.history].max(
        jnp.where(valid, match, 0))
    exponent = (longest - rows.dry_allowed_length[:, None]).astype(jnp.float32)
    penalty = rows.dry_multiplier[:, None] * rows.dry_base[:, None] ** exponent
    return jnp.where(longest > 0, logits - penalty, logits)
