"""Per-row sampling parameters as device arrays.

Every parameter becomes an array with a leading [slots] axis, so a batch of requests with
different temperatures, filters, penalties and seeds is one compiled program: the
sampler never branches on a Python value of a request. A disabled row holds the neutral
value of each stage (temperature 1, top_p 1, no bias...), and `sampler.py` selects per row.

Dense [slots, vocab] arrays are used only for the additive bias (logit_bias plus the hard
masks: allowed ids and single-token bad words as -inf), which is one add in the step.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sampling import registry
from sampling.params import (MAX_BAD_WORD_LEN, MAX_BAD_WORD_SEQUENCES, MAX_DRY_BREAKERS,
                             MAX_STOP_TOKEN_IDS, MAX_TOP_P_RESET_IDS, STAGES, SamplingParams)

NUM_STAGES = len(STAGES)


@flax.struct.dataclass
class SamplingRows:
    seed_hi: jax.Array            # uint32 [S]
    seed_lo: jax.Array            # uint32 [S]
    sample_index: jax.Array       # int32 [S]
    greedy: jax.Array             # bool [S]
    temperature: jax.Array
    top_k: jax.Array              # int32, 0 = off
    top_p: jax.Array
    top_p_decay: jax.Array        # dynamic top-p (1 = off); the current p is in SamplerState
    top_p_min: jax.Array
    top_p_reset_ids: jax.Array    # int32 [S, MAX_TOP_P_RESET_IDS], -1 pad
    min_p: jax.Array
    adaptive_p_target: jax.Array  # adaptive-p (sampling/adaptive_p.py); < 0 = off
    adaptive_p_decay: jax.Array
    min_k: jax.Array              # bool: min-k (sampling/min_k.py)
    min_k_tau: jax.Array
    p_less: jax.Array             # bool: p-less (sampling/min_k.py)
    typical_p: jax.Array
    epsilon: jax.Array
    eta: jax.Array
    top_n_sigma: jax.Array
    xtc_probability: jax.Array
    xtc_threshold: jax.Array
    dynatemp_range: jax.Array
    dynatemp_exponent: jax.Array
    mirostat: jax.Array           # bool [S]
    mirostat_tau: jax.Array
    mirostat_eta: jax.Array
    repetition_penalty: jax.Array
    repetition_prompt: jax.Array  # bool: scope includes the prompt
    presence_penalty: jax.Array
    frequency_penalty: jax.Array
    pf_prompt: jax.Array          # bool: presence/frequency scope includes the prompt
    penalty_window: jax.Array     # int32, 0 = all
    dry_multiplier: jax.Array
    dry_base: jax.Array
    dry_allowed_length: jax.Array
    dry_last_n: jax.Array         # int32, 0 = all, -1 = context
    dry_breakers: jax.Array       # int32 [S, MAX_DRY_BREAKERS], -1 = none
    no_repeat_ngram: jax.Array    # int32
    has_bias: jax.Array           # bool [S]
    bias: jax.Array               # float32 [S, V]: logit_bias + hard masks (-inf)
    bad_words: jax.Array          # int32 [S, MAX_BAD_WORD_SEQUENCES, MAX_BAD_WORD_LEN], right-aligned, -1 pad
    min_tokens: jax.Array         # int32
    min_stop_ids: jax.Array       # int32 [S, MAX_STOP_TOKEN_IDS + 8], -1 pad
    logprobs_processed: jax.Array  # bool
    logprobs_unconstrained: jax.Array  # bool: logprobs_mode "unconstrained"
    counterfactual: jax.Array     # bool: logprobs_mode "unconstrained" or "all"
    return_entropy: jax.Array     # bool
    order: jax.Array              # int32 [S, NUM_STAGES]: position of each stage
    custom_order: jax.Array       # bool [S]
    proc_enabled: jax.Array       # bool [S, P]
    proc_args: jax.Array          # float32 [S, P, A]


def _split_seed(seed: int) -> tuple[int, int]:
    seed &= (1 << 64) - 1
    return seed >> 32, seed & 0xFFFFFFFF


_INT32_FIELDS = ("top_k", "penalty_window", "dry_allowed_length", "dry_penalty_last_n",
                 "no_repeat_ngram_size", "min_tokens")
_INT32 = np.iinfo(np.int32)


def _check_int32(p: SamplingParams) -> None:
    """A ValueError naming the field, not an OverflowError inside the device loop, for a
    value that bypassed `SamplingParams.validate` and does not fit its int32 column."""
    for name in _INT32_FIELDS:
        v = getattr(p, name)
        if not isinstance(v, (int, np.integer)) or not _INT32.min <= v <= _INT32.max:
            raise ValueError(f"{name} must be an integer that fits in int32, got {v!r}")


def make_rows(params: list[SamplingParams | None], vocab_size: int, seeds: list[int],
              sample_indices: list[int], eos_ids=()) -> SamplingRows:
    """Host (numpy) rows for a list of requests; None is a disabled greedy row.

    `eos_ids` are masked, with the request's stop_token_ids, until min_tokens is reached."""
    s = len(params)
    procs = registry.registered()
    n_proc, n_args = max(len(procs), 1), registry.max_args()
    f32 = lambda v: np.full(s, v, np.float32)
    i32 = lambda v: np.full(s, v, np.int32)
    cols = dict(
        seed_hi=np.zeros(s, np.uint32), seed_lo=np.zeros(s, np.uint32), sample_index=i32(0),
        greedy=np.ones(s, bool), temperature=f32(1.0), top_k=i32(0), top_p=f32(1.0),
        top_p_decay=f32(1.0), top_p_min=f32(1e-6),
        top_p_reset_ids=np.full((s, MAX_TOP_P_RESET_IDS), -1, np.int32),
        min_p=f32(0.0), adaptive_p_target=f32(-1.0), adaptive_p_decay=f32(0.9),
        min_k=np.zeros(s, bool), min_k_tau=f32(3.0), p_less=np.zeros(s, bool),
        typical_p=f32(1.0), epsilon=f32(0.0), eta=f32(0.0),
        top_n_sigma=f32(0.0), xtc_probability=f32(0.0), xtc_threshold=f32(0.1),
        dynatemp_range=f32(0.0), dynatemp_exponent=f32(1.0), mirostat=np.zeros(s, bool),
        mirostat_tau=f32(5.0), mirostat_eta=f32(0.1), repetition_penalty=f32(1.0),
        repetition_prompt=np.ones(s, bool), presence_penalty=f32(0.0),
        frequency_penalty=f32(0.0), pf_prompt=np.zeros(s, bool), penalty_window=i32(0),
        dry_multiplier=f32(0.0), dry_base=f32(1.75), dry_allowed_length=i32(2),
        dry_last_n=i32(0), dry_breakers=np.full((s, MAX_DRY_BREAKERS), -1, np.int32),
        no_repeat_ngram=i32(0), has_bias=np.zeros(s, bool),
        bias=np.zeros((s, vocab_size), np.float32),
        bad_words=np.full((s, MAX_BAD_WORD_SEQUENCES, MAX_BAD_WORD_LEN), -1, np.int32),
        min_tokens=i32(0), min_stop_ids=np.full((s, MAX_STOP_TOKEN_IDS + 8), -1, np.int32),
        logprobs_processed=np.zeros(s, bool), logprobs_unconstrained=np.zeros(s, bool),
        counterfactual=np.zeros(s, bool), return_entropy=np.zeros(s, bool),
        order=np.tile(np.arange(NUM_STAGES, dtype=np.int32), (s, 1)),
        custom_order=np.zeros(s, bool), proc_enabled=np.zeros((s, n_proc), bool),
        proc_args=np.zeros((s, n_proc, n_args), np.float32),
    )
    proc_index = {p.name: i for i, p in enumerate(procs)}
    for r, p in enumerate(params):
        if p is None:
            continue
        _check_int32(p)
        if p.use_beam_search:     # never sampled silently instead
            raise ValueError("use_beam_search: beam search runs in serving/beam_search.py "
                             "(LocalModel.beam_search, or the engine's beam path), not in "
                             "the sampler")
        c = cols
        if p.bad_words:   # never ignored silently: strings need the tokenizer first
            raise ValueError("bad_words: strings must become bad_words_ids before the "
                             "sampler (sampling.bad_words.resolve_bad_words)")
        c["seed_hi"][r], c["seed_lo"][r] = _split_seed(int(seeds[r]))
        c["sample_index"][r] = sample_indices[r]
        c["greedy"][r] = p.temperature == 0.0 and p.mirostat_mode == 0
        c["temperature"][r] = p.temperature if p.temperature > 0 else 1.0
        c["top_k"][r] = max(p.top_k, 0)
        c["top_p"][r] = p.top_p
        c["top_p_decay"][r] = p.top_p_decay
        c["top_p_min"][r] = p.top_p_min
        c["top_p_reset_ids"][r, :len(p.top_p_reset_ids)] = p.top_p_reset_ids
        c["min_p"][r] = p.min_p
        c["adaptive_p_target"][r] = p.adaptive_p_target
        c["adaptive_p_decay"][r] = p.adaptive_p_decay
        c["min_k"][r] = p.min_k
        c["min_k_tau"][r] = p.min_k_tau
        c["p_less"][r] = p.p_less
        c["typical_p"][r] = p.typical_p
        c["epsilon"][r] = p.epsilon_cutoff
        c["eta"][r] = p.eta_cutoff
        c["top_n_sigma"][r] = p.top_n_sigma
        c["xtc_probability"][r] = p.xtc_probability
        c["xtc_threshold"][r] = p.xtc_threshold
        c["dynatemp_range"][r] = p.dynatemp_range
        c["dynatemp_exponent"][r] = p.dynatemp_exponent
        c["mirostat"][r] = p.mirostat_mode == 2
        c["mirostat_tau"][r] = p.mirostat_tau
        c["mirostat_eta"][r] = p.mirostat_eta
        c["repetition_penalty"][r] = p.repetition_penalty
        c["repetition_prompt"][r] = p.repetition_penalty_scope == "prompt_and_output"
        c["presence_penalty"][r] = p.presence_penalty
        c["frequency_penalty"][r] = p.frequency_penalty
        c["pf_prompt"][r] = p.presence_frequency_scope == "prompt_and_output"
        c["penalty_window"][r] = p.penalty_window
        c["dry_multiplier"][r] = p.dry_multiplier
        c["dry_base"][r] = p.dry_base
        c["dry_allowed_length"][r] = p.dry_allowed_length
        c["dry_last_n"][r] = p.dry_penalty_last_n
        breakers = p.dry_sequence_breaker_ids or []
        c["dry_breakers"][r, :len(breakers)] = breakers
        c["no_repeat_ngram"][r] = p.no_repeat_ngram_size
        bias = c["bias"][r]
        if p.allowed_token_ids is not None:
            bias[:] = -np.inf
            bias[np.asarray(p.allowed_token_ids)] = 0.0
        for word in p.bad_words_ids:
            if len(word) == 1:
                bias[word[0]] = -np.inf
        for t, b in p.logit_bias.items():
            bias[t] += b
        c["has_bias"][r] = bool(np.any(bias != 0.0))
        multi = [w for w in p.bad_words_ids if len(w) > 1]
        for i, word in enumerate(multi):
            c["bad_words"][r, i, MAX_BAD_WORD_LEN - len(word):] = word
        c["min_tokens"][r] = p.min_tokens
        stops = list(dict.fromkeys(list(p.stop_token_ids) + list(eos_ids)))
        c["min_stop_ids"][r, :len(stops)] = stops[:c["min_stop_ids"].shape[1]]
        c["logprobs_processed"][r] = p.logprobs_mode in ("processed", "all")
        c["logprobs_unconstrained"][r] = p.logprobs_mode == "unconstrained"
        c["counterfactual"][r] = p.logprobs_mode in ("unconstrained", "all")
        c["return_entropy"][r] = p.return_entropy
        if p.sampler_order is not None or p.temperature_last:
            order = p.order()
            position = {stage: i for i, stage in enumerate(order)}
            # stages left out of a custom order are disabled: position NUM_STAGES
            c["order"][r] = [position.get(stage, NUM_STAGES) for stage in STAGES]
            c["custom_order"][r] = True
        for spec in p.logits_processors:
            proc = procs[proc_index[spec["name"]]]
            j = proc_index[spec["name"]]
            c["proc_enabled"][r, j] = True
            args = dict(proc.params, **(spec.get("args") or {}))
            c["proc_args"][r, j, :len(args)] = [args[k] for k in proc.params]
    return SamplingRows(**cols)


def set_row(rows: SamplingRows, slot, one: SamplingRows) -> SamplingRows:
    """Write the one-row `one` into row `slot` (jit-friendly; slot may be traced)."""
    return jax.tree.map(
        lambda full, new: jax.lax.dynamic_update_slice_in_dim(full, new.astype(full.dtype),
                                                              slot, axis=0), rows, one)


def processor_args(rows: SamplingRows, index: int) -> dict:
    """The [S] argument arrays of registered processor number `index`, by name."""
    proc = registry.registered()[index]
    return {name: rows.proc_args[:, index, k] for k, name in enumerate(proc.params)}


def to_device(rows: SamplingRows) -> SamplingRows:
    return jax.tree.map(jnp.asarray, rows)
