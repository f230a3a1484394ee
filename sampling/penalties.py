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
from sampling.state import SamplerState, batch_view

NEG_INF = -jnp.inf
# llama.cpp's FLOAT_MAX_LOG: DRY's exponent stops where base ** e would overflow float32.
_FLOAT_MAX_LOG = 88.7228391


def apply_bias(logits, rows: SamplingRows, state: SamplerState):
    """logit_bias plus allowed_token_ids and single-token bad words (as -inf). `rows.bias`
    may have more rows than the batch (sampling/state.py `batch_view`): the first S count."""
    return logits + rows.bias[:logits.shape[0]]


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

    def body(k, carry):
        alive, count = carry
        src = j - k
        end_tok = jnp.take_along_axis(hist, jnp.maximum(n - k, 0), axis=1)  # [S, 1]
        prev = jnp.take_along_axis(hist, jnp.maximum(src, 0), axis=1)
        ok = (src >= start) & (n - k >= start) & (n - k >= 0) & (prev == end_tok)
        if breakers is not None:
            ok &= ~jnp.any(end_tok[..., None] == breakers[:, None, :], axis=-1)
        alive &= ok
        return alive, count + alive.astype(jnp.int32)

    init = (jnp.ones((s, length), bool), jnp.zeros((s, length), jnp.int32))
    _, count = jax.lax.fori_loop(1, max_match + 1, body, init)
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
    return jnp.zeros((s, state.out_counts.shape[1]), jnp.int32).at[
        rows_idx, state.history].add(valid.astype(jnp.int32))


def scoped_counts(rows: SamplingRows, state: SamplerState, include_prompt,
                  windowed: bool = True):
    """windowed=False (a lean sampler program): no row has a penalty_window."""
    state = batch_view(state, include_prompt.shape[0])
    full = state.out_counts + jnp.where(include_prompt[:, None], state.prompt_counts, 0)
    if not windowed:
        return full
    return jax.lax.cond(
        jnp.any(rows.penalty_window > 0),
        lambda: jnp.where(rows.penalty_window[:, None] > 0,
                          _windowed_counts(state, rows.penalty_window, include_prompt), full),
        lambda: full)


def apply_penalties(logits, rows: SamplingRows, state: SamplerState, windowed: bool = True):
    """Repetition (sign-aware, once per distinct token), then frequency, then presence."""
    rep_counts = scoped_counts(rows, state, rows.repetition_prompt, windowed)
    r = rows.repetition_penalty[:, None]
    penalized = jnp.where(logits > 0, logits / r, logits * r)
    logits = jnp.where(rep_counts > 0, penalized, logits)
    pf_counts = scoped_counts(rows, state, rows.pf_prompt, windowed)
    logits = logits - rows.frequency_penalty[:, None] * pf_counts
    logits = logits - rows.presence_penalty[:, None] * (pf_counts > 0)
    return logits


def apply_dry(logits, rows: SamplingRows, state: SamplerState):
    """llama.cpp DRY ("don't repeat yourself"), exactly its rule with single-token breakers.

    Within the last dry_penalty_last_n tokens of prompt + output (0 or -1: all of them),
    for every earlier position j, L(j) = how many tokens ending at j equal the tokens
    ending the history (compared inside the window only), capped at the number of tokens
    since the last sequence breaker. The token that followed j would extend a repeat of
    length L(j): if L >= allowed_length it gets multiplier * base ** (L - allowed_length)
    subtracted (exponent capped where base ** e overflows float32, as llama.cpp), taking
    the largest L per token. Breaker tokens are never penalised, and nothing is when the
    history ends on a breaker. The engine resolves each breaker string to every token whose
    text contains it (`dry_breaker_ids`).

    Match lengths grow one token per while-loop iteration, which stops when no
    (row, position) still matches or at the longest length that can still change a
    penalty, so the cost follows the repeats actually present."""
    hist, length = state.history, state.length
    s, max_len = hist.shape
    enabled = rows.dry_multiplier > 0
    base, allowed = rows.dry_base, rows.dry_allowed_length
    window = jnp.where(rows.dry_last_n > 0, jnp.minimum(rows.dry_last_n, length), length)
    pos = jnp.arange(max_len)[None, :]
    back = length[:, None] - 1 - pos                                   # distance from the end
    breakers = rows.dry_breakers
    tok_is_breaker = jnp.any(hist[..., None] == jnp.where(breakers < 0, -2, breakers)[:, None, :],
                             axis=-1)
    in_window = (back >= 0) & (back < window[:, None])
    rep_limit = jnp.min(jnp.where(tok_is_breaker & in_window, back, window[:, None]), axis=-1)
    max_exp = jnp.where(base > 1.000001,
                        jnp.floor(_FLOAT_MAX_LOG / jnp.log(jnp.maximum(base, 1.000001))), 0.0)
    useful = jnp.where(max_exp > 0, allowed + max_exp.astype(jnp.int32), window)
    cap = jnp.minimum(rep_limit, useful)
    active = enabled & (window > allowed) & (rep_limit >= allowed)
    k = jnp.arange(1, max_len + 1)[None, :]                            # offset from the end
    live0 = active[:, None] & (k < window[:, None])
    bound = jnp.max(jnp.where(active, cap, 0))

    def cond(carry):
        m, live, _ = carry
        return (m < bound) & jnp.any(live)

    def body(carry):
        m, live, run = carry
        a = jnp.take_along_axis(hist, jnp.clip(length - 1 - m, 0, max_len - 1)[:, None], axis=1)
        b = jnp.take_along_axis(hist, jnp.clip(length[:, None] - 1 - m - k, 0, max_len - 1), axis=1)
        live = live & (m + k < window[:, None]) & (a == b) & (m < cap[:, None])
        return m + 1, live, run + live.astype(jnp.int32)

    _, _, run = jax.lax.while_loop(
        cond, body, (jnp.int32(0), live0, jnp.zeros((s, max_len), jnp.int32)))
    nxt = jnp.take_along_axis(hist, jnp.clip(length[:, None] - k, 0, max_len - 1), axis=1)
    rows_idx = jnp.arange(s)[:, None]
    longest = jnp.zeros(logits.shape, jnp.int32).at[rows_idx, nxt].max(jnp.where(live0, run, 0))
    vocab_breaker = jnp.zeros(logits.shape, bool).at[rows_idx, jnp.maximum(breakers, 0)].max(
        breakers >= 0)
    exponent = (longest - allowed[:, None]).astype(jnp.float32)
    exponent = jnp.where(max_exp[:, None] > 0, jnp.minimum(exponent, max_exp[:, None]), exponent)
    penalty = rows.dry_multiplier[:, None] * jnp.power(base[:, None], exponent)
    hit = (longest >= allowed[:, None]) & (longest > 0) & ~vocab_breaker & active[:, None]
    return jnp.where(hit, logits - penalty, logits)


def dry_breaker_ids(breakers: list[str], token_texts: list[str]) -> list[int]:
    """Token ids whose text contains a breaker string, for
    SamplingParams.dry_sequence_breaker_ids (the engine passes its decoded vocabulary)."""
    return [i for i, text in enumerate(token_texts) if any(b and b in text for b in breakers)]
