"""The sampler: one pure, jittable function from a batch of logits to sampled tokens.

`sample(logits [S, V], rows, state)` runs SAMPLING.md's stages in order, per row:

 1. hard masks (allowed_token_ids, single-token bad words via the row's bias; multi-token
    bad words, no_repeat_ngram, min_tokens; an optional caller mask, e.g. a grammar)
 2. logit_bias (the same [S, V] add as the single-token masks)
 3. penalties (repetition -> frequency -> presence), then DRY
 4. registered processors (sampling/registry.py), in name order
 5-6. T == 0 rows: argmax of the logits after 1-4, no division, no warpers
 7. min-k (before temperature, as its paper does; sampling/min_k.py), then temperature
    (or dynamic temperature)
 8. top_n_sigma -> min_p -> p_less -> top_k -> top_p -> typical -> epsilon -> eta (top_p
    of a row with top_p_decay < 1 is its current, decayed p: sampling/dynamic_top_p.py)
 9. XTC, then adaptive-p (always last, not reorderable: sampling/adaptive_p.py)
 10. processed snapshot; 11. draw: inverse CDF with one uniform from the row's own key (or mirostat v2)

A row's `sampler_order` (or `temperature_last`) reorders stages 3-9 for that row only; the
rows that keep the default order take a straight-line path, the others a loop over stage
positions, so one compiled program serves both. Every stage is skipped with a batch-level
`lax.cond` when no row enabled it, so a row with everything off costs a plain draw.

Randomness (trap 1): the key of a row is
    fold_in(fold_in(fold_in(fold_in(key(0), seed_hi), seed_lo), sample_index), step)
with the 64-bit seed split in two uint32 halves; the draw uses fold_in(key, 0), XTC's coin
fold_in(key, 1). Nothing depends on the row's position or on the other rows.

Logprobs (trap 4): `raw` is log_softmax of the logits given to `sample` (the model's
distribution, before masks, bias, penalties and warpers); `processed` is the distribution
actually sampled from (after every stage and mirostat's truncation; for greedy rows the
logits after stages 1-4). `rank` is 1 + the number of tokens with a higher raw logit.
JSON has no -inf: every logprob field of `SampleOutput` is floored at LOGPROB_FLOOR
(-9999.0) here, in `_floor`, so -inf (a masked token) and NaN come out as -9999.0.

Errors (trap 6): a row whose logits are all -inf after the masks (or contain NaN) gets
error=True, token 0 and floored logprobs; the other rows are unaffected.

Lean programs (`lean=True`, static): only the common stages are traced (the caller mask
and the bias add, min_tokens, repetition / frequency / presence penalties without a
window, temperature, min_p, top_k, top_p, the draw, raw or processed logprobs and the top
logprobs). Tracing and lowering the whole library costs seconds at every start, even with
a warm compilation cache, so the engine runs a lean program while no live row needs more
(`needs_full`, decided on the host from the rows) and the full one otherwise. For a row
that only uses lean stages both give bitwise the same tokens, logprobs and state: the lean
program is the full one with the skipped stages' `lax.cond`s taken as false.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sampling import (adaptive_p, counterfactual, dynamic_top_p, filters, min_k, penalties,
                      registry)
from sampling.params import STAGES
from sampling.rows import NUM_STAGES, SamplingRows, processor_args
from sampling.state import SamplerState, append, batch_view

LOGPROB_FLOOR = -9999.0
_BLOCK = 256  # tokens per block of the two-level draw
_STAGE_INDEX = {name: i for i, name in enumerate(STAGES)}
# the reorderable stages a lean program traces (penalties without a window, temperature
# without dynatemp: see `needs_full`)
LEAN_STAGES = ("penalties", "temperature", "min_p", "top_k", "top_p")


@flax.struct.dataclass
class SampleOutput:
    tokens: jax.Array             # int32 [S]
    logprob: jax.Array            # float32 [S]: sampled token, in the row's logprobs_mode
    raw_logprob: jax.Array        # float32 [S]
    processed_logprob: jax.Array  # float32 [S]
    rank: jax.Array               # int32 [S]: 1 = most likely under the raw distribution
    top_ids: jax.Array            # int32 [S, K]: in the row's logprobs_mode
    top_logprobs: jax.Array       # float32 [S, K]
    entropy: jax.Array            # float32 [S]: nats, of the row's logprobs_mode distribution
    error: jax.Array              # bool [S]: every token was masked (token 0, never NaN)
    # counterfactual rows (logprobs_mode "unconstrained" / "all"; sampling/counterfactual.py):
    unconstrained_logprob: jax.Array | None = None  # float32 [S]: stages 1-9 without `mask`
    removed_mass: jax.Array | None = None           # float32 [S]: mass `mask` took from it


def _floor(x: jax.Array) -> jax.Array:
    """The one place the -9999.0 floor is applied (JSON has no -inf)."""
    return jnp.where(jnp.isnan(x) | (x < LOGPROB_FLOOR), LOGPROB_FLOOR, x)


def _gated(enabled: jax.Array, fn, x: jax.Array) -> jax.Array:
    """fn(x) on the enabled rows; skipped entirely (one cheap any()) when none is."""
    return jax.lax.cond(jnp.any(enabled),
                        lambda y: jnp.where(enabled[:, None], fn(y), y),
                        lambda y: y, x)


def row_keys(rows: SamplingRows, step: jax.Array) -> jax.Array:
    """One PRNG key per row from (seed, sample index, step) only."""
    def one(hi, lo, index, st):
        k = jax.random.fold_in(jax.random.key(0), hi)
        k = jax.random.fold_in(k, lo)
        k = jax.random.fold_in(k, index)
        return jax.random.fold_in(k, st)
    return jax.vmap(one)(rows.seed_hi, rows.seed_lo, rows.sample_index, step)


# -- the reorderable stages (3-9) ----------------------------------------------------------------
# name -> (enabled(rows) -> [S] bool, apply(x, rows, state, keys) -> x over the whole batch)

def _processors(x, rows, state, keys):
    state = batch_view(state, x.shape[0])     # a processor sees [S, V] counts
    for j, proc in enumerate(registry.registered()):
        args = processor_args(rows, j)
        x = _gated(rows.proc_enabled[:, j], lambda y, f=proc.fn, a=args: f(y, a, state), x)
    return x


def _processors_on(rows):
    xp = np if isinstance(rows.proc_enabled, np.ndarray) else jnp   # needs_full: host
    if not registry.registered():
        return xp.zeros(rows.greedy.shape, bool)
    return xp.any(rows.proc_enabled, axis=-1)


def _xtc(x, rows, state, keys):
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1)))(keys)
    return filters.apply_xtc(x, rows, state, u)


def _sampling(rows):
    return ~rows.greedy


_STAGES = {
    "penalties": (lambda r: (r.repetition_penalty != 1.0) | (r.frequency_penalty != 0.0)
                  | (r.presence_penalty != 0.0),
                  lambda x, r, s, k: penalties.apply_penalties(x, r, s)),
    "dry": (lambda r: r.dry_multiplier > 0.0,
            lambda x, r, s, k: penalties.apply_dry(x, r, s)),
    "processors": (_processors_on, _processors),
    "min_k": (lambda r: _sampling(r) & r.min_k,
              lambda x, r, s, k: min_k.apply_min_k(x, r, s)),
    "temperature": (lambda r: _sampling(r) & ((r.temperature != 1.0) | (r.dynatemp_range > 0.0)),
                    lambda x, r, s, k: filters.apply_temperature(x, r, s)),
    "top_n_sigma": (lambda r: _sampling(r) & (r.top_n_sigma > 0.0),
                    lambda x, r, s, k: filters.apply_top_n_sigma(x, r, s)),
    "min_p": (lambda r: _sampling(r) & (r.min_p > 0.0),
              lambda x, r, s, k: filters.apply_min_p(x, r, s)),
    "p_less": (lambda r: _sampling(r) & r.p_less,
               lambda x, r, s, k: min_k.apply_p_less(x, r, s)),
    "top_k": (lambda r: _sampling(r) & (r.top_k > 0),
              lambda x, r, s, k: filters.apply_top_k(x, r, s)),
    "top_p": (lambda r: _sampling(r) & (r.top_p < 1.0),
              lambda x, r, s, k: filters.apply_top_p(x, r, s)),
    "typical": (lambda r: _sampling(r) & (r.typical_p < 1.0),
                lambda x, r, s, k: filters.apply_typical(x, r, s)),
    "epsilon": (lambda r: _sampling(r) & (r.epsilon > 0.0),
                lambda x, r, s, k: filters.apply_epsilon(x, r, s)),
    "eta": (lambda r: _sampling(r) & (r.eta > 0.0),
            lambda x, r, s, k: filters.apply_eta(x, r, s)),
    "xtc": (lambda r: _sampling(r) & (r.xtc_probability > 0.0), _xtc),
}
assert tuple(_STAGES) == STAGES
# a lean program's penalties (no row has a window) and temperature (no dynatemp row)
_LEAN_FNS = {
    "penalties": lambda x, r, s, k: penalties.apply_penalties(x, r, s, windowed=False),
    "temperature": lambda x, r, s, k: filters.apply_temperature(x, r, s, dynatemp=False),
}


def needs_full(rows: SamplingRows) -> np.ndarray:
    """bool [S]: the rows a lean program cannot sample (host numpy rows, from make_rows):
    any stage outside LEAN_STAGES, a penalty window, dynatemp, a decaying top-p, multi-token
    bad words, no_repeat_ngram, mirostat, adaptive-p, counterfactual logprobs, entropy, a
    custom stage order."""
    r = jax.tree.map(np.asarray, rows)
    need = ((r.penalty_window > 0) & np.asarray(_STAGES["penalties"][0](r))) | (
        r.dynatemp_range > 0.0) | dynamic_top_p.dynamic(r)
    need |= np.any(r.bad_words[:, :, -2] >= 0, axis=-1) | (r.no_repeat_ngram > 0)
    need |= r.mirostat | np.asarray(adaptive_p.enabled(r)) | r.counterfactual
    need |= r.logprobs_unconstrained | r.return_entropy | r.custom_order
    for name, (on, _fn) in _STAGES.items():
        if name not in LEAN_STAGES:
            need |= np.asarray(on(r), bool)
    return need


def _run_stages(x, rows: SamplingRows, state: SamplerState, keys, custom_order: bool,
                lean: bool = False) -> jax.Array:
    default_rows = ~rows.custom_order
    for name in STAGES:
        on, fn = _STAGES[name]
        if lean:
            if name not in LEAN_STAGES:
                continue
            fn = _LEAN_FNS.get(name, fn)
        x = _gated(on(rows) & default_rows, lambda y, f=fn: f(y, rows, state, keys), x)
    if not custom_order or lean:
        return x

    def custom(y):
        def body(position, z):
            for name in STAGES:
                on, fn = _STAGES[name]
                here = rows.custom_order & (rows.order[:, _STAGE_INDEX[name]] == position)
                z = _gated(on(rows) & here, lambda w, f=fn: f(w, rows, state, keys), z)
            return z
        return jax.lax.fori_loop(0, NUM_STAGES, body, y)

    return jax.lax.cond(jnp.any(rows.custom_order), custom, lambda y: y, x)


def _hard_masks(x, rows: SamplingRows, state: SamplerState, mask, lean: bool = False
                ) -> jax.Array:
    x = jax.lax.cond(jnp.any(rows.has_bias), lambda y: penalties.apply_bias(y, rows, state),
                     lambda y: y, x)
    if not lean:
        x = _gated(jnp.any(rows.bad_words[:, :, -2] >= 0, axis=-1),
                   lambda y: penalties.ban_bad_word_sequences(y, rows, state), x)
        x = _gated(rows.no_repeat_ngram > 0,
                   lambda y: penalties.ban_repeated_ngrams(y, rows, state), x)
    x = _gated(state.step < rows.min_tokens,
               lambda y: penalties.mask_stops_before_min_tokens(y, rows, state), x)
    if mask is not None:
        x = jnp.where(mask, x, -jnp.inf)
    return x


def _top(lp: jax.Array, num_top: int):
    s = lp.shape[0]
    if num_top == 0:
        return jnp.zeros((s, 0), jnp.int32), jnp.zeros((s, 0), jnp.float32)
    vals, ids = jax.lax.top_k(lp, num_top)
    return ids.astype(jnp.int32), vals


def process_logits(logits: jax.Array, rows: SamplingRows, state: SamplerState, *,
                   mask: jax.Array | None = None, custom_order: bool = True) -> jax.Array:
    """Stages 1-9 without the draw: the logits each row samples from (after adaptive-p,
    before mirostat's truncation); for greedy rows the logits after stages 1-4. Removed
    tokens are -inf."""
    x = _truncated(logits, rows, state, mask=mask, custom_order=custom_order)
    return adaptive_p.apply(x, rows, state)


def _truncated(logits: jax.Array, rows: SamplingRows, state: SamplerState, *,
               mask: jax.Array | None = None, custom_order: bool = True,
               lean: bool = False) -> jax.Array:
    """Stages 1-9 but adaptive-p (whose EMA needs the probabilities before it)."""
    logits = logits.astype(jnp.float32)
    logits = jnp.where(jnp.isnan(logits), -jnp.inf, logits)
    keys = row_keys(rows, state.step)
    if not lean:     # lean rows never decay: their current p is their top_p
        rows = rows.replace(top_p=dynamic_top_p.current(rows, state))   # decayed top_p rows
    x = _hard_masks(logits, rows, state, mask, lean)
    return _run_stages(x, rows, state, keys, custom_order, lean)

def first_max(x: jax.Array, top: jax.Array | None = None) -> jax.Array:
    """argmax over the last axis (the first of tied maxima) as a max and a min-index: two
    plain reductions, which XLA's CPU backend runs ~6x faster than its argmax reduction at
    [32, 32000]. `top`: max(x, axis=-1) when the caller has it (one pass fewer)."""
    top = jnp.max(x, axis=-1, keepdims=True) if top is None else top[..., None]
    index = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(x == top, index, x.shape[-1] - 1), axis=-1)


def draw(logits: jax.Array, uniform: jax.Array) -> jax.Array:
    """Inverse-CDF draw with one uniform per row: pick a block of tokens, then a token.

    Never returns a token with probability 0 (a masked token)."""
    s, v = logits.shape
    pad = (-v) % _BLOCK
    # unnormalised weights: the target is scaled by their total instead (one pass fewer)
    p = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    p = jnp.pad(p, ((0, 0), (0, pad))).reshape(s, -1, _BLOCK)
    block_mass = jnp.sum(p, axis=-1)                                   # [S, B]
    cum = jnp.cumsum(block_mass, axis=-1)
    target = uniform * cum[:, -1]
    nonzero_block = block_mass > 0
    last_block = jnp.max(jnp.where(nonzero_block, jnp.arange(cum.shape[1]), 0), axis=-1)
    block = jnp.minimum(jnp.sum(cum <= target[:, None], axis=-1), last_block)
    inside = jnp.take_along_axis(p, block[:, None, None], axis=1)[:, 0]  # [S, BLOCK]
    before = jnp.take_along_axis(cum - block_mass, block[:, None], axis=1)[:, 0]
    inner_cum = jnp.cumsum(inside, axis=-1)
    last_token = jnp.max(jnp.where(inside > 0, jnp.arange(_BLOCK), 0), axis=-1)
    token = jnp.minimum(jnp.sum(inner_cum <= (target - before)[:, None], axis=-1), last_token)
    return (block * _BLOCK + token).astype(jnp.int32)


def sample(logits: jax.Array, rows: SamplingRows, state: SamplerState, *, num_top: int = 20,
           mask: jax.Array | None = None, custom_order: bool = True, lean: bool = False
           ) -> tuple[SampleOutput, SamplerState]:
    """Sample one token per row and advance the state. Pure and jittable (num_top,
    custom_order and lean static).

    `mask` (optional, bool [S, V]) is an extra hard mask, True = allowed (grammars).
    `custom_order=False` compiles without the per-row sampler_order path (rows asking for
    one then run the default order). `lean=True` traces only the common stages (module
    docstring; rows where `needs_full` is true then get a plain sampler's answer).

    `state`'s count arrays and `rows.bias` may have more rows than `logits` (an engine's
    whole [slots, V] arrays for a batch of its first S slots; sampling/state.py): the
    stages that read them take the first S rows, and the returned state's out_counts is
    then the whole array with those rows' tokens counted."""
    logits = logits.astype(jnp.float32)
    s, v = logits.shape
    nan_row = jnp.any(jnp.isnan(logits), axis=-1)
    logits = jnp.where(jnp.isnan(logits), -jnp.inf, logits)
    keys = row_keys(rows, state.step)
    before_adaptive = _truncated(logits, rows, state, mask=mask, custom_order=custom_order,
                                 lean=lean)
    x = before_adaptive
    mirostat = rows.mirostat & ~rows.greedy
    if not lean:
        x = adaptive_p.apply(before_adaptive, rows, state)
        x = _gated(mirostat, lambda y: filters.apply_mirostat(y, rows, state.mu), x)

    top_x = jnp.max(x, axis=-1)
    error = nan_row | ~jnp.isfinite(top_x)
    sampling = ~rows.greedy

    zeros = jnp.zeros((s,), jnp.int32)
    greedy_tokens = jax.lax.cond(jnp.any(rows.greedy), lambda: first_max(x, top_x),
                                 lambda: zeros)
    uniform = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 0)))(keys)
    drawn = jax.lax.cond(jnp.any(sampling), lambda: draw(x, uniform), lambda: zeros)
    tokens = jnp.where(error, 0, jnp.where(sampling, drawn, greedy_tokens))

    raw_lse = jax.nn.logsumexp(logits, axis=-1)
    proc_lse = jax.nn.logsumexp(x, axis=-1)
    pick = lambda a: jnp.take_along_axis(a, tokens[:, None], axis=-1)[:, 0]
    raw_tok = pick(logits)
    raw_lp = raw_tok - raw_lse
    proc_lp = pick(x) - proc_lse
    rank = 1 + jnp.sum(logits > raw_tok[:, None], axis=-1).astype(jnp.int32)

    processed = rows.logprobs_processed
    if lean:    # no counterfactual, unconstrained-mode or entropy rows
        unc_lp, removed = proc_lp, jnp.zeros((s,), jnp.float32)
        mode_x = jnp.where(processed[:, None], x, logits)
        mode_lse = jnp.where(processed, proc_lse, raw_lse)[:, None]
        unc_mode = jnp.zeros((s,), bool)
    else:
        unc_x, unc_lp, removed = counterfactual.unconstrained(
            lambda: process_logits(logits, rows, state, mask=None, custom_order=custom_order),
            rows.counterfactual, mask, x, tokens)
        unc_lse = jax.nn.logsumexp(unc_x, axis=-1)
        unc_mode = rows.logprobs_unconstrained
        mode_x = jnp.where(processed[:, None], x, jnp.where(unc_mode[:, None], unc_x, logits))
        mode_lse = jnp.where(processed, proc_lse, jnp.where(unc_mode, unc_lse, raw_lse))[:, None]
    top_ids, top_x = _top(mode_x, num_top)      # the order of x is the order of x - lse
    top_lp = top_x - mode_lse

    ent = jnp.zeros((s,)) if lean else jax.lax.cond(
        jnp.any(rows.return_entropy),
        lambda: filters.entropy(mode_x, mode_lse)[:, 0], lambda: jnp.zeros((s,)))

    # mirostat v2: mu -= eta * (surprise of the sampled token - tau), surprise in bits under
    # the truncated, renormalised distribution
    surprise = -proc_lp / math.log(2.0)
    mu = state.mu if lean else jnp.where(
        mirostat & ~error, state.mu - rows.mirostat_eta * (surprise - rows.mirostat_tau),
        state.mu)

    err = lambda a: jnp.where(error, LOGPROB_FLOOR, _floor(a))
    out = SampleOutput(
        tokens=tokens,
        logprob=err(jnp.where(processed, proc_lp, jnp.where(unc_mode, unc_lp, raw_lp))),
        raw_logprob=err(raw_lp),
        processed_logprob=err(proc_lp),
        rank=jnp.where(error, 0, rank),
        top_ids=top_ids,
        top_logprobs=jnp.where(error[:, None], LOGPROB_FLOOR, _floor(top_lp)),
        entropy=jnp.where(error | jnp.isnan(ent), 0.0, ent),
        error=error,
        unconstrained_logprob=err(unc_lp),
        removed_mass=jnp.where(error, 0.0, removed),
    )
    if lean:    # no decaying top-p (its p stays -1) and no adaptive-p row
        return out, append(state, tokens, mu)
    top_p_next = dynamic_top_p.advance(rows, dynamic_top_p.current(rows, state), tokens)
    # adaptive-p's EMA takes the drawn token's probability before its transform
    original_p = jax.lax.cond(
        jnp.any(adaptive_p.enabled(rows)),
        lambda: jnp.exp(pick(before_adaptive) - jax.nn.logsumexp(before_adaptive, axis=-1)),
        lambda: jnp.zeros((s,), jnp.float32))
    adaptive = adaptive_p.advance(rows, state, original_p, error)
    return out, append(state, tokens, mu, top_p_next, adaptive)


def score_tokens(logits: jax.Array, targets: jax.Array, *, num_top: int = 0):
    """Prompt logprobs (scoring): for logits [T, V] and the next tokens [T], the raw
    logprob and rank of each target and the top-N raw logprobs, floored like `sample`."""
    logits = logits.astype(jnp.float32)
    lp = jax.nn.log_softmax(logits, axis=-1)
    tok = jnp.take_along_axis(lp, targets[:, None], axis=-1)[:, 0]
    rank = 1 + jnp.sum(lp > tok[:, None], axis=-1).astype(jnp.int32)
    if num_top:
        vals, ids = jax.lax.top_k(lp, num_top)
    else:
        vals, ids = jnp.zeros((lp.shape[0], 0)), jnp.zeros((lp.shape[0], 0), jnp.int32)
    return _floor(tok), rank, ids.astype(jnp.int32), _floor(vals)
