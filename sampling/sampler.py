"""The sampler: every stage in a stated order, per-row parameters, per-row keys.

`sample` runs inside the engine's jitted step. Order (SAMPLING.md): hard masks and
logit_bias, repetition -> frequency -> presence, DRY, registered processors, then (T == 0
rows take the argmax of what they have) temperature, top_n_sigma, min_p, top_k, top_p,
typical, epsilon, eta, XTC, mirostat truncation, and the draw. `sampler_order` or
`temperature_last` reorders the stages from penalties on, per row, in a second compiled
variant (`custom_order=True`) that the engine uses only while such a row is active.

Cost: a stage no row uses is skipped at run time (`lax.cond` on "any row enabled"), and a
row that has a stage off keeps its logits bit for bit, so rows never influence each other.
The draw needs one uniform number per row (inverse CDF in two levels: blocks, then the
token inside the block), not a vocabulary of Gumbel noise.

Keys: key(row) = fold_in(fold_in(fold_in(key(seed_hi), seed_lo), sample_index), step),
never a batch key split by position, so a seeded request gives the same tokens alone or
in any batch (batch invariance).

Logprobs: `raw` is the log-softmax of the model's logits before any stage (vLLM's raw
mode; SAMPLING.md's stage list puts the snapshot after the masks and penalties, but its
parameter table and vLLM define raw as before them: we follow the table). `processed` is
the distribution actually sampled from. Logprobs handed out are floored at -9999.0 (JSON
has no -inf); `error` marks a row whose every token was masked.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

from sampling import filters, penalties, registry
from sampling.params import STAGES
from sampling.rows import SamplingRows, processor_args
from sampling.state import SamplerState, append

LOGPROB_FLOOR = -9999.0
_BLOCK = 256


@flax.struct.dataclass
class SampleOutput:
    tokens: jax.Array             # int32 [S]
    logprob: jax.Array            # float32 [S], in the row's logprobs_mode
    raw_logprob: jax.Array
    processed_logprob: jax.Array
    rank: jax.Array               # int32 [S], 1 = most likely under the raw distribution
    top_ids: jax.Array            # int32 [S, K]
    top_logprobs: jax.Array       # float32 [S, K], row's logprobs_mode
    entropy: jax.Array            # float32 [S], of the processed distribution
    error: jax.Array              # bool [S]


def row_keys(rows: SamplingRows, state: SamplerState) -> jax.Array:
    def one(hi, lo, index, step):
        key = jax.random.fold_in(jax.random.key(hi), lo)
        return jax.random.fold_in(jax.random.fold_in(key, index), step)

    return jax.vmap(one)(rows.seed_hi, rows.seed_lo, rows.sample_index, state.step)


def _gated(enabled, fn, logits):
    """Apply fn to the rows in `enabled`; skip it entirely when no row is."""
    return jax.lax.cond(jnp.any(enabled),
                        lambda x: jnp.where(enabled[:, None], fn(x), x),
                        lambda x: x, logits)


def _stages(rows: SamplingRows, state: SamplerState, uniforms):
    """(name, enabled [S], fn) for every reorderable stage, in the default order."""
    procs = registry.registered()

    def run_processors(x):
        for i, proc in enumerate(procs):
            x = _gated(rows.proc_enabled[:, i],
                       lambda y, i=i, proc=proc: proc.fn(y, processor_args(rows, i), state), x)
        return x

    sampling = ~rows.greedy
    with_state = lambda f: (lambda x: f(x, rows, state))
    table = {
        "penalties": ((rows.repetition_penalty != 1.0) | (rows.presence_penalty != 0.0)
                      | (rows.frequency_penalty != 0.0), with_state(penalties.apply_penalties)),
        "dry": (rows.dry_multiplier > 0.0, with_state(penalties.apply_dry)),
        "processors": (jnp.any(rows.proc_enabled, axis=-1), run_processors),
        "temperature": (sampling & ((rows.temperature != 1.0) | (rows.dynatemp_range > 0.0)),
                        with_state(filters.apply_temperature)),
        "top_n_sigma": (sampling & (rows.top_n_sigma > 0.0), with_state(filters.apply_top_n_sigma)),
        "min_p": (sampling & (rows.min_p > 0.0), with_state(filters.apply_min_p)),
        "top_k": (sampling & (rows.top_k > 0), with_state(filters.apply_top_k)),
        "top_p": (sampling & (rows.top_p < 1.0), with_state(filters.apply_top_p)),
        "typical": (sampling & (rows.typical_p < 1.0), with_state(filters.apply_typical)),
        "epsilon": (sampling & (rows.epsilon > 0.0), with_state(filters.apply_epsilon)),
        "eta": (sampling & (rows.eta > 0.0), with_state(filters.apply_eta)),
        "xtc": (sampling & (rows.xtc_probability > 0.0),
                lambda x: filters.apply_xtc(x, rows, state, uniforms[:, 1])),
    }
    return [(name,) + table[name] for name in STAGES]


def process(logits: jax.Array, rows: SamplingRows, state: SamplerState, uniforms,
            custom_order: bool = False) -> jax.Array:
    """All stages up to (not including) mirostat and the draw."""
    logits = logits.astype(jnp.float32)
    logits = _gated(rows.has_bias, lambda x: penalties.apply_bias(x, rows, state), logits)
    logits = _gated(jnp.any(rows.bad_words[:, :, -2] >= 0, axis=-1),
                    lambda x: penalties.ban_bad_word_sequences(x, rows, state), logits)
    logits = _gated(rows.no_repeat_ngram > 0,
                    lambda x: penalties.ban_repeated_ngrams(x, rows, state), logits)
    logits = _gated(state.step < rows.min_tokens,
                    lambda x: penalties.mask_stops_before_min_tokens(x, rows, state), logits)
    stages = _stages(rows, state, uniforms)
    if not custom_order:
        for _, enabled, fn in stages:
            logits = _gated(enabled, fn, logits)
        return logits
    for position in range(len(STAGES)):
        for index, (_, enabled, fn) in enumerate(stages):
            logits = _gated(enabled & (rows.order[:, index] == position), fn, logits)
    return logits


def draw(logits: jax.Array, uniform: jax.Array) -> jax.Array:
    """Inverse-CDF draw with one uniform per row: pick a block of tokens, then a token.

    Never returns a token with probability 0 (a masked token)."""
    s, v = logits.shape
    pad = (-v) % _BLOCK
    p = jax.nn.softmax(logits, axis=-1)
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


def _floor(x):
    return jnp.maximum(jnp.where(jnp.isnan(x), -jnp.inf, x), LOGPROB_FLOOR)


def sample(logits: jax.Array, rows: SamplingRows, state: SamplerState, *, num_top: int = 20,
           custom_order: bool = False) -> tuple[SampleOutput, SamplerState]:
    """Sample one token per row; returns the outputs and the updated sampler state."""
    s, v = logits.shape
    raw = logits.astype(jnp.float32)
    keys = row_keys(rows, state)
    uniforms = jax.vmap(lambda k: jax.random.uniform(k, (2,)))(keys)   # [S, 2]: draw, XTC
    processed = process(raw, rows, state, uniforms, custom_order)
    processed = _gated(rows.mirostat & ~rows.greedy,
                       lambda x: filters.apply_mirostat(x, rows, state.mu), processed)
    error = ~jnp.any(processed > -jnp.inf, axis=-1)
    greedy_tok = jnp.argmax(processed, axis=-1).astype(jnp.int32)
    drawn = jax.lax.cond(jnp.all(rows.greedy), lambda: greedy_tok,
                         lambda: draw(processed, uniforms[:, 0]))
    tokens = jnp.where(rows.greedy, greedy_tok, drawn)
    tokens = jnp.where(error, 0, tokens)

    proc_logp = jax.nn.log_softmax(processed, axis=-1)
    proc_lp = jnp.take_along_axis(proc_logp, tokens[:, None], axis=1)[:, 0]
    want_raw = jnp.any(~rows.logprobs_processed) & (num_top > 0)

    def raw_logp():
        return jax.nn.log_softmax(raw, axis=-1)

    raw_logp_all = jax.lax.cond(want_raw, raw_logp, lambda: proc_logp)
    raw_lp = jnp.take_along_axis(raw_logp_all, tokens[:, None], axis=1)[:, 0]
    rank = 1 + jnp.sum(raw_logp_all > raw_lp[:, None], axis=-1).astype(jnp.int32)
    if num_top > 0:
        chosen = jnp.where(rows.logprobs_processed[:, None], proc_logp, raw_logp_all)
        top_lp, top_ids = jax.lax.top_k(chosen, min(num_top, v))
    else:
        top_lp = jnp.zeros((s, 0), jnp.float32)
        top_ids = jnp.zeros((s, 0), jnp.int32)
    entropy = jax.lax.cond(
        jnp.any(rows.return_entropy),
        lambda: -jnp.sum(jnp.where(proc_logp > -jnp.inf, jnp.exp(proc_logp) * proc_logp, 0.0), -1),
        lambda: jnp.zeros((s,), jnp.float32))

    # mirostat v2: mu <- mu - eta * (observed surprise - tau), on the truncated distribution
    surprise = -proc_lp / math.log(2.0)
    mu = jnp.where(rows.mirostat & ~rows.greedy,
                   state.mu - rows.mirostat_eta * (surprise - rows.mirostat_tau), state.mu)
    logprob = jnp.where(rows.logprobs_processed, proc_lp, raw_lp)
    out = SampleOutput(
        tokens=tokens, logprob=_floor(logprob), raw_logprob=_floor(raw_lp),
        processed_logprob=_floor(proc_lp), rank=rank, top_ids=top_ids.astype(jnp.int32),
        top_logprobs=_floor(top_lp), entropy=entropy, error=error)
    return out, append(state, tokens, mu)
